"""Train `AutoencoderKLNanoI2V` on the built-in shapes clips or a folder of videos.

    python training/train_vae.py --config training/configs/vae_tiny.yaml              # CPU smoke run, seconds
    accelerate launch training/train_vae.py --config training/configs/vae_shapes_64.yaml

Loss: reconstruction (L1, or MSE with `reconstruction_loss: mse`; frame 0, the image an I2V pipeline
starts from, weighted `first_frame_loss_weight`) + `kl_weight` * KL (per latent element), plus, from
`gan_start_step` on and when `gan_weight > 0`, a hinge loss from a 3D patch discriminator (weight
fixed, or adaptive as in VQGAN). On mostly-black synthetic clips use MSE: L1's gradient has the same
size at every pixel, so the black background keeps the model on a "predict black" plateau. Every
`validation_steps`, PSNR / SSIM on fixed validation clips and original | reconstruction videos in
`output_dir/samples`. At the end, per-channel `latents_mean` / `latents_std` are measured on training
clips and written into the config, and the VAE is saved with `save_pretrained(output_dir)`. With
`train_decoder_only` the encoder of `pretrained_vae` is frozen and its statistics are kept, so the
latents do not change: a DiT or latent cache made with the earlier VAE stays valid. The loop itself
(checkpoints, exact resume, logging, ...) is `training/trainer.py`'s.
"""

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from nanoi2v_diffusers.data import collate_videos, write_side_by_side
from nanoi2v_diffusers.data.sampling import shard_dataset
from nanoi2v_diffusers.evaluation import psnr, ssim
from nanoi2v_diffusers.models import VAE_PRESETS, AutoencoderKLNanoI2V
from nanoi2v_diffusers.safe_loading import check_local_path
from nanoi2v_diffusers.training.trainer import (
    Trainer,
    TrainingConfig,
    build_dataset,
    validation_items,
)

# VQGAN's adaptive GAN weight: ||grad rec|| / (||grad gan|| + eps), clamped.
ADAPTIVE_WEIGHT_EPS = 1e-4
ADAPTIVE_WEIGHT_MAX = 1e4
LEAKY_RELU_SLOPE = 0.2
RECONSTRUCTION_LOSSES = {"l1": F.l1_loss, "mse": F.mse_loss}


@dataclass
class VAETrainingConfig(TrainingConfig):
    """Settings of training/train_vae.py (see training/trainer.py for the shared ones)."""

    output_dir: str = "outputs/vae"
    vae_preset: str = "shapes-64"  # a key of nanoi2v_diffusers.models.VAE_PRESETS
    pretrained_vae: Optional[str] = None  # start from a saved VAE instead of the preset
    # Freeze the encoder and train the decoder only: the latents, their statistics, and so a DiT or latent
    # cache made with `pretrained_vae`, stay valid. Needs pretrained_vae.
    train_decoder_only: bool = False
    reconstruction_loss: str = "l1"  # "l1" or "mse"
    # Frame 0 is the image an image-to-video pipeline starts from and shows as is: its loss counts this many frames.
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

    RESUME_FREE = (*TrainingConfig.RESUME_FREE, "num_sample_videos", "sample_format", "sample_fps")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.pretrained_vae is None and self.vae_preset not in VAE_PRESETS:
            raise ValueError(f"vae_preset must be one of {sorted(VAE_PRESETS)}; got {self.vae_preset!r}.")
        if self.train_decoder_only and not self.pretrained_vae:
            raise ValueError("train_decoder_only needs pretrained_vae: the frozen encoder comes from a trained VAE.")
        check_local_path("pretrained_vae", self.pretrained_vae)
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

    def forward(
        self, pixels: torch.Tensor, generator: Optional[torch.Generator] = None
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        # A frozen encoder keeps no activations for backward.
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.train_encoder):
            posterior = self.vae.encode(pixels).latent_dist
        latents = posterior.sample(generator) if self.sample_posterior and self.training else posterior.mode()
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
            layers += [nn.Conv3d(width, 2 * width, 4, stride=2, padding=1), nn.GroupNorm(1, 2 * width),
                       nn.LeakyReLU(LEAKY_RELU_SLOPE)]  # fmt: skip
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
    reconstructions = torch.cat([vae(chunk.to(vae.device, vae.dtype)).sample.float().cpu().clamp(-1, 1)
                                 for chunk in videos.split(batch_size)])  # fmt: skip
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
    total = total_sq = 0.0
    count = 0
    for index, batch in enumerate(dataloader):
        if index >= num_batches:
            break
        latents = vae.encode(batch["pixel_values"].to(vae.device, vae.dtype)).latent_dist.mode().double()
        per_channel = latents.transpose(0, 1).flatten(1)  # (C, B*T*H*W)
        total, total_sq = total + per_channel.sum(1), total_sq + per_channel.square().sum(1)
        count += per_channel.shape[1]
    vae.train(was_training)
    mean = total / count
    std = (total_sq / count - mean.square()).clamp_min(0).sqrt()
    return [round(v, 6) for v in mean.tolist()], [round(max(v, 1e-6), 6) for v in std.tolist()]


