"""The training loop (ampipe.train.loop.Trainer) on one process, with a synthetic token source."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from ampipe.model.config import ConfigError, ModelConfig
from ampipe.pipeline import AMPipeBlock
from ampipe.train.checkpoint import MANIFEST, checkpoint_dir
from ampipe.train.config import TrainConfig
from ampipe.train.loop import Trainer, micro_batches_per_rank, sample_indices
from synthetic import Progressions, fixture_plan, model_dict


def trainer(tmp_path, *, plan=None, steps=12, stop_after=None, model=None, **train):
    mc = ModelConfig.from_dict(model or model_dict())
    tc = TrainConfig(**{"steps": steps, "lr": 3e-3, "min_lr": 3e-4, "warmup_steps": 2, "global_batch_size": 4,
                        "eval_interval": 4, "eval_iters": 1, "checkpoint_interval": 4, **train})
    events = []
    t = Trainer(model_cfg=mc, train_cfg=tc, run_dir=tmp_path, train_data=Progressions(mc.seq_length, 64),
                valid_data=Progressions(mc.seq_length, 64, offset=10**6), seed=7, plan=plan,
                emit=lambda kind, **f: events.append((kind, f)), tensorboard=False, say=lambda s: events.append(("say", s)),
                should_stop=(lambda: t.step >= stop_after) if stop_after else None)
    return t, events


def losses(events):
    return [f["loss"] for kind, f in events if kind == "metric" and f["name"] == "train_step"]


def test_loss_falls_and_every_step_is_reported(tmp_path):
    t, events = trainer(tmp_path, steps=20)
    r = t.run()
    ls = losses(events)
    assert len(ls) == 20 and r["step"] == 20 and not r["stopped"]
    assert sum(ls[-4:]) / 4 < sum(ls[:4]) / 4 - 0.5, ls
    evals = [f for kind, f in events if kind == "metric" and f["name"] == "eval"]
    assert [e["step"] for e in evals] == [4, 8, 12, 16, 20]
    step = next(f for kind, f in events if kind == "metric" and f["name"] == "train_step")
    assert {"loss", "lm_loss", "aux_loss", "z_loss", "grad_norm", "lr", "tokens_per_s", "step_ms"} <= set(step)
    assert step["loss"] == pytest.approx(step["lm_loss"] + step["aux_loss"] + step["z_loss"])


def test_schedule_warmup_then_cosine_to_min_lr():
    tc = TrainConfig(steps=10, lr=1.0, min_lr=0.1, warmup_steps=2)
    assert [tc.lr_at(0), tc.lr_at(1)] == [0.5, 1.0]
    assert tc.lr_at(2) == pytest.approx(1.0)
    assert tc.lr_at(6) == pytest.approx(0.1 + 0.45 * (1 + torch.cos(torch.tensor(torch.pi * 0.5)).item()))
    assert tc.lr_at(10) == pytest.approx(0.1)


def test_no_weight_decay_for_norms_and_biases(tmp_path):
    t, _ = trainer(tmp_path, model=model_dict(add_bias_linear=True))
    names = {id(p): n for n, p in t.model.named_parameters()}
    groups = {g["name"]: {names[id(p)] for p in g["params"]} for g in t.optimizer.param_groups}
    assert all("layernorm" in n or n.endswith("bias") or "bias" in n for n in groups["no_decay"]), groups["no_decay"]
    assert any("layernorm" in n for n in groups["no_decay"]) and any(n.endswith(".bias") for n in groups["no_decay"])
    assert "embedding.word_embeddings.weight" in groups["decay"]
    assert any(n.endswith("mlp.experts.weight1") for n in groups["decay"])


def test_global_batch_layout():
    assert micro_batches_per_rank(8, 2, 2) == 2
    with pytest.raises(ConfigError, match=r"train.global_batch_size: must be a multiple of model.micro_batch_size \(2\)"):
        micro_batches_per_rank(6, 2, 2)
    # Rank r's micro-batch m of step t: the same samples for any split of the global batch.
    two_ranks = [list(sample_indices(1, 0, rank=r, dp_size=2, micro_batch=2, global_batch=4)) for r in range(2)]
    one_rank = [list(sample_indices(1, m, rank=0, dp_size=1, micro_batch=2, global_batch=4)) for m in range(2)]
    assert two_ranks == one_rank == [[4, 5], [6, 7]]


def test_gradient_accumulation_equals_the_larger_micro_batch(tmp_path):
    """One micro-batch of 4 vs two of 2: same global batch, same losses (aux statistics differ, so off)."""
    no_aux = dict(moe_aux_loss_coeff=0.0, moe_z_loss_coeff=0.0)
    a, ea = trainer(tmp_path / "a", steps=6, model=model_dict(micro_batch_size=4, **no_aux))
    b, eb = trainer(tmp_path / "b", steps=6, model=model_dict(micro_batch_size=2, **no_aux))
    assert b.micro == 2 and a.micro == 1
    a.run(), b.run()
    assert losses(ea) == pytest.approx(losses(eb), abs=1e-5, rel=0)


@pytest.mark.parametrize("plan_name", ["grouped-p2", "interleaved-p3-nonuniform"])
def test_pipelined_training_matches_the_baseline(tmp_path, plan_name):
    base, eb = trainer(tmp_path / "b", steps=20, model=model_dict(plan_name))
    pipe, ep = trainer(tmp_path / "p", steps=20, model=model_dict(plan_name), plan=fixture_plan(plan_name))
    assert pipe.pipelined and isinstance(pipe.model.decoder.layers[0], AMPipeBlock)
    base.run(), pipe.run()
    lb, lp = losses(eb), losses(ep)
    assert len(lb) == len(lp) == 20
    assert max(abs(x - y) for x, y in zip(lb, lp)) <= 1e-5, (lb, lp)


@pytest.mark.parametrize("plan", [None, "grouped-p2"])
def test_resume_is_bitwise_exact(tmp_path, plan):
    p = fixture_plan(plan) if plan else None
    full, ef = trainer(tmp_path / "full", steps=10, plan=p)
    full.run()
    first, e1 = trainer(tmp_path / "cut", steps=10, plan=p, stop_after=6)
    r1 = first.run()
    assert r1["stopped"] and r1["step"] == 6 and r1["last_checkpoint"] == 6
    second, e2 = trainer(tmp_path / "cut", steps=10, plan=p)
    r2 = second.run()
    assert r2["resumed_from"] == 6 and r2["step"] == 10
    assert losses(e1) + losses(e2) == losses(ef)  # bitwise: == on floats
    sd_full, sd_cut = full.model.state_dict(), second.model.state_dict()
    assert all(torch.equal(sd_full[k], sd_cut[k]) for k in sd_full)


def test_checkpoint_without_manifest_is_skipped_by_name(tmp_path):
    t, _ = trainer(tmp_path, steps=8)
    t.run()
    (checkpoint_dir(tmp_path, 8) / MANIFEST).unlink()
    again, events = trainer(tmp_path, steps=8)
    assert again.resume() == 4
    said = [s for kind, s in events if kind == "say"]
    assert any("step-00000008" in s and "no manifest.json" in s for s in said), said


def test_checkpoint_with_a_bad_checksum_is_refused_by_name(tmp_path):
    t, _ = trainer(tmp_path, steps=8)
    t.run()
    shard = checkpoint_dir(tmp_path, 8) / "rank-00000.pt"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    again, events = trainer(tmp_path, steps=8)
    assert again.resume() == 4
    said = [s for kind, s in events if kind == "say"]
    assert any("rank-00000.pt" in s and "sha256" in s for s in said), said
    shutil.rmtree(checkpoint_dir(tmp_path, 4))
    assert trainer(tmp_path, steps=8)[0].resume() is None


def test_checkpoint_of_another_layout_is_an_error(tmp_path):
    t, _ = trainer(tmp_path, steps=4)
    t.run()
    other, _ = trainer(tmp_path, steps=4, global_batch_size=8)
    with pytest.raises(ValueError, match="global_batch_size.*--fresh"):
        other.resume()


def test_manifest_lists_every_shard_with_its_checksum(tmp_path):
    t, _ = trainer(tmp_path, steps=4)
    t.run()
    m = json.loads((checkpoint_dir(tmp_path, 4) / MANIFEST).read_text())
    assert m["step"] == 4 and m["world_size"] == 1 and set(m["shards"]) == {"0"}
    assert len(m["shards"]["0"]["sha256"]) == 64
    assert not [p for p in checkpoint_dir(tmp_path, 4).iterdir() if p.name.endswith(".tmp")]


def _first_step_loss(t: Trainer, autocast_dtype: torch.dtype | None) -> float:
    """Step 1's reported loss, computed here from `t`'s untrained model (the loop's arithmetic:
    per-micro-batch sums, then the float64 mean), with the test's own autocast around it."""
    sums = [0.0, 0.0, 0.0]
    with torch.no_grad(), torch.autocast("cpu", dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None):
        for m in range(t.micro):
            ids = t._batch(t.train_data, 0, m)
            out = t.model(ids[:, :-1], labels=ids[:, 1:], return_logits=False)
            sums = [s + float(v) for s, v in zip(sums, (out.lm_loss, out.aux_loss, out.z_loss))]
    lm, aux, z = (float(v) / t.micro for v in torch.tensor(sums, dtype=torch.float64))
    return lm + aux + z


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_half_precision_trains_under_autocast(tmp_path, dtype):
    """bf16/fp16 really run under autocast of that dtype (seen inside the model's forward), the loss
    falls, fp16 carries a loss scale, and step 1's loss is the one an fp32 model of the same weights
    computes under the test's own autocast of that dtype (a reference of the same precision, not a
    distance from fp32, which depends on the machine's rounding)."""
    want = {"bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    half, eh = trainer(tmp_path / dtype, steps=8, model=model_dict(dtype=dtype))
    full, ef = trainer(tmp_path / "fp32", steps=8)
    assert all(torch.equal(a, b) for a, b in zip(half.model.parameters(), full.model.parameters()))  # one init
    ref_half, ref_full = _first_step_loss(full, want), _first_step_loss(full, None)
    seen = []
    half.model.decoder.layers[0].self_attention.linear_qkv.register_forward_hook(
        lambda m, a, out: seen.append((torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu"), out.dtype)))
    half.run(), full.run()
    lh, lf = losses(eh), losses(ef)
    assert lh[-1] < lh[0] - 0.3
    assert lh[0] == ref_half and lf[0] == ref_full, (lh[0], ref_half, lf[0], ref_full)
    steps = [f for k, f in eh if k == "metric" and f["name"] == "train_step"]
    if dtype == "fp16":
        assert half.loss_scale is not None and all(s["loss_scale"] > 0 for s in steps)
        assert sum(s["skipped"] for s in steps) < len(steps)
    else:
        assert half.loss_scale is None and all(s["loss_scale"] is None for s in steps)
    assert seen and all(on and d == want and x == want for on, d, x in seen), seen[:2]
