"""Build the ampipe extension: ``python -m ampipe.ops.build [--force] [--cpu-only] [--verbose]``.

Compiles ``csrc/`` with ninja through ``torch.utils.cpp_extension`` into ``build/ext/``
(``$AMPIPE_EXT_DIR``). The CUDA kernels are compiled when torch has CUDA and an nvcc of the
same CUDA major version is found; otherwise the library has the CPU kernels only.

The build is keyed by a fingerprint of the sources, this recipe, the torch and Python
versions and the nvcc version; when the key matches the last build (success or failure)
nothing is done, without importing torch, so the no-change path takes a fraction of a
second. A failed build writes ``build/ext/build.log`` and exits 1; ampipe then uses the
pure-torch reference ops and says so once.

Exit codes: 0 built or up to date, 1 the build failed, 2 nothing to build (no csrc/).
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make `ampipe` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from ampipe.ops import paths  # noqa: E402  (light: no torch import)

CXX_FLAGS = ["-O3", "-fopenmp"]
CUDA_FLAGS = ["-O3", "--expt-relaxed-constexpr", "-lineinfo"]
LD_FLAGS = ["-fopenmp"]


def _torch_versions() -> tuple[str, str | None]:
    """torch's version and CUDA version, read from torch/version.py without importing torch."""
    spec = importlib.util.find_spec("torch")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("torch is not installed")
    text = (Path(list(spec.submodule_search_locations)[0]) / "version.py").read_text()
    found: dict = {}
    for node in ast.parse(text).body:  # `__version__ = '...'`, `cuda: Optional[str] = '12.8'`
        if isinstance(node, ast.Assign) and len(node.targets) == 1:
            target, value = node.targets[0], node.value
        elif isinstance(node, ast.AnnAssign) and node.value is not None:
            target, value = node.target, node.value
        else:
            continue
        if isinstance(target, ast.Name) and target.id in ("__version__", "cuda"):
            found[target.id] = ast.literal_eval(value)
    return str(found.get("__version__")), found.get("cuda")


def _nvcc() -> tuple[str | None, str | None]:
    """Path and CUDA release ("13.0") of the nvcc that cpp_extension would use."""
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    candidates = [Path(home) / "bin" / "nvcc"] if home else []
    which = shutil.which("nvcc")
    if which:
        candidates.append(Path(which))
    candidates.append(Path("/usr/local/cuda/bin/nvcc"))
    for c in candidates:
        if c.is_file():
            try:
                out = subprocess.run([str(c), "--version"], capture_output=True, text=True, timeout=30).stdout
            except (OSError, subprocess.SubprocessError):
                continue
            m = re.search(r"release (\d+\.\d+)", out)
            return str(c), m.group(1) if m else None
    return None, None


def _plan(cpu_only: bool) -> dict:
    torch_version, torch_cuda = _torch_versions()
    nvcc, nvcc_release = (None, None) if cpu_only else _nvcc()
    if cpu_only:
        cuda, why = False, "--cpu-only"
    elif torch_cuda is None:
        cuda, why = False, f"torch {torch_version} has no CUDA"
    elif nvcc is None:
        cuda, why = False, f"torch has CUDA {torch_cuda} but no nvcc was found (set CUDA_HOME)"
    elif nvcc_release is None or nvcc_release.split(".")[0] != torch_cuda.split(".")[0]:
        cuda, why = False, f"nvcc {nvcc_release} ({nvcc}) does not match torch's CUDA {torch_cuda}"
    else:
        cuda, why = True, f"nvcc {nvcc_release} matches torch's CUDA {torch_cuda}"
    sources = paths.sources_hash()
    key = hashlib.sha256(
        json.dumps([sources, torch_version, torch_cuda, nvcc_release if cuda else None,
                    sys.version, os.environ.get("TORCH_CUDA_ARCH_LIST")]).encode()
    ).hexdigest()
    return {"key": key, "sources": sources, "torch": torch_version, "torch_cuda": torch_cuda,
            "cuda": cuda, "cuda_reason": why, "nvcc": nvcc}


