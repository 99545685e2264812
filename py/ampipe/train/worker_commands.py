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

__all__ = ["train", "build_trainer"]

_ARG_FIELDS = {"config", "plan", "run_dir", "timeout_s", "resume"}
DEFAULT_TIMEOUT_S = 7 * 24 * 3600.0


def _section(config: Mapping[str, Any], name: str) -> Mapping[str, Any]:
    s = config.get(name) or {}
    if not isinstance(s, Mapping):
        raise ValueError(f"train: config.{name} must be a mapping, got {type(s).__name__}")
    return s


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
    seed = int(_section(config, "run").get("seed", 1234))
    windows = {split: TokenWindows(data_cfg.path, model_cfg.seq_length, split=split, seed=seed,
                                   valid_fraction=data_cfg.valid_fraction, split_seed=data_cfg.seed)
               for split in ("train", "valid")}
    top = windows["train"].dataset.max_token_id()
    if top >= model_cfg.vocab_size:  # `ampipe train` checked this already; a Python caller may not have
        raise ConfigError("model.vocab_size", f"must exceed the dataset's largest token id ({top}, in "
                                              f"{data_cfg.path}.bin); got {model_cfg.vocab_size}")
    emu = _section(config, "pipeline").get("emulated_comm")
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

    ep = int(_section(config, "parallelism").get("expert_model_parallel_size", 1))
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
