"""Train `NanoI2VTransformer3DModel` by flow matching, on one CPU, one GPU or many (DDP, FSDP).

    python training/train_dit.py --config training/configs/tiny.yaml              # CPU smoke run
    python training/precompute_latents.py --config training/configs/shapes_64.yaml
    accelerate launch training/train_dit.py --config training/configs/shapes_64.yaml
    accelerate launch --config_file training/accelerate_configs/multi_gpu.yaml \\
        training/train_dit.py --config training/configs/gpu_256.yaml --resume_from_checkpoint latest

A step encodes clips with the frozen VAE and text encoder, or reads them from the latent cache that
training/precompute_latents.py wrote when `cache_dir` is set, then (DESIGN.md sections 3 and 5):
draws a latent `x0` from the VAE posterior; builds the image condition from the posterior mean of
latent frame 0, with a little noise added, dropped for a fraction `image_dropout` of the clips;
drops the text (no tokens) for a fraction `text_dropout`, independently; samples sigmas with the
scheduler's training helper (logit-normal by default); and regresses the velocity `noise - x0` at
`x_t = (1 - sigma) x0 + sigma noise`. One model so learns image-to-video, text-to-video and
unconditional generation, which classifier-free guidance needs.

Every random draw of a step comes from a generator seeded with (seed, rank, micro-step) and the
data order from (seed, position) (`ResumableSampler`), so on the CPU a run resumed from a
checkpoint continues with exactly the losses of an uninterrupted one. Checkpoints
(`accelerator.save_state`, EMA included) are written atomically every `checkpointing_steps`. A step
whose gradients are not finite is skipped and logged; `max_nonfinite_steps` of them in a row save a
checkpoint and stop the run. Every `validation_steps` the real `NanoI2VPipeline` is built from the
EMA weights and generates videos from fixed validation first frames and captions. At the end the
whole pipeline is saved to `output_dir` with a model card, and pushed with `--push_to_hub`. With
`lora_rank`, only a LoRA adapter on the pretrained pipeline's transformer trains, and the run saves
the adapter (`pytorch_lora_weights.safetensors`, for `NanoI2VPipeline.load_lora_weights`) instead.
"""

import collections
import gc
import hashlib
import json
import logging
import math
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple

import numpy as np
import torch
import yaml
from accelerate.utils import set_seed
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel
from PIL import Image
from torch.utils.data import Subset
from tqdm.auto import tqdm

from nanoi2v_diffusers import hub_utils
from nanoi2v_diffusers.conditioning import build_image_condition, drop_image_condition, num_condition_channels
from nanoi2v_diffusers.contact_sheet import make_contact_sheet
from nanoi2v_diffusers.data import collate_videos, tensor_to_frames
from nanoi2v_diffusers.data.latent_cache import (
    collate_cache_rows,
    encode_clips,
    load_latent_cache,
    model_fingerprint,
    sample_latents,
    vae_encoder_fingerprint,
)
from nanoi2v_diffusers.models import VAE_PRESETS, AutoencoderKLNanoI2V
from nanoi2v_diffusers.models.transformer_nanoi2v import TRANSFORMER_PRESETS, NanoI2VTransformer3DModel
from nanoi2v_diffusers.pipelines.pipeline_nanoi2v import NanoI2VPipeline
from nanoi2v_diffusers.schedulers.scheduling_nanoi2v_flow_match import NanoI2VFlowMatchScheduler
from nanoi2v_diffusers.text_encoders import encode_text, load_text_encoder
from nanoi2v_diffusers.training.common import (
    TRAIN_LOG,
    NonFiniteLossError,  # noqa: F401 - raised by stop_on_nonfinite_streak; part of this script's API
    TrainingConfig,
    append_jsonl,
    build_accelerator,
    build_dataset,
    build_resumable_dataloader,
    parse_config,
    resume_if_requested,
    save_checkpoint,
    save_config,
    shard_dataset,
    stop_on_nonfinite_streak,
    write_side_by_side,
)

logger = logging.getLogger(__name__)

WEIGHT_DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
WEIGHTING_SCHEMES = ("logit_normal", "mode", "sigma_sqrt", "cosmap", "none")
VALIDATION_FORMATS = ("gif", "mp4")
# The attention projections of every block (self-attention's fused QKV, cross-attention's Q and fused KV).
LORA_TARGET_MODULES = ("to_qkv", "to_q", "to_kv", "to_out")
# The summary also averages the loss over the last steps: one step's loss (one batch at random noise
# levels) is too noisy to compare runs by.
FINAL_LOSS_WINDOW = 100
MEAN_LOSS_KEY = f"mean_loss_last_{FINAL_LOSS_WINDOW}_steps"
VALIDATION_DIR = "validation"
RANK_FACTS_DIR = "rank_facts"
# The contact sheet logged at each validation shows every other frame.
CONTACT_SHEET_FRAME_STEP = 2
# Hex digits kept of each clip's hash in the per-rank debug facts.
CLIP_HASH_DIGITS = 16


