"""Tests for NanoI2VFlowMatchScheduler: ODE accuracy, shifting, diffusers interchangeability, training helpers."""

import math

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FlowMatchHeunDiscreteScheduler

from nanoi2v_diffusers.schedulers import NanoI2VFlowMatchScheduler, calculate_shift
from nanoi2v_diffusers.schedulers.scheduling_nanoi2v_flow_match import shift_sigmas


def sample_loop(scheduler, velocity_fn, sample):
    """The plain pipeline loop; returns the final sample, every intermediate one and the model-call count."""
    trajectory = []
    for t in scheduler.timesteps:
        sample = scheduler.step(velocity_fn(sample, t), t, sample).prev_sample
        trajectory.append(sample)
    return sample, trajectory, len(trajectory)


# Gaussian data x0 ~ N(0, DATA_STD^2): the exact flow-matching velocity is linear in x and the ODE has the
# closed form x(sigma) = x(1) * std(sigma) with std(sigma)^2 = (1 - sigma)^2 DATA_STD^2 + sigma^2; a curved path.
DATA_STD = 0.3


def gaussian_velocity(x, t):
    sigma = t.double() / 1000
    variance = (1 - sigma) ** 2 * DATA_STD**2 + sigma**2
    return x * (sigma - (1 - sigma) * DATA_STD**2) / variance


@pytest.mark.parametrize("solver", ["euler", "heun"])
@pytest.mark.parametrize("num_steps", [1, 2, 7, 30])
@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_oracle_velocity_on_straight_path_recovers_x0(solver, num_steps, shift):
    x0, noise = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    scheduler = NanoI2VFlowMatchScheduler(shift=shift, solver=solver)
    scheduler.set_timesteps(num_steps)
    final, _, calls = sample_loop(scheduler, lambda x, t: noise - x0, noise.clone())
    torch.testing.assert_close(final, x0, rtol=0, atol=1e-5)
    assert calls == (2 * num_steps - 1 if solver == "heun" else num_steps)


def _final_error(solver, num_steps):
    scheduler = NanoI2VFlowMatchScheduler(solver=solver)
    scheduler.set_timesteps(num_steps)
    x1 = torch.linspace(-2, 2, 64, dtype=torch.float64)
    final, _, _ = sample_loop(scheduler, gaussian_velocity, x1.clone())
    return (final - x1 * DATA_STD).abs().max().item()


def test_curved_ode_convergence_orders_euler_1_heun_2():
    steps = (8, 16, 32)
    orders = {}
    for solver in ("euler", "heun"):
        errors = [_final_error(solver, n) for n in steps]
        orders[solver] = [math.log2(coarse / fine) for coarse, fine in zip(errors, errors[1:])]
        print(f"{solver}: errors {errors} -> measured orders {orders[solver]}")
    assert all(0.8 < order < 1.3 for order in orders["euler"]), orders
    assert all(1.7 < order < 2.4 for order in orders["heun"]), orders
    assert _final_error("heun", 16) < _final_error("euler", 16) / 10


def test_shift_moves_sigmas_as_documented():
    num_steps = 10
    plain = NanoI2VFlowMatchScheduler()
    plain.set_timesteps(num_steps)
    for shift in (0.5, 3.0):
        shifted = NanoI2VFlowMatchScheduler(shift=shift)
        shifted.set_timesteps(num_steps)
        sigmas = shifted.sigmas
        assert sigmas[0] == 1.0 and sigmas[-1] == 0.0 and len(sigmas) == num_steps + 1
        assert (sigmas[:-1] >= 0).all() and (sigmas.diff() < 0).all()
        base = np.linspace(1.0, shifted.sigma_min, num_steps)
        torch.testing.assert_close(sigmas[:-1], torch.from_numpy(shift_sigmas(base, shift)).float())
        torch.testing.assert_close(shifted.timesteps, sigmas[:-1] * 1000)
        inner = slice(1, num_steps)
        if shift > 1:
            assert (sigmas[inner] > plain.sigmas[inner]).all()  # more of the schedule at high noise
        else:
            assert (sigmas[inner] < plain.sigmas[inner]).all()
    # Dynamic shifting with mu shifts by exp(mu).
    dynamic = NanoI2VFlowMatchScheduler(use_dynamic_shifting=True)
    dynamic.set_timesteps(num_steps, mu=math.log(3.0))
    base = np.linspace(1.0, 1 / 1000, num_steps)
    torch.testing.assert_close(dynamic.sigmas[:-1], torch.from_numpy(shift_sigmas(base, 3.0)).float())