class VAETrainer(Trainer):
    config_class = VAETrainingConfig
    name = "train_vae"
    run_files = (*Trainer.run_files, "config.json", "diffusion_pytorch_model.safetensors", "samples")

    @property
    def vae(self) -> AutoencoderKLNanoI2V:
        return self.accelerator.unwrap_model(self.model).vae

    def build_model(self) -> nn.Module:
        config = self.config
        vae = build_vae(config)
        if config.gradient_checkpointing:
            vae.enable_gradient_checkpointing()
        self.discriminator = self.disc_optimizer = None
        if config.gan_weight > 0:
            discriminator = PatchDiscriminator3D(vae.config.out_channels, config.discriminator_channels)
            disc_optimizer = torch.optim.AdamW(
                discriminator.parameters(),
                betas=(config.adam_beta1, config.adam_beta2),
                lr=config.discriminator_learning_rate or config.learning_rate,
            )
            self.discriminator, self.disc_optimizer = self.accelerator.prepare(discriminator, disc_optimizer)
        self.validation_videos = torch.stack([item["pixel_values"] for item in validation_items(config)])
        return VAEWithPosterior(vae, config.sample_posterior, train_encoder=not config.train_decoder_only)

    def training_data(self) -> Tuple[Dataset, Callable]:
        accelerator = self.accelerator
        dataset = shard_dataset(
            build_dataset(self.config, "train"), accelerator.process_index, accelerator.num_processes
        )
        return dataset, collate_videos

    def _gan_active(self) -> bool:
        return self.discriminator is not None and self.state.step >= self.config.gan_start_step

    def compute_loss(self, batch: Dict[str, Any], generator: torch.Generator) -> Tuple[torch.Tensor, Dict[str, float]]:
        config = self.config
        pixels = batch["pixel_values"].to(self.accelerator.device)
        reconstruction, kl = self.model(pixels, generator)
        rec_loss = reconstruction_loss(reconstruction.float(), pixels.float(), config.reconstruction_loss,
                                       config.first_frame_loss_weight)  # fmt: skip
        loss = rec_loss + config.kl_weight * kl
        logs = {"rec_loss": rec_loss.item(), "kl": kl.item()}
        if self._gan_active():
            # The unwrapped, frozen discriminator: its parameters get no gradient from the generator's loss.
            discriminator = self.accelerator.unwrap_model(self.discriminator).requires_grad_(False)
            gan_loss = -discriminator(reconstruction).float().mean()
            discriminator.requires_grad_(True)
            weight = config.gan_weight
            if config.gan_adaptive_weight:
                last_layer = self.vae.decoder.conv_out.conv.weight
                weight *= adaptive_gan_weight(rec_loss, gan_loss, last_layer).item()
            loss = loss + weight * gan_loss
            logs.update(gan_loss=gan_loss.item(), gan_weight=weight)
        self.last_pair = (pixels, reconstruction.detach())
        return loss, logs

    def after_update(self) -> Dict[str, float]:
        """One discriminator step on the last micro-batch's real and reconstructed clips, unless its loss is
        not finite."""
        if not self._gan_active():
            return {}
        logits = self.discriminator(torch.cat(self.last_pair))
        disc_loss = hinge_discriminator_loss(*logits.float().chunk(2))
        if not torch.isfinite(disc_loss):
            return {"disc_skipped": 1}
        self.accelerator.backward(disc_loss)
        self.disc_optimizer.step()
        self.disc_optimizer.zero_grad(set_to_none=True)
        return {"disc_loss": disc_loss.item()}

    def validate(self) -> Dict[str, float]:
        if not self.accelerator.is_main_process:
            return {}
        config = self.config
        metrics, reconstructions = evaluate(self.vae, self.validation_videos, config.train_batch_size)
        for index in range(min(config.num_sample_videos, len(reconstructions))):
            path = self.output_dir / "samples" / f"step-{self.state.step:06d}-{index}.{config.sample_format}"
            write_side_by_side(path, [self.validation_videos[index], reconstructions[index]], fps=config.sample_fps)
        return metrics

    def save_outputs(self, summary: Dict[str, Any]) -> None:
        vae, config = self.vae, self.config
        if not config.train_decoder_only:  # a frozen encoder keeps the pretrained VAE's statistics
            # At the validation length, the length the latents will be used at: latent frames beyond the
            # training length are out of distribution and come out larger.
            stats_config = dataclasses.replace(config, num_frames=config.eval_num_frames)
            loader = DataLoader(
                build_dataset(stats_config, "train"),
                batch_size=config.train_batch_size,
                shuffle=True,
                collate_fn=collate_videos,
                generator=torch.Generator().manual_seed(config.seed),
            )
            mean, std = measure_latent_stats(vae, loader, config.num_latent_stat_batches)
            vae.register_to_config(latents_mean=mean, latents_std=std)
        vae.save_pretrained(self.output_dir)


main = VAETrainer.main

if __name__ == "__main__":
    main()
