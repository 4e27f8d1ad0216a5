"""The training objectives (flow matching; DDPM epsilon / v / sample) and the schedulers that sample them (issue 39).

Known answers: each objective's training inputs and target on a known x0 and noise; an oracle transformer that
returns the exact prediction for a known x0 makes the pipeline recover x0 with every scheduler that fits.
"""

import functools
import json
import math

import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    UniPCMultistepScheduler,
)
from training_fixtures import assets, fresh_accelerator_state, single_thread, tiny_dit_argv  # noqa: F401

from nanoi2v_diffusers import NanoI2VFlowMatchScheduler, NanoI2VPipeline, NanoI2VTransformer3DModel
from nanoi2v_diffusers.conditioning import num_condition_channels
from nanoi2v_diffusers.models.autoencoder_kl_nanoi2v import VAE_PRESETS, AutoencoderKLNanoI2V
from nanoi2v_diffusers.schedulers.objectives import scheduler_from_name
from nanoi2v_diffusers.training import train_dit
from nanoi2v_diffusers.training.train_dit import DiTTrainingConfig

NOISE_SCHEDULERS = (DDPMScheduler, DDIMScheduler, DPMSolverMultistepScheduler, UniPCMultistepScheduler,
                    EulerDiscreteScheduler)  # fmt: skip
LATENT_SHAPE = (1, 4, 2, 4, 4)  # 5 frames at 32 x 32 with the tiny VAE
TEXT_DIM = 8


def _ddpm(prediction_type: str, **settings) -> DDPMScheduler:
    return DDPMScheduler(clip_sample=False, prediction_type=prediction_type, **settings)


# ------------------------------------------------------------------------------------ training targets


def _draws(config: DiTTrainingConfig, num_train_timesteps: int, batch: int, seed: int):
    """The timesteps and noise `noised_inputs` draws from a generator seeded `seed`, drawn the same way."""
    generator = torch.manual_seed(seed)
    timesteps = torch.randint(0, num_train_timesteps, (batch,), generator=generator)
    return timesteps, torch.randn((batch, *LATENT_SHAPE[1:]), generator=generator)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("beta_schedule", ["linear", "squaredcos_cap_v2"])
def test_ddpm_objectives_noise_x0_and_regress_their_target(prediction_type, beta_schedule):
    config = DiTTrainingConfig(prediction_type=prediction_type, noise_scheduler={"beta_schedule": beta_schedule})
    scheduler = train_dit.build_noise_scheduler(config)
    assert isinstance(scheduler, DDPMScheduler) and scheduler.config.prediction_type == prediction_type
    x0 = torch.randn(64, *LATENT_SHAPE[1:])
    noisy, timesteps, target, weights = train_dit.noised_inputs(x0, scheduler, config, torch.manual_seed(3))

    expected_t, noise = _draws(config, 1000, 64, seed=3)
    assert torch.equal(timesteps, expected_t) and timesteps.dtype == torch.int64
    assert 0 <= timesteps.min() and timesteps.max() < 1000 and len(timesteps.unique()) > 30  # uniform, discrete
    a = scheduler.alphas_cumprod[timesteps].view(-1, 1, 1, 1, 1)
    torch.testing.assert_close(noisy, a.sqrt() * x0 + (1 - a).sqrt() * noise)
    expected = {"epsilon": noise, "v_prediction": a.sqrt() * noise - (1 - a).sqrt() * x0, "sample": x0}
    torch.testing.assert_close(target, expected[prediction_type])
    assert torch.equal(weights, torch.ones(64))


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_min_snr_weights_follow_the_prediction_type(prediction_type):
    config = DiTTrainingConfig(prediction_type=prediction_type, loss_weighting="min_snr", snr_gamma=5.0)
    scheduler = train_dit.build_noise_scheduler(config)
    timesteps = torch.tensor([0, 10, 100, 500, 999])
    weights = train_dit.ddpm_loss_weights(scheduler, timesteps, config)
    a = scheduler.alphas_cumprod[timesteps].double()
    snr = a / (1 - a)
    clipped = snr.clamp(max=5.0)
    expected = {"epsilon": clipped / snr, "v_prediction": clipped / (snr + 1), "sample": clipped}[prediction_type]
    torch.testing.assert_close(weights.double(), expected, rtol=1e-4, atol=1e-6)
    if prediction_type == "epsilon":  # high noise: SNR < gamma, weight 1; low noise: gamma / SNR
        assert weights[-1] == pytest.approx(1.0) and weights[0] < 0.01