def _write_stamp(stamp: dict) -> None:
    paths.build_dir().mkdir(parents=True, exist_ok=True)
    tmp = paths.stamp_path().with_suffix(".tmp")
    tmp.write_text(json.dumps(stamp, indent=2) + "\n")
    tmp.replace(paths.stamp_path())


def _default_arch_list() -> None:
    """Without a visible GPU, cpp_extension would target every arch nvcc knows (slow)."""
    if os.environ.get("TORCH_CUDA_ARCH_LIST"):
        return
    import torch

    if torch.cuda.is_available():
        return  # cpp_extension targets the visible devices
    os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0+PTX"


def build(force: bool = False, cpu_only: bool = False, verbose: bool = False) -> int:
    srcs = paths.source_files()
    cpp = [p for p in srcs if p.suffix == ".cpp"]
    cu = [p for p in srcs if p.suffix == ".cu"]
    if not cpp:
        print(f"ampipe.ops.build: no sources in {paths.CSRC}; nothing to build")
        return 2
    plan = _plan(cpu_only)
    old = paths.read_stamp()
    if not force and old and old.get("key") == plan["key"]:
        lib = paths.build_dir() / old.get("library", "")
        if old.get("ok") and lib.is_file():
            print(f"ampipe.ops.build: up to date ({'CPU+CUDA' if old.get('cuda') else 'CPU'} "
                  f"kernels, {lib})")
            return 0
        if not old.get("ok"):
            print(f"ampipe.ops.build: the last build of these sources failed "
                  f"(log: {old.get('log')}); rerun with --force to retry")
            return 1
    work = paths.build_dir() / "work"
    work.mkdir(parents=True, exist_ok=True)
    log = paths.build_dir() / "build.log"
    sources = [str(p) for p in cpp + (cu if plan["cuda"] else [])]
    print(f"ampipe.ops.build: compiling {len(sources)} sources "
          f"({'CPU+CUDA' if plan['cuda'] else 'CPU only'}: {plan['cuda_reason']}) into {work}")
    t0 = time.perf_counter()
    stamp = {k: plan[k] for k in ("key", "sources", "torch", "torch_cuda", "cuda", "cuda_reason")}
    try:
        if plan["cuda"]:
            _default_arch_list()
        from torch.utils import cpp_extension

        cpp_extension.load(
            name=paths.LIB_NAME,
            sources=sources,
            build_directory=str(work),
            extra_cflags=CXX_FLAGS,
            extra_cuda_cflags=CUDA_FLAGS,
            extra_ldflags=LD_FLAGS,
            with_cuda=plan["cuda"],
            is_python_module=False,
            verbose=verbose,
        )
    except Exception as exc:  # any failure: keep the reference path working
        log.write_text(f"{type(exc).__name__}: {exc}\n")
        first = next((ln for ln in str(exc).splitlines() if "error" in ln.lower()), str(exc))[:300]
        _write_stamp({**stamp, "ok": False, "error": first, "log": str(log)})
        print(f"ampipe.ops.build: FAILED after {time.perf_counter() - t0:.1f}s: {first}\n"
              f"  full log: {log}\n  ampipe will use the pure-torch reference ops", file=sys.stderr)
        return 1
    lib = work / f"{paths.LIB_NAME}.so"
    _write_stamp({**stamp, "ok": True, "library": str(lib.relative_to(paths.build_dir())),
                  "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
    log.write_text(f"built {lib} in {time.perf_counter() - t0:.1f}s\n")
    print(f"ampipe.ops.build: built {lib} in {time.perf_counter() - t0:.1f}s")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m ampipe.ops.build", description=__doc__.split("\n\n")[0])
    ap.add_argument("--force", action="store_true", help="rebuild even when the key matches")
    ap.add_argument("--cpu-only", action="store_true", help="skip the CUDA kernels")
    ap.add_argument("--verbose", action="store_true", help="show the compiler commands")
    args = ap.parse_args(argv)
    return build(force=args.force, cpu_only=args.cpu_only, verbose=args.verbose)


if __name__ == "__main__":
    sys.exit(main())
