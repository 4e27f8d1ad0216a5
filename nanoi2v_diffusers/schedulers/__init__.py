from .scheduling_nanoi2v_flow_match import NanoI2VFlowMatchScheduler, calculate_shift

__all__ = ["NanoI2VFlowMatchScheduler", "calculate_shift"]