def test_min_snr_at_zero_terminal_snr_is_finite():
    config = DiTTrainingConfig(prediction_type="epsilon", loss_weighting="min_snr",
                               noise_scheduler={"rescale_betas_zero_snr": True})  # fmt: skip
    scheduler = train_dit.build_noise_scheduler(config)
    weights = train_dit.ddpm_loss_weights(scheduler, torch.tensor([999, 0]), config)
    assert torch.isfinite(weights).all() and weights[0] == pytest.approx(1.0)


def test_flow_objective_is_unchanged():
    """The flow path draws sigmas then noise, as before the DDPM objectives existed."""
    config = DiTTrainingConfig()
    scheduler = train_dit.build_noise_scheduler(config)
    assert isinstance(scheduler, NanoI2VFlowMatchScheduler)
    x0 = torch.randn(4, *LATENT_SHAPE[1:])
    noisy, timesteps, target, weights = train_dit.noised_inputs(x0, scheduler, config, torch.manual_seed(1))
    generator = torch.manual_seed(1)
    sigmas = scheduler.sample_training_sigmas(4, density="logit_normal", generator=generator)
    noise = torch.randn(x0.shape, generator=generator)
    torch.testing.assert_close(timesteps, sigmas * 1000, rtol=0, atol=0)
    torch.testing.assert_close(noisy, (1 - sigmas.view(-1, 1, 1, 1, 1)) * x0 + sigmas.view(-1, 1, 1, 1, 1) * noise)
    assert torch.equal(target, noise - x0) and torch.equal(weights, torch.ones(4))


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"prediction_type": "eps"}, r"prediction_type must be one of \('flow', 'epsilon'"),
        ({"loss_weighting": "min_snr"}, "loss_weighting 'min_snr' applies to the DDPM objectives only"),
        ({"noise_scheduler": {"beta_schedule": "linear"}}, "noise_scheduler .* applies to the DDPM objectives only"),
        ({"prediction_type": "epsilon", "loss_weighting": "p2"},
         r"loss_weighting must be one of \('none', 'min_snr'\)"),
        ({"prediction_type": "epsilon", "loss_weighting": "min_snr", "snr_gamma": 0.0},
         "snr_gamma must be > 0; got 0.0"),
        ({"prediction_type": "epsilon", "snr_gamma": 2.0}, "snr_gamma 2.0 applies with loss_weighting 'min_snr' only"),
        ({"prediction_type": "epsilon", "scheduler_shift": 3.0}, "scheduler_shift 3.0 applies to flow matching only"),
        ({"prediction_type": "epsilon", "noise_scheduler": {"beta_schedul": "linear"}},
         "noise_scheduler key 'beta_schedul' is not a DDPMScheduler setting"),
        ({"prediction_type": "epsilon", "noise_scheduler": {"beta_schedule": "cosine"}},
         "noise_scheduler beta_schedule 'cosine': must be one of"),
        ({"prediction_type": "epsilon", "noise_scheduler": {"prediction_type": "sample"}},
         "noise_scheduler sets prediction_type"),
        ({"prediction_type": "epsilon", "noise_scheduler": [1, 2]}, "noise_scheduler must be a mapping"),
    ],
)
def test_bad_objective_settings_are_refused_in_one_line(settings, message):
    with pytest.raises(ValueError, match=message) as error:
        DiTTrainingConfig(**settings)
    assert "\n" not in str(error.value)


