"""Train `NanoI2VTransformer3DModel` by flow matching (or a DDPM objective), on one CPU, one GPU or many (DDP, FSDP).

    python training/train_dit.py --config training/configs/tiny.yaml              # CPU smoke run, seconds
    accelerate launch --config_file training/accelerate_configs/multi_gpu.yaml \\
        training/train_dit.py --config training/configs/gpu_256.yaml --resume_from_checkpoint latest

A step encodes clips with the frozen VAE and text encoder, or reads them from the latent cache that
training/precompute_latents.py wrote when `cache_dir` is set; `diffusion_inputs` then builds the
model's inputs, target and loss weights for the run's `prediction_type` (docs/design.md, "Conditioning" and
"Objectives"; docs/training.md, "Objectives"). At the end the whole pipeline (with the EMA
weights) is saved to `output_dir` with a model card, and pushed with `--push_to_hub`. With `lora_rank`,
only a LoRA adapter on the pretrained pipeline's transformer trains, and the run saves the adapter
(`pytorch_lora_weights.safetensors`, for `NanoI2VPipeline.load_lora_weights`) instead. The loop itself
(accumulation, EMA, checkpoints, exact resume, logging, ...) is `training/trainer.py`'s.
"""

import inspect
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np
import torch
import yaml
from PIL import Image
from torch.utils.data import Dataset, Subset

from nanoi2v_diffusers import hub_utils
from nanoi2v_diffusers.conditioning import (
    build_condition,
    check_task_weights,
    num_condition_channels,
    sample_condition_masks,
)
from nanoi2v_diffusers.contact_sheet import make_contact_sheet
from nanoi2v_diffusers.data import collate_videos, tensor_to_frames, write_side_by_side
from nanoi2v_diffusers.data.latent_cache import (
    collate_cache_rows,
    encode_clips,
    load_latent_cache,
    model_fingerprint,
    sample_latents,
    vae_encoder_fingerprint,
)
from nanoi2v_diffusers.data.sampling import shard_dataset
from nanoi2v_diffusers.models import VAE_PRESETS, AutoencoderKLNanoI2V
from nanoi2v_diffusers.models.transformer_nanoi2v import TRANSFORMER_PRESETS, NanoI2VTransformer3DModel
from nanoi2v_diffusers.pipelines.pipeline_nanoi2v import NanoI2VPipeline
from nanoi2v_diffusers.safe_loading import check_local_path
from nanoi2v_diffusers.size_rules import check_multiple
from nanoi2v_diffusers.schedulers.objectives import PREDICTION_TYPES
from nanoi2v_diffusers.schedulers.scheduling_nanoi2v_flow_match import NanoI2VFlowMatchScheduler
from nanoi2v_diffusers.text_encoders import BUILTIN_TEXT_ENCODER, encode_text, load_text_encoder
from nanoi2v_diffusers.training.trainer import (
    MEAN_LOSS_KEY,
    TRAIN_LOG,  # noqa: F401 - part of this script's API
    NonFiniteLossError,  # noqa: F401 - raised by the loop; part of this script's API
    Trainer,
    TrainingConfig,
    build_dataset,
    validation_items,
)

WEIGHT_DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
WEIGHTING_SCHEMES = ("logit_normal", "mode", "sigma_sqrt", "cosmap", "none")
DDPM_LOSS_WEIGHTINGS = ("none", "min_snr")  # the DDPM objectives' (Hang et al. 2023, diffusers' --snr_gamma)
# diffusers' DDPMScheduler defaults but clip_sample: normalised latents are not bounded by [-1, 1].
DEFAULT_NOISE_SCHEDULER = {"clip_sample": False}
VALIDATION_FORMATS = ("gif", "mp4")
# diffusers' default LoRA targets: every attention projection (self- and cross-attention's query, key, value, output).
LORA_TARGET_MODULES = ("to_q", "to_k", "to_v", "to_out.0")
VALIDATION_DIR = "validation"


