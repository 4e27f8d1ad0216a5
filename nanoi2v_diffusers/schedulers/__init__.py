from .objectives import PREDICTION_TYPES, SCHEDULER_NAMES, check_scheduler_matches, scheduler_from_name
from .scheduling_nanoi2v_flow_match import NanoI2VFlowMatchScheduler, calculate_shift

__all__ = [
    "NanoI2VFlowMatchScheduler",
    "calculate_shift",
    "PREDICTION_TYPES",
    "SCHEDULER_NAMES",
    "check_scheduler_matches",
    "scheduler_from_name",
]