# ------------------------------------------------------------------------------------ sampling with an oracle


def _tiny_pipe(scheduler, prediction_type: str = "flow") -> NanoI2VPipeline:
    torch.manual_seed(0)
    vae = AutoencoderKLNanoI2V(**VAE_PRESETS["tiny"]).eval()
    transformer = NanoI2VTransformer3DModel(in_channels=4 + num_condition_channels(4), out_channels=4, num_layers=1,
                                            num_attention_heads=2, attention_head_dim=8, ffn_dim=16,
                                            text_dim=TEXT_DIM, freq_dim=16).eval()  # fmt: skip
    pipe = NanoI2VPipeline(vae=vae, transformer=transformer, scheduler=scheduler, prediction_type=prediction_type)
    pipe.set_progress_bar_config(disable=True)
    return pipe


class Oracle:
    """A transformer forward that returns the exact prediction of `prediction_type` for the known `x0`."""

    def __init__(self, pipe: NanoI2VPipeline, x0: torch.Tensor, prediction_type: str, alphas_cumprod=None):
        self.x0, self.prediction_type, self.alphas_cumprod, self.calls = x0, prediction_type, alphas_cumprod, 0
        pipe.transformer.forward = self

    def __call__(self, hidden_states, timestep, return_dict=True, **kwargs):
        self.calls += 1
        x, x0 = hidden_states.double(), self.x0.double()
        if self.prediction_type == "flow":
            sigma = (timestep.double() / 1000).view(-1, 1, 1, 1, 1)
            output = (x - (1 - sigma) * x0) / sigma - x0  # noise - x0
        else:
            a = self.alphas_cumprod.double()[timestep.round().long()].view(-1, 1, 1, 1, 1)
            eps = (x - a.sqrt() * x0) / (1 - a).sqrt()
            output = {"epsilon": eps, "v_prediction": a.sqrt() * eps - (1 - a).sqrt() * x0,
                      "sample": x0.expand_as(x)}[self.prediction_type]  # fmt: skip
        return (output.to(hidden_states.dtype),)


def _sample(pipe, steps: int = 10, **kwargs) -> torch.Tensor:
    embeds = torch.zeros(1, 2, TEXT_DIM)
    return pipe(prompt_embeds=embeds, num_frames=5, height=32, width=32, num_inference_steps=steps, guidance_scale=1.0,
                output_type="latent", generator=torch.Generator().manual_seed(0), **kwargs).frames  # fmt: skip


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("scheduler_class", NOISE_SCHEDULERS, ids=lambda cls: cls.__name__)
def test_every_fitting_scheduler_recovers_x0_from_an_oracle(prediction_type, scheduler_class):
    training = _ddpm(prediction_type)
    scheduler = scheduler_class.from_config(training.config)
    assert scheduler.config.prediction_type == prediction_type
    pipe = _tiny_pipe(scheduler, prediction_type)
    x0 = torch.randn(LATENT_SHAPE, generator=torch.Generator().manual_seed(1))
    oracle = Oracle(pipe, x0, prediction_type, training.alphas_cumprod)
    torch.testing.assert_close(_sample(pipe), x0, atol=2e-3, rtol=1e-3)
    assert oracle.calls == 10


@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
def test_ddim_eta_is_forwarded_and_still_recovers_x0(eta, monkeypatch):
    pipe = _tiny_pipe(DDIMScheduler.from_config(_ddpm("epsilon").config), "epsilon")
    x0 = torch.randn(LATENT_SHAPE, generator=torch.Generator().manual_seed(1))
    Oracle(pipe, x0, "epsilon", pipe.scheduler.alphas_cumprod)
    seen, step = [], pipe.scheduler.step

    @functools.wraps(step)  # keeps step's signature, which says it takes eta
    def recording_step(*args, **kwargs):
        seen.append(kwargs.get("eta"))
        return step(*args, **kwargs)

    monkeypatch.setattr(pipe.scheduler, "step", recording_step)
    torch.testing.assert_close(_sample(pipe, eta=eta), x0, atol=2e-3, rtol=1e-3)
    assert seen == [eta] * 10