@dataclass
class DiTTrainingConfig(TrainingConfig):
    """Settings of training/train_dit.py (see training/trainer.py for the shared ones)."""

    output_dir: str = "outputs/dit"
    lr_scheduler: str = "cosine"
    lr_warmup_steps: int = 500
    use_ema: bool = True
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
    torch_compile: bool = False  # compile the transformer's blocks (one graph shared by all of them)
    # Objective. "flow" (flow matching) or a DDPM objective: "epsilon", "v_prediction", "sample" (docs/training.md).
    prediction_type: str = "flow"
    # DDPM objectives: the noise schedule, diffusers' DDPMScheduler(**noise_scheduler) (e.g. {beta_schedule:
    # squaredcos_cap_v2, rescale_betas_zero_snr: true}); None: DEFAULT_NOISE_SCHEDULER. Its prediction_type is
    # the field above.
    noise_scheduler: Optional[Dict[str, Any]] = None
    loss_weighting: str = "none"  # DDPM objectives: "none" or "min_snr" (min(SNR, snr_gamma), per prediction type)
    snr_gamma: float = 5.0
    # Flow matching only: the timestep density / loss weighting (scheduler_shift, logit_*, mode_scale too).
    weighting_scheme: str = "logit_normal"  # as diffusers' SD3 script: see split_weighting_scheme
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29
    image_dropout: float = 0.1  # the share of clips with no frame known (text-to-video)
    # The others draw what they are conditioned on with these weights (conditioning.CONDITIONING_TASKS: first_frame,
    # first_last, last_frame, keyframes, continuation); text dropout is independent of it.
    conditioning_tasks: Dict[str, float] = field(default_factory=lambda: {"first_frame": 1.0})
    text_dropout: float = 0.1
    condition_noise_std: float = 0.02  # per clip, the known latent frames get noise of std U(0, this)
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

    RESUME_FREE = (*TrainingConfig.RESUME_FREE, "torch_compile", "cache_num_shards", "validation_num_inference_steps",
                   "validation_guidance_scale", "validation_fps", "validation_formats", "push_to_hub", "hub_model_id",
                   "hub_private")  # fmt: skip

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.transformer_overrides, str):  # from the command line: a YAML/JSON mapping
            self.transformer_overrides = yaml.safe_load(self.transformer_overrides)
        if isinstance(self.conditioning_tasks, str):  # from the command line: a YAML/JSON mapping
            self.conditioning_tasks = yaml.safe_load(self.conditioning_tasks)
        if isinstance(self.noise_scheduler, str):  # from the command line: a YAML/JSON mapping
            self.noise_scheduler = yaml.safe_load(self.noise_scheduler)
        self._check_objective()
        self.conditioning_tasks = check_task_weights(self.conditioning_tasks)
        if self.transformer_overrides is not None and not isinstance(self.transformer_overrides, dict):
            raise ValueError(f"transformer_overrides must be a mapping; got {self.transformer_overrides!r}.")
        if self.pretrained_transformer is None and self.transformer_preset not in TRANSFORMER_PRESETS:
            raise ValueError(
                f"transformer_preset must be one of {sorted(TRANSFORMER_PRESETS)}; got {self.transformer_preset!r}."
            )
        if self.pretrained_vae is None and self.vae_preset not in VAE_PRESETS:
            raise ValueError(f"vae_preset must be one of {sorted(VAE_PRESETS)}; got {self.vae_preset!r}.")
        patch = (self.transformer_overrides or {}).get("patch_size", (1, 2, 2))[-1]
        check_multiple("resolution", self.resolution, 8 * patch, f"VAE factor 8 x patch size {patch}")
        for name in ("pretrained_vae", "pretrained_transformer", "text_encoder"):
            check_local_path(name, getattr(self, name), hub_ok=name != "text_encoder")
        for name in ("max_sequence_length", "validation_num_inference_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1; got {getattr(self, name)}.")
        if self.max_train_samples is not None and self.max_train_samples < 1:
            raise ValueError(f"max_train_samples must be >= 1 or None; got {self.max_train_samples}.")
        for name in ("image_dropout", "text_dropout"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1]; got {getattr(self, name)}.")
        if self.weighting_scheme not in WEIGHTING_SCHEMES:
            raise ValueError(f"weighting_scheme must be one of {WEIGHTING_SCHEMES}; got {self.weighting_scheme!r}.")
        if self.push_to_hub and not self.hub_model_id:
            raise ValueError("push_to_hub needs hub_model_id (e.g. 'your-name/nanoi2v-shapes-64').")
        unknown = [fmt for fmt in self.validation_formats if fmt not in VALIDATION_FORMATS]
        if unknown:
            raise ValueError(f"validation_formats may hold {VALIDATION_FORMATS}; got {unknown}.")
        if self.lora_rank is not None:
            self._check_lora()

    def _check_objective(self) -> None:
        """The objective's settings, one rule each (docs/training.md, "Objectives")."""
        if self.prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}; got {self.prediction_type!r}.")
        if self.loss_weighting not in DDPM_LOSS_WEIGHTINGS:
            raise ValueError(f"loss_weighting must be one of {DDPM_LOSS_WEIGHTINGS}; got {self.loss_weighting!r}.")
        if not self.snr_gamma > 0:
            raise ValueError(f"snr_gamma must be > 0; got {self.snr_gamma}.")
        if self.snr_gamma != 5.0 and self.loss_weighting != "min_snr":
            raise ValueError(f"snr_gamma {self.snr_gamma} applies with loss_weighting 'min_snr' only; got "
                             f"loss_weighting {self.loss_weighting!r}.")  # fmt: skip
        if self.prediction_type == "flow":
            for name, unset in (("noise_scheduler", None), ("loss_weighting", "none")):
                if getattr(self, name) != unset:
                    raise ValueError(f"{name} {getattr(self, name)!r} applies to the DDPM objectives only; "
                                     f"prediction_type is 'flow' (use weighting_scheme, scheduler_shift).")  # fmt: skip
            return
        if self.scheduler_shift != 1.0:
            raise ValueError(f"scheduler_shift {self.scheduler_shift} applies to flow matching only; prediction_type "
                             f"is {self.prediction_type!r} (set the noise schedule in noise_scheduler).")  # fmt: skip
        if self.noise_scheduler is not None and not isinstance(self.noise_scheduler, dict):
            raise ValueError(f"noise_scheduler must be a mapping of DDPMScheduler settings; "
                             f"got {self.noise_scheduler!r}.")  # fmt: skip
        build_ddpm_scheduler(self)  # names the bad key or value

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
            raise ValueError("lora_target_modules must name at least one module, e.g. ['to_q', 'to_k', 'to_v'].")
        fused = [name for name in self.lora_target_modules if name in ("to_qkv", "to_kv", "to_out")]
        if fused:
            raise ValueError(
                f"lora_target_modules names the fused projections of earlier versions {fused}; the attention now "
                "has diffusers' names: to_q, to_k, to_v, to_out.0."
            )
        if not (self.pretrained_transformer and hub_utils.is_pipeline_folder(self.pretrained_transformer)):
            raise ValueError(
                "lora_rank needs pretrained_transformer to be a pipeline folder (with model_index.json): the "
                f"pipeline the LoRA weights load into; got {self.pretrained_transformer!r}."
            )
        check_lora_objective_matches(self)


