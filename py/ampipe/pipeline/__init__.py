"""The pipelined block: plan loading/validation and the stream executor (docs/pipeline.md)."""

from .emulation import EmulatedComm
from .plan import Plan, PlanError, PlanOp, StreamSpec, check_dims, load_plan, validate_plan
from .streams import OpFailed, OpTime, OpTimes, StreamExecutor

__all__ = [
    "EmulatedComm", "Plan", "PlanError", "PlanOp", "StreamSpec", "check_dims", "load_plan",
    "validate_plan", "OpFailed", "OpTime", "OpTimes", "StreamExecutor",
]
