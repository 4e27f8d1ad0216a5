"""Train `AutoencoderKLNanoI2V` on the built-in shapes clips or a folder of videos.

    accelerate launch training/train_vae.py --config training/configs/vae_shapes_64_images.yaml  # first frames
    accelerate launch training/train_vae.py --config training/configs/vae_shapes_64.yaml  # then clips
    accelerate launch training/train_vae.py --config training/configs/vae_shapes_64_decoder.yaml  # then decoder
    accelerate launch training/train_vae.py --config training/configs/vae_shapes_64_first_frame.yaml  # frame 0
    python training/train_vae.py --config training/configs/vae_tiny.yaml --max_train_steps 20

Loss: reconstruction (L1, or MSE with `reconstruction_loss: mse`; frame 0, the image an I2V pipeline
starts from, weighted `first_frame_loss_weight`) + `kl_weight` * KL (per latent element), plus, from
`gan_start_step` on and when `gan_weight > 0`, a hinge loss from a 3D patch discriminator (weight
fixed, or adaptive as in VQGAN). On mostly-black synthetic clips use MSE: L1's gradient has the same
size at every pixel, so the black background (about 90% of the pixels) keeps the model on a "predict
black" plateau (measured: a 2-clip overfit stays at 14 dB with L1 and reaches 28 dB in 300 steps with
MSE). Checkpoints (`accelerator.save_state`) every `checkpointing_steps`, rotated by
`checkpoints_total_limit`, resumable with `--resume_from_checkpoint latest`. Every
`validation_steps`, PSNR / SSIM on fixed validation clips and original | reconstruction videos in
`output_dir/samples`. At the end, per-channel `latents_mean` / `latents_std` are measured on
training clips, written into the config, and the VAE is saved with `save_pretrained(output_dir)`.
With `train_decoder_only` the encoder of `pretrained_vae` is frozen and its statistics are kept, so the
latents do not change: a DiT or latent cache made with the earlier VAE stays valid.
"""

import dataclasses
import gc
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from accelerate.logging import get_logger
from accelerate.utils import set_seed
from diffusers.optimization import get_scheduler
from tqdm.auto import tqdm

from nanoi2v_diffusers.evaluation import psnr, ssim
from nanoi2v_diffusers.models import VAE_PRESETS, AutoencoderKLNanoI2V
from nanoi2v_diffusers.training.common import (
    TRAIN_LOG,
    TrainingConfig,
    append_jsonl,
    build_accelerator,
    build_dataloader,
    build_dataset,
    infinite_batches,
    parse_config,
    resume_if_requested,
    save_checkpoint,
    save_config,
    stop_on_nonfinite_streak,
    validation_batch,
    write_side_by_side,
)

logger = get_logger(__name__)

# VQGAN's adaptive GAN weight: ||grad rec|| / (||grad gan|| + eps), clamped.
ADAPTIVE_WEIGHT_EPS = 1e-4
ADAPTIVE_WEIGHT_MAX = 1e4
LEAKY_RELU_SLOPE = 0.2
RECONSTRUCTION_LOSSES = {"l1": F.l1_loss, "mse": F.mse_loss}