@dataclass
class DiTTrainingConfig(TrainingConfig):
    """Settings of training/train_dit.py (see training/common.py for the shared ones)."""

    output_dir: str = "outputs/dit"
    lr_scheduler: str = "cosine"
    lr_warmup_steps: int = 500
    # Models. A random VAE of `vae_preset` is used when `pretrained_vae` is None: smoke tests only.
    pretrained_vae: Optional[str] = None  # a folder written by training/train_vae.py
    vae_preset: str = "shapes-64"
    text_encoder: Optional[str] = None  # None: the built-in all-MiniLM-L6-v2; or a local transformers folder
    max_sequence_length: int = 64
    # A regular expression: encode each clause of a caption on its own (text_encoders.encode_clauses); saved
    # in the pipeline, which then encodes prompts the same way. The shapes captions' is CAPTION_CLAUSE_SEPARATOR.
    text_clause_separator: Optional[str] = None
    transformer_preset: str = "S"  # a key of TRANSFORMER_PRESETS
    transformer_overrides: Optional[Dict[str, Any]] = None  # e.g. {num_layers: 8}; wins over the preset
    # With pretrained_transformer, overrides may add modules to it: see grow_transformer.
    pretrained_transformer: Optional[str] = None  # start from a saved transformer, or a pipeline folder's
    # LoRA: with lora_rank, only a PEFT adapter on `lora_target_modules` trains; pretrained_transformer must
    # then be a pipeline folder (the base the LoRA weights load into) and the run saves only the adapter.
    lora_rank: Optional[int] = None
    lora_alpha: Optional[float] = None  # None: lora_rank (an adapter scale of 1)
    lora_target_modules: Tuple[str, ...] = LORA_TARGET_MODULES
    scheduler_shift: float = 1.0
    # Objective
    weighting_scheme: str = "logit_normal"  # as diffusers' SD3 script: see split_weighting_scheme
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29
    image_dropout: float = 0.1
    text_dropout: float = 0.1
    condition_noise_std: float = 0.02  # per clip, the image latent gets noise of std U(0, this)
    use_ema: bool = True
    ema_decay: float = 0.9999
    ema_power: float = 0.75  # EMA warm-up: decay = 1 - (1 + step) ** -power, capped at ema_decay
    # Data. With cache_dir the clips come from training/precompute_latents.py's cache.
    cache_dir: Optional[str] = None
    max_train_samples: Optional[int] = None  # use the first N training clips (the clips a cache holds)
    cache_num_shards: Optional[int] = None
    cache_dtype: str = "float32"
    # Validation and publishing
    validation_num_inference_steps: int = 20
    validation_guidance_scale: float = 5.0
    validation_fps: int = 8
    validation_formats: Tuple[str, ...] = ("gif", "mp4")
    push_to_hub: bool = False
    hub_model_id: Optional[str] = None
    hub_private: bool = False
    debug_rank_facts: bool = False  # write output_dir/rank_facts/rank-<r>.json (multi-process tests)

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.transformer_overrides, str):  # from the command line: a YAML/JSON mapping
            self.transformer_overrides = yaml.safe_load(self.transformer_overrides)
        self._check_models()
        self._check_objective()
        if self.max_train_samples is not None and self.max_train_samples < 1:
            raise ValueError(f"max_train_samples must be >= 1 or None; got {self.max_train_samples}.")
        if self.push_to_hub and not self.hub_model_id:
            raise ValueError("push_to_hub needs hub_model_id (e.g. 'your-name/nanoi2v-shapes-64').")
        unknown = [fmt for fmt in self.validation_formats if fmt not in VALIDATION_FORMATS]
        if unknown:
            raise ValueError(f"validation_formats may hold {VALIDATION_FORMATS}; got {unknown}.")

    def _check_models(self) -> None:
        if self.transformer_overrides is not None and not isinstance(self.transformer_overrides, dict):
            raise ValueError(f"transformer_overrides must be a mapping; got {self.transformer_overrides!r}.")
        if self.pretrained_transformer is None and self.transformer_preset not in TRANSFORMER_PRESETS:
            raise ValueError(
                f"transformer_preset must be one of {sorted(TRANSFORMER_PRESETS)}; got {self.transformer_preset!r}."
            )
        if self.pretrained_vae is None and self.vae_preset not in VAE_PRESETS:
            raise ValueError(f"vae_preset must be one of {sorted(VAE_PRESETS)}; got {self.vae_preset!r}.")
        if self.max_sequence_length < 1:
            raise ValueError(f"max_sequence_length must be >= 1; got {self.max_sequence_length}.")
        if self.lora_rank is not None:
            self._check_lora()

    @property
    def resolved_lora_alpha(self) -> float:
        """`lora_alpha`, or `lora_rank` when it is None: the adapter's output is scaled by alpha / rank."""
        return self.lora_alpha if self.lora_alpha is not None else float(self.lora_rank)

    def _check_lora(self) -> None:
        if self.lora_rank < 1:
            raise ValueError(f"lora_rank must be >= 1 or None (full training); got {self.lora_rank}.")
        if self.lora_alpha is not None and self.lora_alpha <= 0:
            raise ValueError(f"lora_alpha must be > 0 or None (= lora_rank); got {self.lora_alpha}.")
        if not self.lora_target_modules:
            raise ValueError("lora_target_modules must name at least one module, e.g. ['to_qkv'].")
        if not (self.pretrained_transformer and hub_utils.is_pipeline_folder(self.pretrained_transformer)):
            raise ValueError(
                "lora_rank needs pretrained_transformer to be a pipeline folder (with model_index.json): the "
                f"pipeline the LoRA weights load into; got {self.pretrained_transformer!r}."
            )

    def _check_objective(self) -> None:
        for name in ("image_dropout", "text_dropout"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1]; got {getattr(self, name)}.")
        if self.weighting_scheme not in WEIGHTING_SCHEMES:
            raise ValueError(f"weighting_scheme must be one of {WEIGHTING_SCHEMES}; got {self.weighting_scheme!r}.")
        if self.validation_num_inference_steps < 1:
            raise ValueError(f"validation_num_inference_steps must be >= 1; got {self.validation_num_inference_steps}.")


