"""The `compare` rank command on one process: the arms from one initialisation, their steps in a
Williams order, per-arm run directories, resume, the parameter distance (dropless fp32: the arms
agree), and the control arm: the baseline one ulp away, on the same data, a rounding-level
difference at step 1."""

from __future__ import annotations

import copy
import itertools
import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "data"))
from megatron_writer import write_megatron  # noqa: E402

from ampipe.parallel.groups import ParallelGroups  # noqa: E402
from ampipe.train.compare import FAULT_ENV, compare, parameter_distance, perturb_one_ulp, step_orders  # noqa: E402
from ampipe.train.worker_commands import build_trainer  # noqa: E402
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
    d = r["seeds"][0]["parameter_distance"]["pipelined"]
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


def test_step_orders_balance_position_and_carry_over():
    assert step_orders(2) == [[0, 1], [1, 0]]  # ABBA
    orders = step_orders(3)
    assert len(orders) == 6 and all(sorted(o) == [0, 1, 2] for o in orders)
    for pos in range(3):  # every arm in every position equally often
        assert sorted(o[pos] for o in orders) == [0, 0, 1, 1, 2, 2]
    follows = [(o[i], o[i + 1]) for o in orders for i in range(2)]  # every arm after every other equally often
    assert sorted(follows) == sorted(list(itertools.permutations(range(3), 2)) * 2)


def test_three_arms_interleave_and_measure_the_parameter_distance_at_each_eval(tmp_path):
    ctx = Ctx()
    r = compare({"config": config(tmp_path), "plan": fixture_plan("grouped-p2"), "seeds": [5],
                 "run_dir": str(tmp_path / "cmp"), "control": True}, ctx)
    arms = r["seeds"][0]["arms"]
    assert sorted(arms) == ["baseline", "control", "pipelined"] and all(a["step"] == 6 for a in arms.values())
    order = [f["arm"] for k, f in ctx.events if k == "metric" and f["name"] == "train_step"]
    names = ["baseline", "pipelined", "control"]
    assert order == [names[i] for o in step_orders(3) for i in o]  # 6 steps: the whole Williams cycle
    dist = [(f["arm"], f["step"]) for k, f in ctx.events if k == "metric" and f["name"] == "param_distance"]
    assert dist == [("pipelined", 3), ("control", 3), ("pipelined", 6), ("control", 6)]  # eval_interval 3
    assert set(r["seeds"][0]["parameter_distance"]) == {"pipelined", "control"}
    assert r["seeds"][0]["fault"] is None
    # Dropless fp32: the control and the pipelined arm both stay at rounding level from the baseline.
    for arm in ("pipelined", "control"):
        assert 0 < r["seeds"][0]["parameter_distance"][arm]["relative"] < 1e-5


def _ulp_directions(p: torch.Tensor) -> torch.Tensor:
    d = torch.full((p.numel(),), math.inf, dtype=p.dtype)
    d[1::2] = -math.inf
    return d.view_as(p)


def test_the_control_arm_is_the_baseline_one_ulp_away_on_the_same_data(tmp_path):
    cfg = {**config(tmp_path), "run": {"seed": 5}}
    make = lambda name: build_trainer(cfg, None, str(tmp_path / name), groups=ParallelGroups.single(), device="cpu",
                                      say=lambda s: None, tensorboard=False)
    base, ctl = make("baseline"), make("control")
    perturb_one_ulp(ctl.model)
    # The same initialisation, every element moved by exactly one ulp in the stated pattern.
    for (name, p), (_, q) in zip(base.model.named_parameters(), ctl.model.named_parameters()):
        assert torch.equal(q, torch.nextafter(p, _ulp_directions(p))), name
        assert bool((q != p).all()), name
    # The same data: every micro-batch of the first steps.
    for step in range(3):
        for m in range(base.micro):
            assert torch.equal(base._batch(base.train_data, step, m), ctl._batch(ctl.train_data, step, m))
    # The bound the perturbation allows at step 1: its first-order effect sum |dL/dθ_i| |δθ_i| (the
    # gradient taken in float64 at the baseline's initial weights, on step 1's micro-batches), plus
    # one fp32 ulp of the loss, the resolution of the loss the trainer reports.
    ref = copy.deepcopy(base.model).double()
    for m in range(base.micro):
        ids = base._batch(base.train_data, 0, m)
        (ref(ids[:, :-1], labels=ids[:, 1:], return_logits=False).loss / base.micro).backward()
    first_order = sum(float((g.grad.abs() * (q.detach().double() - p.detach().double()).abs()).sum())
                      for g, p, q in zip(ref.parameters(), base.model.parameters(), ctl.model.parameters()))
    lb, lc = base.train_step(), ctl.train_step()
    ulp = float(torch.tensor(lb.loss, dtype=torch.float32).nextafter(torch.tensor(math.inf)) - torch.tensor(lb.loss, dtype=torch.float32))
    assert 0 < abs(lc.loss - lb.loss) <= first_order + ulp
    assert lc.grad_norm != lb.grad_norm  # the gradients differ too, by rounding


def test_the_fault_hook_names_a_parameter_it_does_not_know(tmp_path, monkeypatch):
    monkeypatch.setenv(FAULT_ENV, "no.such.weight=1.01")
    with pytest.raises(ValueError, match=rf"{FAULT_ENV}: expected <parameter name>=<factor> naming one of the model's parameters"):
        compare({"config": config(tmp_path), "plan": fixture_plan("grouped-p2"), "seeds": [5],
                 "run_dir": str(tmp_path / "cmp")}, Ctx())


def test_a_resumed_control_arm_continues_its_own_trajectory(tmp_path):
    cfg, plan = config(tmp_path), fixture_plan("grouped-p2")
    full = Ctx()
    compare({"config": cfg, "plan": plan, "seeds": [5], "run_dir": str(tmp_path / "full"), "control": True}, full)
    cut = Ctx(cancel_after=6)  # two steps of each arm
    compare({"config": cfg, "plan": plan, "seeds": [5], "run_dir": str(tmp_path / "cut"), "control": True}, cut)
    again = Ctx()
    compare({"config": cfg, "plan": plan, "seeds": [5], "run_dir": str(tmp_path / "cut"), "control": True}, again)
    for arm in ("baseline", "pipelined", "control"):
        assert losses(cut, arm, 5) + losses(again, arm, 5) == losses(full, arm, 5), arm
