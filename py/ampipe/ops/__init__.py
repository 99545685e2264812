"""Expert dispatch/combine ops: ``make_row_map``, ``permute``, ``unpermute``.

One API, two implementations (docs/contracts.md section 3, docs/kernels.md):

- the compiled extension (``torch.ops.ampipe.*``, C++ on CPU and CUDA on GPU), built by
  ``python -m ampipe.ops.build`` into ``build/ext/`` and loaded here when it is present and
  matches the sources and the installed torch;
- the pure-torch reference (:mod:`ampipe.ops.reference`) otherwise, with one warning that
  says how to build.

Importing this module never compiles anything. ``AMPIPE_OPS=reference`` forces the
reference (the tests use it to compare); ``AMPIPE_OPS=compiled`` makes a missing or stale
extension an error instead of a warning.
"""

from __future__ import annotations

import importlib

# The API lives in ampipe.ops.api (which imports torch); it is bound here on first use so
# that `python -m ampipe.ops.build` (which imports this package) does not import torch.
_API = ("make_row_map", "permute", "unpermute", "implementation", "extension_status", "set_sync_checks")
_SUBMODULES = ("api", "reference", "loader", "registration", "validate", "paths", "build")

__all__ = list(_API)


def __getattr__(name: str):
    if name in _API:
        value = getattr(importlib.import_module(".api", __name__), name)
        globals()[name] = value  # later lookups skip __getattr__
        return value
    if name in _SUBMODULES:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_API) | set(_SUBMODULES))