# --------------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------------


def load_vae(config: DiTTrainingConfig) -> AutoencoderKLNanoI2V:
    """The frozen VAE (float32, eval mode): the trained one, or a random preset (seeded) for smoke runs."""
    if config.pretrained_vae:
        vae = AutoencoderKLNanoI2V.from_pretrained(config.pretrained_vae, use_safetensors=True)
    else:
        logger.warning("No pretrained_vae: using a random %r VAE (for smoke tests only).", config.vae_preset)
        with torch.random.fork_rng(devices=[]):  # the same random VAE for the precompute and training scripts
            torch.manual_seed(config.seed)
            vae = AutoencoderKLNanoI2V(**VAE_PRESETS[config.vae_preset])
    # Training clips are short, so whole-clip encoding fits in memory, and it is faster than the
    # frame-chunked default (about 1.7x on the CPU for 17 frames at 64 px).
    vae.use_framewise_encoding = False
    return vae.requires_grad_(False).eval()


def grow_transformer(pretrained: NanoI2VTransformer3DModel, overrides: Dict[str, Any]) -> NanoI2VTransformer3DModel:
    """`pretrained` with config `overrides` that add modules, e.g. `{num_text_refiner_layers: 1}`.

    The added modules keep their fresh initialisation; text-refiner blocks start as the identity, so
    a model grown by them starts out computing what `pretrained` computes. Overrides that would drop
    weights raise; ones that change a weight's shape raise in `load_state_dict`.
    """
    changed = {key: value for key, value in overrides.items() if pretrained.config.get(key) != value}
    if not changed:
        return pretrained
    # As keyword arguments: from_config drops config entries that were defaults when `pretrained` was loaded.
    grown = NanoI2VTransformer3DModel.from_config(pretrained.config, **changed)
    missing, unexpected = grown.load_state_dict(pretrained.state_dict(), strict=False)
    if unexpected:
        raise ValueError(
            f"transformer_overrides {changed} may only add modules to pretrained_transformer; "
            f"{len(unexpected)} of its weights would be dropped, e.g. {unexpected[0]!r}."
        )
    logger.info("Grew the pretrained transformer with %s: %d new parameter tensors.", changed, len(missing))
    return grown


def load_pretrained_transformer(path: str) -> NanoI2VTransformer3DModel:
    """The transformer saved at `path`: a transformer folder, or a pipeline folder (its `transformer/`)."""
    subfolder = "transformer" if hub_utils.is_pipeline_folder(path) else None
    return NanoI2VTransformer3DModel.from_pretrained(path, subfolder=subfolder)


def check_text_encoding_matches(config: DiTTrainingConfig) -> None:
    """A transformer taken from a pipeline folder learned prompts encoded as that pipeline encodes them: a run
    that encodes its captions otherwise (`text_clause_separator`) would teach it, or a LoRA on it, another input."""
    path = config.pretrained_transformer
    if not (path and hub_utils.is_pipeline_folder(path)):
        return
    saved = json.loads((Path(path) / hub_utils.MODEL_INDEX).read_text(encoding="utf-8")).get("text_clause_separator")
    if saved != config.text_clause_separator:
        raise ValueError(
            f"pretrained_transformer {path} encodes prompts with text_clause_separator={saved!r}, this run with "
            f"{config.text_clause_separator!r}: set text_clause_separator to the pipeline's."
        )


def build_transformer(config: DiTTrainingConfig, latent_channels: int, text_dim: int) -> NanoI2VTransformer3DModel:
    """The transformer to train: from the preset, or the pretrained one (grown by the overrides); with
    `lora_rank`, frozen, with a fresh LoRA adapter as its only trainable parameters."""
    if config.pretrained_transformer:
        check_text_encoding_matches(config)
        pretrained = load_pretrained_transformer(config.pretrained_transformer)
        transformer = grow_transformer(pretrained, config.transformer_overrides or {})
        if config.lora_rank is not None:
            if transformer is not pretrained:
                raise ValueError("With lora_rank only the adapter trains, so transformer_overrides may not add "
                                 f"modules to pretrained_transformer; got {config.transformer_overrides}.")  # fmt: skip
            add_lora_adapter(transformer, config)
        return transformer
    overrides = dict(config.transformer_overrides or {})
    overrides.update(in_channels=latent_channels + num_condition_channels(latent_channels),
                     out_channels=latent_channels, text_dim=text_dim)  # fmt: skip
    return NanoI2VTransformer3DModel.from_preset(config.transformer_preset, **overrides)


def lora_config(config: DiTTrainingConfig):
    try:
        from peft import LoraConfig
    except ImportError as error:  # an optional dependency
        raise ImportError('lora_rank needs peft: pip install "nanoi2v_diffusers[lora]" (or peft).') from error

    # Gaussian A and zero B, as diffusers' LoRA scripts: the adapted model starts as the pretrained one.
    return LoraConfig(r=config.lora_rank, lora_alpha=config.resolved_lora_alpha, init_lora_weights="gaussian",
                      target_modules=list(config.lora_target_modules))  # fmt: skip


def add_lora_adapter(transformer: NanoI2VTransformer3DModel, config: DiTTrainingConfig) -> None:
    """Freeze `transformer` and add the config's LoRA adapter (trainable, float32)."""
    transformer.requires_grad_(False)
    transformer.add_adapter(lora_config(config))


def latent_shape(vae: AutoencoderKLNanoI2V, config: DiTTrainingConfig) -> Tuple[int, int, int, int]:
    """(C, T, h, w) of one clip's latents at the config's resolution and frame count."""
    frames = (config.num_frames - 1) // vae.temporal_compression_ratio + 1
    size = config.resolution // vae.spatial_compression_ratio
    return (vae.config.latent_channels, frames, size, size)