# --------------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------------


def load_vae(config: DiTTrainingConfig) -> AutoencoderKLNanoI2V:
    """The frozen VAE (float32, eval mode): the trained one, or a random preset (seeded) for smoke runs."""
    if config.pretrained_vae:
        vae = AutoencoderKLNanoI2V.from_pretrained(config.pretrained_vae, use_safetensors=True)
    else:
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
    _, unexpected = grown.load_state_dict(pretrained.state_dict(), strict=False)
    if unexpected:
        raise ValueError(
            f"transformer_overrides {changed} may only add modules to pretrained_transformer; "
            f"{len(unexpected)} of its weights would be dropped, e.g. {unexpected[0]!r}."
        )
    return grown


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


def check_lora_objective_matches(config: DiTTrainingConfig) -> None:
    """A LoRA adapter loads into its base pipeline, which samples the base's objective: the run must train that one.
    (A full fine-tune may change the objective: the saved pipeline records the new one.)"""
    if config.lora_rank is None:
        return
    index = json.loads((Path(config.pretrained_transformer) / hub_utils.MODEL_INDEX).read_text(encoding="utf-8"))
    saved = index.get("prediction_type") or "flow"
    if saved != config.prediction_type:
        raise ValueError(
            f"prediction_type {config.prediction_type!r}: a LoRA adapter must train its base pipeline's objective, "
            f"and {config.pretrained_transformer} predicts {saved!r}."
        )


def build_transformer(config: DiTTrainingConfig, latent_channels: int, text_dim: int) -> NanoI2VTransformer3DModel:
    """The transformer to train: from the preset, or the pretrained one (grown by the overrides); with
    `lora_rank`, frozen, with a fresh LoRA adapter as its only trainable parameters."""
    if not config.pretrained_transformer:
        overrides = dict(config.transformer_overrides or {})
        overrides.update(in_channels=latent_channels + num_condition_channels(latent_channels),
                         out_channels=latent_channels, text_dim=text_dim)  # fmt: skip
        return NanoI2VTransformer3DModel.from_preset(config.transformer_preset, **overrides)
    check_text_encoding_matches(config)
    path = config.pretrained_transformer
    subfolder = "transformer" if hub_utils.is_pipeline_folder(path) else None
    pretrained = NanoI2VTransformer3DModel.from_pretrained(path, subfolder=subfolder)
    transformer = grow_transformer(pretrained, config.transformer_overrides or {})
    if config.lora_rank is not None:
        if transformer is not pretrained:
            raise ValueError("With lora_rank only the adapter trains, so transformer_overrides may not add "
                             f"modules to pretrained_transformer; got {config.transformer_overrides}.")  # fmt: skip
        add_lora_adapter(transformer, config)
    return transformer