def test_calculate_shift_is_linear_in_token_count():
    assert calculate_shift(256) == pytest.approx(0.5)
    assert calculate_shift(4096) == pytest.approx(1.15)
    assert calculate_shift(2176) == pytest.approx((0.5 + 1.15) / 2)


def test_config_round_trip(tmp_path):
    scheduler = NanoI2VFlowMatchScheduler(shift=2.5, solver="heun", num_train_timesteps=500)
    scheduler.save_config(tmp_path)
    reloaded = NanoI2VFlowMatchScheduler.from_pretrained(tmp_path)
    public = [{k: v for k, v in s.config.items() if not k.startswith("_")} for s in (scheduler, reloaded)]
    assert public[0] == public[1]
    for s in (scheduler, reloaded):
        s.set_timesteps(6)
    assert torch.equal(reloaded.timesteps, scheduler.timesteps)
    assert reloaded.order == 2


CONFIGS = [{}, {"shift": 3.0}, {"use_dynamic_shifting": True}]


@pytest.mark.parametrize("config", CONFIGS)
def test_swap_with_diffusers_euler_gives_same_trajectory(config):
    ours = NanoI2VFlowMatchScheduler(**config)
    theirs = FlowMatchEulerDiscreteScheduler.from_config(ours.config)
    back = NanoI2VFlowMatchScheduler.from_config(theirs.config)
    assert FlowMatchEulerDiscreteScheduler in ours.compatibles
    assert isinstance(theirs, FlowMatchEulerDiscreteScheduler) and back.config.shift == ours.config.shift

    mu = calculate_shift(1024) if config.get("use_dynamic_shifting") else None
    start = torch.randn(2, 3, 4, 4)

    def velocity(x, t):
        return torch.sin(x) * (t / 1000) - 0.5 * x

    results = []
    for scheduler in (ours, theirs, back):
        scheduler.set_timesteps(12, mu=mu)
        results.append((scheduler.timesteps, scheduler.sigmas, sample_loop(scheduler, velocity, start.clone())[1]))
    reference = results[1]
    for timesteps, sigmas, trajectory in (results[0], results[2]):
        assert torch.equal(timesteps, reference[0]) and torch.equal(sigmas, reference[1])
        for ours_sample, their_sample in zip(trajectory, reference[2]):
            assert torch.equal(ours_sample, their_sample)


def test_custom_sigmas_match_diffusers():
    custom = [1.0, 0.7, 0.4, 0.1]
    ours, theirs = NanoI2VFlowMatchScheduler(shift=2.0), FlowMatchEulerDiscreteScheduler(shift=2.0)
    for scheduler in (ours, theirs):
        scheduler.set_timesteps(sigmas=custom)
    assert torch.equal(ours.sigmas, theirs.sigmas) and torch.equal(ours.timesteps, theirs.timesteps)


def test_heun_matches_diffusers_heun_and_interleaves_timesteps():
    num_steps = 6
    ours = NanoI2VFlowMatchScheduler(shift=3.0, solver="heun")
    theirs = FlowMatchHeunDiscreteScheduler(shift=3.0)
    start = torch.randn(2, 3, 4, 4)

    def velocity(x, t):
        return torch.cos(x) * (t / 1000) + 0.2 * x

    finals = []
    for scheduler in (ours, theirs):
        scheduler.set_timesteps(num_steps)
        finals.append(sample_loop(scheduler, velocity, start.clone())[0])
    assert torch.equal(ours.timesteps, theirs.timesteps) and torch.equal(ours.sigmas, theirs.sigmas)
    assert len(ours.timesteps) == 2 * num_steps - 1
    assert torch.equal(ours.timesteps[1::2], ours.timesteps[2::2])  # every point after the first twice
    torch.testing.assert_close(finals[0], finals[1], rtol=1e-5, atol=1e-5)