@pytest.mark.parametrize("solver, eta", [("euler", 0.0), ("heun", 0.0), ("euler", 0.5), ("euler", 1.0)])
def test_flow_schedulers_recover_x0_from_an_oracle(solver, eta):
    pipe = _tiny_pipe(NanoI2VFlowMatchScheduler(solver=solver, shift=3.0))
    x0 = torch.randn(LATENT_SHAPE, generator=torch.Generator().manual_seed(1))
    Oracle(pipe, x0, "flow")
    torch.testing.assert_close(_sample(pipe, eta=eta), x0, atol=1e-4, rtol=1e-4)


def test_stochastic_flow_sampling_adds_fresh_noise_that_eta_zero_does_not():
    """With a model that is not an oracle, eta > 0 changes the sample (fresh noise, seeded) and eta 0 is Euler."""
    pipe = _tiny_pipe(NanoI2VFlowMatchScheduler())
    x0 = torch.zeros(LATENT_SHAPE)
    pipe.transformer.forward = lambda hidden_states, timestep, return_dict=True, **kw: (hidden_states * 0.5,)
    euler, again = _sample(pipe, steps=4), _sample(pipe, steps=4, eta=0.0)
    stochastic = _sample(pipe, steps=4, eta=1.0)
    assert torch.equal(euler, again) and not torch.allclose(euler, stochastic)
    torch.testing.assert_close(stochastic, _sample(pipe, steps=4, eta=1.0))  # the generator makes it repeatable
    del x0


