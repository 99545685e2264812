"""The rank command of `ampipe train`: ``train`` (docs/train.md).

The controller imports this module on every rank. The command reads the resolved config,
builds the rank's process groups, data and `Trainer`, and trains on a helper thread while the
main thread keeps the bridge alive and watches for the controller's ``cancel`` (Ctrl-C): then
every rank stops after the same step, with a checkpoint.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ampipe.worker.background import run_beside_heartbeats
from ampipe.worker.commands import CommandContext, command

__all__ = ["train", "train_tune", "train_profile", "build_trainer"]

_ARG_FIELDS = {"config", "plan", "run_dir", "timeout_s", "resume"}
_ARMS_FIELDS = {"config", "arms", "run_dir", "steps", "warmup", "timeout_s", "torch_profiler"}
DEFAULT_TIMEOUT_S = 7 * 24 * 3600.0


def _section(config: Mapping[str, Any], name: str) -> dict[str, Any]:
    """A section of the config, its fields checked and the missing ones at the schema's defaults."""
    from ampipe.config_schema import resolve_section

    return resolve_section(config, name)


def build_trainer(config: Mapping[str, Any], plan: Mapping[str, Any] | None, run_dir: str, *,
                  groups: Any, device: Any, emit=None, should_stop=None, say=None, tensorboard: bool = True):
    """A `Trainer` for the resolved experiment config (also usable without the bridge)."""
    from ampipe.data import TokenWindows
    from ampipe.model.config import ConfigError, ModelConfig
    from ampipe.pipeline.emulation import EmulatedComm
    from ampipe.train.config import DataConfig, TrainConfig
    from ampipe.train.loop import Trainer

    model_cfg = ModelConfig.from_dict(_section(config, "model"))
    model_cfg.check_parallel(groups.ep.size, groups.world_size)
    train_cfg = TrainConfig.from_dict(_section(config, "train"))
    data_cfg = DataConfig.from_dict(_section(config, "data"))
    if data_cfg.path is None:
        raise ConfigError("data.path", "must name a dataset prefix on the ranks (ampipe train resolves the default)")
    seed = _section(config, "run")["seed"]
    windows = {split: TokenWindows(data_cfg.path, model_cfg.seq_length, split=split, seed=seed,
                                   valid_fraction=data_cfg.valid_fraction, split_seed=data_cfg.seed)
               for split in ("train", "valid")}
    top = windows["train"].dataset.max_token_id()
    if top >= model_cfg.vocab_size:  # `ampipe train` checked this already; a Python caller may not have
        raise ConfigError("model.vocab_size", f"must exceed the dataset's largest token id ({top}, in "
                                              f"{data_cfg.path}.bin); got {model_cfg.vocab_size}")
    emu = _section(config, "pipeline")["emulated_comm"]
    return Trainer(model_cfg=model_cfg, train_cfg=train_cfg, run_dir=run_dir, train_data=windows["train"],
                   valid_data=windows["valid"], seed=seed, plan=None if plan is None else dict(plan),
                   emulated_comm=EmulatedComm.from_dict(emu) if emu else None, groups=groups, device=device,
                   emit=emit, should_stop=should_stop, say=say, tensorboard=tensorboard)


@command("train")
def train(args: dict, ctx: CommandContext) -> dict[str, Any]:
    """Trains (resuming from the run directory's newest complete checkpoint unless ``resume`` is
    false). args: ``config`` (resolved), ``plan`` (plan JSON, or None for the baseline block),
    ``run_dir``, optionally ``resume`` and ``timeout_s``. Returns `Trainer.run`'s summary."""
    unknown = set(args) - _ARG_FIELDS
    if unknown:
        raise ValueError(f"train: unknown argument(s) {sorted(unknown)}; known: {sorted(_ARG_FIELDS)}")
    config, plan, run_dir = args.get("config"), args.get("plan"), args.get("run_dir")
    if not isinstance(config, Mapping) or not isinstance(run_dir, str) or not (plan is None or isinstance(plan, Mapping)):
        raise ValueError("train: needs config (a mapping), run_dir (a string) and plan (a mapping or None)")
    from ampipe.parallel.groups import ParallelGroups, init_parallel_groups

    ep = _section(config, "parallelism")["expert_model_parallel_size"]
    if ctx.backend is None and ctx.world_size > 1:
        raise RuntimeError("train: several ranks need torch.distributed (launch them with dist enabled)")
    groups = init_parallel_groups(ep) if ctx.backend is not None else ParallelGroups.single()
    if plan is not None:
        from ampipe.pipeline.worker_commands import plan_for_config

        plan_for_config(plan, config)
    resume = bool(args.get("resume", True))

    def work() -> dict[str, Any]:  # all of it beside heartbeats: opening data and building a model take time
        import torch

        device = torch.device(ctx.device or "cpu")
        if device.type == "cuda":
            torch.cuda.set_device(device)  # the current device is per thread
        trainer = build_trainer(config, plan, run_dir, groups=groups, device=device, emit=ctx.emit,
                                should_stop=lambda: ctx.cancel_requested, say=lambda s: None)
        return trainer.run(resume=resume)

    return run_beside_heartbeats(ctx, float(args.get("timeout_s") or DEFAULT_TIMEOUT_S), work, what="train")