def test_heun_state_between_stages():
    scheduler = NanoI2VFlowMatchScheduler(solver="heun")
    scheduler.set_timesteps(3)
    x = torch.ones(1, 4)
    assert scheduler.order == 2 and scheduler.state_in_first_order
    predicted = scheduler.step(torch.ones(1, 4), scheduler.timesteps[0], x).prev_sample
    assert not scheduler.state_in_first_order
    corrected = scheduler.step(3 * torch.ones(1, 4), scheduler.timesteps[1], predicted).prev_sample
    assert scheduler.state_in_first_order
    dt = scheduler.sigmas[1] - scheduler.sigmas[0]
    torch.testing.assert_close(predicted, x + dt)
    torch.testing.assert_close(corrected, x + dt * 2)  # the mean of the two velocities, from the step's start


def test_training_helpers():
    scheduler = NanoI2VFlowMatchScheduler()
    generator = torch.Generator().manual_seed(0)
    sigmas = scheduler.sample_training_sigmas(4096, density="uniform", generator=generator)
    assert sigmas.shape == (4096,) and (sigmas >= 0).all() and (sigmas <= 1).all()
    assert sigmas.mean().item() == pytest.approx(0.5, abs=0.03)
    logit_normal = scheduler.sample_training_sigmas(4096, generator=generator)
    assert logit_normal.std() < sigmas.std()  # concentrated around sigma = 0.5
    shifted = NanoI2VFlowMatchScheduler(shift=3.0).sample_training_sigmas(4096, density="uniform", generator=generator)
    assert shifted.mean() > 0.6  # the shift moves training noise levels up, as it does sampling ones
    again = scheduler.sample_training_sigmas(8, generator=torch.Generator().manual_seed(1))
    assert torch.equal(again, scheduler.sample_training_sigmas(8, generator=torch.Generator().manual_seed(1)))

    x0, noise = torch.randn(3, 2, 4), torch.randn(3, 2, 4)
    timesteps = torch.tensor([0.0, 250.0, 1000.0])
    noisy = scheduler.add_noise(x0, noise, timesteps)
    torch.testing.assert_close(noisy[0], x0[0])
    torch.testing.assert_close(noisy[1], 0.75 * x0[1] + 0.25 * noise[1])
    torch.testing.assert_close(noisy[2], noise[2])
    torch.testing.assert_close(scheduler.scale_noise(x0, timesteps, noise), noisy)
    # The target is the derivative of x_t along sigma.
    step = 1e-2
    derivative = (scheduler.add_noise(x0, noise, timesteps + 1000 * step) - noisy) / step
    torch.testing.assert_close(derivative, scheduler.velocity_target(x0, noise), rtol=1e-3, atol=1e-3)

    weights = torch.tensor([0.25, 0.5])
    assert torch.equal(scheduler.training_loss_weighting(weights), torch.ones(2))
    torch.testing.assert_close(scheduler.training_loss_weighting(weights, "sigma_sqrt"), torch.tensor([16.0, 4.0]))
    assert torch.equal(scheduler.scale_model_input(x0, timesteps[0]), x0)
    assert scheduler.init_noise_sigma == 1.0


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match="solver must be one of"):
        NanoI2VFlowMatchScheduler(solver="rk4")
    scheduler = NanoI2VFlowMatchScheduler()
    with pytest.raises(ValueError, match="set_timesteps"):
        scheduler.step(torch.zeros(1), torch.tensor(1000.0), torch.zeros(1))
    with pytest.raises(ValueError, match="num_inference_steps must be >= 1; got 0"):
        scheduler.set_timesteps(0)
    with pytest.raises(ValueError, match="decrease strictly"):
        scheduler.set_timesteps(sigmas=[0.2, 0.5])
    scheduler.set_timesteps(4)
    with pytest.raises(ValueError, match="not an integer index"):
        scheduler.step(torch.zeros(1), 0, torch.zeros(1))
    with pytest.raises(ValueError, match="not in scheduler.timesteps"):
        scheduler.step(torch.zeros(1), torch.tensor(123.4), torch.zeros(1))
    with pytest.raises(ValueError, match="pass mu"):
        NanoI2VFlowMatchScheduler(use_dynamic_shifting=True).set_timesteps(4)
    with pytest.raises(ValueError, match="density must be one of"):
        scheduler.sample_training_sigmas(2, density="beta")
