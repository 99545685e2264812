"""Loads the built extension (never builds it) and registers its Python-side pieces.

The library is loaded at most once per process, on first use. When it is missing, stale
(sources or torch changed since the build) or fails to load, ampipe uses the pure-torch
reference and says so in ONE warning naming the command that builds it.
"""

from __future__ import annotations

import threading
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from . import paths

BUILD_HINT = "build it with `python -m ampipe.ops.build` (or `npm run setup`)"


@dataclass
class ExtensionState:
    loaded: bool
    reason: str = ""
    library: str | None = None
    cuda: bool = False  # the library has CUDA kernels

    def as_dict(self) -> dict:
        return asdict(self)


_state: ExtensionState | None = None
_lock = threading.Lock()


def _find() -> tuple[Path | None, str, dict | None]:
    """The library to load, or None with the reason."""
    stamp = paths.read_stamp()
    if stamp is None:
        return None, f"no build found in {paths.build_dir()}", None
    if not stamp.get("ok"):
        return None, f"the last build failed ({stamp.get('error', 'see its log')})", stamp
    lib = paths.build_dir() / stamp.get("library", "")
    if not lib.is_file():
        return None, f"the built library {lib} is missing", stamp
    if stamp.get("torch") != torch.__version__:
        return None, f"built for torch {stamp.get('torch')}, running torch {torch.__version__}", stamp
    if paths.source_files() and stamp.get("sources") != paths.sources_hash():
        return None, "csrc/ changed since the last build (stale)", stamp
    return lib, "", stamp


def load_extension(required: bool = False) -> ExtensionState:
    """Load ``torch.ops.ampipe`` once; ``required`` turns a fallback into an error."""
    global _state
    if _state is None:  # after the first call this is the whole hot path (what torch.compile traces): no lock
        with _lock:
            if _state is None:
                _state = _load()
                if not _state.loaded:
                    warnings.warn(
                        f"ampipe: compiled dispatch/combine ops not loaded: {_state.reason}; using the "
                        f"pure-torch reference ({BUILD_HINT})",
                        RuntimeWarning,
                        stacklevel=3,
                    )
    if required and not _state.loaded:
        raise RuntimeError(
            f"AMPIPE_OPS=compiled but the extension is not loaded: {_state.reason}; {BUILD_HINT}"
        )
    return _state


def _load() -> ExtensionState:
    lib, reason, stamp = _find()
    if lib is None:
        return ExtensionState(False, reason)
    try:
        torch.ops.load_library(str(lib))
        from . import registration  # noqa: F401  (fake kernels and autograd, once)
    except Exception as exc:  # a broken .so must not take the model down with it
        return ExtensionState(False, f"loading {lib} failed: {exc}", str(lib))
    has_cuda = torch._C._dispatch_has_kernel_for_dispatch_key("ampipe::permute", "CUDA")
    return ExtensionState(True, "", str(lib), bool(has_cuda))
