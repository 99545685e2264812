"""The pipelined block: plan loading/validation, the stream executor, `AMPipeBlock`
(docs/pipeline.md). Importing it needs torch only."""

from .block import AMPipeBlock, baseline_layers, block_dims, pipeline_layers
from .compare import run_block_comparison
from .emulation import EmulatedComm
from .plan import Plan, PlanError, PlanOp, StreamSpec, check_dims, load_plan, validate_plan
from .streams import OpFailed, OpTime, OpTimes, StreamExecutor

__all__ = [
    "AMPipeBlock", "block_dims", "pipeline_layers", "baseline_layers", "run_block_comparison", "EmulatedComm", "Plan", "PlanError",
    "PlanOp", "StreamSpec", "check_dims", "load_plan", "validate_plan", "OpFailed", "OpTime",
    "OpTimes", "StreamExecutor",
]
