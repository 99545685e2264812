"""Shared by the pipeline tests: fixture plans, a layer for a plan, one block step."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import torch

from ampipe.model.gpt import init_parameters
from ampipe.model.layers import TransformerLayer
from ampipe.parallel.groups import ExpertParallel
from ampipe.pipeline.dims import model_config_from_plan
from ampipe.pipeline.plan import Plan, data_needs, load_plan

PLANS = Path(__file__).resolve().parents[2] / "fixtures" / "plans"
PLAN_NAMES = sorted(p.stem for p in PLANS.glob("*.json"))


def plan_doc(name: str, **dims: Any) -> dict[str, Any]:
    doc = json.loads((PLANS / f"{name}.json").read_text())
    doc = copy.deepcopy(doc)
    doc["dims"].update(dims)
    return doc


def make_layer(plan: Plan, ep: ExpertParallel | None = None, seed: int = 3, **cfg: Any) -> TransformerLayer:
    c = model_config_from_plan(plan, cfg)
    layer = TransformerLayer(c, 0, ep)
    init_parameters(layer, c, seed=seed, prefix="decoder.layers.0.")
    return layer


def inputs(plan: Plan, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    d = plan.dims
    shape = (d["seq_length"], d["micro_batch_size"], d["hidden_size"])
    return torch.randn(shape, generator=g).requires_grad_(True), torch.randn(shape, generator=g)


def step(block: torch.nn.Module, layer: torch.nn.Module, x: torch.Tensor, dy: torch.Tensor,
         aux_weight: float = 3.0, z_weight: float = 5.0) -> dict[str, torch.Tensor]:
    """y, the losses, dx and every parameter gradient of one forward+backward."""
    x.grad = None
    for p in layer.parameters():
        p.grad = None
    y, losses = block(x)
    ((y * dy).sum() + aux_weight * losses.aux_loss + z_weight * losses.z_loss).backward()
    out = {"y": y.detach(), "aux_loss": losses.aux_loss.detach(), "z_loss": losses.z_loss.detach(),
           "dx": x.grad.clone()}
    out.update({f"grad.{n}": p.grad.clone() for n, p in layer.named_parameters()})
    return out


def assert_equal_within(ref: dict[str, torch.Tensor], got: dict[str, torch.Tensor],
                        rel: float, what: str) -> None:
    assert ref.keys() == got.keys()
    for k in ref:
        r, g = ref[k], got[k]
        scale = r.abs().max().item() or 1.0
        err = (g - r).abs().max().item() / scale
        assert err <= rel, f"{what}: {k} differs by {err:.3e} (relative to max |ref| {scale:.3e})"


def load(name: str, **dims: Any) -> Plan:
    return load_plan(plan_doc(name, **dims))


def load_scoped(name: str, capacity_scope: str, **dims: Any) -> Plan:
    """A fixture plan with another `capacity_scope` (its route ops run in chunk order on one
    stream, as `sequence` needs)."""
    return load_plan({**plan_doc(name, **dims), "capacity_scope": capacity_scope})


def two_compute_streams(plan: Plan) -> Plan:
    """The same schedule with odd chunks' compute ops (forward and their backward alike) on
    a second compute stream `compute2`. Every op gets its data needs as explicit deps (the
    stream order that covered some of them is gone) and each attn_bwd a dep on the previous
    one (they accumulate dK/dV in place). Contracts §2 allows several streams of a kind."""
    doc = plan.to_dict()
    doc["streams"] = [*doc["streams"], {"name": "compute2", "kind": "compute"}]
    for name, forward in (("forward", True), ("backward", False)):
        needs = data_needs(plan, forward)
        prev_attn_bwd = None
        for op in doc[name]:
            if op["stream"] == "compute" and op["chunk"] is not None and op["chunk"] % 2 == 1:
                op["stream"] = "compute2"
            deps = list(dict.fromkeys([*op["deps"], *needs[op["id"]]]))
            if op["kind"] == "attn_bwd":
                if prev_attn_bwd is not None and prev_attn_bwd not in deps:
                    deps.append(prev_attn_bwd)
                prev_attn_bwd = op["id"]
            op["deps"] = deps
    doc["variant"] = f"{plan.variant}-two-compute-streams"
    return load_plan(doc)
