"""The training loop: a GPT-MoE with baseline or pipelined MoE blocks, trained on token windows.

One `Trainer` per rank. Every rank is a data-parallel replica (expert parallelism is carved
out of data parallelism, as in Megatron-Core): step t's global batch is samples
``[t*G, (t+1)*G)`` of the training split, and rank r's micro-batch m holds samples
``t*G + (m*D + r)*b + [0, b)`` (D ranks, micro-batch b, G/(D*b) micro-batches per rank). So any
layout of the same global batch sees the same micro-batches, and the same loss curve.

A step: forward/backward of each micro-batch (loss / micro-batches; under autocast when
``model.dtype`` is bf16/fp16, with a dynamic loss scale for fp16), gradients averaged over the
data-parallel groups (`sync_gradients`: dense over every rank, experts over their replicas),
the global norm clipped, one AdamW step at the scheduled learning rate. The reported losses are
means over every micro-batch of every rank.

Resume is exact: a checkpoint holds the model, optimiser, loss scale, step and RNG states; the
data position is the step (samples are a function of their index), and the learning rate a
function of the step. On CPU in fp32 a resumed run's losses equal an uninterrupted run's bitwise.
"""

from __future__ import annotations

import math
import os
import random
import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.distributed as dist

from .. import spans
from ..model.config import ConfigError, ModelConfig
from ..model.expert_bias import update_expert_bias
from ..model.gpt import GPTModel
from ..parallel.grad_sync import sync_gradients
from ..parallel.groups import ParallelGroups
from .checkpoint import find_resumable, load_shard, save_checkpoint
from .config import TrainConfig
from .optim import DynamicLossScale, clip_gradients, global_grad_norm, make_optimizer

__all__ = ["Samples", "Trainer", "micro_batches_per_rank", "sample_indices"]


class Samples(Protocol):
    """What the loop reads: sample i (any i >= 0) as seq_length + 1 token ids."""

    def sample(self, i: int) -> np.ndarray: ...


def micro_batches_per_rank(global_batch: int, micro_batch: int, dp_size: int) -> int:
    if global_batch % (micro_batch * dp_size) != 0:
        raise ConfigError("train.global_batch_size",
                          f"must be a multiple of model.micro_batch_size ({micro_batch}) x parallelism.world_size "
                          f"({dp_size}) = {micro_batch * dp_size}; got {global_batch}")
    return global_batch // (micro_batch * dp_size)


def sample_indices(step: int, micro: int, *, rank: int, dp_size: int, micro_batch: int, global_batch: int) -> range:
    start = step * global_batch + (micro * dp_size + rank) * micro_batch
    return range(start, start + micro_batch)


