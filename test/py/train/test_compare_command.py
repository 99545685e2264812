"""The `compare` rank command on one process: both arms from one initialisation, ABBA steps,
per-arm run directories, resume, and the parameter distance (dropless fp32: the arms agree)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "data"))
from megatron_writer import write_megatron  # noqa: E402

from ampipe.train.compare import compare, parameter_distance  # noqa: E402
from synthetic import fixture_plan, model_dict  # noqa: E402


class Ctx:
    rank, world_size, local_rank, device, backend = 0, 1, 0, None, None

    def __init__(self, cancel_after: int | None = None):
        self.events: list[tuple[str, dict]] = []
        self.cancel_after = cancel_after

    def emit(self, kind, **f):
        self.events.append((kind, f))

    def heartbeat(self):
        pass

    @property
    def cancel_requested(self):
        steps = sum(1 for k, f in self.events if k == "metric" and f["name"] == "train_step")
        return self.cancel_after is not None and steps >= self.cancel_after


def config(tmp_path: Path) -> dict:
    prefix = tmp_path / "data"
    if not prefix.with_suffix(".bin").exists():
        rng = torch.Generator().manual_seed(0)
        docs = [[torch.randint(0, 60, (200,), generator=rng).tolist()] for _ in range(20)]
        write_megatron(prefix, docs, "uint16")
    return {"model": model_dict("grouped-p2"), "parallelism": {"world_size": 1, "expert_model_parallel_size": 1},
            "pipeline": {"emulated_comm": None}, "run": {"seed": 1},
            "data": {"path": str(prefix), "split": "90,10", "seed": 3},
            "train": {"steps": 6, "lr": 3e-3, "min_lr": 3e-4, "warmup_steps": 1, "global_batch_size": 2,
                      "eval_interval": 3, "eval_iters": 1, "checkpoint_interval": 3}}


def losses(ctx: Ctx, arm: str, seed: int) -> list[tuple[int, float]]:
    return [(f["step"], f["loss"]) for k, f in ctx.events
            if k == "metric" and f["name"] == "train_step" and f["arm"] == arm and f["seed"] == seed]


def test_arms_from_one_initialisation_agree_in_dropless_fp32(tmp_path):
    ctx = Ctx()
    r = compare({"config": config(tmp_path), "plan": fixture_plan("grouped-p2"), "seeds": [5, 6],
                 "run_dir": str(tmp_path / "cmp")}, ctx)
    assert not r["stopped"] and [s["seed"] for s in r["seeds"]] == [5, 6]
    for seed in (5, 6):
        b, p = losses(ctx, "baseline", seed), losses(ctx, "pipelined", seed)
        assert [s for s, _ in b] == [s for s, _ in p] == [1, 2, 3, 4, 5, 6]
        assert max(abs(x - y) for (_, x), (_, y) in zip(b, p)) <= 1e-5
        for arm in ("baseline", "pipelined"):
            assert (tmp_path / "cmp" / f"seed-{seed}" / arm / "checkpoints" / "step-00000006" / "manifest.json").is_file()
    assert losses(ctx, "baseline", 5) != losses(ctx, "baseline", 6)  # the seed changes the run
    d = r["seeds"][0]["parameter_distance"]
    assert 0 <= d["relative"] < 1e-5 and d["max_abs"] < 1e-5
    # ABBA: the arms alternate which goes first.
    order = [f["arm"] for k, f in ctx.events if k == "metric" and f["name"] == "train_step" and f["seed"] == 5]
    assert order[:4] == ["baseline", "pipelined", "pipelined", "baseline"]


def test_a_cancelled_comparison_resumes_where_it_stopped(tmp_path):
    cfg, plan = config(tmp_path), fixture_plan("grouped-p2")
    full = Ctx()
    compare({"config": cfg, "plan": plan, "seeds": [5], "run_dir": str(tmp_path / "full")}, full)
    cut = Ctx(cancel_after=4)  # two steps of each arm
    r1 = compare({"config": cfg, "plan": plan, "seeds": [5], "run_dir": str(tmp_path / "cut")}, cut)
    assert r1["stopped"] and r1["seeds"][0]["arms"]["baseline"]["step"] == 2
    again = Ctx()
    r2 = compare({"config": cfg, "plan": plan, "seeds": [5], "run_dir": str(tmp_path / "cut")}, again)
    assert r2["seeds"][0]["arms"]["pipelined"]["resumed_from"] == 2
    for arm in ("baseline", "pipelined"):
        assert losses(cut, arm, 5) + losses(again, arm, 5) == losses(full, arm, 5)


def test_parameter_distance_by_hand():
    a, b = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    with torch.no_grad():
        b.weight.copy_(a.weight)
        b.bias.copy_(a.bias + torch.tensor([0.3, -0.4]))
    d = parameter_distance(a, b)
    ref = torch.cat([b.weight.flatten(), b.bias]).double().norm().item()
    assert d["l2"] == pytest.approx(0.5) and d["max_abs"] == pytest.approx(0.4)
    assert d["relative"] == pytest.approx(0.5 / ref)


def test_bad_arguments_are_named(tmp_path):
    with pytest.raises(ValueError, match="seeds must be a non-empty list"):
        compare({"config": config(tmp_path), "plan": fixture_plan("grouped-p2"), "seeds": [],
                 "run_dir": str(tmp_path)}, Ctx())
