"""NanoI2VFlowMatchScheduler: flow-matching sampling (Euler or Heun) and training helpers (docs/design.md).

Convention (as diffusers): `x_t = (1 - sigma) * x0 + sigma * noise`, sigma = 1 is pure noise, the
model predicts the velocity `v = noise - x0 = dx/dsigma`, and `timestep = sigma * num_train_timesteps`.
Sampling integrates the ODE from sigma = 1 down to 0.

With the same config, the Euler path gives the same timesteps, sigmas and samples as diffusers'
`FlowMatchEulerDiscreteScheduler`, so the two can be swapped with `from_config` either way.
"""

import math
from typing import List, Optional, Tuple, Union

import numpy as np
import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import SchedulerMixin, SchedulerOutput

SOLVERS = ("euler", "heun")
TIMESTEP_DENSITIES = ("uniform", "logit_normal", "mode")
LOSS_WEIGHTINGS = ("none", "sigma_sqrt", "cosmap")


def calculate_shift(
    image_seq_len: int,
    base_seq_len: int = 256,
    max_seq_len: int = 4096,
    base_shift: float = 0.5,
    max_shift: float = 1.15,
) -> float:
    """The `mu` of resolution-dependent shifting: linear in the token count, `base_shift` at
    `base_seq_len` tokens and `max_shift` at `max_seq_len` (as SD3 / Flux). Pass the scheduler's
    config values and the transformer's token count `T' * H' * W'`; `set_timesteps(..., mu=mu)`
    then uses `exp(mu)` as the shift."""
    slope = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return base_shift + slope * (image_seq_len - base_seq_len)


def shift_sigmas(sigmas, shift: float):
    """Static timestep shift `shift * s / (1 + (shift - 1) * s)`: keeps 0 and 1 fixed and, for
    shift > 1, moves every sigma in between up (more of the schedule at high noise)."""
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def time_shift(sigmas, mu: float):
    """Dynamic shift: the static shift with `shift = exp(mu)`, written as `e^mu / (e^mu + (1/s - 1))`."""
    return math.exp(mu) / (math.exp(mu) + (1 / sigmas - 1))