def build_noise_scheduler(config: DiTTrainingConfig) -> NanoI2VFlowMatchScheduler:
    return NanoI2VFlowMatchScheduler(shift=config.scheduler_shift)


# --------------------------------------------------------------------------------------------------
# The flow-matching objective
# --------------------------------------------------------------------------------------------------


def step_generator(seed: int, rank: int, micro_step: int) -> torch.Generator:
    """The CPU generator of one micro-step of one process: all of its random draws depend on these three only."""
    state = np.random.SeedSequence([seed, rank, micro_step]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


def _uniform(batch_size: int, generator: torch.Generator, device) -> torch.Tensor:
    return torch.rand(batch_size, generator=generator).to(device)


def drop_text(embeds: torch.Tensor, mask: torch.Tensor, keep: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """No text for the rows where `keep` (B,) is False: zero states and an all-zero mask, as the pipeline's
    unconditional branch (`null_text_embeds`) sees it."""
    keep = keep.to(embeds.device)
    return embeds * keep.to(embeds.dtype)[:, None, None], mask * keep.to(mask.dtype)[:, None]


def noisy_image_latents(image_latents: torch.Tensor, max_std: float, generator: torch.Generator) -> torch.Tensor:
    """Add Gaussian noise of a per-clip std drawn from U(0, max_std): the model then tolerates small
    differences between training and inference image latents."""
    batch_size = image_latents.shape[0]
    stds = _uniform(batch_size, generator, image_latents.device) * max_std
    noise = torch.randn(image_latents.shape, generator=generator).to(image_latents.device, image_latents.dtype)
    return image_latents + stds.view(-1, 1, 1, 1, 1) * noise


def flow_matching_inputs(
    encoded: Dict[str, torch.Tensor],
    vae: AutoencoderKLNanoI2V,
    noise_scheduler: NanoI2VFlowMatchScheduler,
    config: DiTTrainingConfig,
    generator: torch.Generator,
) -> Tuple[Dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
    """-> (transformer keyword arguments, velocity target, per-clip loss weights) for a batch of encoded clips.

    The draws happen in a fixed order from `generator`: posterior sample, image noise, image dropout,
    text dropout, sigmas, noise.
    """
    mean, std = encoded["posterior_mean"].float(), encoded["posterior_std"].float()  # (B, C, T, h, w)
    latents = vae.normalize_latents(sample_latents(mean, std, generator))
    batch_size, device = latents.shape[0], latents.device
    # The posterior mean of latent frame 0 is the image latent: the VAE is causal (DESIGN.md section 5).
    image_latents = noisy_image_latents(vae.normalize_latents(mean[:, :, :1]), config.condition_noise_std, generator)
    keep_image = _uniform(batch_size, generator, device) >= config.image_dropout
    condition = drop_image_condition(build_image_condition(image_latents, latents.shape[2]), keep_image)
    keep_text = _uniform(batch_size, generator, device) >= config.text_dropout
    embeds, mask = drop_text(encoded["prompt_embeds"].float(), encoded["prompt_attention_mask"], keep_text)

    density, loss_weighting = split_weighting_scheme(config.weighting_scheme)
    sigmas = noise_scheduler.sample_training_sigmas(
        batch_size, density=density, logit_mean=config.logit_mean, logit_std=config.logit_std,
        mode_scale=config.mode_scale, generator=generator,
    ).to(device)  # fmt: skip
    timesteps = sigmas * noise_scheduler.config.num_train_timesteps
    noise = torch.randn(latents.shape, generator=generator).to(device)
    model_kwargs = {
        "hidden_states": noise_scheduler.add_noise(latents, noise, timesteps),
        "timestep": timesteps,
        "encoder_hidden_states": embeds,
        "encoder_attention_mask": mask,
        "condition": condition,
    }
    target = noise_scheduler.velocity_target(latents, noise)
    return model_kwargs, target, noise_scheduler.training_loss_weighting(sigmas, loss_weighting)


def split_weighting_scheme(weighting_scheme: str) -> Tuple[str, str]:
    """diffusers' one `weighting_scheme` flag (SD3 scripts) -> (timestep density, loss weighting):
    "logit_normal" and "mode" shape the timestep density (with unit loss weights), "sigma_sqrt" and
    "cosmap" weight the loss (with uniform timesteps), "none" does neither."""
    density = weighting_scheme if weighting_scheme in ("logit_normal", "mode") else "uniform"
    loss_weighting = weighting_scheme if weighting_scheme in ("sigma_sqrt", "cosmap") else "none"
    return density, loss_weighting


def weighted_mse(prediction: torch.Tensor, target: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Mean over clips of `weight * mean squared error of the clip`, in float32."""
    per_clip = (prediction.float() - target.float()).square().flatten(1).mean(1)
    return (weights.float() * per_clip).mean()


# --------------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------------


@dataclass
class ValidationSet:
    """Fixed first frames and captions (with their reference clips), encoded once at the start."""

    videos: torch.Tensor  # (N, C, T, H, W) in [-1, 1]
    captions: List[str]
    prompt_embeds: torch.Tensor  # (N, L, D)
    prompt_attention_mask: torch.Tensor  # (N, L)

    @property
    def images(self) -> List[Image.Image]:
        return [Image.fromarray(tensor_to_frames(video[:, :1])[0]) for video in self.videos]


@torch.no_grad()
def build_validation_set(config: DiTTrainingConfig, text_encoder, tokenizer) -> ValidationSet:
    dataset = build_dataset(config, split="validation")
    items = [dataset[index] for index in range(min(config.num_validation_samples, len(dataset)))]
    captions = [item["caption"] for item in items]
    embeds, mask = encode_text(text_encoder, tokenizer, captions, config.max_sequence_length,
                               device=text_encoder.device, clause_separator=config.text_clause_separator)  # fmt: skip
    videos = torch.stack([item["pixel_values"] for item in items])
    return ValidationSet(videos, captions, embeds.float().cpu(), mask.cpu())


def write_validation_videos(folder: Path, step: int, validation: ValidationSet, generated: np.ndarray,
                            formats: Tuple[str, ...], fps: int) -> List[Path]:  # fmt: skip
    """Reference clip | generated clip, one file per sample and format; returns the paths."""
    paths = []
    for index, video in enumerate(generated):  # (F, H, W, 3) in [0, 1]
        generated_video = torch.from_numpy(video).permute(3, 0, 1, 2) * 2 - 1  # (C, F, H, W) in [-1, 1]
        for fmt in formats:
            path = folder / f"step-{step:06d}-{index}.{fmt}"
            paths.append(write_side_by_side(path, [validation.videos[index], generated_video], fps=fps))
    return paths


# --------------------------------------------------------------------------------------------------
# The trainer
# --------------------------------------------------------------------------------------------------


class DiTTrainer:
    """The training loop; one instance per run."""

    def __init__(self, config: DiTTrainingConfig) -> None:
        self.config = config
        self.accelerator = accelerator = build_accelerator(config)
        self.output_dir = Path(config.output_dir)
        self.weight_dtype = WEIGHT_DTYPES[config.mixed_precision]
        set_seed(config.seed)  # the same initial weights on every process
        if accelerator.is_main_process:
            save_config(config, self.output_dir)

        self.vae = load_vae(config)
        self.vae_encoder_fingerprint = vae_encoder_fingerprint(self.vae)
        _move(self.vae, accelerator.device, self.weight_dtype)
        self.text_encoder, self.tokenizer = load_text_encoder(config.text_encoder)
        _move(self.text_encoder, accelerator.device, self.weight_dtype)
        self.noise_scheduler = build_noise_scheduler(config)
        self._build_optimization()
        self.global_step = resume_if_requested(self.accelerator, self.config)
        self.train_dataset = None  # the clips' dataset when they are decoded on the fly
        self.batches = self._training_batches()
        self.nonfinite_streak = 0
        self.seen_clips: List[Tuple[str, str]] = []  # (clip hash, caption), for debug_rank_facts
        self.last_validation_videos: List[Path] = []
        self.validation = None
        if accelerator.is_main_process:
            self.validation = build_validation_set(config, self.text_encoder, self.tokenizer)
            accelerator.init_trackers("train_dit", config=_tracker_config(config))

    def _build_optimization(self) -> None:
        config, accelerator = self.config, self.accelerator
        transformer = build_transformer(config, self.vae.config.latent_channels, self.text_encoder.config.hidden_size)
        if config.gradient_checkpointing:
            transformer.enable_gradient_checkpointing()
        optimizer = torch.optim.AdamW(
            [p for p in transformer.parameters() if p.requires_grad], lr=config.learning_rate,
            betas=(config.adam_beta1, config.adam_beta2), weight_decay=config.adam_weight_decay,
        )  # fmt: skip
        # The prepared scheduler steps once per process per optimizer step, hence the factors.
        lr_scheduler = get_scheduler(
            config.lr_scheduler, optimizer, num_warmup_steps=config.lr_warmup_steps * accelerator.num_processes,
            num_training_steps=config.max_train_steps * accelerator.num_processes,
        )  # fmt: skip
        self.model, self.optimizer, self.lr_scheduler = accelerator.prepare(transformer, optimizer, lr_scheduler)
        # All parameters, or the LoRA adapter's alone; after `prepare`, which may replace them (FSDP).
        self.trainable_parameters = [p for p in self.model.parameters() if p.requires_grad]
        self.ema = None
        if config.use_ema:
            self.ema = EMAModel(self.trainable_parameters, decay=config.ema_decay, use_ema_warmup=True,
                                power=config.ema_power, foreach=True)  # fmt: skip
            accelerator.register_for_checkpointing(self.ema)

    # ---------------------------------------------------------------------------------------- data

    def _training_batches(self) -> Iterator[Dict[str, Any]]:
        """Encoded batches of this process's part of the data, from step `global_step` on, forever."""
        config, accelerator = self.config, self.accelerator
        rank, world_size = accelerator.process_index, accelerator.num_processes
        if config.cache_dir:
            table, info = load_latent_cache(config.cache_dir, rank, world_size)
            info.check_matches(latent_shape=latent_shape(self.vae, config), text_shape=self._text_shape(),
                               vae_encoder_fingerprint=self.vae_encoder_fingerprint,
                               text_encoder_fingerprint=model_fingerprint(self.text_encoder),
                               text_clause_separator=config.text_clause_separator)  # fmt: skip
            loader = build_resumable_dataloader(table, config, self.global_step, config.seed, collate_cache_rows)
            return iter(loader)
        dataset = self.train_dataset = build_dataset(config, split="train")
        if config.max_train_samples is not None:
            dataset = Subset(dataset, range(min(config.max_train_samples, len(dataset))))
        loader = build_resumable_dataloader(shard_dataset(dataset, rank, world_size), config, self.global_step,
                                            config.seed, collate_videos)  # fmt: skip
        return (self._encode(batch) for batch in loader)

    def _text_shape(self) -> Tuple[int, int]:
        return (self.config.max_sequence_length, self.text_encoder.config.hidden_size)

    def _encode(self, batch: Dict[str, Any]) -> Dict[str, Any]:
        encoded = encode_clips(self.vae, self.text_encoder, self.tokenizer, batch["pixel_values"], batch["captions"],
                               self.config.max_sequence_length, self.config.text_clause_separator)  # fmt: skip
        return {**encoded, "caption": batch["captions"]}

    # ---------------------------------------------------------------------------------------- steps

    def _micro_step(self, batch: Dict[str, Any], micro_step: int) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Forward + backward of one micro-batch; at the last one of a step, also the gradient clipping.
        Returns the loss and, at the last micro-batch, the gradient norm before clipping."""
        accelerator, device = self.accelerator, self.accelerator.device
        encoded = {name: value.to(device) for name, value in batch.items() if isinstance(value, torch.Tensor)}
        if self.config.debug_rank_facts:
            self._remember_clips(encoded["posterior_mean"], batch["caption"])
        generator = step_generator(self.config.seed, accelerator.process_index, micro_step)
        model_kwargs, target, weights = flow_matching_inputs(encoded, self.vae, self.noise_scheduler, self.config,
                                                             generator)  # fmt: skip
        grad_norm = None
        with accelerator.accumulate(self.model):
            prediction = self.model(**model_kwargs, return_dict=False)[0]
            loss = weighted_mse(prediction, target, weights)
            accelerator.backward(loss)
            if accelerator.sync_gradients:
                grad_norm = accelerator.clip_grad_norm_(self.trainable_parameters, self.config.max_grad_norm)
                grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm  # FSDP2
        return loss.detach(), grad_norm

    def _apply_update(self, grad_norm: torch.Tensor) -> bool:
        """Step the optimizer unless the gradients are not finite; returns whether the weights changed."""
        finite = bool(torch.isfinite(grad_norm))
        # Under fp16 the grad scaler skips non-finite steps itself, and must see them to lower its scale.
        if finite or self.accelerator.scaler is not None:
            self.optimizer.step()
        self.lr_scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        updated = finite and not self.accelerator.optimizer_step_was_skipped
        if updated and self.ema is not None:
            self.ema.step(self.trainable_parameters)
        return updated

    def _train_step(self) -> Dict[str, Any]:
        """One optimizer step (all its micro-batches); returns the step's log record."""
        accumulation = self.config.gradient_accumulation_steps
        losses, grad_norm = [], None
        for index in range(accumulation):
            loss, grad_norm = self._micro_step(next(self.batches), self.global_step * accumulation + index)
            losses.append(loss)
        updated = self._apply_update(grad_norm)
        loss = self.accelerator.reduce(torch.stack(losses).mean(), reduction="mean").item()
        self.global_step += 1
        record = {"loss": loss if math.isfinite(loss) else None, "lr": self.lr_scheduler.get_last_lr()[0]}
        if updated:
            self.nonfinite_streak = 0
            record["grad_norm"] = float(grad_norm)
        else:
            self.nonfinite_streak += 1
            record["skipped"] = True
            if self.accelerator.is_main_process:
                logger.warning("Step %d: non-finite loss or gradients; update skipped (%d in a row).",
                               self.global_step, self.nonfinite_streak)  # fmt: skip
        return record

    def _log(self, record: Dict[str, Any]) -> None:
        if not self.accelerator.is_main_process:
            return
        append_jsonl(self.output_dir / TRAIN_LOG, {"step": self.global_step, **record})
        if self.global_step % self.config.logging_steps == 0:
            scalars = {key: value for key, value in record.items() if isinstance(value, (int, float))}
            self.accelerator.log(scalars, step=self.global_step)

    def train(self) -> Dict[str, Any]:
        config = self.config
        progress = tqdm(total=config.max_train_steps, initial=self.global_step, desc="train_dit",
                        disable=not self.accelerator.is_local_main_process)  # fmt: skip
        self.model.train()
        # Steps/s counts the optimizer steps alone (data included), not checkpoints or validation.
        first_step, step_seconds, record = self.global_step, 0.0, {}
        recent_losses = collections.deque(maxlen=FINAL_LOSS_WINDOW)
        while self.global_step < config.max_train_steps:
            start = time.perf_counter()
            record = self._train_step()
            step_seconds += time.perf_counter() - start
            if record["loss"] is not None:
                recent_losses.append(record["loss"])
            self._log(record)
            progress.update(1)
            progress.set_postfix(loss=_format_loss(record["loss"]),
                                 steps_per_s=f"{(self.global_step - first_step) / step_seconds:.2f}")  # fmt: skip
            self._after_step()
        progress.close()
        steps_per_second = (self.global_step - first_step) / max(step_seconds, 1e-9)
        mean_loss = float(np.mean(recent_losses)) if recent_losses else None
        summary = {"steps": self.global_step, "final_loss": record.get("loss"),
                   MEAN_LOSS_KEY: mean_loss, "train_seconds": round(step_seconds, 1),
                   "steps_per_second": round(steps_per_second, 3), **self._bad_file_report()}  # fmt: skip
        return self._finish(summary)

    def _bad_file_report(self) -> Dict[str, Any]:
        """The unreadable videos this process skipped (video folders only), for the summary."""
        bad_files = getattr(self.train_dataset, "bad_files", None)
        if bad_files is None:
            return {}
        if bad_files:
            logger.warning("Skipped %d unreadable video(s): %s", len(bad_files), ", ".join(bad_files))
        return {"num_bad_video_files": len(bad_files)}

    def _after_step(self) -> None:
        """Stop on a streak of non-finite steps; checkpoint and validate when due."""
        config, step = self.config, self.global_step
        stop_on_nonfinite_streak(self.accelerator, config, step, self.nonfinite_streak)
        if step % config.checkpointing_steps == 0:
            save_checkpoint(self.accelerator, self.output_dir, step, config.checkpoints_total_limit)
        if step % config.validation_steps == 0 or step == config.max_train_steps:
            self.validate()

    # ---------------------------------------------------------------------------------------- EMA, validation, saving

    def export_transformer(self) -> Optional[NanoI2VTransformer3DModel]:
        """A standalone copy of the transformer with the EMA weights, on the main process (None elsewhere).

        Call on every process: under FSDP, gathering the full weights is a collective.
        """
        parameters = self.trainable_parameters
        if self.ema is not None:
            self.ema.store(parameters)
            self.ema.copy_to(parameters)
        state_dict = self.accelerator.get_state_dict(self.model)
        transformer = None
        if self.accelerator.is_main_process:  # load_state_dict copies, before the training weights come back
            transformer = NanoI2VTransformer3DModel.from_config(self.accelerator.unwrap_model(self.model).config)
            if self.config.lora_rank is not None:
                add_lora_adapter(transformer, self.config)  # the same module names as the trained model
            transformer.load_state_dict(state_dict)
            transformer.requires_grad_(False).eval()
        if self.ema is not None:
            self.ema.restore(parameters)
        return transformer

    @torch.no_grad()
    def validate(self) -> List[Path]:
        """Generate the validation videos with the EMA weights; write them and log a contact sheet."""
        transformer = self.export_transformer()
        if not self.accelerator.is_main_process:
            return []
        config, validation, device = self.config, self.validation, self.accelerator.device
        # No text encoder: the validation captions were encoded once, at the start.
        pipeline = NanoI2VPipeline(vae=self.vae, transformer=_move(transformer, device, self.weight_dtype),
                                   scheduler=self.noise_scheduler)  # fmt: skip
        pipeline.set_progress_bar_config(disable=True)
        generated = pipeline(
            image=validation.images, prompt_embeds=validation.prompt_embeds,
            prompt_attention_mask=validation.prompt_attention_mask, num_frames=config.eval_num_frames,
            num_inference_steps=config.validation_num_inference_steps, guidance_scale=config.validation_guidance_scale,
            generator=torch.Generator().manual_seed(config.seed), output_type="np",
        ).frames  # fmt: skip
        folder = self.output_dir / VALIDATION_DIR
        paths = write_validation_videos(folder, self.global_step, validation, generated, config.validation_formats,
                                        config.validation_fps)  # fmt: skip
        frames = (generated * 255).round().astype(np.uint8)  # (N, F, H, W, 3)
        sheet = make_contact_sheet(list(frames), validation.captions, frame_step=CONTACT_SHEET_FRAME_STEP)
        sheet.save(folder / f"step-{self.global_step:06d}-sheet.png")
        self._log_image("validation", np.asarray(sheet))
        self.last_validation_videos = paths
        return paths

    def _log_image(self, tag: str, image: np.ndarray) -> None:
        if self.config.report_to not in ("tensorboard", "all"):
            return
        writer = self.accelerator.get_tracker("tensorboard", unwrap=True)
        writer.add_image(tag, image, self.global_step, dataformats="HWC")

    def _finish(self, summary: Dict[str, Any]) -> Dict[str, Any]:
        accelerator = self.accelerator
        transformer = self.export_transformer()
        if accelerator.is_main_process:
            self._save_pipeline(transformer, summary)
            append_jsonl(self.output_dir / TRAIN_LOG, {"step": self.global_step, "summary": summary})
            saved = "the pipeline" if self.config.lora_rank is None else "the LoRA weights"
            accelerator.print(f"Saved {saved} to {self.output_dir}: {summary}")
        if self.config.debug_rank_facts:
            self._write_rank_facts()
        accelerator.wait_for_everyone()
        return summary

    def _save_pipeline(self, transformer: NanoI2VTransformer3DModel, summary: Dict[str, Any]) -> None:
        """Save the pipeline (or, with LoRA, the adapter alone) and its model card; push when asked."""
        config = self.config
        custom_text_encoder = config.text_encoder is not None
        if config.lora_rank is None:
            # The frozen models as loaded (float32), not the copies cast to the mixed-precision dtype.
            vae = load_vae(config) if config.pretrained_vae else self.vae.float()
            text_encoder, tokenizer = load_text_encoder(config.text_encoder) if custom_text_encoder else (None, None)
            pipeline = NanoI2VPipeline(vae=vae, transformer=transformer.float(), scheduler=self.noise_scheduler,
                                       text_encoder=text_encoder, tokenizer=tokenizer,
                                       text_clause_separator=config.text_clause_separator)  # fmt: skip
            pipeline.save_pretrained(self.output_dir)
        else:
            save_lora_weights(transformer, self.output_dir)
        hub_utils.write_model_card(
            self.output_dir, repo_id=config.hub_model_id, title=f"NanoI2V ({Path(config.output_dir).name})",
            description=_card_description(config, summary), datasets=_card_datasets(config),
            training_config=config.to_dict(), metrics=summary,
            sample_videos=[path for path in self.last_validation_videos if path.suffix == ".gif"],
            text_encoder_hint=None if custom_text_encoder else "text_encoder=text_encoder, tokenizer=tokenizer",
            lora_base_model=config.pretrained_transformer if config.lora_rank is not None else None,
        )  # fmt: skip
        if config.push_to_hub:
            publish(self.output_dir, config.hub_model_id, private=config.hub_private)

    # ---------------------------------------------------------------------------------------- debugging

    def _remember_clips(self, posterior_mean: torch.Tensor, captions: List[str]) -> None:
        for latents, caption in zip(posterior_mean, captions):
            self.seen_clips.append((clip_hash(latents), caption))

    def _write_rank_facts(self) -> None:
        accelerator = self.accelerator
        facts = {
            "rank": accelerator.process_index,
            "world_size": accelerator.num_processes,
            "distributed_type": str(accelerator.distributed_type),
            "steps": self.global_step,
            "clip_hashes": [digest for digest, _ in self.seen_clips],
            "captions": [caption for _, caption in self.seen_clips],
            "parameter_fingerprint": model_fingerprint(accelerator.unwrap_model(self.model)),
        }
        path = self.output_dir / RANK_FACTS_DIR / f"rank-{accelerator.process_index}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(facts, indent=1), encoding="utf-8")


# --------------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------------


def save_lora_weights(transformer: NanoI2VTransformer3DModel, folder: Path) -> None:
    """Write the adapter as `NanoI2VPipeline.load_lora_weights` reads it, with its PEFT config (rank, alpha,
    targets) as metadata, in float32."""
    from peft.utils import get_peft_model_state_dict

    layers = {name: value.float() for name, value in get_peft_model_state_dict(transformer).items()}
    NanoI2VPipeline.save_lora_weights(folder, transformer_lora_layers=layers, weight_name=hub_utils.LORA_WEIGHT_NAME,
                                      transformer_lora_adapter_metadata=transformer.peft_config["default"].to_dict())


def _move(model: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """`model.to(device)`, then to `dtype` only when it differs (diffusers warns on every dtype cast)."""
    model.to(device)
    return model if next(model.parameters()).dtype == dtype else model.to(dtype=dtype)


def clip_hash(tensor: torch.Tensor) -> str:
    """A short hash of a clip's latents: tells apart the clips each process saw."""
    return hashlib.sha256(tensor.detach().float().cpu().contiguous().numpy().tobytes()).hexdigest()[:CLIP_HASH_DIGITS]


def _format_loss(loss: Optional[float]) -> str:
    return "nan" if loss is None else f"{loss:.4f}"


def _tracker_config(config: DiTTrainingConfig) -> Dict[str, Any]:
    """Tracker hyper-parameters: only scalars and strings (TensorBoard's hparams refuse None and mappings)."""
    scalar = (int, float, str, bool)
    return {key: value if isinstance(value, scalar) else str(value) for key, value in config.to_dict().items()}


def _card_datasets(config: DiTTrainingConfig) -> List[str]:
    return [] if config.dataset == "shapes" else [Path(config.train_data_dir).name]


def _card_description(config: DiTTrainingConfig, summary: Dict[str, Any]) -> str:
    data = f"the videos in `{config.train_data_dir}`"
    if config.dataset == "shapes":
        data = "the built-in synthetic shapes clips"
    text = (f"Trained with `training/train_dit.py` on {data} ({config.resolution} x {config.resolution}, "
            f"{config.num_frames} frames) for {summary['steps']} steps; training loss "
            f"{_format_loss(summary.get(MEAN_LOSS_KEY))} averaged over up to the last "
            f"{FINAL_LOSS_WINDOW} steps, {_format_loss(summary.get('final_loss'))} at the last one.")  # fmt: skip
    weights = "transformer weights"
    if config.lora_rank is not None:
        text += (f" A LoRA adapter (rank {config.lora_rank}, alpha {config.resolved_lora_alpha:g}, on "
                 f"{', '.join(config.lora_target_modules)}) for the pipeline `{config.pretrained_transformer}`.")
        weights = "adapter weights"
    if config.use_ema:
        text += f" The {weights} are the EMA weights."
    if config.text_encoder is None:
        text += (" The text encoder is the built-in all-MiniLM-L6-v2, not stored here: "
                 "`from nanoi2v_diffusers.text_encoders import load_minilm; text_encoder, tokenizer = load_minilm()`.")
    return text


def publish(folder: Path, repo_id: str, private: bool = False) -> str:
    """Push the pipeline (or LoRA) files of `folder`, not the checkpoints, logs or validation videos, to the Hub."""
    names = ["README.md", hub_utils.SAMPLES_DIR]
    if (folder / hub_utils.LORA_WEIGHT_NAME).is_file():
        names.append(hub_utils.LORA_WEIGHT_NAME)
    else:
        index = json.loads((folder / hub_utils.MODEL_INDEX).read_text())
        components = [name for name, spec in index.items() if isinstance(spec, list) and spec[0] is not None]
        names += [hub_utils.MODEL_INDEX, *components]
    with tempfile.TemporaryDirectory() as staging:
        for name in names:
            source, target = folder / name, Path(staging) / name
            if source.is_dir():
                shutil.copytree(source, target)
            elif source.is_file():
                shutil.copy2(source, target)
        return hub_utils.push_to_hub(staging, repo_id, private=private)


def main(argv=None) -> Dict[str, Any]:
    trainer = DiTTrainer(parse_config(DiTTrainingConfig, argv))
    try:
        return trainer.train()
    finally:
        # Dropping the (DDP) model before the process group goes avoids a sporadic gloo abort at exit.
        accelerator = trainer.accelerator
        del trainer
        accelerator.free_memory()
        gc.collect()
        accelerator.end_training()


if __name__ == "__main__":
    main()