def add_lora_adapter(transformer: NanoI2VTransformer3DModel, config: DiTTrainingConfig) -> None:
    """Freeze `transformer` and add the config's LoRA adapter (trainable, float32)."""
    try:
        from peft import LoraConfig
    except ImportError as error:  # an optional dependency
        raise ImportError('lora_rank needs peft: pip install "nanoi2v_diffusers[lora]" (or peft).') from error

    transformer.requires_grad_(False)
    # Gaussian A and zero B, as diffusers' LoRA scripts: the adapted model starts as the pretrained one.
    transformer.add_adapter(
        LoraConfig(
            r=config.lora_rank,
            lora_alpha=config.resolved_lora_alpha,
            init_lora_weights="gaussian",
            target_modules=list(config.lora_target_modules),
        )
    )


def latent_shape(vae: AutoencoderKLNanoI2V, config: DiTTrainingConfig) -> Tuple[int, int, int, int]:
    """(C, T, h, w) of one clip's latents at the config's resolution and frame count."""
    frames = (config.num_frames - 1) // vae.temporal_compression_ratio + 1
    size = config.resolution // vae.spatial_compression_ratio
    return (vae.config.latent_channels, frames, size, size)


def build_noise_scheduler(config: DiTTrainingConfig):
    """The training scheduler: flow matching's, or the DDPM objectives' `DDPMScheduler` (`build_ddpm_scheduler`)."""
    if config.prediction_type == "flow":
        return NanoI2VFlowMatchScheduler(shift=config.scheduler_shift)
    return build_ddpm_scheduler(config)


def build_ddpm_scheduler(config: DiTTrainingConfig):
    """diffusers' `DDPMScheduler(**noise_scheduler, prediction_type=...)`; a bad setting raises one line naming it."""
    from diffusers import DDPMScheduler

    settings = {**DEFAULT_NOISE_SCHEDULER, **(config.noise_scheduler or {})}
    parameters = inspect.signature(DDPMScheduler.__init__).parameters
    for key, value in settings.items():
        if key == "prediction_type":
            raise ValueError(f"noise_scheduler sets prediction_type ({value!r}): set the prediction_type field "
                             "instead.")  # fmt: skip
        if key not in parameters or key == "self":
            raise ValueError(f"noise_scheduler key {key!r} is not a DDPMScheduler setting; known: "
                             f"{sorted(name for name in parameters if name != 'self')}.")  # fmt: skip
    schedules = ("linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid")
    if settings.get("beta_schedule", "linear") not in schedules:
        raise ValueError(f"noise_scheduler beta_schedule {settings['beta_schedule']!r}: must be one of {schedules}.")
    if settings.get("num_train_timesteps", 1000) < 2:
        raise ValueError(f"noise_scheduler num_train_timesteps must be >= 2; got {settings['num_train_timesteps']}.")
    try:
        return DDPMScheduler(**settings, prediction_type=config.prediction_type)
    except (NotImplementedError, ValueError, TypeError) as error:
        raise ValueError(f"noise_scheduler {settings}: DDPMScheduler refuses it ({error}).") from None


def sampling_scheduler(config: DiTTrainingConfig, noise_scheduler):
    """The scheduler the saved pipeline ships (and validation samples with): the flow scheduler, or for the DDPM
    objectives a deterministic `DDIMScheduler` on the training noise schedule, with its prediction type."""
    if config.prediction_type == "flow":
        return noise_scheduler
    from diffusers import DDIMScheduler

    return DDIMScheduler.from_config(noise_scheduler.config)


# --------------------------------------------------------------------------------------------------
# The flow-matching objective
# --------------------------------------------------------------------------------------------------


def _uniform(batch_size: int, generator: torch.Generator, device) -> torch.Tensor:
    return torch.rand(batch_size, generator=generator).to(device)


