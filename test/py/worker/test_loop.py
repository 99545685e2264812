"""The rank loop against a fake controller (a pyzmq ROUTER in the test)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import msgpack
import pytest
import zmq

from ampipe.worker.protocol import PROTOCOL_VERSION

REPO = Path(__file__).resolve().parents[3]
TOKEN = "f" * 32

pytestmark = pytest.mark.slow


class FakeController:
    def __init__(self, rcvhwm: int = 1000):
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.RCVTIMEO, 20_000)
        # Before bind: the listener keeps a copy of the options it had then for every connection.
        self.sock.setsockopt(zmq.RCVHWM, rcvhwm)
        port = self.sock.bind_to_random_port("tcp://127.0.0.1")
        self.endpoint = f"tcp://127.0.0.1:{port}"
        self.procs: list[subprocess.Popen] = []

    def spawn(self, rank=0, world_size=1, token=TOKEN, **extra_env: str) -> subprocess.Popen:
        env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": str(world_size), "LOCAL_RANK": str(rank),
               "AMPIPE_CONTROLLER": self.endpoint, "AMPIPE_TOKEN": token, "AMPIPE_NUM_THREADS": "1",
               "PYTHONPATH": str(REPO / "py"), **extra_env}
        p = subprocess.Popen([sys.executable, "-m", "ampipe.worker"], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.procs.append(p)
        return p

    def recv(self, skip=("heartbeat",)) -> tuple[bytes, dict]:
        while True:
            ident, frame = self.sock.recv_multipart()
            msg = msgpack.unpackb(frame, raw=False, strict_map_key=False)
            if msg["type"] not in skip:
                return ident, msg

    def send(self, ident: bytes, msg: dict | bytes) -> None:
        self.sock.send_multipart([ident, msg if isinstance(msg, bytes) else msgpack.packb(msg)])

    def welcome(self, ident: bytes, **over) -> None:
        self.send(ident, {"type": "welcome", "v": PROTOCOL_VERSION, "heartbeat_interval_s": 0.05,
                          "heartbeat_timeout_s": 2.0, "max_message_bytes": 1 << 20, "imports": [],
                          "dist": None, **over})

    def close(self):
        for p in self.procs:
            if p.poll() is None:
                p.kill()
            p.wait(timeout=10)
        self.sock.close(0)
        self.ctx.term()


@pytest.fixture
def controller(request):
    c = FakeController(**getattr(request, "param", {}))
    yield c
    c.close()


def test_handshake_commands_errors_and_shutdown(controller):
    p = controller.spawn()
    ident, hello = controller.recv()
    assert ident == b"rank-0"
    assert hello["type"] == "hello" and hello["v"] == PROTOCOL_VERSION and hello["token"] == TOKEN
    assert hello["rank"] == 0 and hello["world_size"] == 1 and hello["pid"] == p.pid
    controller.welcome(ident)
    _, ready = controller.recv()
    assert ready["type"] == "ready" and "ping" in ready["commands"] and ready["backend"] is None

    controller.send(ident, {"type": "command", "id": 1, "name": "echo", "args": {"a": [1, 2.5, "x"]}})
    _, reply = controller.recv()
    assert reply == {**reply, "type": "reply", "id": 1, "ok": True, "result": {"a": [1, 2.5, "x"]}}

    controller.send(ident, {"type": "command", "id": 2, "name": "fail", "args": {"message": "kaboom"}})
    _, reply = controller.recv()
    assert reply["ok"] is False and reply["error"]["type"] == "RuntimeError"
    assert "kaboom" in reply["error"]["message"]
    assert "Traceback (most recent call last)" in reply["error"]["traceback"]

    controller.send(ident, {"type": "command", "id": 3, "name": "nope", "args": {}})
    _, reply = controller.recv()
    assert reply["error"]["type"] == "UnknownCommand" and "this rank knows" in reply["error"]["message"]

    # Bad frames are answered with protocol_error; the rank keeps serving.
    controller.send(ident, b"\xc1\xc1")
    _, err = controller.recv()
    assert err["type"] == "protocol_error" and "malformed frame" in err["message"]
    controller.send(ident, {"type": "teleport"})
    _, err = controller.recv()
    assert err["type"] == "protocol_error" and "unknown message type 'teleport'" in err["message"]

    controller.send(ident, {"type": "command", "id": 4, "name": "emit_metrics", "args": {"count": 50}})
    events = []
    while True:
        _, m = controller.recv()
        if m["type"] == "reply":
            break
        assert m["type"] == "events"
        events.extend(m["items"])
    assert [e["step"] for e in events if e["kind"] == "metric"] == list(range(50))
    assert m["result"]["count"] == 50 and m["result"]["dropped"] == 0

    controller.send(ident, {"type": "shutdown"})
    _, bye = controller.recv()
    assert bye == {"type": "bye", "reason": "shutdown"}
    assert p.wait(timeout=20) == 0


def test_heartbeats_flow_and_silent_controller_ends_the_rank(controller):
    p = controller.spawn()
    ident, _ = controller.recv()
    controller.welcome(ident, heartbeat_interval_s=0.05, heartbeat_timeout_s=0.5)
    controller.recv()  # ready
    _, hb = controller.recv(skip=())
    assert hb["type"] == "heartbeat" and hb["busy"] is None and hb["dropped"] == 0
    # We never heartbeat back: the rank gives up on us after its deadline.
    assert p.wait(timeout=20) == 3
    assert "controller lost: nothing from the controller" in p.stderr.read()


def test_version_mismatch_in_welcome_ends_the_rank(controller):
    p = controller.spawn()
    ident, _ = controller.recv()
    controller.welcome(ident, v=PROTOCOL_VERSION + 1)
    assert p.wait(timeout=20) == 2
    assert "protocol version mismatch" in p.stderr.read()


def test_rejected_rank_exits_with_the_reason(controller):
    p = controller.spawn(token="wrong")
    ident, _ = controller.recv()
    controller.send(ident, {"type": "reject", "reason": "wrong token"})
    assert p.wait(timeout=20) == 2
    assert "the controller rejected this rank: wrong token" in p.stderr.read()


@pytest.mark.parametrize("controller", [{"rcvhwm": 10}], indirect=True)
def test_slow_controller_does_not_stall_the_rank(controller, tmp_path):
    """The rank streams far more events than the pipes hold while we read nothing: it drops
    and counts them instead of blocking, and its reply still arrives."""
    p = controller.spawn(AMPIPE_SEND_HWM="10", PYTHONPATH=f"{REPO / 'py'}:{Path(__file__).parent}")
    ident, _ = controller.recv()
    controller.welcome(ident, imports=["worker_test_commands"])
    controller.recv()
    count = 200_000
    done = tmp_path / "done"
    controller.send(ident, {"type": "command", "id": 1, "name": "test_emit_then_mark_done",
                            "args": {"count": count, "done_file": str(done)}})
    # A controller busy elsewhere: read nothing until the rank has emitted every event (a
    # fixed sleep is not enough on a loaded machine, where the rank may still be emitting).
    deadline = time.monotonic() + 60
    while not done.exists():
        assert time.monotonic() < deadline, "the rank blocked while the controller was not reading"
        assert p.poll() is None, p.stderr.read()
        time.sleep(0.05)
    received = 0
    while True:
        _, m = controller.recv(skip=())
        if m["type"] == "reply":
            break
        if m["type"] == "events":
            received += len(m["items"])
    res = m["result"]
    assert res["count"] == count
    assert res["dropped"] > 0, (res, received)
    assert received + res["dropped"] == count
    controller.send(ident, {"type": "shutdown"})
    assert p.wait(timeout=20) == 0


def test_imported_commands_events_from_threads_numpy_values_and_logging(controller):
    p = controller.spawn(PYTHONPATH=f"{REPO / 'py'}:{Path(__file__).parent}")
    ident, _ = controller.recv()
    controller.welcome(ident, imports=["worker_test_commands"])
    _, ready = controller.recv()
    assert "test_emit_values" in ready["commands"]
    controller.send(ident, {"type": "command", "id": 1, "name": "test_emit_values", "args": {}})
    items = []
    while True:
        _, m = controller.recv()
        if m["type"] == "reply":
            break
        items.extend(m["items"])
    metrics = {e["name"]: e["value"] for e in items if e["kind"] == "metric"}
    assert metrics == {"np": 1.5, "tensor": 2.5, "from_thread": 3}
    logs = [e for e in items if e["kind"] == "log"]
    assert logs == [{"kind": "log", "level": "warning", "logger": "ampipe.test", "message": "careful: 7"}]
    assert m["result"]["dropped"] == 1
    assert m["result"]["heartbeat_error"] == [
        "ctx.heartbeat() called from thread 'helper' of rank 0: only the thread running the command "
        "can send heartbeats (the socket is not thread-safe)"]
    controller.send(ident, {"type": "shutdown"})
    assert p.wait(timeout=20) == 0
    err = p.stderr.read()
    assert "dropped a 'metric' event (bad): cannot send a builtins.object" in err
    assert "WARNING ampipe.test: careful: 7" in err


def test_cancel_stops_a_long_command_and_later_messages_wait_for_it(controller):
    p = controller.spawn(PYTHONPATH=f"{REPO / 'py'}:{Path(__file__).parent}")
    ident, _ = controller.recv()
    controller.welcome(ident, imports=["worker_test_commands"])
    controller.recv()
    # A cancel with nothing running is a no-op.
    controller.send(ident, {"type": "cancel"})
    controller.send(ident, {"type": "command", "id": 1, "name": "test_until_cancelled", "args": {}})
    while True:  # wait until the command runs
        _, m = controller.recv()
        if m["type"] == "events" and any(e.get("stage") == "start" for e in m["items"]):
            break
    # Read while the command runs: a command queued behind it, then the cancel that ends it.
    controller.send(ident, {"type": "command", "id": 2, "name": "echo", "args": {"x": 1}})
    time.sleep(0.3)
    controller.send(ident, {"type": "cancel"})
    replies = []
    while len(replies) < 2:
        _, m = controller.recv(skip=("heartbeat", "events"))
        replies.append(m)
    assert [r["id"] for r in replies] == [1, 2]
    assert replies[0]["ok"] and replies[0]["result"]["steps"] > 0
    assert replies[1]["ok"]
    # The next long command starts un-cancelled (and is cancelled again).
    controller.send(ident, {"type": "command", "id": 3, "name": "test_until_cancelled", "args": {}})
    time.sleep(0.3)
    controller.send(ident, {"type": "cancel"})
    _, m = controller.recv(skip=("heartbeat", "events"))
    assert m["id"] == 3 and m["ok"] and m["result"]["steps"] > 0
    controller.send(ident, {"type": "shutdown"})
    assert p.wait(timeout=20) == 0


def _running_in_background(controller, **welcome):
    """A rank (external: no AMPIPE_PARENT_PID) running a long command on its helper thread."""
    p = controller.spawn(PYTHONPATH=f"{REPO / 'py'}:{Path(__file__).parent}", AMPIPE_PARENT_PID="")
    ident, _ = controller.recv()
    controller.welcome(ident, imports=["worker_test_commands"], **welcome)
    controller.recv()  # ready
    controller.send(ident, {"type": "command", "id": 1, "name": "test_until_cancelled", "args": {}})
    _, m = controller.recv()
    assert m["type"] == "events" and m["items"][0]["kind"] == "progress", m
    return p, ident


def test_shutdown_during_a_command_ends_the_rank_at_once_naming_why(controller):
    """The controller gave up on the run (a rank died): the command's thread may be inside a
    collective that never ends, so the rank leaves now, exit 4, saying what was lost."""
    p, ident = _running_in_background(controller)
    controller.send(ident, {"type": "shutdown", "reason": "rank 1 (pid 42 on h) was killed by SIGKILL"})
    assert p.wait(timeout=20) == 4
    err = p.stderr.read()
    assert ("ampipe rank 0: the controller ended the run while 'test_until_cancelled' was running "
            "(rank 1 (pid 42 on h) was killed by SIGKILL); aborting the process group and exiting (4)") in err, err


def test_a_failed_runs_shutdown_between_commands_exits_4_naming_why(controller):
    p = controller.spawn(AMPIPE_PARENT_PID="")
    ident, _ = controller.recv()
    controller.welcome(ident)
    controller.recv()  # ready
    controller.send(ident, {"type": "shutdown", "reason": "rank 1 (pid 42 on h) disconnected"})
    assert p.wait(timeout=20) == 4
    assert "ampipe rank 0: the controller ended the run (rank 1 (pid 42 on h) disconnected)" in p.stderr.read()


def test_controller_gone_during_a_command_ends_the_rank_within_the_grace(controller):
    """The controller's socket closes (its process died): the connection drops and does not
    come back, so the rank leaves after the grace (a few heartbeats), long before its
    heartbeat deadline (60 s here), exit 3."""
    p, _ = _running_in_background(controller, heartbeat_interval_s=0.2, heartbeat_timeout_s=60.0)
    controller.sock.close(0)
    assert p.wait(timeout=30) == 3
    err = p.stderr.read()
    assert "controller lost while 'test_until_cancelled' was running: the connection to tcp://127.0.0.1:" in err, err
