"""What a transformer predicts (its objective) and which schedulers can sample it (docs/design.md, "Objectives").

- "flow": the flow-matching velocity `noise - x0` at `x_t = (1 - sigma) x0 + sigma noise` (the default). Sampled
  by `NanoI2VFlowMatchScheduler` (Euler, Heun) or diffusers' flow-matching schedulers.
- "epsilon", "v_prediction", "sample": the noise, the velocity `sqrt(a) noise - sqrt(1 - a) x0` or `x0` itself
  at the DDPM `x_t = sqrt(a) x0 + sqrt(1 - a) noise` (`a` = alphas_cumprod[t]). Sampled by diffusers' DDPM-family
  schedulers (DDPM, DDIM, DPM-Solver++ multistep, UniPC, Euler discrete), whose config carries that
  `prediction_type` and the noise schedule.

The pipeline records its model's objective in model_index.json (`prediction_type`) and refuses a scheduler of
the other family, or one configured for another prediction type, before any work (`check_scheduler_matches`).
"""

import inspect
from typing import Any, Dict, Optional

PREDICTION_TYPES = ("flow", "epsilon", "v_prediction", "sample")
NOISE_PREDICTION_TYPES = PREDICTION_TYPES[1:]
# `nanoi2v generate --scheduler NAME`: the flow solvers, and diffusers' schedulers for noise-prediction models.
FLOW_SCHEDULER_NAMES = ("euler", "heun")
NOISE_SCHEDULER_NAMES = {
    "ddpm": "DDPMScheduler",
    "ddim": "DDIMScheduler",
    "dpm++": "DPMSolverMultistepScheduler",
    "unipc": "UniPCMultistepScheduler",
    "euler_discrete": "EulerDiscreteScheduler",
}
SCHEDULER_NAMES = (*FLOW_SCHEDULER_NAMES, *NOISE_SCHEDULER_NAMES)


def is_flow_scheduler(scheduler) -> bool:
    """A flow-matching sampler: this package's, or one of diffusers' FlowMatch* schedulers."""
    from .scheduling_nanoi2v_flow_match import NanoI2VFlowMatchScheduler

    return isinstance(scheduler, NanoI2VFlowMatchScheduler) or type(scheduler).__name__.startswith("FlowMatch")


def check_prediction_type(prediction_type: Any, name: str = "prediction_type") -> None:
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"{name} must be one of {PREDICTION_TYPES}; got {prediction_type!r}.")


def check_scheduler_matches(prediction_type: str, scheduler) -> None:
    """Raise a one-line ValueError unless `scheduler` samples a model trained with `prediction_type`."""
    name = type(scheduler).__name__
    if prediction_type == "flow":
        if not is_flow_scheduler(scheduler):
            raise ValueError(
                f"The model predicts the flow-matching velocity (prediction_type 'flow'), but the scheduler is a "
                f"{name}: use NanoI2VFlowMatchScheduler (--scheduler {' or '.join(FLOW_SCHEDULER_NAMES)})."
            )
        return
    scheduled = scheduler.config.get("prediction_type")
    if is_flow_scheduler(scheduler) or scheduled is None:
        raise ValueError(
            f"The model predicts {prediction_type!r} (DDPM objective), but the scheduler is a {name}: use one of "
            f"diffusers' {', '.join(NOISE_SCHEDULER_NAMES.values())} (--scheduler {', '.join(NOISE_SCHEDULER_NAMES)})."
        )
    if scheduled != prediction_type:
        raise ValueError(
            f"The model predicts {prediction_type!r}, but the {name} is configured with prediction_type "
            f"{scheduled!r}: build it with prediction_type={prediction_type!r} (e.g. from the saved scheduler's "
            "config)."
        )


def scheduler_from_name(name: str, scheduler, prediction_type: str):
    """The scheduler `nanoi2v generate --scheduler NAME` asks for, built from the pipeline's saved `scheduler`
    config (so the noise schedule and the prediction type carry over); a name that does not fit the model's
    objective raises a one-line ValueError naming the value and the choices that fit."""
    import diffusers

    from .scheduling_nanoi2v_flow_match import NanoI2VFlowMatchScheduler

    choices = FLOW_SCHEDULER_NAMES if prediction_type == "flow" else tuple(NOISE_SCHEDULER_NAMES)
    if name not in choices:
        kind = "a flow-matching" if prediction_type == "flow" else f"a noise-prediction ({prediction_type})"
        known = "" if name in SCHEDULER_NAMES else f" (known: {', '.join(SCHEDULER_NAMES)})"
        raise ValueError(f"scheduler {name!r} does not fit {kind} model{known}; choose one of {', '.join(choices)}.")
    if prediction_type == "flow":  # also from diffusers' FlowMatchEulerDiscreteScheduler: its shift carries over
        if is_flow_scheduler(scheduler):
            return NanoI2VFlowMatchScheduler.from_config(scheduler.config, solver=name)
        return NanoI2VFlowMatchScheduler(solver=name)
    return getattr(diffusers, NOISE_SCHEDULER_NAMES[name]).from_config(scheduler.config)


def step_kwargs(scheduler, generator=None, eta: Optional[float] = None) -> Dict[str, Any]:
    """Extra `scheduler.step` arguments, as diffusers' `prepare_extra_step_kwargs`: `eta` and `generator` only
    where the scheduler's `step` takes them. An `eta` other than 0 for a scheduler without one raises."""
    parameters = inspect.signature(scheduler.step).parameters
    kwargs = {}
    if eta is not None:
        if "eta" in parameters:
            kwargs["eta"] = eta
        elif eta != 0:
            raise ValueError(
                f"`eta` {eta!r}: the {type(scheduler).__name__} has no eta; use DDIMScheduler (noise-prediction "
                "models) or NanoI2VFlowMatchScheduler with solver 'euler' (flow models), or leave eta at 0."
            )
    if "generator" in parameters and generator is not None:
        kwargs["generator"] = generator
    return kwargs