def drop_text(embeds: torch.Tensor, mask: torch.Tensor, keep: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """No text for the rows where `keep` (B,) is False: zero states and an all-zero mask, as the pipeline's
    unconditional branch (`null_text_embeds`) sees it."""
    keep = keep.to(embeds.device)
    return embeds * keep.to(embeds.dtype)[:, None, None], mask * keep.to(mask.dtype)[:, None]


def noisy_condition_latents(latents: torch.Tensor, max_std: float, generator: torch.Generator) -> torch.Tensor:
    """Add Gaussian noise of a per-clip std drawn from U(0, max_std): the model then tolerates small
    differences between training and inference condition latents."""
    stds = _uniform(latents.shape[0], generator, latents.device) * max_std
    noise = torch.randn(latents.shape, generator=generator).to(latents.device, latents.dtype)
    return latents + stds.view(-1, 1, 1, 1, 1) * noise


def needs_keyframes(config: DiTTrainingConfig) -> bool:
    """Whether the run's tasks condition on keyframes (one-frame latents beyond frame 0)."""
    return any(config.conditioning_tasks.get(task, 0) > 0 for task in ("first_last", "last_frame", "keyframes"))


def diffusion_inputs(
    encoded: Dict[str, torch.Tensor],
    vae: AutoencoderKLNanoI2V,
    noise_scheduler,
    config: DiTTrainingConfig,
    generator: torch.Generator,
) -> Tuple[Dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
    """-> (transformer keyword arguments, target, per-clip loss weights) for a batch of encoded clips.

    Draws a latent `x0` from the VAE posterior; draws each clip's conditioning task (`conditioning_tasks`,
    see `nanoi2v_diffusers.conditioning.sample_condition_masks`) and builds its condition from the posterior
    means of the known frames (the clip's own latents for the first frame and a continuation's opening, the
    one-frame `keyframe_mean` for other keyframes) with a little noise, dropped for a fraction `image_dropout`
    of the clips; drops the text for a fraction `text_dropout`, independently (so one model learns each
    conditioning task, text-to-video and unconditional generation, which classifier-free guidance needs);
    then builds the noisy latents and the target of `config.prediction_type` (`noised_inputs`). The draws
    happen in a fixed order from `generator`: posterior sample, tasks, condition noise, condition dropout, text
    dropout, sigmas (or timesteps), noise.
    """
    mean, std = encoded["posterior_mean"].float(), encoded["posterior_std"].float()  # (B, C, T, h, w)
    latents = vae.normalize_latents(sample_latents(mean, std, generator))
    batch_size, num_frames, device = latents.shape[0], latents.shape[2], latents.device
    masks = sample_condition_masks(config.conditioning_tasks, batch_size, num_frames, generator)  # (B, T) each
    prefix, keyframe = (mask.to(device) for mask in masks)
    known = mean
    if keyframe.any():
        if "keyframe_mean" not in encoded:
            raise ValueError("conditioning_tasks draws keyframes, but the batch has no keyframe_mean: encode the "
                             "clips with encode_clips(..., keyframes=True).")  # fmt: skip
        known = torch.where(keyframe[:, None, :, None, None], encoded["keyframe_mean"].float(), mean)
    known = noisy_condition_latents(vae.normalize_latents(known), config.condition_noise_std, generator)
    keep_image = _uniform(batch_size, generator, device) >= config.image_dropout
    condition = build_condition(known, (prefix | keyframe) & keep_image[:, None])
    keep_text = _uniform(batch_size, generator, device) >= config.text_dropout
    embeds, mask = drop_text(encoded["prompt_embeds"].float(), encoded["prompt_attention_mask"], keep_text)

    noisy, timesteps, target, weights = noised_inputs(latents, noise_scheduler, config, generator)
    model_kwargs = {"hidden_states": noisy, "timestep": timesteps, "encoder_hidden_states": embeds,
                    "encoder_attention_mask": mask, "condition": condition}  # fmt: skip
    return model_kwargs, target, weights


def noised_inputs(
    latents: torch.Tensor, noise_scheduler, config: DiTTrainingConfig, generator: torch.Generator
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (noisy latents, the model's timesteps, target, per-clip loss weights) for clean `latents` x0.

    "flow": sigmas of `weighting_scheme`'s density (logit-normal by default), `x_t = (1 - sigma) x0 + sigma noise`,
    the velocity `noise - x0`, timesteps `sigma * 1000`. The DDPM objectives: uniform integer timesteps in
    [0, num_train_timesteps), the `DDPMScheduler`'s `add_noise`, and the target of `prediction_type`: the noise
    ("epsilon"), `get_velocity` ("v_prediction") or x0 ("sample"); `loss_weighting` "min_snr" weighs by
    `min(SNR, snr_gamma)` over the SNR the target carries (SNR for epsilon, SNR + 1 for v, 1 for x0), as diffusers'
    text-to-image script. Draws the timesteps, then the noise, from `generator`.
    """
    batch_size, device = latents.shape[0], latents.device
    if config.prediction_type == "flow":
        density, loss_weighting = split_weighting_scheme(config.weighting_scheme)
        sigmas = noise_scheduler.sample_training_sigmas(
            batch_size, density=density, logit_mean=config.logit_mean, logit_std=config.logit_std,
            mode_scale=config.mode_scale, generator=generator,
        ).to(device)  # fmt: skip
        timesteps = sigmas * noise_scheduler.config.num_train_timesteps
        noise = torch.randn(latents.shape, generator=generator).to(device)
        noisy = noise_scheduler.add_noise(latents, noise, timesteps)
        target = noise_scheduler.velocity_target(latents, noise)
        return noisy, timesteps, target, noise_scheduler.training_loss_weighting(sigmas, loss_weighting)

    timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (batch_size,), generator=generator)
    timesteps = timesteps.to(device)
    noise = torch.randn(latents.shape, generator=generator).to(device)
    noisy = noise_scheduler.add_noise(latents, noise, timesteps)
    if config.prediction_type == "epsilon":
        target = noise
    elif config.prediction_type == "v_prediction":
        target = noise_scheduler.get_velocity(latents, noise, timesteps)
    else:  # "sample"
        target = latents
    return noisy, timesteps, target, ddpm_loss_weights(noise_scheduler, timesteps, config)


def ddpm_loss_weights(noise_scheduler, timesteps: torch.Tensor, config: DiTTrainingConfig) -> torch.Tensor:
    """Per-clip loss weights of the DDPM objectives: ones, or Min-SNR-gamma (diffusers' `compute_snr`)."""
    if config.loss_weighting == "none":
        return torch.ones(timesteps.shape, device=timesteps.device)
    from diffusers.training_utils import compute_snr

    snr = compute_snr(noise_scheduler, timesteps).float()
    weights = torch.clamp(snr, max=config.snr_gamma)  # min(SNR, gamma): x0 prediction's weight
    if config.prediction_type == "epsilon":
        # The epsilon loss is the x0 loss times 1 / SNR; at zero terminal SNR (rescale_betas_zero_snr) the limit is 1.
        weights = torch.where(snr > 0, weights / snr.clamp(min=torch.finfo(snr.dtype).tiny), torch.ones_like(snr))
    elif config.prediction_type == "v_prediction":
        weights = weights / (snr + 1)
    return weights


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
# The trainer
# --------------------------------------------------------------------------------------------------


class DiTTrainer(Trainer):
    config_class = DiTTrainingConfig
    name = "train_dit"
    run_files = (*Trainer.run_files, hub_utils.MODEL_INDEX, "transformer", "vae", "scheduler", "text_encoder",
                 "tokenizer", "README.md", hub_utils.LORA_WEIGHT_NAME, hub_utils.SAMPLES_DIR,
                 VALIDATION_DIR)  # fmt: skip

    def build_model(self) -> torch.nn.Module:
        config, device = self.config, self.accelerator.device
        self.weight_dtype = WEIGHT_DTYPES[config.mixed_precision]
        self.vae = load_vae(config)
        self.text_encoder, self.tokenizer = load_text_encoder(config.text_encoder)
        self.noise_scheduler = build_noise_scheduler(config)
        self.last_validation_videos: List[Path] = []
        items = validation_items(config) if self.accelerator.is_main_process else []
        self.validation_videos = [item["pixel_values"] for item in items]  # (C, T, H, W) in [-1, 1]
        self.validation_captions = [item["caption"] for item in items]
        if items:
            embeds, mask = encode_text(
                self.text_encoder,
                self.tokenizer,
                self.validation_captions,
                config.max_sequence_length,
                clause_separator=config.text_clause_separator,
            )
            self.validation_text = (embeds.float(), mask)
        for model in (self.vae, self.text_encoder):
            _move(model, device, self.weight_dtype)
        transformer = build_transformer(config, self.vae.config.latent_channels, self.text_encoder.config.hidden_size)
        if config.gradient_checkpointing:
            transformer.enable_gradient_checkpointing()
        if config.torch_compile:
            transformer.compile_repeated_blocks(fullgraph=True)
        return transformer

    def training_data(self) -> Tuple[Dataset, Callable]:
        config, accelerator = self.config, self.accelerator
        rank, world_size = accelerator.process_index, accelerator.num_processes
        if config.cache_dir:
            table, info = load_latent_cache(config.cache_dir, rank, world_size)
            info.check_matches(latent_shape=latent_shape(self.vae, config),
                               text_shape=(config.max_sequence_length, self.text_encoder.config.hidden_size),
                               vae_encoder_fingerprint=vae_encoder_fingerprint(self.vae),
                               text_encoder_fingerprint=model_fingerprint(self.text_encoder),
                               text_clause_separator=config.text_clause_separator)  # fmt: skip
            return table, collate_cache_rows
        dataset = build_dataset(config, split="train")
        if config.max_train_samples is not None:
            dataset = Subset(dataset, range(min(config.max_train_samples, len(dataset))))
        return shard_dataset(dataset, rank, world_size), collate_videos

    def prepare_batch(self, batch: Dict[str, Any]) -> Dict[str, Any]:
        if "pixel_values" not in batch:  # rows of the latent cache: encoded already
            return batch
        encoded = encode_clips(self.vae, self.text_encoder, self.tokenizer, batch["pixel_values"], batch["captions"],
                               self.config.max_sequence_length, self.config.text_clause_separator,
                               keyframes=needs_keyframes(self.config))  # fmt: skip
        return {**encoded, "caption": batch["captions"], "skipped_files": batch.get("skipped_files", [])}

    def compute_loss(self, batch: Dict[str, Any], generator: torch.Generator) -> Tuple[torch.Tensor, Dict[str, float]]:
        encoded = {name: value.to(self.accelerator.device) for name, value in batch.items() if torch.is_tensor(value)}
        model_kwargs, target, weights = diffusion_inputs(encoded, self.vae, self.noise_scheduler, self.config,
                                                         generator)  # fmt: skip
        prediction = self.model(**model_kwargs, return_dict=False)[0]
        return weighted_mse(prediction, target, weights), {}

    def export_transformer(self) -> Optional[NanoI2VTransformer3DModel]:
        """A standalone copy of the transformer as it is now (the EMA weights when swapped in), on the main process
        (None elsewhere). Call on every process: under FSDP, gathering the full weights is a collective."""
        state_dict = self.accelerator.get_state_dict(self.model)
        if not self.accelerator.is_main_process:
            return None
        transformer = NanoI2VTransformer3DModel.from_config(self.accelerator.unwrap_model(self.model).config)
        if self.config.lora_rank is not None:
            add_lora_adapter(transformer, self.config)  # the same module names as the trained model
        transformer.load_state_dict(state_dict)
        return transformer.requires_grad_(False).eval()

    @torch.no_grad()
    def validate(self) -> Dict[str, float]:
        """Generate the validation videos with the current (EMA) weights; write them and log a contact sheet."""
        transformer = self.export_transformer()
        if transformer is None:
            return {}
        config, step, device = self.config, self.state.step, self.accelerator.device
        pipeline = NanoI2VPipeline(vae=self.vae, transformer=_move(transformer, device, self.weight_dtype),
                                   scheduler=sampling_scheduler(config, self.noise_scheduler),
                                   prediction_type=config.prediction_type)  # fmt: skip
        pipeline.set_progress_bar_config(disable=True)
        images = [Image.fromarray(tensor_to_frames(video[:, :1])[0]) for video in self.validation_videos]
        generated = pipeline(
            image=images, prompt_embeds=self.validation_text[0], prompt_attention_mask=self.validation_text[1],
            num_frames=config.eval_num_frames, num_inference_steps=config.validation_num_inference_steps,
            guidance_scale=config.validation_guidance_scale, generator=torch.Generator().manual_seed(config.seed),
            output_type="np",
        ).frames  # (N, F, H, W, 3) in [0, 1]  # fmt: skip
        folder, paths = self.output_dir / VALIDATION_DIR, []
        for index, video in enumerate(generated):  # reference clip | generated clip
            generated_video = torch.from_numpy(video).permute(3, 0, 1, 2) * 2 - 1  # (C, F, H, W) in [-1, 1]
            for fmt in config.validation_formats:
                paths.append(
                    write_side_by_side(
                        folder / f"step-{step:06d}-{index}.{fmt}",
                        [self.validation_videos[index], generated_video],
                        fps=config.validation_fps,
                    )
                )
        sheet = make_contact_sheet(
            list((generated * 255).round().astype(np.uint8)), self.validation_captions, frame_step=2
        )
        sheet.save(folder / f"step-{step:06d}-sheet.png")
        if config.report_to in ("tensorboard", "all"):
            writer = self.accelerator.get_tracker("tensorboard", unwrap=True)
            writer.add_image("validation", np.asarray(sheet), step, dataformats="HWC")
        self.last_validation_videos = paths
        return {}

    def export_outputs(self, summary: Dict[str, Any]) -> None:
        self.final_transformer = self.export_transformer()  # a collective: on every process
        super().export_outputs(summary)

    def save_outputs(self, summary: Dict[str, Any]) -> None:
        """Save the pipeline (or, with LoRA, the adapter alone) and its model card; push when asked."""
        config, transformer = self.config, self.final_transformer
        custom_text_encoder = config.text_encoder is not None
        if config.lora_rank is None:
            # The frozen models as loaded (float32), not the copies cast to the mixed-precision dtype.
            vae = load_vae(config) if config.pretrained_vae else self.vae.float()
            text_encoder, tokenizer = load_text_encoder(config.text_encoder) if custom_text_encoder else (None, None)
            pipeline = NanoI2VPipeline(vae=vae, transformer=transformer.float(),
                                       scheduler=sampling_scheduler(config, self.noise_scheduler),
                                       prediction_type=config.prediction_type, text_encoder=text_encoder,
                                       tokenizer=tokenizer,
                                       text_clause_separator=config.text_clause_separator,
                                       default_text_encoder=None if custom_text_encoder else BUILTIN_TEXT_ENCODER,
                                       input_domain="shapes" if config.dataset == "shapes" else None)  # fmt: skip
            pipeline.save_pretrained(self.output_dir)
        else:
            from peft.utils import get_peft_model_state_dict

            # As NanoI2VPipeline.load_lora_weights reads it, with its PEFT config (rank, alpha, targets) as metadata.
            layers = {name: value.float() for name, value in get_peft_model_state_dict(transformer).items()}
            NanoI2VPipeline.save_lora_weights(
                self.output_dir,
                transformer_lora_layers=layers,
                weight_name=hub_utils.LORA_WEIGHT_NAME,
                transformer_lora_adapter_metadata=transformer.peft_config["default"].to_dict(),
            )
        hub_utils.write_model_card(
            self.output_dir, repo_id=config.hub_model_id, datasets=[] if config.dataset == "shapes" else
            [config.train_data_dir], description=f"{hub_utils.describe_folder(self.output_dir)} "
            f"{_card_description(config, summary)}".strip(), training_config=config.to_dict(), metrics=summary,
            sample_videos=[path for path in self.last_validation_videos if path.suffix == ".gif"],
            lora_base_model=config.pretrained_transformer if config.lora_rank is not None else None,
        )  # fmt: skip
        if config.push_to_hub:
            hub_utils.publish_folder(self.output_dir, config.hub_model_id, private=config.hub_private)


# --------------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------------


def _move(model: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """`model.to(device)`, then to `dtype` only when it differs (diffusers warns on every dtype cast)."""
    model.to(device)
    return model if next(model.parameters()).dtype == dtype else model.to(dtype=dtype)


def _card_description(config: DiTTrainingConfig, summary: Dict[str, Any]) -> str:
    """What the run trained, on what, for how long, in one paragraph of the model card."""
    data = "the built-in synthetic shapes clips" if config.dataset == "shapes" else "a folder of videos"
    loss = summary.get(MEAN_LOSS_KEY)
    text = (f"Trained with `training/train_dit.py` on {data} ({config.resolution} x {config.resolution}, "
            f"{config.num_frames} frames) for {summary['steps']} steps; training loss "
            f"{'nan' if loss is None else f'{loss:.4f}'} averaged over up to the last 100 steps.")  # fmt: skip
    if config.prediction_type != "flow":
        text += (f" Objective: {config.prediction_type} on a DDPM noise schedule (sample with diffusers' DDIM, "
                 "DPM-Solver++, UniPC, ...).")
    if config.lora_rank is not None:
        text += (f" A LoRA adapter (rank {config.lora_rank}, alpha {config.resolved_lora_alpha:g}, on "
                 f"{', '.join(config.lora_target_modules)}).")
    if config.use_ema:
        text += f" The {'adapter' if config.lora_rank is not None else 'transformer'} weights are the EMA weights."
    return text


main = DiTTrainer.main

if __name__ == "__main__":
    main()
