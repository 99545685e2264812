"""One rank of test_train_layouts: trains the tiny model with the given EP size; rank 0 prints the losses."""

import json
import tempfile

from rank_procs import gloo_rank

with gloo_rank(lambda ap: (ap.add_argument("--ep", type=int, required=True),
                           ap.add_argument("--plan", default=None))) as args:
    from ampipe.model.config import ModelConfig
    from ampipe.parallel.groups import init_parallel_groups
    from ampipe.train.config import TrainConfig
    from ampipe.train.loop import Trainer
    from synthetic import Progressions, fixture_plan, model_dict

    groups = init_parallel_groups(args.ep)
    mc = ModelConfig.from_dict(model_dict())
    tc = TrainConfig(steps=6, lr=3e-3, min_lr=3e-4, warmup_steps=2, global_batch_size=4, eval_interval=3,
                     eval_iters=1, checkpoint_interval=100)
    events = []
    t = Trainer(model_cfg=mc, train_cfg=tc, run_dir=tempfile.mkdtemp(), train_data=Progressions(mc.seq_length, 64),
                valid_data=Progressions(mc.seq_length, 64, offset=10**6), seed=7, groups=groups,
                plan=fixture_plan(args.plan) if args.plan else None,
                emit=lambda kind, **f: events.append((kind, f)), tensorboard=False, say=lambda s: None)
    t.run()
    if args.rank == 0:
        print(json.dumps({"train": [f["loss"] for k, f in events if k == "metric" and f["name"] == "train_step"],
                          "eval": [f["loss"] for k, f in events if k == "metric" and f["name"] == "eval"]}))
