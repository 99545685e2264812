"""The rank's ZeroMQ loop: handshake, commands, events, heartbeats, shutdown.

The only module of ampipe that imports pyzmq. One DEALER socket, used from the main thread
only; events emitted from other threads wait in a bounded queue that the main thread
flushes. Heartbeats are sent by the main thread (between commands, and from ``ctx.emit`` /
``ctx.heartbeat`` during one), so a rank whose Python is stuck stops heartbeating even
though libzmq's I/O thread would still answer (docs/protocol.md, "Liveness").
"""

from __future__ import annotations

import collections
import importlib
import logging
import os
import platform
import socket
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field
from typing import Any

import zmq

from ampipe.process_exit import exit_rank
from ampipe.worker import commands
from ampipe.worker.protocol import DEFAULT_MAX_MESSAGE_BYTES, PROTOCOL_VERSION, ProtocolError, decode, encode

EXIT_OK = 0
EXIT_FATAL = 1  # a failure during start-up (imports, torch.distributed)
EXIT_REJECTED = 2  # the controller refused the handshake
EXIT_CONTROLLER_LOST = 3  # the controller went silent or away
EXIT_RUN_ENDED = 4  # the controller ended the run (a fault elsewhere, a second Ctrl-C) while a command ran

_THREAD_QUEUE_MAX = 10_000  # events from other threads waiting for the main thread
_BATCH_MAX = 256
_BATCH_AGE_S = 0.002


@dataclass
class WorkerSettings:
    endpoint: str
    token: str
    rank: int
    world_size: int
    local_rank: int
    join_timeout_s: float = 120.0
    # Messages (event batches of up to _BATCH_MAX) queued for a slow controller before
    # events are dropped; AMPIPE_SEND_HWM overrides.
    send_hwm: int = 1_000


@dataclass
class _Context:
    """What a command handler sees (ampipe.worker.commands.CommandContext)."""

    worker: "Worker"
    rank: int
    world_size: int
    local_rank: int
    device: Any = None
    backend: str | None = None
    _groups: dict[int, Any] = field(default_factory=dict)

    def emit(self, kind: str, **fields: Any) -> None:
        self.worker.emit(kind, fields)

    @property
    def dropped_events(self) -> int:
        return self.worker.dropped

    def flush_events(self) -> None:
        """Sends what is batched. From another thread it does nothing: the socket is the main
        thread's, and that thread sends other threads' events with its next flush."""
        if threading.get_ident() == self.worker.main_thread:
            self.worker.flush_events()

    def heartbeat(self) -> None:
        """Tells the controller this rank is alive; only the thread running the command can."""
        if threading.get_ident() != self.worker.main_thread:
            raise RuntimeError(
                f"ctx.heartbeat() called from thread {threading.current_thread().name!r} of rank {self.rank}: "
                "only the thread running the command can send heartbeats (the socket is not thread-safe)")
        self.worker.maybe_heartbeat()
        self.worker.poll_control()

    @property
    def cancel_requested(self) -> bool:
        """The controller sent `cancel` during this command (seen by `heartbeat()`); any thread may read it."""
        return self.worker.cancelled.is_set()

    def subgroup(self, size: int) -> Any:
        import torch.distributed as dist

        if size not in self._groups:
            if self.world_size % size != 0:
                raise ValueError(f"subgroup size {size} does not divide world size {self.world_size}")
            self._groups[size], _ = dist.new_subgroups(group_size=size)
        return self._groups[size]


class _EventLogHandler(logging.Handler):
    """Forwards log records of the rank's Python code to the controller as `log` events."""

    def __init__(self, worker: "Worker"):
        super().__init__(logging.INFO)
        self.worker = worker

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.worker.emit("log", {"level": record.levelname.lower(), "logger": record.name,
                                     "message": record.getMessage()})
        except Exception:  # logging must never take the rank down
            pass


class ControllerLost(RuntimeError):
    pass