@dataclass
class VAETrainingConfig(TrainingConfig):
    """Settings of training/train_vae.py (see training/common.py for the shared ones)."""

    output_dir: str = "outputs/vae"
    vae_preset: str = "shapes-64"  # a key of nanoi2v_diffusers.models.VAE_PRESETS
    pretrained_vae: Optional[str] = None  # start from a saved VAE instead of the preset
    # Freeze the encoder and train the decoder only: the latents, their `latents_mean` / `latents_std`,
    # and so a DiT or latent cache made with `pretrained_vae`, stay valid. Needs pretrained_vae.
    train_decoder_only: bool = False
    reconstruction_loss: str = "l1"  # "l1" or "mse"
    # Frame 0 is the image an image-to-video pipeline starts from and shows as is (its latent is the
    # image's): its reconstruction loss counts this many times that of any other frame.
    first_frame_loss_weight: float = 1.0
    kl_weight: float = 1e-6
    sample_posterior: bool = True
    # Start the posterior nearly deterministic (log-variance bias of the encoder's last conv), so that
    # sampling noise does not drown the latents' signal at the start; None keeps the default init.
    initial_posterior_logvar: Optional[float] = None
    gan_weight: float = 0.0  # 0 turns the discriminator off
    gan_start_step: int = 2000
    gan_adaptive_weight: bool = True
    discriminator_channels: int = 32
    discriminator_learning_rate: Optional[float] = None  # defaults to learning_rate
    num_sample_videos: int = 4
    sample_format: str = "mp4"  # "mp4" or "gif"
    sample_fps: int = 8
    num_latent_stat_batches: int = 8

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.pretrained_vae is None and self.vae_preset not in VAE_PRESETS:
            raise ValueError(f"vae_preset must be one of {sorted(VAE_PRESETS)}; got {self.vae_preset!r}.")
        if self.train_decoder_only and not self.pretrained_vae:
            raise ValueError("train_decoder_only needs pretrained_vae: the frozen encoder comes from a trained VAE.")
        if self.reconstruction_loss not in RECONSTRUCTION_LOSSES:
            raise ValueError(
                f"reconstruction_loss must be one of {sorted(RECONSTRUCTION_LOSSES)}; got {self.reconstruction_loss!r}."
            )
        if not self.first_frame_loss_weight > 0:
            raise ValueError(f"first_frame_loss_weight must be > 0; got {self.first_frame_loss_weight}.")
        if self.sample_format not in ("mp4", "gif"):
            raise ValueError(f"sample_format must be 'mp4' or 'gif'; got {self.sample_format!r}.")


def reconstruction_loss(
    reconstruction: torch.Tensor, target: torch.Tensor, kind: str, first_frame_weight: float = 1.0
) -> torch.Tensor:
    """Mean `kind` loss over the pixels of `(B, C, T, H, W)` videos, frame 0 weighted `first_frame_weight`."""
    per_frame = RECONSTRUCTION_LOSSES[kind](reconstruction, target, reduction="none").mean(dim=(0, 1, 3, 4))  # (T,)
    weights = torch.ones_like(per_frame)
    weights[0] = first_frame_weight
    return (per_frame * weights).sum() / weights.sum()


class VAEWithPosterior(nn.Module):
    """Runs encode -> sample -> decode in one `forward`, so that DDP and autocast wrap the whole step."""

    def __init__(self, vae: AutoencoderKLNanoI2V, sample_posterior: bool, train_encoder: bool = True) -> None:
        super().__init__()
        self.vae = vae.requires_grad_(True)
        self.vae.encoder.requires_grad_(train_encoder)
        self.sample_posterior = sample_posterior
        self.train_encoder = train_encoder

    def forward(self, pixels: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        # A frozen encoder keeps no activations for backward.
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.train_encoder):
            posterior = self.vae.encode(pixels).latent_dist
        latents = posterior.sample() if self.sample_posterior and self.training else posterior.mode()
        reconstruction = self.vae.decode(latents).sample
        # KL to N(0, I) per latent element; diffusers' kl() sums over dims 1-3 only, so sum and divide.
        kl = posterior.kl().sum() / posterior.mean.numel()
        return reconstruction, kl


class PatchDiscriminator3D(nn.Module):
    """Strided 3D convs that score overlapping space-time patches as real (> 0) or fake (< 0)."""

    def __init__(self, in_channels: int = 3, channels: int = 32, num_layers: int = 3) -> None:
        super().__init__()
        layers = [nn.Conv3d(in_channels, channels, 4, stride=(1, 2, 2), padding=1), nn.LeakyReLU(LEAKY_RELU_SLOPE)]
        width = channels
        for _ in range(1, num_layers):
            layers += [
                nn.Conv3d(width, 2 * width, 4, stride=2, padding=1),
                nn.GroupNorm(1, 2 * width),
                nn.LeakyReLU(LEAKY_RELU_SLOPE),
            ]
            width *= 2
        layers.append(nn.Conv3d(width, 1, 3, padding=1))
        self.net = nn.Sequential(*layers)

    def forward(self, video: torch.Tensor) -> torch.Tensor:  # (B, C, T, H, W) -> (B, 1, t, h, w) logits
        return self.net(video)


def hinge_discriminator_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    return F.relu(1.0 - real_logits).mean() + F.relu(1.0 + fake_logits).mean()