def test_stochastic_flow_step_at_eta_zero_limit_is_the_euler_step():
    """The stochastic step's formula at a vanishing eta equals the Euler (ODE) step."""
    scheduler = NanoI2VFlowMatchScheduler(shift=2.0)
    scheduler.set_timesteps(5)
    sample, velocity = torch.randn(2, 3), torch.randn(2, 3)
    euler = scheduler.step(velocity, scheduler.timesteps[1], sample).prev_sample
    scheduler.set_timesteps(5)
    tiny = scheduler.step(velocity, scheduler.timesteps[1], sample, generator=torch.manual_seed(0), eta=1e-6)
    torch.testing.assert_close(tiny.prev_sample, euler, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------ pairing errors


def test_mismatched_schedulers_are_refused_in_one_line_before_any_work():
    with pytest.raises(ValueError, match="predicts the flow-matching velocity .* but the scheduler is a DDIMScheduler"):
        _tiny_pipe(DDIMScheduler())
    with pytest.raises(ValueError, match="predicts 'epsilon' .* but the scheduler is a NanoI2VFlowMatchScheduler"):
        _tiny_pipe(NanoI2VFlowMatchScheduler(), "epsilon")
    with pytest.raises(ValueError, match="configured with prediction_type 'epsilon'"):
        _tiny_pipe(DDIMScheduler(prediction_type="epsilon"), "v_prediction")
    with pytest.raises(ValueError, match="prediction_type must be one of"):
        _tiny_pipe(NanoI2VFlowMatchScheduler(), "x0")

    pipe = _tiny_pipe(NanoI2VFlowMatchScheduler())
    oracle = Oracle(pipe, torch.zeros(LATENT_SHAPE), "flow")
    pipe.scheduler = DDPMScheduler()  # swapped in after loading: refused at the call, before the model runs
    with pytest.raises(ValueError, match="but the scheduler is a DDPMScheduler") as error:
        _sample(pipe)
    assert oracle.calls == 0 and "\n" not in str(error.value)

    pipe = _tiny_pipe(DPMSolverMultistepScheduler(), "epsilon")
    with pytest.raises(ValueError, match="`eta` 0.5: the DPMSolverMultistepScheduler has no eta"):
        _sample(pipe, eta=0.5)
    pipe = _tiny_pipe(NanoI2VFlowMatchScheduler(solver="heun"))
    with pytest.raises(ValueError, match="needs eta in \\[0, 1\\] and solver 'euler'"):
        _sample(pipe, eta=0.5)


def test_scheduler_names_fit_the_objective():
    ddim = scheduler_from_name("ddim", _ddpm("v_prediction", beta_schedule="squaredcos_cap_v2"), "v_prediction")
    assert isinstance(ddim, DDIMScheduler) and ddim.config.prediction_type == "v_prediction"
    assert ddim.config.beta_schedule == "squaredcos_cap_v2"
    assert scheduler_from_name("dpm++", ddim, "v_prediction").config.prediction_type == "v_prediction"
    assert scheduler_from_name("heun", NanoI2VFlowMatchScheduler(shift=3.0), "flow").config.shift == 3.0
    with pytest.raises(ValueError, match="scheduler 'ddim' does not fit a flow-matching model; choose one of euler"):
        scheduler_from_name("ddim", NanoI2VFlowMatchScheduler(), "flow")
    with pytest.raises(ValueError, match=r"scheduler 'heun' does not fit a noise-prediction \(epsilon\) model"):
        scheduler_from_name("heun", ddim, "epsilon")
    with pytest.raises(ValueError, match=r"scheduler 'lms' does not fit .*\(known: euler, heun, ddpm"):
        scheduler_from_name("lms", ddim, "epsilon")


# ------------------------------------------------------------------------------------ save / load


def test_a_pipeline_saved_with_ddim_loads_back_with_it_and_its_objective(tmp_path):
    from nanoi2v_diffusers.cli import load_pipeline

    pipe = _tiny_pipe(DDIMScheduler.from_config(_ddpm("v_prediction", beta_schedule="squaredcos_cap_v2").config),
                      "v_prediction")  # fmt: skip
    pipe.save_pretrained(tmp_path)
    index = json.loads((tmp_path / "model_index.json").read_text())
    assert index["prediction_type"] == "v_prediction" and index["scheduler"] == ["diffusers", "DDIMScheduler"]
    loaded = NanoI2VPipeline.from_pretrained(tmp_path)
    assert isinstance(loaded.scheduler, DDIMScheduler) and loaded.config.prediction_type == "v_prediction"
    assert loaded.scheduler.config.prediction_type == "v_prediction"
    assert loaded.scheduler.config.beta_schedule == "squaredcos_cap_v2"
    # The command line's loader swaps in another fitting scheduler on the saved schedule, and refuses others.
    unipc = load_pipeline(str(tmp_path), scheduler="unipc").scheduler
    assert isinstance(unipc, UniPCMultistepScheduler) and unipc.config.prediction_type == "v_prediction"
    with pytest.raises(ValueError, match="scheduler 'euler' does not fit"):
        load_pipeline(str(tmp_path), scheduler="euler")
    # A folder of earlier versions names no objective: flow.
    flow = tmp_path / "flow"
    _tiny_pipe(NanoI2VFlowMatchScheduler()).save_pretrained(flow)
    index = json.loads((flow / "model_index.json").read_text())
    del index["prediction_type"]
    (flow / "model_index.json").write_text(json.dumps(index))
    assert NanoI2VPipeline.from_pretrained(flow).config.prediction_type == "flow"


# ------------------------------------------------------------------------------------ training


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_one_tiny_training_step_per_objective_saves_a_matching_pipeline(tmp_path, assets, prediction_type):  # noqa: F811
    out = tmp_path / prediction_type
    summary = train_dit.main(tiny_dit_argv(out, assets, "--prediction_type", prediction_type, "--max_train_steps", "1",
                                           "--checkpointing_steps", "1", "--validation_steps", "1",
                                           "--noise_scheduler", "{beta_schedule: squaredcos_cap_v2}",
                                           "--loss_weighting", "min_snr"))  # fmt: skip
    assert summary["steps"] == 1 and math.isfinite(summary["final_loss"])
    index = json.loads((out / "model_index.json").read_text())
    assert index["prediction_type"] == prediction_type and index["scheduler"] == ["diffusers", "DDIMScheduler"]
    scheduler = json.loads((out / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["prediction_type"] == prediction_type and scheduler["beta_schedule"] == "squaredcos_cap_v2"
    assert scheduler["clip_sample"] is False
    assert len(list((out / "validation").glob("step-000001-*.gif"))) == 2  # validation sampled with the DDIM


# ------------------------------------------------------------------------------------ command line


@pytest.fixture(scope="module")
def saved_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("objectives")
    _tiny_pipe(NanoI2VFlowMatchScheduler()).save_pretrained(root / "flow")
    _tiny_pipe(DDIMScheduler.from_config(_ddpm("epsilon").config), "epsilon").save_pretrained(root / "eps")
    return root


@pytest.mark.parametrize(
    "model, flags, message",
    [
        ("eps", ["--scheduler", "lms"], "--scheduler 'lms': must be one of euler, heun, ddpm, ddim, dpm\\+\\+, unipc, "
                                        "euler_discrete"),
        ("eps", ["--scheduler", "heun"], "--scheduler 'heun': this model predicts 'epsilon' .* choose one of ddpm"),
        ("flow", ["--scheduler", "ddim"], "--scheduler 'ddim': this model is a flow-matching model: choose one of "
                                          "euler, heun"),
        ("eps", ["--shift", "3"], "--shift 3.0: applies to flow models; this one predicts 'epsilon'"),
        ("eps", ["--scheduler", "ddim", "--solver", "heun"], "--solver 'heun': give --scheduler or --solver"),
        ("eps", ["--eta", "-1"], "--eta -1.0: must be a number >= 0"),
        ("eps", ["--scheduler", "dpm++", "--eta", "0.5"], "--eta 0.5: the dpm\\+\\+ scheduler takes no eta"),
        ("flow", ["--eta", "1.5"], "--eta 1.5: must be in \\[0, 1\\] for a flow model"),
    ],
)
@pytest.mark.parametrize("command", ["generate", "evaluate"])
def test_bad_scheduler_flags_stop_with_one_line_before_anything_loads(saved_models, model, flags, message, command,
                                                                      capsys, monkeypatch):  # fmt: skip
    import re

    from nanoi2v_diffusers import cli

    monkeypatch.setattr(cli, "load_pipeline", lambda *a, **k: pytest.fail("the model was loaded"))
    with pytest.raises(SystemExit) as exit_info:
        cli.main([command, "--model", str(saved_models / model), *flags])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and len(err.splitlines()) == 1, err
    assert re.search(message, err), err


def test_a_lora_must_train_its_base_pipelines_objective(tmp_path, assets):  # noqa: F811
    from training_fixtures import write_tiny_pipeline

    from nanoi2v_diffusers.settings import parse_config

    base = tmp_path / "base"
    write_tiny_pipeline(base, assets)  # a flow pipeline
    argv = tiny_dit_argv(tmp_path / "lora", assets, "--pretrained_transformer", str(base), "--lora_rank", "2")
    assert parse_config(DiTTrainingConfig, argv).prediction_type == "flow"
    with pytest.raises(ValueError, match="prediction_type 'epsilon': a LoRA adapter must train its base pipeline's "
                                         "objective, and .* predicts 'flow'"):  # fmt: skip
        parse_config(DiTTrainingConfig, [*argv, "--prediction_type", "epsilon"])
