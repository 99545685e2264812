"""The pipelined block: plan loading/validation, the stream executor, `AMPipeBlock`,
swapping it into models (docs/pipeline.md, docs/swap.md). Importing it needs torch only."""

from .block import AMPipeBlock, apply_ampipe, unapply_ampipe
from .dims import block_dims
from .side_by_side import run_block_comparison
from .emulation import EmulatedComm
from .plan import Plan, PlanError, PlanOp, StreamSpec, check_dims, load_plan, validate_plan
from .streams import OpFailed, OpTime, OpTimes, StreamExecutor
from .swap import SwapReport, baseline_layers, pipeline_layers, swap_blocks, unswap_blocks

__all__ = [
    "AMPipeBlock", "apply_ampipe", "unapply_ampipe", "block_dims", "swap_blocks", "unswap_blocks",
    "SwapReport", "pipeline_layers", "baseline_layers", "run_block_comparison", "EmulatedComm",
    "Plan", "PlanError", "PlanOp", "StreamSpec", "check_dims", "load_plan", "validate_plan",
    "OpFailed", "OpTime", "OpTimes", "StreamExecutor",
]
