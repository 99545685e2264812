"""ampipe: intra-block pipelining of attention and the MoE all-to-all (AMPipe).

Importing ampipe needs torch only: ZeroMQ is imported by the rank process
(`python -m ampipe.worker`) alone, so GPU machines without pyzmq can use the model,
the executor and the kernels.

The swap API, importable from here (loaded on first use, so ``import ampipe`` itself
imports nothing heavy): `swap_blocks(model, plan) -> SwapReport`, `unswap_blocks(model)`,
`apply_ampipe(layer, plan)`, `load_plan(path)` (docs/swap.md).
"""

__version__ = "0.1.0"

_LAZY = {
    "swap_blocks": "ampipe.pipeline.swap",
    "unswap_blocks": "ampipe.pipeline.swap",
    "SwapReport": "ampipe.pipeline.swap",
    "apply_ampipe": "ampipe.pipeline.block",
    "unapply_ampipe": "ampipe.pipeline.block",
    "AMPipeBlock": "ampipe.pipeline.block",
    "load_plan": "ampipe.pipeline.plan",
    "PlanError": "ampipe.pipeline.plan",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'ampipe' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
