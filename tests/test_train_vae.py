"""End-to-end runs of training/train_vae.py with the tiny config (a few seconds each)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nanoi2v_diffusers.models import AutoencoderKLNanoI2V

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "training" / "train_vae.py"
TINY_CONFIG = ROOT / "training" / "configs" / "vae_tiny.yaml"


def read_log(output_dir: Path) -> list:
    return [json.loads(line) for line in (output_dir / "train_log.jsonl").read_text().splitlines()]


def run_script(*args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, str(SCRIPT), "--config", str(TINY_CONFIG), *args]
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("vae_run")
    run_script("--output_dir", str(output_dir), "--max_train_steps", "12", "--checkpointing_steps", "6",
               "--validation_steps", "6")  # fmt: skip
    return output_dir


@pytest.mark.slow
def test_training_writes_a_loadable_vae_with_latent_stats(trained_run):
    assert (trained_run / "diffusion_pytorch_model.safetensors").is_file()
    vae = AutoencoderKLNanoI2V.from_pretrained(trained_run).eval()
    channels = vae.config.latent_channels
    assert len(vae.config.latents_mean) == channels and len(vae.config.latents_std) == channels
    assert all(std > 0 for std in vae.config.latents_std)
    with torch.no_grad():
        video = vae(torch.zeros(1, 3, 5, 32, 32)).sample
    assert video.shape == (1, 3, 5, 32, 32) and torch.isfinite(video).all()


@pytest.mark.slow
def test_training_loss_goes_down(trained_run):
    losses = [record["rec_loss"] for record in read_log(trained_run) if "rec_loss" in record]
    assert len(losses) == 12
    assert sum(losses[-3:]) / 3 < 0.7 * sum(losses[:3]) / 3


@pytest.mark.slow
def test_training_writes_checkpoints_samples_and_metrics(trained_run):
    # checkpoints_total_limit: 1 in the tiny config, so checkpoint-6 was rotated out.
    assert sorted(path.name for path in trained_run.glob("checkpoint-*")) == ["checkpoint-12"]
    assert (trained_run / "samples" / "step-000006-0.mp4").is_file()
    assert (trained_run / "samples" / "step-000012-0.mp4").is_file()
    assert (trained_run / "training_config.yaml").is_file()
    summary = read_log(trained_run)[-1]["summary"]
    assert summary["steps"] == 12 and summary["val_psnr"] > 0 and -1 <= summary["val_ssim"] <= 1
    assert summary["val_psnr_first_frame"] > 0


@pytest.mark.slow
def test_resume_from_latest_continues_the_step_count(trained_run):
    result = run_script("--output_dir", str(trained_run), "--max_train_steps", "14", "--resume_from_checkpoint", "latest",
                        "--allow_changed_settings")  # more steps than the checkpoint's run: a changed setting
    assert "Resuming from" in result.stdout + result.stderr
    steps = [record["step"] for record in read_log(trained_run) if "rec_loss" in record]
    assert steps[-2:] == [13, 14]


@pytest.mark.slow
def test_gan_loss_starts_after_warmup(tmp_path):
    from nanoi2v_diffusers.training.train_vae import main

    main(["--config", str(TINY_CONFIG), "--output_dir", str(tmp_path), "--max_train_steps", "3",
          "--gan_weight", "0.5", "--gan_start_step", "1", "--validation_steps", "100", "--checkpointing_steps", "100",
          "--reconstruction_loss", "mse"])  # fmt: skip
    records = [record for record in read_log(tmp_path) if "rec_loss" in record]
    assert "gan_loss" not in records[0] and "disc_loss" not in records[0]  # step 1: still warming up
    assert all("gan_loss" in record and "disc_loss" in record for record in records[1:])
    assert all(record["gan_weight"] >= 0 for record in records[1:])


@pytest.mark.slow
def test_decoder_only_training_keeps_the_encoder_and_latent_stats(trained_run, tmp_path):
    from nanoi2v_diffusers.data.latent_cache import vae_encoder_fingerprint
    from nanoi2v_diffusers.training.train_vae import main

    main(["--config", str(TINY_CONFIG), "--output_dir", str(tmp_path), "--max_train_steps", "3",
          "--pretrained_vae", str(trained_run), "--train_decoder_only",
          "--validation_steps", "100", "--checkpointing_steps", "100"])  # fmt: skip
    before, after = AutoencoderKLNanoI2V.from_pretrained(trained_run), AutoencoderKLNanoI2V.from_pretrained(tmp_path)
    assert vae_encoder_fingerprint(after) == vae_encoder_fingerprint(before)
    assert not torch.equal(after.decoder.conv_out.conv.weight, before.decoder.conv_out.conv.weight)
    assert after.config.latents_mean == before.config.latents_mean
    assert after.config.latents_std == before.config.latents_std


@pytest.mark.parametrize("kind", ["l1", "mse"])
def test_reconstruction_loss_weights_the_first_frame(kind):
    from nanoi2v_diffusers.training.train_vae import RECONSTRUCTION_LOSSES, reconstruction_loss

    target = torch.randn(2, 3, 5, 4, 4)
    noisy = target + torch.randn(target.shape)
    assert reconstruction_loss(noisy, target, kind) == pytest.approx(RECONSTRUCTION_LOSSES[kind](noisy, target).item())
    frame_0_wrong = target.clone()
    frame_0_wrong[:, :, 0] += 1.0  # per-pixel error 1 in frame 0 only, under both losses
    # Frame 0 counts 3 times among 5 frames: 3 * 1 / (3 + 4).
    assert reconstruction_loss(frame_0_wrong, target, kind, first_frame_weight=3.0).item() == pytest.approx(3 / 7)
    assert reconstruction_loss(frame_0_wrong, target, kind).item() == pytest.approx(1 / 5)


def test_vae_config_choices_and_initial_logvar():
    from nanoi2v_diffusers.training.train_vae import VAETrainingConfig, build_vae

    with pytest.raises(ValueError, match="reconstruction_loss must be one of"):
        VAETrainingConfig(reconstruction_loss="l3")
    with pytest.raises(ValueError, match="vae_preset must be one of"):
        VAETrainingConfig(vae_preset="huge")
    with pytest.raises(ValueError, match="train_decoder_only needs pretrained_vae"):
        VAETrainingConfig(train_decoder_only=True)
    with pytest.raises(ValueError, match="first_frame_loss_weight must be > 0; got 0"):
        VAETrainingConfig(first_frame_loss_weight=0.0)
    vae = build_vae(VAETrainingConfig(vae_preset="tiny", initial_posterior_logvar=-6.0))
    with torch.no_grad():
        posterior = vae.encode(torch.zeros(1, 3, 1, 8, 8)).latent_dist
    # Zero input: the conv_out output is its bias plus what earlier layers' biases propagate, so the
    # log-variance half sits around -6 (std about 0.05) while the mean half stays near 0.
    assert posterior.logvar.mean().item() == pytest.approx(-6.0, abs=1.0)
    assert posterior.mean.abs().mean().item() < 1.0