def _rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: Mapping[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@dataclass
class StepMetrics:
    step: int  # 1-based: the number of optimiser steps done
    loss: float
    lm_loss: float
    aux_loss: float
    z_loss: float
    grad_norm: float
    lr: float
    tokens_per_s: float
    step_ms: float
    skipped: bool  # fp16: a step with inf/NaN gradients is skipped
    loss_scale: float | None

    def as_event(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items()}


class Trainer:
    """Trains `model_cfg`'s GPT-MoE on this rank. See the module docstring for the batch layout.

    `plan` (a `Plan` or plan dict) swaps every MoE layer for `AMPipeBlock`; None trains the
    baseline. `emulated_comm` adds the modelled interconnect's delays to either kind of layer.
    `emit(kind, **fields)` streams events; `should_stop()` is polled once per step (any rank
    asking stops every rank after the same step, with a checkpoint).
    """

    def __init__(self, *, model_cfg: ModelConfig, train_cfg: TrainConfig, run_dir: str | os.PathLike,
                 train_data: Samples, valid_data: Samples | None, seed: int, plan: Any = None,
                 emulated_comm: Any = None, groups: ParallelGroups | None = None,
                 device: torch.device | str = "cpu", emit: Callable[..., None] | None = None,
                 should_stop: Callable[[], bool] | None = None, tensorboard: bool = True,
                 say: Callable[[str], None] | None = None):
        self.cfg, self.tcfg = model_cfg, train_cfg
        self.groups = groups or ParallelGroups.single()
        self.rank, self.world = self.groups.rank, self.groups.world_size
        self.device = torch.device(device)
        self.run_dir = Path(run_dir)
        self.train_data, self.valid_data = train_data, valid_data
        self.seed = seed
        self.emit = emit or (lambda kind, **f: None)
        self.should_stop = should_stop or (lambda: False)
        self.say = say or (lambda s: print(s, flush=True))
        self.micro = micro_batches_per_rank(train_cfg.global_batch_size, model_cfg.micro_batch_size, self.world)

        self.model = GPTModel(model_cfg, ep=self.groups.ep, seed=seed, device=self.device)
        # Dropout's RNG, this trainer's own (two trainers alternate in `ampipe compare`): set
        # before each step, kept after it, saved in checkpoints.
        torch.manual_seed(seed * 1_000_003 + self.rank)
        self._rng = _rng_state()
        self.emulated_comm = emulated_comm
        self._delay_hooks: list[Any] = []
        self.pipelined = False
        self.set_block(plan)
        self.optimizer = make_optimizer(self.model, train_cfg)
        self.loss_scale = DynamicLossScale(train_cfg.initial_loss_scale) if model_cfg.dtype == "fp16" else None
        self.step = 0
        self.resumed_from: int | None = None
        self._tb = None
        self._tensorboard = tensorboard and self.rank == 0

    def set_block(self, plan: Any) -> None:
        """Make every MoE layer run `plan` (a `Plan` or plan dict), or the baseline block for None;
        in place, so parameters and optimiser state are untouched (`ampipe.train.arms` times the
        candidates of an auto-tuned plan this way)."""
        from ..pipeline.swap import swap_blocks, unswap_blocks

        for h in self._delay_hooks:
            h.remove()
        self._delay_hooks = []
        unswap_blocks(self.model)
        self.pipelined = plan is not None
        if self.pipelined:
            # record_times off: training reads no per-op times (a profile records spans instead)
            report = swap_blocks(self.model, plan, emulated_comm=self.emulated_comm, record_times=False)
            if report.skipped or not report.swapped:  # a run labelled pipelined runs pipelined blocks only
                unswap_blocks(self.model)
                raise ValueError(f"train: the plan does not swap every MoE layer ({report})")
        elif self.emulated_comm is not None:
            from ..pipeline.emulation import add_emulated_delays

            self._delay_hooks = add_emulated_delays(self.model, self.emulated_comm)

    # ------------------------------------------------------------------------------ layout
    @property
    def layout(self) -> dict[str, Any]:
        """What a checkpoint must agree on to be resumed here."""
        return {"world_size": self.world, "expert_model_parallel_size": self.groups.ep.size,
                "pipelined": self.pipelined, "global_batch_size": self.tcfg.global_batch_size,
                "micro_batch_size": self.cfg.micro_batch_size}

    def _batch(self, data: Samples, step: int, micro: int) -> torch.Tensor:
        idx = sample_indices(step, micro, rank=self.rank, dp_size=self.world,
                             micro_batch=self.cfg.micro_batch_size, global_batch=self.tcfg.global_batch_size)
        rows = np.stack([np.asarray(data.sample(i), dtype=np.int64) for i in idx])  # any Samples, not only TokenWindows
        if rows.shape[1] != self.cfg.seq_length + 1:
            raise ValueError(f"a data sample has {rows.shape[1]} tokens; model.seq_length + 1 = {self.cfg.seq_length + 1}")
        return torch.from_numpy(rows).to(self.device)

    # ------------------------------------------------------------------------------ checkpoints
    def resume(self) -> int | None:
        """Loads the newest complete checkpoint of the run directory; returns its step (None: fresh)."""
        found = find_resumable(self.run_dir, rank=self.rank, world_size=self.world, layout=self.layout,
                               say=self._log)
        if found is None:
            return None
        shard = load_shard(found, self.rank)
        self.model.load_state_dict(shard["model"])
        self.optimizer.load_state_dict(shard["optimizer"])
        if self.loss_scale is not None:
            self.loss_scale.load_state_dict(shard["loss_scale"])
        self._rng = shard["rng"]
        self.step = self.resumed_from = int(shard["step"])
        return self.step

    def save(self) -> Path:
        shard = {
            "step": self.step,
            "samples_consumed": self.step * self.tcfg.global_batch_size,  # the data position
            "lr": self.tcfg.lr_at(max(0, self.step - 1)),
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "loss_scale": None if self.loss_scale is None else self.loss_scale.state_dict(),
            "rng": self._rng,
            "model_config": self.cfg.to_dict(),
            "train_config": self.tcfg.to_dict(),
        }
        path = save_checkpoint(self.run_dir, self.step, shard, rank=self.rank, world_size=self.world,
                               layout=self.layout)
        self.emit("checkpoint", step=self.step, path=str(path))
        return path

    # ------------------------------------------------------------------------------ the loop
    def _all_mean(self, values: list[float], count: int) -> list[float]:
        t = torch.tensor(values, dtype=torch.float64, device=self.device)  # NCCL reduces device tensors only
        if self.world > 1:
            dist.all_reduce(t)
        return [float(v) / count for v in t]

    def any_rank(self, flag: bool) -> bool:
        """Whether `flag` is true on any rank (a collective: every rank calls it)."""
        if self.world == 1:
            return flag
        t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    def train_step(self) -> StepMetrics:
        """One optimiser step. Its phases are recorded as spans when a profile is active
        (`ampipe.spans`; `ampipe train --profile`): they cover the whole step."""
        span = spans.span
        t0 = time.perf_counter()
        rec = spans.active()
        s0 = spans.now_ns() if rec is not None else 0
        with span("zero_grad", "phase"):
            _set_rng_state(self._rng)
            self.model.train()
            self.optimizer.zero_grad(set_to_none=True)
        sums = [0.0, 0.0, 0.0]
        for m in range(self.micro):
            with span("data", "phase", micro=m):
                ids = self._batch(self.train_data, self.step, m)
            with span("forward", "phase", micro=m):
                out = self.model(ids[:, :-1], labels=ids[:, 1:], return_logits=False)
                loss = out.loss / self.micro
                if self.loss_scale is not None:
                    loss = loss * self.loss_scale.scale
            with span("backward", "phase", micro=m):
                loss.backward()
            with span("loss_read", "phase", micro=m):
                sums[0] += float(out.lm_loss.detach())
                sums[1] += float(out.aux_loss.detach())
                sums[2] += float(out.z_loss.detach())
        with span("grad_sync", "phase"):
            sync_gradients(self.model, self.groups)
            update_expert_bias(self.model, self.groups.dp_group)  # aux-loss-free balancing, as Megatron after the grads
        skipped = False
        if self.loss_scale is not None:
            with span("loss_scale", "phase"):
                skipped = not self.loss_scale.unscale_and_check(self.model, self.groups)
        lr = self.tcfg.lr_at(self.step)
        norm = float("nan")
        if not skipped:
            with span("clip", "phase"):
                norm = global_grad_norm(self.model, self.groups)
                clip_gradients(self.model, norm, self.tcfg.clip_grad)
            with span("optimizer", "phase"):
                for group in self.optimizer.param_groups:
                    group["lr"] = lr
                self.optimizer.step()
        with span("metrics", "phase"):
            self._rng = _rng_state()
            lm, aux, z = self._all_mean(sums, self.micro * self.world)
        self.step += 1
        step_s = time.perf_counter() - t0
        if rec is not None:
            rec.add(f"step {self.step}", "step", s0, spans.now_ns(), step=self.step)
        tokens = self.tcfg.global_batch_size * self.cfg.seq_length
        return StepMetrics(step=self.step, loss=lm + aux + z, lm_loss=lm, aux_loss=aux, z_loss=z, grad_norm=norm,
                           lr=lr, tokens_per_s=tokens / step_s, step_ms=step_s * 1e3, skipped=skipped,
                           loss_scale=None if self.loss_scale is None else self.loss_scale.scale)

    @torch.no_grad()
    def evaluate(self) -> dict[str, float] | None:
        """Mean LM loss over `eval_iters` global batches of the validation split (the same ones each time)."""
        if self.valid_data is None:
            return None
        self.model.eval()
        total = 0.0
        for it in range(self.tcfg.eval_iters):
            for m in range(self.micro):
                ids = self._batch(self.valid_data, it, m)
                total += float(self.model(ids[:, :-1], labels=ids[:, 1:], return_logits=False).lm_loss)
        self.model.train()
        (loss,) = self._all_mean([total], self.tcfg.eval_iters * self.micro * self.world)
        return {"step": self.step, "loss": loss, "ppl": math.exp(min(loss, 700.0))}

    def _log(self, message: str) -> None:
        self.say(f"[rank {self.rank}] {message}")
        self.emit("log", level="warning", message=message)

    def _tb_writer(self):
        if not self._tensorboard:
            return None
        from torch.utils.tensorboard import SummaryWriter

        # purge_step: events a killed run wrote after the checkpoint we resumed from are dropped.
        return SummaryWriter(str(self.run_dir / "tb"), purge_step=self.step + 1)

    def begin(self, *, resume: bool = True) -> None:
        """Before the first `advance`: resume (when asked), announce the run, open TensorBoard."""
        if resume:
            self.resume()
        self._history: list[StepMetrics] = []
        self._evals: list[dict[str, float]] = []
        self._last_saved = self.step if self.resumed_from is not None else None
        self.emit("progress", stage="start", step=self.step, steps=self.tcfg.steps, resumed_from=self.resumed_from,
                  pipelined=self.pipelined, micro_batches=self.micro,
                  tokens_per_step=self.tcfg.global_batch_size * self.cfg.seq_length)
        self._tb = self._tb_writer()

    def advance(self) -> StepMetrics:
        """One training step with its reporting (event, TensorBoard) and the evaluation when due."""
        total, tb = self.tcfg.steps, self._tb
        m = self.train_step()
        self._history.append(m)
        if self.rank == 0:
            self.emit("metric", name="train_step", steps=total, **m.as_event())
        if tb is not None:
            for k in ("loss", "lm_loss", "aux_loss", "z_loss", "grad_norm", "lr", "tokens_per_s", "step_ms"):
                tb.add_scalar(f"train/{k}", getattr(m, k), m.step)
        if self.step % self.tcfg.eval_interval == 0 or self.step == total:
            ev = self.evaluate()
            if ev is not None:
                self._evals.append(ev)
                if self.rank == 0:
                    self.emit("metric", name="eval", steps=total, **ev)
                if tb is not None:
                    tb.add_scalar("eval/loss", ev["loss"], ev["step"])
                    tb.add_scalar("eval/ppl", ev["ppl"], ev["step"])
        return m

    def stop_requested(self) -> bool:
        """Whether any rank was asked to stop (collective: every rank calls it after each step)."""
        return self.any_rank(self.should_stop()) and self.step < self.tcfg.steps

    def checkpoint_if_due(self, *, stop: bool = False) -> None:
        """After a step: a checkpoint every `checkpoint_interval` steps, at the end, and on stop."""
        if self.step % self.tcfg.checkpoint_interval == 0 or self.step == self.tcfg.steps or stop:
            self.save()
            self._last_saved = self.step
        if self._tb is not None:
            self._tb.flush()

    def end(self, *, stopped: bool) -> dict[str, Any]:
        """Closes TensorBoard; the run's summary."""
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        history, total = self._history, self.tcfg.steps
        times = [h.step_ms for h in history[1:]] or [h.step_ms for h in history]
        median_ms = statistics.median(times) if times else None
        return {
            "rank": self.rank, "step": self.step, "steps": total, "stopped": stopped,
            "resumed_from": self.resumed_from, "last_checkpoint": self._last_saved, "pipelined": self.pipelined,
            "steps_run": len(history),
            "final": history[-1].as_event() if history else None,
            "last_eval": self._evals[-1] if self._evals else None,
            "median_step_ms": median_ms,
            "median_tokens_per_s": self.tcfg.global_batch_size * self.cfg.seq_length / (median_ms / 1e3) if median_ms else None,
        }

    def run(self, *, resume: bool = True) -> dict[str, Any]:
        """Trains to `train.steps` (resuming first when asked); returns the run's summary."""
        self.begin(resume=resume)
        stopped = False
        while self.step < self.tcfg.steps:
            self.advance()
            stopped = self.stop_requested()
            self.checkpoint_if_due(stop=stopped)
            if stopped:
                break
        return self.end(stopped=stopped)