class NanoI2VFlowMatchScheduler(SchedulerMixin, ConfigMixin):
    """
    Flow-matching ODE sampler with an Euler (first order) or Heun (second order) solver.

    Heun follows diffusers' `HeunDiscreteScheduler` layout so that the plain loop
    `for t in scheduler.timesteps: x = scheduler.step(model(x, t), t, x).prev_sample` works:
    every timestep after the first appears twice (the end of one step, then the start of the
    next), `step` keeps the first stage's state, and the last step (to sigma = 0) is an Euler
    step. N inference steps cost `2 N - 1` model calls with Heun and `N` with Euler.

    Args:
        num_train_timesteps (`int`, defaults to 1000): Timesteps are `sigma * num_train_timesteps`.
        shift (`float`, defaults to 1.0): Static shift of the sigmas (see `shift_sigmas`).
        use_dynamic_shifting (`bool`, defaults to `False`): Shift by `exp(mu)` given to `set_timesteps`
            instead (see `calculate_shift`).
        base_shift (`float`, defaults to 0.5): `mu` at `base_image_seq_len` tokens (for `calculate_shift`).
        max_shift (`float`, defaults to 1.15): `mu` at `max_image_seq_len` tokens (for `calculate_shift`).
        base_image_seq_len (`int`, defaults to 256): Token count where `mu = base_shift`.
        max_image_seq_len (`int`, defaults to 4096): Token count where `mu = max_shift`.
        solver (`str`, defaults to `"euler"`): `"euler"` or `"heun"`.
    """

    _compatibles = ["FlowMatchEulerDiscreteScheduler", "FlowMatchHeunDiscreteScheduler"]

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        shift: float = 1.0,
        use_dynamic_shifting: bool = False,
        base_shift: float = 0.5,
        max_shift: float = 1.15,
        base_image_seq_len: int = 256,
        max_image_seq_len: int = 4096,
        solver: str = "euler",
    ):
        if solver not in SOLVERS:
            raise ValueError(f"solver must be one of {SOLVERS}; got {solver!r}.")
        if shift <= 0:
            raise ValueError(f"shift must be > 0; got {shift}.")
        if num_train_timesteps < 1:
            raise ValueError(f"num_train_timesteps must be >= 1; got {num_train_timesteps}.")
        # The training schedule, sigma = 1 ... 1 / num_train_timesteps; its ends bound every inference schedule.
        sigmas = torch.arange(num_train_timesteps, 0, -1, dtype=torch.float32) / num_train_timesteps
        if not use_dynamic_shifting:
            sigmas = shift_sigmas(sigmas, shift)
        self.sigmas = sigmas
        self.timesteps = sigmas * num_train_timesteps
        self.sigma_min = sigmas[-1].item()
        self.sigma_max = sigmas[0].item()
        self.init_noise_sigma = 1.0
        self.num_inference_steps = None
        self._step_index = None
        self._begin_index = None
        self._heun_stage = None  # (sample, velocity, dt) kept between the two stages of a Heun step

    @property
    def order(self) -> int:
        """Model calls per step: 1 for Euler, 2 for Heun (pipelines use it for progress bars)."""
        return 2 if self.config.solver == "heun" else 1

    @property
    def state_in_first_order(self) -> bool:
        """True unless `step` is waiting for the second (corrector) stage of a Heun step."""
        return self._heun_stage is None

    @property
    def step_index(self) -> Optional[int]:
        """Index into `timesteps` of the next `step`; None before the first one."""
        return self._step_index

    @property
    def begin_index(self) -> Optional[int]:
        """First index into `timesteps`, set by pipelines that start mid-schedule (image-to-image)."""
        return self._begin_index

    def set_begin_index(self, begin_index: int = 0) -> None:
        self._begin_index = begin_index

    def set_timesteps(
        self,
        num_inference_steps: Optional[int] = None,
        device: Union[str, torch.device, None] = None,
        sigmas: Optional[List[float]] = None,
        mu: Optional[float] = None,
    ) -> None:
        """Set `timesteps` and `sigmas` (with a final 0) for `num_inference_steps` steps, or for the
        decreasing custom `sigmas` in (0, 1]; both are then shifted. `mu` is required with
        `use_dynamic_shifting` (see `calculate_shift`)."""
        if self.config.use_dynamic_shifting and mu is None:
            raise ValueError("use_dynamic_shifting is set: pass mu (see calculate_shift).")
        if sigmas is None:
            if num_inference_steps is None or num_inference_steps < 1:
                raise ValueError(f"num_inference_steps must be >= 1; got {num_inference_steps}.")
            n = self.config.num_train_timesteps
            sigmas = np.linspace(self.sigma_max * n, self.sigma_min * n, num_inference_steps) / n
        else:
            sigmas = self._check_custom_sigmas(sigmas, num_inference_steps)

        if self.config.use_dynamic_shifting:
            sigmas = time_shift(sigmas, mu)
        else:
            sigmas = shift_sigmas(sigmas, self.config.shift)
        sigmas = torch.from_numpy(sigmas).to(dtype=torch.float32, device=device)

        self.num_inference_steps = len(sigmas)
        self.timesteps, self.sigmas = self._interleave(sigmas * self.config.num_train_timesteps, sigmas)
        self._step_index = None
        self._begin_index = None
        self._heun_stage = None

    @staticmethod
    def _check_custom_sigmas(sigmas, num_inference_steps: Optional[int]) -> np.ndarray:
        sigmas = np.asarray(sigmas, dtype=np.float32)
        if sigmas.ndim != 1 or len(sigmas) == 0:
            raise ValueError(f"sigmas must be a non-empty 1-D sequence; got shape {sigmas.shape}.")
        if num_inference_steps is not None and num_inference_steps != len(sigmas):
            raise ValueError(f"num_inference_steps ({num_inference_steps}) != len(sigmas) ({len(sigmas)}).")
        if not ((sigmas > 0) & (sigmas <= 1)).all() or (np.diff(sigmas) >= 0).any():
            raise ValueError(f"sigmas must decrease strictly within (0, 1]; got {sigmas.tolist()}.")
        return sigmas

    def _interleave(self, timesteps: torch.Tensor, sigmas: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Append the final sigma 0; for Heun, repeat every point after the first (end of one step,
        start of the next), so that `sigmas[i]` is the noise level of the `i`-th model call."""
        sigmas = torch.cat([sigmas, sigmas.new_zeros(1)])
        if self.config.solver == "heun":
            timesteps = torch.cat([timesteps[:1], timesteps[1:].repeat_interleave(2)])
            sigmas = torch.cat([sigmas[:1], sigmas[1:-1].repeat_interleave(2), sigmas[-1:]])
        return timesteps, sigmas

    def index_for_timestep(self, timestep: Union[float, torch.Tensor], schedule_timesteps=None) -> int:
        """Index of `timestep` in the schedule; of a repeated one, the second (the start of a step)."""
        schedule_timesteps = self.timesteps if schedule_timesteps is None else schedule_timesteps
        indices = (schedule_timesteps == timestep).nonzero()
        if len(indices) == 0:
            raise ValueError(f"timestep {float(timestep)} is not in scheduler.timesteps; pass one of them.")
        return indices[1 if len(indices) > 1 else 0].item()

    def _init_step_index(self, timestep: Union[float, torch.Tensor]) -> None:
        if self.begin_index is not None:
            self._step_index = self.begin_index
        else:
            if isinstance(timestep, torch.Tensor):
                timestep = timestep.to(self.timesteps.device)
            self._step_index = self.index_for_timestep(timestep)

    def scale_model_input(self, sample: torch.Tensor, timestep: Optional[Union[float, torch.Tensor]] = None):
        """Flow matching feeds the model `x_t` unscaled."""
        return sample

    def step(
        self,
        model_output: torch.Tensor,
        timestep: Union[float, torch.Tensor],
        sample: torch.Tensor,
        generator: Optional[torch.Generator] = None,
        return_dict: bool = True,
        eta: float = 0.0,
    ) -> Union[SchedulerOutput, Tuple[torch.Tensor]]:
        """Move `sample` from the noise level of `timestep` to the next one in `timesteps`.

        Args:
            model_output (`torch.Tensor`): The predicted velocity at (`sample`, `timestep`).
            timestep (`float` or `torch.Tensor`): The current entry of `timesteps`.
            sample (`torch.Tensor`): The current `x_t`.
            generator (`torch.Generator`, *optional*): The noise of stochastic steps (`eta > 0`); unused by the
                ODE solvers.
            return_dict (`bool`, defaults to `True`): Return a `SchedulerOutput` instead of a tuple.
            eta (`float`, defaults to 0.0): Stochastic sampling, as DDIM's eta, for the Euler solver: 0 is the ODE
                step; above 0 the step predicts `x0` and the noise from the velocity and re-noises with a share
                of fresh noise, 1 being the DDPM posterior (ancestral sampling) of the flow path (see
                `_stochastic_step`).

        Returns:
            `SchedulerOutput` with `prev_sample` (the input of the next model call), or `(prev_sample,)`.
        """
        if self.num_inference_steps is None:
            raise ValueError("Call set_timesteps before step.")
        if isinstance(timestep, int) or (isinstance(timestep, torch.Tensor) and not timestep.is_floating_point()):
            raise ValueError(
                f"step takes an entry of scheduler.timesteps (a float), not an integer index; got {timestep!r}."
            )
        if self._step_index is None:
            self._init_step_index(timestep)
        if self._step_index >= len(self.timesteps):
            raise ValueError(f"step called after the last of the {len(self.timesteps)} timesteps.")
        self.check_eta(eta)

        # Accumulate in at least float32: many small updates drift in bf16.
        sample = sample.to(torch.promote_types(sample.dtype, torch.float32))
        if eta > 0:
            prev_sample = self._stochastic_step(model_output, sample, eta, generator)
        elif self._heun_stage is None:
            prev_sample = self._predictor_step(model_output, sample)
        else:
            prev_sample = self._corrector_step(model_output)
        self._step_index += 1

        prev_sample = prev_sample.to(model_output.dtype)
        if not return_dict:
            return (prev_sample,)
        return SchedulerOutput(prev_sample=prev_sample)

    def _predictor_step(self, velocity: torch.Tensor, sample: torch.Tensor) -> torch.Tensor:
        """Euler step to the next sigma; with Heun (unless it is the last step) remember it for the corrector."""
        dt = self.sigmas[self._step_index + 1] - self.sigmas[self._step_index]
        is_last = self._step_index == len(self.timesteps) - 1
        if self.config.solver == "heun" and not is_last:
            self._heun_stage = (sample, velocity.to(sample.dtype), dt)
        return sample + dt * velocity

    def check_eta(self, eta: float) -> None:
        """Raise a one-line ValueError unless `eta` suits this scheduler: 0, or in (0, 1] with solver "euler"."""
        if not 0.0 <= eta <= 1.0 or (eta > 0 and self.config.solver != "euler"):
            raise ValueError(f"`eta` {eta!r}: the flow scheduler's stochastic step needs eta in [0, 1] and solver "
                             f"'euler'; got solver {self.config.solver!r}.")  # fmt: skip

    def _stochastic_step(self, velocity: torch.Tensor, sample: torch.Tensor, eta: float, generator) -> torch.Tensor:
        """DDIM's step written for the flow path `x_t = alpha x0 + sigma noise`, `alpha = 1 - sigma`: predict
        `x0 = x - sigma v` and `noise = x + alpha v`, then go to the next sigma `s` with
        `alpha_s x0 + sqrt(s^2 - std^2) noise + std z`, where `std = eta * s * sqrt(1 - snr_t / snr_s)` (the
        DDPM posterior's std at eta = 1; `snr = alpha^2 / sigma^2`). eta = 0 would be the Euler step exactly."""
        from diffusers.utils.torch_utils import randn_tensor

        velocity = velocity.to(sample.dtype)
        sigma, sigma_next = self.sigmas[self._step_index], self.sigmas[self._step_index + 1]
        x0, noise = sample - sigma * velocity, sample + (1 - sigma) * velocity
        if sigma_next <= 0:
            return x0
        snr_ratio = ((1 - sigma) * sigma_next / ((1 - sigma_next) * sigma)) ** 2  # snr_t / snr_s, in [0, 1]
        std = eta * sigma_next * torch.sqrt((1 - snr_ratio).clamp(min=0))
        fresh = randn_tensor(sample.shape, generator=generator, device=sample.device, dtype=sample.dtype)
        return (1 - sigma_next) * x0 + torch.sqrt((sigma_next**2 - std**2).clamp(min=0)) * noise + std * fresh

    def _corrector_step(self, velocity: torch.Tensor) -> torch.Tensor:
        """Heun: redo the step from its start with the mean of the velocities at both ends."""
        sample, first_velocity, dt = self._heun_stage
        self._heun_stage = None
        return sample + dt * (0.5 * (first_velocity + velocity.to(sample.dtype)))

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """`x_t = (1 - sigma) * x0 + sigma * noise` with `sigma = timesteps / num_train_timesteps`
        (one timestep per batch row, or a scalar); works for any timestep, on or off the schedule."""
        sigmas = torch.as_tensor(timesteps, device=original_samples.device) / self.config.num_train_timesteps
        sigmas = sigmas.to(original_samples.dtype).reshape(-1, *[1] * (original_samples.ndim - 1))
        return torch.lerp(original_samples, noise, sigmas)

    def scale_noise(self, sample: torch.Tensor, timestep: Union[float, torch.Tensor], noise: torch.Tensor):
        """Forward process for pipelines (image-to-image start, diffusers' argument order): `add_noise`."""
        return self.add_noise(sample, noise, timestep)

    @staticmethod
    def velocity_target(original_samples: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """The training target `v = noise - x0`, the same at every timestep."""
        return noise - original_samples

    def sample_training_sigmas(
        self,
        batch_size: int,
        density: str = "logit_normal",
        logit_mean: float = 0.0,
        logit_std: float = 1.0,
        mode_scale: float = 1.29,
        mu: Optional[float] = None,
        device: Union[str, torch.device, None] = None,
        generator: Optional[torch.Generator] = None,
    ) -> torch.Tensor:
        """Draw (B,) training sigmas in [0, 1]: `density` "uniform", "logit_normal" (SD3's default,
        `sigmoid(N(logit_mean, logit_std))`) or "mode" (SD3's mode sampling with `mode_scale`), then
        apply this scheduler's shift so training sees the noise levels sampling visits. The model's
        timesteps are `sigmas * num_train_timesteps`."""
        # Imported here: diffusers.training_utils imports every pipeline (seconds) and sampling never needs it.
        from diffusers.training_utils import compute_density_for_timestep_sampling

        if density not in TIMESTEP_DENSITIES:
            raise ValueError(f"density must be one of {TIMESTEP_DENSITIES}; got {density!r}.")
        if self.config.use_dynamic_shifting and mu is None:
            raise ValueError("use_dynamic_shifting is set: pass mu (see calculate_shift).")
        u = compute_density_for_timestep_sampling(
            density, batch_size, logit_mean, logit_std, mode_scale, device=device, generator=generator
        )
        return time_shift(u, mu) if self.config.use_dynamic_shifting else shift_sigmas(u, self.config.shift)

    @staticmethod
    def training_loss_weighting(sigmas: torch.Tensor, scheme: str = "none") -> torch.Tensor:
        """Per-sample loss weights (SD3): "none" (ones), "sigma_sqrt" (`sigma ** -2`) or "cosmap"."""
        from diffusers.training_utils import compute_loss_weighting_for_sd3

        if scheme not in LOSS_WEIGHTINGS:
            raise ValueError(f"scheme must be one of {LOSS_WEIGHTINGS}; got {scheme!r}.")
        return compute_loss_weighting_for_sd3(scheme, sigmas)

    def __len__(self) -> int:
        return self.config.num_train_timesteps
