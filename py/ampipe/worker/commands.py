"""The rank's command registry (docs/contracts.md section 4).

Feature modules add commands with the ``@command`` decorator; the bridge loop
(``ampipe.worker.loop``) owns the socket, the handshake, heartbeats and errors. Importing
this module does not import pyzmq or torch.

    from ampipe.worker.commands import command

    @command("run_block")
    def run_block(args: dict, ctx: CommandContext) -> dict:
        ctx.emit("metric", name="step_ms", value=12.5, step=0)
        return {"ok": True}

The controller names the modules a rank imports at start (``launchRanks({imports: [...]})``);
the built-in commands in ``ampipe.worker.builtin`` are always there.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

BUILTIN_MODULES = ("ampipe.worker.builtin",)


class CommandContext(Protocol):
    rank: int
    world_size: int
    local_rank: int
    device: Any  # torch.device
    backend: str | None  # "gloo" | "nccl" | None when torch.distributed is not initialised

    def emit(self, kind: str, **fields: Any) -> None:
        """Streams an event (``metric``, ``log``, ...) to the controller without ever blocking.

        Events travel in batches; when the controller is not keeping up they are dropped and
        counted (``dropped_events``, and every heartbeat). Callable from any thread.
        """

    @property
    def dropped_events(self) -> int:
        """Events this rank has dropped so far because the controller was not keeping up."""

    def flush_events(self) -> None:
        """Sends the batched events now (a reply does this anyway)."""

    def heartbeat(self) -> None:
        """Proves liveness during a long command (emit() does this too), and reads a `cancel`
        the controller sent meanwhile. Main thread only."""

    @property
    def cancel_requested(self) -> bool:
        """Whether the controller asked the running command to stop at its next safe point."""

    def subgroup(self, size: int) -> Any:
        """The process group of contiguous ranks [k*size, (k+1)*size) holding this rank (cached).

        Every rank must call it with the same sizes in the same order (torch.distributed rule).
        """


Handler = Callable[[dict, CommandContext], Any]


@dataclass
class _Registry:
    handlers: dict[str, Handler] = field(default_factory=dict)
    origins: dict[str, str] = field(default_factory=dict)


_registry = _Registry()


def command(name: str) -> Callable[[Handler], Handler]:
    """Registers ``fn(args, ctx) -> msgpack-able result`` as the command ``name``."""

    def deco(fn: Handler) -> Handler:
        origin = f"{fn.__module__}.{fn.__qualname__}"
        previous = _registry.origins.get(name)
        if previous is not None and previous != origin:
            raise ValueError(f"command {name!r} is registered twice: by {previous} and by {origin}")
        _registry.handlers[name] = fn
        _registry.origins[name] = origin
        return fn

    return deco


def get(name: str) -> Handler | None:
    return _registry.handlers.get(name)


def names() -> list[str]:
    return sorted(_registry.handlers)