def adaptive_gan_weight(rec_loss: torch.Tensor, gan_loss: torch.Tensor, last_layer: torch.Tensor) -> torch.Tensor:
    """Scale the GAN term so its gradient at the decoder's last layer matches the reconstruction's."""
    rec_grad = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)[0]
    gan_grad = torch.autograd.grad(gan_loss, last_layer, retain_graph=True)[0]
    weight = rec_grad.norm() / (gan_grad.norm() + ADAPTIVE_WEIGHT_EPS)
    return weight.clamp(0.0, ADAPTIVE_WEIGHT_MAX).detach()


def build_vae(config: VAETrainingConfig) -> AutoencoderKLNanoI2V:
    if config.pretrained_vae:
        return AutoencoderKLNanoI2V.from_pretrained(config.pretrained_vae, use_safetensors=True)
    vae = AutoencoderKLNanoI2V(**VAE_PRESETS[config.vae_preset])
    if config.initial_posterior_logvar is not None:
        # The encoder's last conv outputs (mean, log-variance) stacked on channels.
        with torch.no_grad():
            vae.encoder.conv_out.conv.bias[vae.config.latent_channels :] = config.initial_posterior_logvar
    return vae


@torch.no_grad()
def evaluate(vae: AutoencoderKLNanoI2V, videos: torch.Tensor, batch_size: int) -> Tuple[Dict[str, float], torch.Tensor]:
    """Mean PSNR / SSIM (on [0, 1] pixels, posterior mode) and the reconstructions, batch by batch."""
    was_training = vae.training
    vae.eval()
    device, dtype = vae.device, vae.dtype
    reconstructions = torch.cat([
        vae(chunk.to(device, dtype)).sample.float().cpu().clamp(-1, 1) for chunk in videos.split(batch_size)
    ])  # fmt: skip
    vae.train(was_training)
    target, output = (videos + 1) / 2, (reconstructions + 1) / 2
    metrics = {"val_psnr": psnr(output, target).mean().item(), "val_ssim": ssim(output, target).mean().item()}
    if videos.shape[2] > 1:  # frame 0 alone: what an image-to-video pipeline's first frame gets
        metrics["val_psnr_first_frame"] = psnr(output[:, :, :1], target[:, :, :1]).mean().item()
    return metrics, reconstructions


@torch.no_grad()
def measure_latent_stats(vae: AutoencoderKLNanoI2V, dataloader, num_batches: int) -> Tuple[list, list]:
    """Per-channel mean and std of posterior means over `num_batches` batches."""
    was_training = vae.training
    vae.eval()
    total = total_sq = None
    count = 0
    for index, batch in enumerate(dataloader):
        if index >= num_batches:
            break
        latents = vae.encode(batch["pixel_values"].to(vae.device, vae.dtype)).latent_dist.mode().double()
        per_channel = latents.transpose(0, 1).flatten(1)  # (C, B*T*H*W)
        total = per_channel.sum(1) if total is None else total + per_channel.sum(1)
        total_sq = per_channel.square().sum(1) if total_sq is None else total_sq + per_channel.square().sum(1)
        count += per_channel.shape[1]
    vae.train(was_training)
    mean = total / count
    std = (total_sq / count - mean.square()).clamp_min(0).sqrt()
    return [round(v, 6) for v in mean.tolist()], [round(max(v, 1e-6), 6) for v in std.tolist()]


