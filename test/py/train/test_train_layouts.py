"""Equal results for any layout of the same global batch: 2 ranks with EP 1 and EP 2, 1 rank
accumulating 2 micro-batches (gloo ranks as processes)."""

import json
from pathlib import Path

import pytest

from rank_procs import run_ranks
from synthetic import Progressions, model_dict

WORKER = Path(__file__).with_name("train_layout_worker.py")


def one_rank_accumulating(tmp_path):
    from ampipe.model.config import ModelConfig
    from ampipe.train.config import TrainConfig
    from ampipe.train.loop import Trainer

    mc = ModelConfig.from_dict(model_dict())
    tc = TrainConfig(steps=6, lr=3e-3, min_lr=3e-4, warmup_steps=2, global_batch_size=4, eval_interval=3,
                     eval_iters=1, checkpoint_interval=100)
    events = []
    t = Trainer(model_cfg=mc, train_cfg=tc, run_dir=tmp_path, train_data=Progressions(mc.seq_length, 64),
                valid_data=Progressions(mc.seq_length, 64, offset=10**6), seed=7,
                emit=lambda kind, **f: events.append((kind, f)), tensorboard=False, say=lambda s: None)
    assert t.micro == 2
    t.run()
    return {"train": [f["loss"] for k, f in events if k == "metric" and f["name"] == "train_step"],
            "eval": [f["loss"] for k, f in events if k == "metric" and f["name"] == "eval"]}


@pytest.mark.slow
def test_layouts_of_one_global_batch_give_one_loss_curve(tmp_path):
    ref = one_rank_accumulating(tmp_path / "one")
    for ep in (1, 2):
        (tmp_path / f"ep{ep}").mkdir()
        out = run_ranks(WORKER, 2, tmp_path / f"ep{ep}", ["--ep", str(ep)])
        got = json.loads(out[0].strip().splitlines()[-1])
        assert len(got["train"]) == 6 and len(got["eval"]) == 2
        assert got["train"] == pytest.approx(ref["train"], abs=1e-5, rel=0), (ep, got, ref)
        assert got["eval"] == pytest.approx(ref["eval"], abs=1e-5, rel=0), (ep, got, ref)
