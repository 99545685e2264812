"""``python -m ampipe.worker``: one rank, connecting to the ampipe controller.

Launched by the controller (``ampipe ping``, ``launchRanks``) or by torchrun:

    AMPIPE_TOKEN=<token> python -m torch.distributed.run --standalone --nproc-per-node 2 \\
        -m ampipe.worker --controller tcp://HOST:PORT

RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT come from the environment
(torchrun sets them). The token (printed by `ampipe ping --external`) comes from
AMPIPE_TOKEN or --token; the environment keeps it out of the process list.
"""

from __future__ import annotations

import argparse
import os
import sys


def _env_int(name: str, default: int | None = None) -> int:
    v = os.environ.get(name)
    if v is None:
        if default is None:
            raise SystemExit(f"ampipe.worker: environment variable {name} is not set (run under torchrun or the ampipe launcher)")
        return default
    return int(v)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m ampipe.worker", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--controller", default=os.environ.get("AMPIPE_CONTROLLER"),
                   help="controller endpoint, e.g. tcp://10.0.0.1:5555 (env AMPIPE_CONTROLLER)")
    p.add_argument("--token", default=os.environ.get("AMPIPE_TOKEN"),
                   help="the run's token, printed by the controller (env AMPIPE_TOKEN)")
    p.add_argument("--join-timeout", type=float, default=float(os.environ.get("AMPIPE_JOIN_TIMEOUT_S", "120")),
                   help="seconds to wait for the controller's answer to the handshake")
    a = p.parse_args(argv)
    if not a.controller:
        p.error("--controller is required (or AMPIPE_CONTROLLER)")
    if not a.token:
        p.error("--token is required (or AMPIPE_TOKEN)")
    try:
        from ampipe.worker.loop import WorkerSettings, run
    except ImportError as e:
        print(f"ampipe.worker: {e}; the rank process needs pyzmq: pip install 'pyzmq>=26'", file=sys.stderr)
        return 1
    settings = WorkerSettings(
        endpoint=a.controller, token=a.token,
        rank=_env_int("RANK"), world_size=_env_int("WORLD_SIZE"), local_rank=_env_int("LOCAL_RANK", _env_int("RANK")),
        join_timeout_s=a.join_timeout,
    )
    if os.environ.get("AMPIPE_SEND_HWM"):
        settings.send_hwm = int(os.environ["AMPIPE_SEND_HWM"])
    return run(settings)


def _exit_status(e: SystemExit) -> int:
    if e.code is None or isinstance(e.code, int):
        return e.code or 0
    print(e.code, file=sys.stderr)  # SystemExit("message"), as sys.exit prints it
    return 1


if __name__ == "__main__":
    # Every way out ends with exit_rank, not sys.exit (see ampipe.process_exit).
    from ampipe.process_exit import exit_rank

    try:
        status = main()
    except SystemExit as e:
        status = _exit_status(e)
    except BaseException:  # noqa: BLE001 - reported, then the same exit as any other
        import traceback

        traceback.print_exc()
        status = 1
    exit_rank(status)