class VAETrainer:
    """The training loop; one instance per run."""

    def __init__(self, config: VAETrainingConfig) -> None:
        self.config = config
        self.accelerator = build_accelerator(config)
        # Per-process seeds (posterior noise differs across ranks); DDP broadcasts rank 0's initial weights.
        set_seed(config.seed, device_specific=True)
        self.output_dir = Path(config.output_dir)
        if self.accelerator.is_main_process:
            save_config(config, self.output_dir)

        vae = build_vae(config)
        if config.gradient_checkpointing:
            vae.enable_gradient_checkpointing()
        self.model = VAEWithPosterior(vae, config.sample_posterior, train_encoder=not config.train_decoder_only)
        self.optimizer = torch.optim.AdamW(
            [param for param in vae.parameters() if param.requires_grad], lr=config.learning_rate,
            betas=(config.adam_beta1, config.adam_beta2), weight_decay=config.adam_weight_decay,
        )  # fmt: skip
        num_processes = self.accelerator.num_processes
        self.lr_scheduler = get_scheduler(
            config.lr_scheduler, self.optimizer, num_warmup_steps=config.lr_warmup_steps * num_processes,
            num_training_steps=config.max_train_steps * num_processes,
        )  # fmt: skip
        self.train_loader = build_dataloader(build_dataset(config, "train"), config, shuffle=True)
        self.model, self.optimizer, self.train_loader, self.lr_scheduler = self.accelerator.prepare(
            self.model, self.optimizer, self.train_loader, self.lr_scheduler
        )
        self.discriminator = self.disc_optimizer = None
        if config.gan_weight > 0:
            discriminator = PatchDiscriminator3D(vae.config.out_channels, config.discriminator_channels)
            disc_optimizer = torch.optim.AdamW(
                discriminator.parameters(), lr=config.discriminator_learning_rate or config.learning_rate,
                betas=(config.adam_beta1, config.adam_beta2),
            )  # fmt: skip
            self.discriminator, self.disc_optimizer = self.accelerator.prepare(discriminator, disc_optimizer)
        self.validation_videos = validation_batch(config)
        self.last_metrics: Dict[str, float] = {}
        self.nonfinite_streak = 0
        self.global_step = resume_if_requested(self.accelerator, self.config)
        if self.accelerator.is_main_process:
            self.accelerator.init_trackers("train_vae", config=config.to_dict())

    @property
    def vae(self) -> AutoencoderKLNanoI2V:
        return self.accelerator.unwrap_model(self.model).vae

    def _count_nonfinite(self, logs: Dict[str, float]) -> None:
        """Warn about a skipped (non-finite) step; stop the run after `max_nonfinite_steps` of them in a row."""
        if not logs.get("skipped"):
            self.nonfinite_streak = 0
            return
        self.nonfinite_streak += 1
        logger.warning(f"Step {self.global_step}: non-finite loss or gradients; update skipped "
                       f"({self.nonfinite_streak} in a row).", main_process_only=True)  # fmt: skip
        stop_on_nonfinite_streak(self.accelerator, self.config, self.global_step, self.nonfinite_streak)

    def _gan_active(self) -> bool:
        return self.discriminator is not None and self.global_step >= self.config.gan_start_step

    def _autoencoder_step(self, pixels: torch.Tensor) -> Tuple[Dict[str, float], torch.Tensor]:
        config = self.config
        with self.accelerator.accumulate(self.model):
            reconstruction, kl = self.model(pixels)
            rec_loss = reconstruction_loss(
                reconstruction.float(), pixels.float(), config.reconstruction_loss, config.first_frame_loss_weight
            )
            loss = rec_loss + config.kl_weight * kl
            logs = {"rec_loss": rec_loss.item(), "kl": kl.item()}
            if self._gan_active():
                gan_loss, gan_weight = self._generator_gan_loss(reconstruction, rec_loss)
                loss = loss + gan_weight * gan_loss
                logs.update(gan_loss=gan_loss.item(), gan_weight=float(gan_weight))
            self.accelerator.backward(loss)
            finite = True
            if self.accelerator.sync_gradients:
                grad_norm = self.accelerator.clip_grad_norm_(self.model.parameters(), config.max_grad_norm)
                finite = bool(torch.isfinite(grad_norm))
            # A non-finite step is skipped; under fp16 the grad scaler skips it itself and must see it.
            if finite or self.accelerator.scaler is not None:
                self.optimizer.step()
            self.lr_scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
        logs.update(loss=loss.item(), lr=self.lr_scheduler.get_last_lr()[0])
        if not finite:
            logs["skipped"] = True
        return logs, reconstruction.detach()

    def _generator_gan_loss(self, reconstruction: torch.Tensor, rec_loss: torch.Tensor) -> Tuple[torch.Tensor, float]:
        # The unwrapped, frozen discriminator: its parameters get no gradient from the generator's loss.
        discriminator = self.accelerator.unwrap_model(self.discriminator).requires_grad_(False)
        gan_loss = -discriminator(reconstruction).float().mean()
        discriminator.requires_grad_(True)
        weight = self.config.gan_weight
        if self.config.gan_adaptive_weight:
            last_layer = self.vae.decoder.conv_out.conv.weight
            weight = weight * adaptive_gan_weight(rec_loss, gan_loss, last_layer).item()
        return gan_loss, weight

    def _discriminator_step(self, pixels: torch.Tensor, reconstruction: torch.Tensor) -> Dict[str, float]:
        with self.accelerator.accumulate(self.discriminator):
            logits = self.discriminator(torch.cat([pixels, reconstruction]))
            real_logits, fake_logits = logits.float().chunk(2)
            disc_loss = hinge_discriminator_loss(real_logits, fake_logits)
            self.accelerator.backward(disc_loss)
            self.disc_optimizer.step()
            self.disc_optimizer.zero_grad(set_to_none=True)
        return {"disc_loss": disc_loss.item()}

    def _validate(self) -> Dict[str, float]:
        config = self.config
        metrics, reconstructions = evaluate(self.vae, self.validation_videos, config.train_batch_size)
        samples_dir = self.output_dir / "samples"
        for index in range(min(config.num_sample_videos, len(reconstructions))):
            path = samples_dir / f"step-{self.global_step:06d}-{index}.{config.sample_format}"
            write_side_by_side(path, [self.validation_videos[index], reconstructions[index]], fps=config.sample_fps)
        self.last_metrics = {"step": self.global_step, **metrics}
        return metrics

    def _log(self, logs: Dict[str, float]) -> None:
        self.accelerator.log(logs, step=self.global_step)
        if self.accelerator.is_main_process:
            append_jsonl(self.output_dir / TRAIN_LOG, {"step": self.global_step, **logs})

    def train(self) -> Dict[str, float]:
        config, accelerator = self.config, self.accelerator
        batches = infinite_batches(self.train_loader)
        progress = tqdm(total=config.max_train_steps, initial=self.global_step, desc="train_vae",
                        disable=not accelerator.is_local_main_process)  # fmt: skip
        self.model.train()
        start = time.perf_counter()
        while self.global_step < config.max_train_steps:
            pixels = next(batches)["pixel_values"]
            logs, reconstruction = self._autoencoder_step(pixels)
            if self._gan_active() and not logs.get("skipped"):
                logs.update(self._discriminator_step(pixels, reconstruction))
            if not accelerator.sync_gradients:
                continue
            self.global_step += 1
            progress.update(1)
            progress.set_postfix(loss=f"{logs['loss']:.4f}", rec=f"{logs['rec_loss']:.4f}")
            if logs.get("skipped") or self.global_step % config.logging_steps == 0 or self.global_step == 1:
                self._log(logs)
            self._count_nonfinite(logs)
            if self.global_step % config.checkpointing_steps == 0:
                save_checkpoint(accelerator, self.output_dir, self.global_step, config.checkpoints_total_limit)
            if accelerator.is_main_process and (
                self.global_step % config.validation_steps == 0 or self.global_step == config.max_train_steps
            ):
                metrics = self._validate()
                progress.write(f"step {self.global_step}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
                self._log(metrics)
        progress.close()
        return self._finish(time.perf_counter() - start)

    def _finish(self, train_seconds: float) -> Dict[str, float]:
        accelerator = self.accelerator
        accelerator.wait_for_everyone()
        summary = {"train_seconds": round(train_seconds, 1), "steps": self.global_step}
        if accelerator.is_main_process:
            vae = self.vae
            if not self.config.train_decoder_only:  # a frozen encoder keeps the pretrained VAE's statistics
                # Statistics at the validation length, the clip length the latents will be used at: latent
                # frames beyond the training length are out of distribution and come out larger.
                stats_config = dataclasses.replace(self.config, num_frames=self.config.eval_num_frames)
                stats_loader = build_dataloader(build_dataset(stats_config, "train"), stats_config, shuffle=True)
                mean, std = measure_latent_stats(vae, stats_loader, self.config.num_latent_stat_batches)
                vae.register_to_config(latents_mean=mean, latents_std=std)
            vae.save_pretrained(self.output_dir)
            if self.last_metrics.get("step") != self.global_step:  # e.g. resumed at max_train_steps
                self._validate()
            summary.update({name: value for name, value in self.last_metrics.items() if name != "step"})
            append_jsonl(self.output_dir / TRAIN_LOG, {"step": self.global_step, "summary": summary})
            accelerator.print(f"Saved the VAE to {self.output_dir}: {summary}")
        return summary


def main(argv=None) -> Dict[str, float]:
    trainer = VAETrainer(parse_config(VAETrainingConfig, argv))
    summary = trainer.train()
    # Dropping the (DDP) model before the process group goes avoids a sporadic gloo abort at exit.
    accelerator = trainer.accelerator
    del trainer
    accelerator.free_memory()
    gc.collect()
    accelerator.end_training()
    return summary


if __name__ == "__main__":
    main()
