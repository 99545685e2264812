"""What ``ampipe doctor`` asks Python (through pythonia): versions, devices, backends, kernels.

``probe_json()`` returns one JSON string: a list of checks, each
``{"name", "ok", "required", "value", "fix"}``. Every check catches its own errors, so a
broken install yields a report, never an exception. Loadable as a plain file (pythonia
imports it by path), so it must not rely on ``ampipe`` being importable.
"""

from __future__ import annotations

import json
import platform
import sys
from importlib import import_module
from pathlib import Path
from typing import Any

MIN_PYTHON = (3, 10)
MIN_VERSIONS = {"torch": "2.5", "zmq": "26", "msgpack": "1.0", "numpy": "1.26"}
PIP_NAMES = {"zmq": "pyzmq"}


def _version_tuple(v: str) -> tuple[int, ...]:
    out = []
    for part in v.split("+")[0].split("."):
        digits = "".join(c for c in part if c.isdigit())
        if not digits:
            break
        out.append(int(digits))
    return tuple(out)


def _check(name: str, ok: bool, value: str, required: bool = True, fix: str | None = None) -> dict[str, Any]:
    return {"name": name, "ok": bool(ok), "required": required, "value": value, "fix": None if ok else fix}


def _package(mod: str, required: bool = True) -> tuple[dict[str, Any], Any]:
    pip = PIP_NAMES.get(mod, mod)
    want = MIN_VERSIONS[mod]
    install = f"{sys.executable} -m pip install '{pip}>={want}'"
    try:
        m = import_module(mod)
    except Exception as e:  # ImportError, or a broken install raising anything
        return _check(pip, False, f"missing ({type(e).__name__}: {e})", required, install), None
    version = getattr(m, "__version__", "?")
    if mod == "zmq":
        version = f"{m.pyzmq_version()} (libzmq {m.zmq_version()})"
    ok = _version_tuple(version) >= _version_tuple(want)
    return _check(pip, ok, version if ok else f"{version}, older than {want}", required, install), m


def probe() -> list[dict[str, Any]]:
    checks: list[dict[str, Any]] = []
    py_ok = sys.version_info[:2] >= MIN_PYTHON
    checks.append(_check("python", py_ok, f"{platform.python_version()} at {sys.executable}", True,
                         f"use Python >= {'.'.join(map(str, MIN_PYTHON))}: set AMPIPE_PYTHON or recreate .venv"))
    torch_check, torch = _package("torch")
    checks.append(torch_check)
    checks.append(_package("numpy")[0])
    checks.append(_package("msgpack")[0])
    checks.append(_package("zmq")[0])

    try:
        import ampipe

        checks.append(_check("ampipe package", True, f"{ampipe.__version__} from {Path(ampipe.__file__).parent}"))
    except Exception as e:
        checks.append(_check("ampipe package", False, f"not importable ({e})", True,
                             f"{sys.executable} -m pip install -e py   (or run `npm start` once)"))

    if torch is None:
        return checks
    try:
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        names = [torch.cuda.get_device_name(i) for i in range(n)]
        value = f"{n}: " + ", ".join(names) if n else f"none (CPU only; torch built {'with' if torch.version.cuda else 'without'} CUDA)"
        checks.append(_check("CUDA devices", True, value, required=False))
    except Exception as e:
        n = 0
        checks.append(_check("CUDA devices", False, f"probe failed: {e}", False, "check the NVIDIA driver (nvidia-smi)"))
    try:
        import torch.distributed as dist

        dist_ok = dist.is_available()
        gloo = dist_ok and dist.is_gloo_available()
        nccl = dist_ok and dist.is_nccl_available()
    except Exception:
        dist_ok = gloo = nccl = False
    checks.append(_check("gloo backend", gloo, "available" if gloo else "not available", True,
                         "install a torch build with distributed support (pip install torch)"))
    checks.append(_check("nccl backend", nccl or n == 0,
                         "available" if nccl else ("not available (not needed on CPU)" if n == 0 else "not available"),
                         required=n > 0, fix="install a CUDA build of torch with NCCL"))
    try:
        ops = import_module("ampipe.ops")
        impl = ops.implementation()
        status = ops.extension_status()
        reason = status.get("reason") or status.get("error")
        value = impl + (f" ({reason})" if impl == "reference" and reason else "")
        checks.append(_check("kernels", impl != "reference", value, required=False,
                             fix="build the extension: .venv/bin/python -m ampipe.ops.build (falls back to the pure-torch reference)"))
    except Exception as e:
        checks.append(_check("kernels", False, f"unknown ({type(e).__name__}: {e})", required=False,
                             fix="the ampipe.ops module did not load"))
    return checks


def probe_json() -> str:
    return json.dumps(probe())


if __name__ == "__main__":
    print(json.dumps(probe(), indent=2))