class Worker:
    def __init__(self, settings: WorkerSettings):
        self.s = settings
        self.ctx_zmq = zmq.Context.instance()
        self.sock = self.ctx_zmq.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.ROUTING_ID, f"rank-{settings.rank}".encode())
        self.sock.setsockopt(zmq.SNDHWM, settings.send_hwm)
        self.sock.setsockopt(zmq.RCVHWM, 10_000)
        self.sock.connect(settings.endpoint)
        self.main_thread = threading.get_ident()
        self.thread_events: collections.deque[dict[str, Any]] = collections.deque()
        self.batch: list[dict[str, Any]] = []
        self.last_flush = 0.0
        self.thread_lock = threading.Lock()
        self.dropped = 0
        self.sent_events = 0
        self.hb_seq = 0
        self.hb_interval = 1.0
        self.hb_timeout = 30.0
        self.next_hb = 0.0
        self.busy: int | None = None
        # Messages read while a command runs (ctx.heartbeat polls for `cancel`): handled after it.
        self.cancelled = threading.Event()
        self.deferred: collections.deque[dict[str, Any]] = collections.deque()
        self.max_bytes = DEFAULT_MAX_MESSAGE_BYTES
        self.context = _Context(self, settings.rank, settings.world_size, settings.local_rank)
        # The controller's liveness: when it was last heard, and when the connection to it
        # dropped (a ZeroMQ monitor event; None while connected).
        self.last_heard = time.monotonic()
        self.disconnected_since: float | None = None
        self.running: str | None = None  # the command running now
        self.monitor = self.sock.get_monitor_socket(zmq.EVENT_CONNECTED | zmq.EVENT_DISCONNECTED)

    # -- sending ------------------------------------------------------------------------
    def send(self, msg: dict[str, Any]) -> None:
        """Sends a message that must arrive (hello, replies): waits up to the heartbeat timeout."""
        self.sock.setsockopt(zmq.SNDTIMEO, int(self.hb_timeout * 1000))
        try:
            self.sock.send(encode(msg))
        except zmq.Again:
            raise ControllerLost(f"could not send {msg.get('type')!r} for {self.hb_timeout:.1f} s") from None

    def _send_nowait(self, frame: bytes) -> bool:
        try:
            self.sock.send(frame, zmq.NOBLOCK)
            return True
        except zmq.Again:
            return False

    def emit(self, kind: str, fields: dict[str, Any]) -> None:
        """Queues an event. Events go out in batches (one frame of up to _BATCH_MAX events):
        an event after a quiet spell is sent at once, a burst is sent every _BATCH_AGE_S or
        _BATCH_MAX events, and whatever is left goes out with the next heartbeat or reply.
        A batch the controller cannot take now is dropped and counted, never waited for."""
        event = {"kind": kind, **fields}
        if threading.get_ident() != self.main_thread:
            with self.thread_lock:
                if len(self.thread_events) >= _THREAD_QUEUE_MAX:
                    self.dropped += 1
                    return
                self.thread_events.append(event)
            return
        self.batch.append(event)
        now = time.monotonic()
        if len(self.batch) >= _BATCH_MAX or now - self.last_flush >= _BATCH_AGE_S:
            self.flush_events(now)
        if now >= self.next_hb:
            self.maybe_heartbeat()

    def flush_events(self, now: float | None = None) -> None:
        if self.thread_events:
            with self.thread_lock:
                moved, self.thread_events = self.thread_events, collections.deque()
            self.batch.extend(moved)
        if not self.batch:
            return
        items, self.batch = self.batch, []
        self.last_flush = time.monotonic() if now is None else now
        try:
            frame = encode({"type": "events", "items": items})
        except (TypeError, ValueError, OverflowError):
            items = self._sendable(items)
            frame = encode({"type": "events", "items": items})
        if self._send_nowait(frame):
            self.sent_events += len(items)
        else:
            self.dropped += len(items)

    def _sendable(self, items: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Drops (and reports on stderr, and counts) the events msgpack cannot carry."""
        ok = []
        for item in items:
            try:
                encode(item)
                ok.append(item)
            except (TypeError, ValueError, OverflowError) as e:
                self.dropped += 1
                print(f"ampipe rank {self.s.rank}: dropped a {item.get('kind')!r} event "
                      f"({item.get('name', '')!s}): {e}", file=sys.stderr)
        return ok

    def maybe_heartbeat(self) -> None:
        now = time.monotonic()
        if now < self.next_hb:
            return
        self.next_hb = now + self.hb_interval
        self.hb_seq += 1
        self.flush_events(now)
        self._send_nowait(encode({"type": "heartbeat", "seq": self.hb_seq, "busy": self.busy,
                                  "dropped": self.dropped, "events": self.sent_events}))

    # -- receiving ----------------------------------------------------------------------
    def _recv(self, timeout_s: float) -> dict[str, Any] | None:
        """One controller message, or None on timeout. Raises ProtocolError for an invalid frame."""
        if not self.sock.poll(max(0, int(timeout_s * 1000))):
            return None
        frames = self.sock.recv_multipart(zmq.NOBLOCK)
        self.last_heard = time.monotonic()
        if len(frames) != 1:
            raise ProtocolError(f"expected 1 frame, got {len(frames)}")
        return decode(frames[0], self.max_bytes)

    def poll_control(self) -> None:
        """During a command (main thread): reads what the controller sent without waiting.
        `cancel` sets `cancelled`; everything else waits for `serve`. A `shutdown` (the
        controller gave up on the run) or a lost controller ends the rank now: the command may
        be inside a collective that waits for a rank that is gone (`abandon`)."""
        while True:
            try:
                msg = self._recv(0)
            except ProtocolError as e:
                self._protocol_error(str(e))
                continue
            if msg is None:
                break
            if msg["type"] == "heartbeat":
                continue  # the controller is alive; nothing to keep
            if msg["type"] == "shutdown":
                why = f" ({msg['reason']})" if msg.get("reason") else ""
                self.abandon(EXIT_RUN_ENDED, f"the controller ended the run while {self.running!r} was running{why}")
            if msg["type"] == "cancel":
                self.cancelled.set()
            else:
                self.deferred.append(msg)
        lost = self.controller_lost()
        if lost:
            self.abandon(EXIT_CONTROLLER_LOST, f"controller lost while {self.running!r} was running: {lost}")

    def controller_lost(self) -> str | None:
        """Why the controller counts as gone, or None. Gone: its connection dropped and did not
        come back within the grace (a killed controller's host refuses the reconnects), or
        nothing came from it for the heartbeat timeout (a hung one)."""
        from zmq.utils.monitor import recv_monitor_message

        while self.monitor.poll(0):
            ev = recv_monitor_message(self.monitor)["event"]
            if ev == zmq.EVENT_DISCONNECTED:
                self.disconnected_since = self.disconnected_since or time.monotonic()
            elif ev == zmq.EVENT_CONNECTED:
                self.disconnected_since = None
        now = time.monotonic()
        if self.disconnected_since is not None and now - self.disconnected_since > self.disconnect_grace_s:
            return (f"the connection to {self.s.endpoint} dropped {now - self.disconnected_since:.1f} s ago "
                    f"and did not come back")
        if now - self.last_heard > self.hb_timeout:
            return f"nothing from the controller for {now - self.last_heard:.1f} s (deadline {self.hb_timeout:.1f} s)"
        return None

    @property
    def disconnect_grace_s(self) -> float:
        """How long a dropped connection may take to come back (a network blip) before the
        controller counts as gone: a few heartbeats, at least 2 s, at most the heartbeat timeout."""
        return min(self.hb_timeout, max(2.0, 3 * self.hb_interval))

    def abandon(self, code: int, why: str) -> None:
        """Leaves now, from the main thread, while the command's thread may be stuck in a
        collective: says why, aborts the process groups, exits with `code` without Python's
        clean-up (which would wait for, or abort on, that thread). Never returns."""
        if not os.environ.get("AMPIPE_PARENT_PID"):  # a local rank's controller reports the cause itself
            print(f"ampipe rank {self.s.rank}: {why}; aborting the process group and exiting ({code})",
                  file=sys.stderr, flush=True)
        self._send_nowait(encode({"type": "bye", "reason": why}))
        _abort_process_groups()
        exit_rank(code)

    def _protocol_error(self, message: str) -> None:
        print(f"ampipe rank {self.s.rank}: rejected a message from the controller: {message}", file=sys.stderr)
        self._send_nowait(encode({"type": "protocol_error", "message": message}))

    # -- life cycle ---------------------------------------------------------------------
    def handshake(self) -> dict[str, Any]:
        import torch

        self.send({
            "type": "hello", "v": PROTOCOL_VERSION, "token": self.s.token,
            "rank": self.s.rank, "world_size": self.s.world_size, "local_rank": self.s.local_rank,
            "pid": os.getpid(), "host": socket.gethostname(),
            "python": platform.python_version(), "torch": torch.__version__,
        })
        deadline = time.monotonic() + self.s.join_timeout_s
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise ControllerLost(f"no answer to the handshake from {self.s.endpoint} in {self.s.join_timeout_s:.0f} s")
            try:
                msg = self._recv(left)
            except ProtocolError as e:
                # Before the welcome, an unreadable answer means we cannot talk to this controller.
                print(f"ampipe rank {self.s.rank}: cannot understand the controller's answer to the "
                      f"handshake: {e}", file=sys.stderr)
                raise SystemExit(EXIT_REJECTED) from None
            if msg is None:
                continue
            if msg["type"] == "reject":
                print(f"ampipe rank {self.s.rank}: the controller rejected this rank: {msg['reason']}", file=sys.stderr)
                raise SystemExit(EXIT_REJECTED)
            if msg["type"] == "welcome":
                return msg
            # anything else before the welcome is ignored (e.g. an early heartbeat)

    def start(self, welcome: dict[str, Any]) -> None:
        """Imports the command modules and initialises torch.distributed; reports `ready`."""
        self.hb_interval = float(welcome["heartbeat_interval_s"])
        self.hb_timeout = float(welcome["heartbeat_timeout_s"])
        self.max_bytes = int(welcome.get("max_message_bytes") or DEFAULT_MAX_MESSAGE_BYTES)
        for mod in (*commands.BUILTIN_MODULES, *(welcome.get("imports") or [])):
            importlib.import_module(mod)
        dist_cfg = welcome.get("dist")
        if dist_cfg:
            self._init_dist(dist_cfg)
        self.send({"type": "ready", "commands": commands.names(),
                   "device": str(self.context.device), "backend": self.context.backend})

    def _init_dist(self, cfg: dict[str, Any]) -> None:
        from datetime import timedelta

        import torch
        import torch.distributed as dist

        device = cfg.get("device") or "auto"
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        backend = cfg.get("backend") or "auto"
        if backend == "auto":
            backend = "nccl" if device == "cuda" else "gloo"
        if device == "cuda":
            torch.cuda.set_device(self.s.local_rank)
            dev = torch.device("cuda", self.s.local_rank)
        else:
            dev = torch.device("cpu")
        dist.init_process_group(backend=backend, rank=self.s.rank, world_size=self.s.world_size,
                                timeout=timedelta(seconds=float(cfg.get("timeout_s") or 300)))
        self.context.device = dev
        self.context.backend = backend

    def serve(self) -> int:
        last_heard = time.monotonic()
        while True:
            self.flush_events()
            self.maybe_heartbeat()
            try:
                msg = self.deferred.popleft() if self.deferred else self._recv(max(0.0, self.next_hb - time.monotonic()))
            except ProtocolError as e:
                self._protocol_error(str(e))  # answered, skipped; the rank stays up
                last_heard = time.monotonic()
                continue
            now = time.monotonic()
            if msg is None:
                self.last_heard = max(self.last_heard, last_heard)
                lost = self.controller_lost()
                if lost:
                    raise ControllerLost(lost)
                continue
            last_heard = now
            kind = msg["type"]
            if kind == "command":
                self._run_command(msg)
                last_heard = self.last_heard = time.monotonic()  # we were not listening while it ran
            elif kind == "shutdown":
                if msg.get("reason"):  # the run failed elsewhere: say what was lost
                    if not os.environ.get("AMPIPE_PARENT_PID"):
                        print(f"ampipe rank {self.s.rank}: the controller ended the run ({msg['reason']})",
                              file=sys.stderr, flush=True)
                    return EXIT_RUN_ENDED
                return EXIT_OK
            elif kind == "cancel":
                pass  # nothing is running: nothing to stop
            elif kind == "welcome":
                self._protocol_error("unexpected second 'welcome'")
            # heartbeat, protocol_error: nothing more to do

    def _run_command(self, msg: dict[str, Any]) -> None:
        cid, name = msg["id"], msg["name"]
        handler = commands.get(name)
        t0 = time.perf_counter()
        if handler is None:
            reply = {"type": "reply", "id": cid, "ok": False, "error": {
                "type": "UnknownCommand", "message": f"unknown command {name!r}; this rank knows: {', '.join(commands.names())}",
                "traceback": ""}}
        else:
            self.busy = cid
            self.running = name
            self.cancelled.clear()
            try:
                result = handler(msg.get("args") or {}, self.context)
                reply = {"type": "reply", "id": cid, "ok": True, "result": result}
                encode(reply)  # fail here, as this command's error, if the result cannot travel
            except Exception as e:
                reply = {"type": "reply", "id": cid, "ok": False, "error": {
                    "type": type(e).__name__, "message": f"{e}", "traceback": traceback.format_exc()}}
            finally:
                self.busy = None
                self.running = None
        reply["elapsed_s"] = time.perf_counter() - t0
        self.flush_events()
        self.send(reply)

    def close(self, reason: str) -> None:
        self._send_nowait(encode({"type": "bye", "reason": reason}))
        if _command_threads():
            return  # a command's thread is still inside torch: `run` leaves without clean-up
        try:
            import torch.distributed as dist

            if dist.is_available() and dist.is_initialized():
                dist.destroy_process_group()
        except Exception:
            pass
        self.sock.disable_monitor()
        self.monitor.close(linger=0)
        self.sock.close(linger=0)
        self.ctx_zmq.term()


def _command_threads() -> list[threading.Thread]:
    """Helper threads of commands still running (one that outlived its command's timeout)."""
    from ampipe.worker.background import COMMAND_THREAD_NAME

    return [t for t in threading.enumerate() if t.name == COMMAND_THREAD_NAME and t.is_alive()]


def _abort_process_groups(timeout_s: float = 2.0) -> None:
    """Aborts every process group (NCCL frees its communicators; for gloo, as of torch 2.13, it
    does not interrupt a running collective, and the exit that follows closes the connections,
    which ends the peers' collectives at once). Bounded: an abort that hangs is left behind."""
    try:
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return
    except Exception:  # noqa: BLE001
        return

    def abort() -> None:
        try:
            dist.distributed_c10d._abort_process_group()
        except Exception:  # noqa: BLE001 - leaving anyway
            pass

    t = threading.Thread(target=abort, name="ampipe-abort", daemon=True)
    t.start()
    t.join(timeout_s)


def _die_with_parent() -> None:
    """Local ranks die with the controller, even if it is SIGKILLed (Linux prctl)."""
    parent = os.environ.get("AMPIPE_PARENT_PID")
    if not parent or not sys.platform.startswith("linux"):
        return
    import ctypes
    import signal

    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        return
    if os.getppid() != int(parent):  # the parent died before prctl took effect
        os._exit(EXIT_CONTROLLER_LOST)


def run(settings: WorkerSettings) -> int:
    _die_with_parent()
    from ..runtime import keep_freed_memory

    keep_freed_memory()  # before the first large allocation
    threads = os.environ.get("AMPIPE_NUM_THREADS")
    if threads:
        import torch

        torch.set_num_threads(int(threads))
    worker = Worker(settings)
    # Python logging: INFO and up travel as `log` events; WARNING and up also go to stderr,
    # so they show in the controller's output and in the stderr tail of a failure report.
    log_handler = _EventLogHandler(worker)
    stderr_handler = logging.StreamHandler(sys.stderr)
    stderr_handler.setLevel(logging.WARNING)
    stderr_handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.addHandler(log_handler)
    root.addHandler(stderr_handler)
    root.setLevel(logging.INFO)
    code, reason = EXIT_FATAL, "fatal"
    try:
        welcome = worker.handshake()
        try:
            worker.start(welcome)
        except Exception as e:
            # Tell the controller why this rank cannot start, then exit non-zero.
            tb = traceback.format_exc()
            print(tb, file=sys.stderr)
            worker._send_nowait(encode({"type": "event", "kind": "error", "fatal": True,
                                        "message": f"start-up failed: {type(e).__name__}: {e}", "traceback": tb}))
            return EXIT_FATAL
        code = worker.serve()
        reason = "shutdown"
        return code
    except ControllerLost as e:
        print(f"ampipe rank {settings.rank}: controller lost: {e}", file=sys.stderr)
        code, reason = EXIT_CONTROLLER_LOST, "controller lost"
        return code
    except SystemExit as e:
        code = int(e.code or 0)
        return code
    finally:
        root.removeHandler(log_handler)
        root.removeHandler(stderr_handler)
        worker.close(reason)
        if _command_threads():
            # A command's thread (past its timeout) is still running, maybe inside a collective:
            # Python's clean-up would wait for it or abort (see ampipe.process_exit).
            print(f"ampipe rank {settings.rank}: a command was still running at exit ({', '.join(t.name for t in _command_threads())}); "
                  "exiting without clean-up", file=sys.stderr, flush=True)
            _abort_process_groups()
            exit_rank(code)