def _arms_command(name: str, args: dict, ctx: CommandContext, fn) -> Any:  # noqa: ANN001
    """Shared by `train_tune` and `train_profile`: check the args, build the groups and a
    throwaway trainer (the run's model, data and ranks; nothing saved), run `fn(trainer, arms)`."""
    unknown = set(args) - _ARMS_FIELDS
    if unknown:
        raise ValueError(f"{name}: unknown argument(s) {sorted(unknown)}; known: {sorted(_ARMS_FIELDS)}")
    config, arms, run_dir = args.get("config"), args.get("arms"), args.get("run_dir")
    if not isinstance(config, Mapping) or not isinstance(run_dir, str) or not isinstance(arms, Mapping) or not arms:
        raise ValueError(f"{name}: needs config (a mapping), run_dir (a string) and arms "
                         f"(a non-empty mapping of name to plan or None)")
    from ampipe.parallel.groups import ParallelGroups, init_parallel_groups
    from ampipe.pipeline.worker_commands import plan_for_config

    for arm, plan in arms.items():
        if plan is not None:
            try:
                plan_for_config(plan, config)
            except Exception as e:
                raise type(e)(f"{name}: arm {arm!r}: {e}") from None
    ep = _section(config, "parallelism")["expert_model_parallel_size"]
    groups = init_parallel_groups(ep) if ctx.backend is not None else ParallelGroups.single()

    def work() -> Any:
        import torch

        device = torch.device(ctx.device or "cpu")
        if device.type == "cuda":
            torch.cuda.set_device(device)
        trainer = build_trainer(config, None, run_dir, groups=groups, device=device, say=lambda s: None,
                                tensorboard=False)
        return fn(trainer, {str(k): (None if v is None else dict(v)) for k, v in arms.items()})

    return run_beside_heartbeats(ctx, float(args.get("timeout_s") or DEFAULT_TIMEOUT_S), work, what=name)


@command("train_tune")
def train_tune(args: dict, ctx: CommandContext) -> dict[str, Any]:
    """Times training steps of each arm (``arms``: name -> plan, or None for the baseline block)
    on a throwaway trainer of the run's config, ``warmup`` + ``steps`` rounds in ABBA order
    (`ampipe.train.arms`). Returns ``{"rank", "step_ms": {arm: [ms per measured round]}}``; a
    cancel stops every rank after the same step (the lists are then shorter). ``arms``: per arm
    the figures the planner's calibration reads (`ampipe.train.profile.arm_summaries`)."""

    def fn(trainer, arms):  # noqa: ANN001
        import threading

        from ampipe import spans
        from ampipe.train.arms import time_arms
        from ampipe.train.profile import arm_summaries, instrument_moe_layers

        steps, warmup = int(args.get("steps", 4)), int(args.get("warmup", 1))
        if steps < 1 or warmup < 0:
            raise ValueError(f"train_tune: steps must be >= 1 and warmup >= 0; got {steps}, {warmup}")
        handles = instrument_moe_layers(trainer.model)  # spans (about a microsecond each) for the calibration
        try:
            with spans.recording() as rec:
                times = time_arms(trainer, arms, steps=steps, warmup=warmup,
                                  should_stop=lambda: trainer.any_rank(ctx.cancel_requested),
                                  on_step=lambda arm, r, ms: ctx.emit("progress", stage="tune", arm=arm, round=r, ms=ms))
        finally:
            for h in handles:
                h.remove()
        return {"rank": trainer.rank, "step_ms": times,
                "arms": arm_summaries(rec.spans, threading.get_native_id())}

    return _arms_command("train_tune", args, ctx, fn)


@command("train_profile")
def train_profile(args: dict, ctx: CommandContext) -> dict[str, Any]:
    """Profiles each arm (`ampipe.train.profile.profile_arms`): ``steps`` quiet steps for the
    breakdown, then ``steps`` under torch.profiler (unless ``torch_profiler`` is false). Writes
    this rank's Chrome trace events to ``<run_dir>/profile/rank-<r>.trace.json`` and returns
    ``{"rank", "trace", "breakdown": {arm: medians}, "steps": {arm: per-step rows},
    "torch_profiler"}``."""

    def fn(trainer, arms):  # noqa: ANN001
        import json
        from pathlib import Path

        from ampipe.atomic import write_bytes_atomic
        from ampipe.train.profile import profile_arms

        steps = int(args.get("steps", 3))
        if steps < 1:
            raise ValueError(f"train_profile: steps must be >= 1; got {steps}")
        r = profile_arms(trainer, arms, steps=steps, rank=trainer.rank,
                         torch_profiler=bool(args.get("torch_profiler", True)))
        path = Path(args["run_dir"]) / "profile" / f"rank-{trainer.rank}.trace.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        write_bytes_atomic(path, json.dumps({"traceEvents": r["events"]}).encode())
        return {"rank": trainer.rank, "trace": str(path), "breakdown": r["breakdown"], "steps": r["steps"],
                "torch_profiler": r["torch_profiler"]}

    return _arms_command("train_profile", args, ctx, fn)

