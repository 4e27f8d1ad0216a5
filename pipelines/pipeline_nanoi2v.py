"""NanoI2VPipeline: image + text -> video with a causal 3D VAE, a DiT and flow matching.

The image is encoded by the VAE as a one-frame video; its latent becomes latent frame 0 of a
conditioning video that the transformer sees beside the noisy latents (docs/design.md, "Conditioning";
`nanoi2v_diffusers.conditioning`). A last frame, keyframes (`NanoI2VCondition`) and the opening frames of a
clip to continue are placed in the same conditioning video. Without any the pipeline does text-to-video, and
without text (prompt None or "") unconditional generation.
"""

import inspect
import math
import os
from pathlib import Path
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

import numpy as np
import PIL.Image
import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DiffusionPipeline,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    UniPCMultistepScheduler,
)
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.loaders.lora_pipeline import Mochi1LoraLoaderMixin
from diffusers.utils import BaseOutput, logging
from diffusers.utils.torch_utils import randn_tensor
from diffusers.video_processor import VideoProcessor
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from nanoi2v_diffusers.conditioning import build_condition, continuation_frames, keyframe_latent_index
from nanoi2v_diffusers.image_inputs import has_other_aspect_ratio, to_rgb_images
from nanoi2v_diffusers.models.autoencoder_kl_nanoi2v import AutoencoderKLNanoI2V
from nanoi2v_diffusers.models.transformer_nanoi2v import NanoI2VTransformer3DModel, convert_fused_attention_keys
from nanoi2v_diffusers.safe_loading import (
    check_local_path,
    hub_unreachable,
    not_found_error,
    safe_loading_kwargs,
    validate_pipeline_folder,
)
from nanoi2v_diffusers.schedulers.objectives import (
    check_prediction_type,
    check_scheduler_matches,
    is_flow_scheduler,
    step_kwargs,
)
from nanoi2v_diffusers.schedulers.scheduling_nanoi2v_flow_match import NanoI2VFlowMatchScheduler, calculate_shift
from nanoi2v_diffusers.size_rules import check_frame_count, check_multiple, nearest_multiple
from nanoi2v_diffusers.data.shapes import SHAPES_DOMAIN, unlike_shapes
from nanoi2v_diffusers.hub_utils import LORA_WEIGHT_NAME, write_model_card
from nanoi2v_diffusers.text_encoders import (
    BUILTIN_TEXT_ENCODER,
    builtin_text_encoder_name,
    check_clause_separator,
    encode_text,
    load_minilm,
    null_text_embeds,
)

logger = logging.get_logger(__name__)

PipelineImageInput = Union[PIL.Image.Image, np.ndarray, torch.Tensor, List[PIL.Image.Image], List[np.ndarray], List[torch.Tensor]]

OUTPUT_TYPES = ("np", "pt", "pil", "latent")
DEFAULT_RESOLUTION = 64  # the built-in shapes model's size, used when neither an image nor a size is given
DEFAULT_MAX_SEQUENCE_LENGTH = 64
# The resize rule for conditioning images whose aspect ratio differs from (height, width): scale to
# cover the target, then center-crop (nothing is stretched, the borders are cut).
IMAGE_RESIZE_MODE = "crop"

EXAMPLE_DOC_STRING = """
    Examples:
        ```py
        >>> import torch
        >>> from PIL import Image
        >>> from nanoi2v_diffusers import NanoI2VPipeline
        >>> from nanoi2v_diffusers.data import write_video

        >>> pipe = NanoI2VPipeline.from_pretrained("examples/nanoi2v-shapes-64")
        >>> image = Image.open("first_frame.png")
        >>> video = pipe(image=image, prompt="a red circle moves left", generator=torch.manual_seed(0)).frames[0]
        >>> write_video("out.mp4", (video * 255).round().astype("uint8"), fps=8)
        ```
"""

# LoRA target modules of earlier versions' fused attention projections, and today's names for them.
_LEGACY_LORA_TARGETS = {"to_qkv": ("to_q", "to_k", "to_v"), "to_kv": ("to_k", "to_v"), "to_out": ("to_out.0",)}
INPUT_DOMAINS = ("shapes",)  # training data a pipeline can warn about (`input_domain`)
# The samplers a pipeline folder may name: flow matching for "flow" models, diffusers' DDPM family for the others
# (schedulers.objectives.check_scheduler_matches pairs them with the model's `prediction_type`).
NanoI2VScheduler = Union[
    NanoI2VFlowMatchScheduler, FlowMatchEulerDiscreteScheduler, DDPMScheduler, DDIMScheduler,
    DPMSolverMultistepScheduler, UniPCMultistepScheduler, EulerDiscreteScheduler,
]  # fmt: skip


@dataclass
class NanoI2VPipelineOutput(BaseOutput):
    r"""
    Output of [`NanoI2VPipeline`].

    Args:
        frames (`np.ndarray`, `torch.Tensor` or `List[List[PIL.Image.Image]]`):
            The generated videos: `(B, F, H, W, C)` floats in [0, 1] for "np", `(B, F, C, H, W)` for "pt", a list of
            `B` lists of `F` PIL images for "pil", or the `(B, C, T, h, w)` latents for "latent".
    """

    frames: Union[np.ndarray, torch.Tensor, List[List[PIL.Image.Image]]]


@dataclass
class NanoI2VCondition:
    r"""
    Frames the generated video must hold, for `NanoI2VPipeline(conditions=[...])`.

    Args:
        image (PIL image, array, tensor, or a list with one per prompt, *optional*): a keyframe at pixel frame
            `frame_index`. A latent frame of the causal VAE holds 4 pixel frames and a keyframe is the last one,
            so keyframes go at frames 0, 4, 8, ... (negative indices count from the end: -1 is the last frame).
        video (*optional*): the opening frames of a clip to continue: a list of images, an `(F, H, W, C)` array or
            an `(F, C, H, W)` tensor (several clips: a list of those, one per prompt). Its first `1 + 4m` frames
            are kept, the most that encode to whole latent frames; they open the output and the rest is generated.
        frame_index (`int`, defaults to 0): where `image` goes; a video starts at frame 0.
        strength (`float`, defaults to 1.0): the share of the denoising steps, from the first, that see this
            condition. 1 holds it throughout (and puts the latents of frame 0 or of a video back at the end);
            less leaves the last steps free to depart from it.
    """

    image: Optional[PipelineImageInput] = None
    video: Optional[Any] = None
    frame_index: int = 0
    strength: float = 1.0


@dataclass
class _KnownFrames:
    """One condition, checked: its frames per video (one list, or one per prompt) and where they go."""

    name: str  # how errors and logs call it, e.g. "conditions[1]"
    frames: List[List[PIL.Image.Image]]  # per video: one frame (an image) or 1 + r * m frames (a video)
    latent_index: int  # the latent frame of its first frame
    num_latent_frames: int
    strength: float

    @property
    def is_prefix(self) -> bool:
        """Opening frames: encoded together they are exactly the clip's own first latents (the VAE is causal)."""
        return self.latent_index == 0


class NanoI2VLoraLoaderMixin(Mochi1LoraLoaderMixin):
    r"""
    `load_lora_weights`, `save_lora_weights`, `fuse_lora`, `set_adapters`, `unload_lora_weights` for the
    transformer, as on diffusers' video pipelines. diffusers' Mochi loader is transformer-only and converts no
    keys, so it serves any transformer with `PeftAdapterMixin`; this subclass only refuses pickle files (this
    package loads safetensors only).
    """

    @classmethod
    def lora_state_dict(cls, pretrained_model_name_or_path_or_dict, **kwargs):
        """diffusers' `lora_state_dict` (safetensors only), with LoRA weights saved for the fused attention
        projections of earlier versions (`to_qkv`, `to_kv`, `to_out`) converted exactly to today's names."""
        if kwargs.get("use_safetensors") is False:
            raise ValueError("LoRA weights load from safetensors only; got use_safetensors=False.")
        source = pretrained_model_name_or_path_or_dict
        if not isinstance(source, dict):
            check_local_path("LoRA weights", source)
            kwargs.setdefault("weight_name", LORA_WEIGHT_NAME)  # what this package writes: no Hub listing needed
        try:
            loaded = super().lora_state_dict(source, **{**kwargs, "use_safetensors": True})
        except Exception as error:
            if not isinstance(source, dict) and not os.path.exists(source) and hub_unreachable(error):
                raise not_found_error("LoRA weights", source, error) from error
            raise
        state_dict, metadata = loaded if kwargs.get("return_lora_metadata") else (loaded, None)
        convert_fused_attention_keys(state_dict, lora=True)
        for key, value in (metadata or {}).items():
            if key.endswith("target_modules") and isinstance(value, list):
                metadata[key] = sorted({new for name in value for new in _LEGACY_LORA_TARGETS.get(name, (name,))})
        return (state_dict, metadata) if kwargs.get("return_lora_metadata") else state_dict


class NanoI2VPipeline(DiffusionPipeline, NanoI2VLoraLoaderMixin):
    r"""
    Image-to-video (and text-to-video, unconditional) generation with classifier-free guidance.

    Args:
        vae ([`AutoencoderKLNanoI2V`]): causal 3D VAE; encodes the conditioning image and decodes the latents.
        transformer ([`NanoI2VTransformer3DModel`]): predicts what `prediction_type` names for the noisy latents.
        scheduler: the sampler. For a "flow" model [`NanoI2VFlowMatchScheduler`] or diffusers'
            `FlowMatchEulerDiscreteScheduler`; for a noise-prediction model diffusers' `DDPMScheduler`,
            `DDIMScheduler`, `DPMSolverMultistepScheduler`, `UniPCMultistepScheduler` or `EulerDiscreteScheduler`
            configured with the model's prediction type. Another pairing is refused (`ValueError`).
        text_encoder ([`~transformers.PreTrainedModel`], *optional*): any transformers text encoder whose
            `last_hidden_state` has `transformer.config.text_dim` features (BERT, T5 encoder, CLIP text).
        tokenizer ([`~transformers.PreTrainedTokenizerBase`], *optional*): the text encoder's tokenizer.
            Both may be left out when `prompt_embeds` are passed in.
        text_clause_separator (`str`, *optional*): a regular expression; when set, each clause of a prompt is
            encoded on its own and the clauses' tokens are joined (`text_encoders.encode_clauses`), as the
            transformer was trained. Saved in model_index.json.
        default_text_encoder (`str`, *optional*): "all-MiniLM-L6-v2" when the pipeline uses the package's built-in
            text encoder: `save_pretrained` then does not store it (80 MB the installed package already holds,
            hash-checked), and `from_pretrained` restores it when none is stored or passed.
        input_domain (`str`, *optional*): "shapes" for a model trained on the built-in shapes clips: a call whose
            image or prompt is clearly unlike them gets one warning (`data.shapes.unlike_shapes`).
        prediction_type (`str`, defaults to "flow"): what the transformer was trained to predict: "flow" (the
            flow-matching velocity), or with a DDPM noise schedule "epsilon", "v_prediction" or "sample"
            (`schedulers.objectives`). Saved in model_index.json.
    """

    model_cpu_offload_seq = "text_encoder->transformer->vae"
    _optional_components = ["text_encoder", "tokenizer"]
    _callback_tensor_inputs = ["latents", "prompt_embeds", "negative_prompt_embeds"]

    def __init__(
        self,
        vae: AutoencoderKLNanoI2V,
        transformer: NanoI2VTransformer3DModel,
        scheduler: NanoI2VScheduler,
        text_encoder: Optional[PreTrainedModel] = None,
        tokenizer: Optional[PreTrainedTokenizerBase] = None,
        text_clause_separator: Optional[str] = None,
        default_text_encoder: Optional[str] = None,
        input_domain: Optional[str] = None,
        prediction_type: str = "flow",
    ):
        super().__init__()
        self.register_modules(
            vae=vae, transformer=transformer, scheduler=scheduler, text_encoder=text_encoder, tokenizer=tokenizer
        )
        if text_clause_separator is not None:
            check_clause_separator(text_clause_separator)  # fail here, not at the first prompt
        if default_text_encoder not in (None, BUILTIN_TEXT_ENCODER):
            raise ValueError(
                f"default_text_encoder must be None or {BUILTIN_TEXT_ENCODER!r}; got {default_text_encoder!r}."
            )
        if input_domain not in (None, *INPUT_DOMAINS):
            raise ValueError(f"input_domain must be None or one of {INPUT_DOMAINS}; got {input_domain!r}.")
        check_prediction_type(prediction_type)
        if scheduler is not None:
            check_scheduler_matches(prediction_type, scheduler)
        default_text_encoder = builtin_text_encoder_name(text_encoder) or default_text_encoder
        self.register_to_config(text_clause_separator=text_clause_separator, default_text_encoder=default_text_encoder,
                                input_domain=input_domain, prediction_type=prediction_type)  # fmt: skip
        self.vae_scale_factor_spatial = vae.spatial_compression_ratio if vae is not None else 8
        self.vae_scale_factor_temporal = vae.temporal_compression_ratio if vae is not None else 4
        self.video_processor = VideoProcessor(vae_scale_factor=self.vae_scale_factor_spatial, do_convert_rgb=True)

    # ------------------------------------------------------------------ loading

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        r"""
        diffusers' `DiffusionPipeline.from_pretrained`, made safe for folders and repos from strangers.

        Weights load from safetensors only unless `allow_pickle=True` is passed (pickle files are then read with
        `torch.load(weights_only=True)`, where no safetensors exist); `trust_remote_code` and `custom_pipeline`
        are refused; model_index.json and every component config are validated first
        (`safe_loading.validate_pipeline_folder`), so a tampered or incomplete file raises a
        `ConfigValidationError` naming the file and the key.
        """
        kwargs, allow_pickle = safe_loading_kwargs(kwargs)
        if os.path.isdir(pretrained_model_name_or_path):
            cls._validate_folder(pretrained_model_name_or_path, kwargs, allow_pickle)
            return super().from_pretrained(pretrained_model_name_or_path, **kwargs)._with_default_text_encoder(kwargs)
        check_local_path("pretrained_model_name_or_path", pretrained_model_name_or_path)
        try:
            pipe = super().from_pretrained(pretrained_model_name_or_path, **kwargs)
        except Exception as error:
            if hub_unreachable(error):
                raise not_found_error("pretrained_model_name_or_path", pretrained_model_name_or_path, error) from error
            raise
        return pipe._with_default_text_encoder(kwargs)

    def _with_default_text_encoder(self, kwargs) -> "NanoI2VPipeline":
        """Fill in the built-in text encoder that `default_text_encoder` names, unless one was stored or passed."""
        if self.text_encoder is not None or "text_encoder" in kwargs or not self.config.get("default_text_encoder"):
            return self
        try:
            text_encoder, tokenizer = load_minilm(dtype=kwargs.get("dtype") or kwargs.get("torch_dtype"))
        except ImportError as error:
            logger.warning(f"{error} Until then pass text_encoder= and tokenizer=, or prompt_embeds.")
            return self
        self.register_modules(text_encoder=text_encoder, tokenizer=tokenizer)
        return self

    def save_pretrained(self, save_directory: Union[str, os.PathLike], *args, save_text_encoder: bool = False,
                        **kwargs) -> None:  # fmt: skip
        """diffusers' `save_pretrained`, with two differences. The built-in text encoder is left out unless
        `save_text_encoder=True`: `default_text_encoder` names it and `from_pretrained` restores it from the
        installed package (any other text encoder is stored, or the folder could not be used). And a model card,
        README.md, is written when the folder has none (`hub_utils.write_model_card`)."""
        builtin = builtin_text_encoder_name(self.text_encoder)
        modules = (self.text_encoder, self.tokenizer)
        if builtin and not save_text_encoder:
            self.register_modules(text_encoder=None, tokenizer=None)
        try:
            super().save_pretrained(save_directory, *args, **kwargs)
        finally:
            self.register_modules(text_encoder=modules[0], tokenizer=modules[1])
        if not (Path(save_directory) / "README.md").is_file():
            write_model_card(save_directory)
        sizes = {folder.name: sum(f.stat().st_size for f in folder.glob("*.safetensors")) / 2**20
                 for folder in Path(save_directory).iterdir() if folder.is_dir()}  # fmt: skip
        stored = ", ".join(f"{name} {size:.1f} MB" for name, size in sizes.items() if size)
        left_out = f"; the built-in text encoder {builtin} is not stored" if builtin and not save_text_encoder else ""
        logger.info(f"Saved {save_directory}: {stored}{left_out}.")

    @classmethod
    def download(cls, pretrained_model_name, **kwargs) -> str:
        """diffusers' Hub download, then the same validation as a local folder gets (safetensors only by default)."""
        kwargs, allow_pickle = safe_loading_kwargs(kwargs)
        folder = super().download(pretrained_model_name, **kwargs)
        cls._validate_folder(folder, kwargs, allow_pickle)
        return folder

    @classmethod
    def _validate_folder(cls, folder, kwargs, allow_pickle: bool) -> None:
        components = inspect.signature(cls.__init__).parameters
        passed = [name for name in kwargs if name in components]  # components given as objects are not read
        validate_pipeline_folder(folder, cls, allow_pickle=allow_pickle, passed_components=passed)

    # ------------------------------------------------------------------ text

    def _null_text(self, batch_size: int, device, dtype) -> Tuple[torch.Tensor, torch.Tensor]:
        # Without a transformer (a pipeline of the text encoder alone), the text encoder says how wide text is.
        if self.transformer is not None:
            text_dim = self.transformer.config.text_dim
        else:
            text_dim = self.text_encoder.config.hidden_size
        return null_text_embeds(batch_size, text_dim, device=device, dtype=dtype)

    def _encode_text(
        self, prompt: List[str], max_sequence_length: int, device, dtype
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        if all(not p for p in prompt):
            return self._null_text(len(prompt), device, dtype)
        if self.text_encoder is None or self.tokenizer is None:
            raise ValueError(
                "This pipeline has no text_encoder/tokenizer: pass prompt_embeds, or load the pipeline with "
                "`NanoI2VPipeline.from_pretrained(path, text_encoder=..., tokenizer=...)`."
            )
        return encode_text(self.text_encoder, self.tokenizer, prompt, max_sequence_length, device=device, dtype=dtype,
                           clause_separator=self.config.text_clause_separator)  # fmt: skip

    def encode_prompt(
        self,
        prompt: Optional[Union[str, List[str]]],
        negative_prompt: Optional[Union[str, List[str]]] = None,
        do_classifier_free_guidance: bool = True,
        num_videos_per_prompt: int = 1,
        prompt_embeds: Optional[torch.Tensor] = None,
        negative_prompt_embeds: Optional[torch.Tensor] = None,
        prompt_attention_mask: Optional[torch.Tensor] = None,
        negative_prompt_attention_mask: Optional[torch.Tensor] = None,
        max_sequence_length: int = DEFAULT_MAX_SEQUENCE_LENGTH,
        device: Optional[torch.device] = None,
        dtype: Optional[torch.dtype] = None,
    ) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
        r"""
        Encode the prompt (and the negative prompt when guidance is on) into text-encoder hidden states.

        Args:
            prompt (`str` or `List[str]`, *optional*): the prompt(s); None or "" means no text.
            negative_prompt (`str` or `List[str]`, *optional*): what guidance steers away from; None means no text.
            do_classifier_free_guidance (`bool`): also return the negative embeddings.
            num_videos_per_prompt (`int`): repeats each embedding this many times.
            prompt_embeds, negative_prompt_embeds (`torch.Tensor`, *optional*): precomputed `(B, L, text_dim)`.
            prompt_attention_mask, negative_prompt_attention_mask (`torch.Tensor`, *optional*): `(B, L)` masks for
                the precomputed embeddings (1 = token, 0 = padding); all ones when left out.
            max_sequence_length (`int`): longer prompts are truncated, with a warning.
            device, dtype: where and in which dtype to return the embeddings.

        Returns:
            `(prompt_embeds, prompt_attention_mask, negative_prompt_embeds, negative_prompt_attention_mask)`; the
            negative pair is None when `do_classifier_free_guidance` is False.
        """
        device = device or self._execution_device
        if dtype is None:  # the transformer's, or the text encoder's in a pipeline of the text encoder alone
            source = self.transformer if self.transformer is not None else self.text_encoder
            dtype = source.dtype if source is not None else torch.float32
        if prompt_embeds is None:
            prompts = _as_prompt_list(prompt)
            prompt_embeds, prompt_attention_mask = self._encode_text(prompts, max_sequence_length, device, dtype)
        else:
            prompt_embeds = prompt_embeds.to(device=device, dtype=dtype)
            prompt_attention_mask = _default_mask(prompt_embeds, prompt_attention_mask)
        batch_size = prompt_embeds.shape[0]

        if do_classifier_free_guidance and negative_prompt_embeds is None:
            negatives = _as_prompt_list(negative_prompt, batch_size)
            if len(negatives) != batch_size:
                raise ValueError(
                    f"negative_prompt has {len(negatives)} entries but prompt has {batch_size}: pass one per prompt."
                )
            negative_prompt_embeds, negative_prompt_attention_mask = self._encode_text(
                negatives, max_sequence_length, device, dtype
            )
        elif negative_prompt_embeds is not None:
            negative_prompt_embeds = negative_prompt_embeds.to(device=device, dtype=dtype)
            negative_prompt_attention_mask = _default_mask(negative_prompt_embeds, negative_prompt_attention_mask)

        repeat = lambda x: None if x is None else x.repeat_interleave(num_videos_per_prompt, dim=0)  # noqa: E731
        prompt_embeds, prompt_attention_mask = repeat(prompt_embeds), repeat(prompt_attention_mask)
        negative_prompt_embeds = repeat(negative_prompt_embeds)
        negative_prompt_attention_mask = repeat(negative_prompt_attention_mask)
        # Named as `__call__` takes them: `pipe(prompt_embeds=..., prompt_attention_mask=..., ...)`.
        return prompt_embeds, prompt_attention_mask, negative_prompt_embeds, negative_prompt_attention_mask

    # ------------------------------------------------------------------ checks

    @property
    def _size_multiple(self) -> int:
        return self.vae_scale_factor_spatial * self.transformer.config.patch_size[-1]

    def check_inputs(
        self,
        prompt,
        negative_prompt,
        height: int,
        width: int,
        num_frames: int,
        num_inference_steps: int,
        guidance_scale: float,
        image_guidance_scale: Optional[float],
        prompt_embeds,
        negative_prompt_embeds,
        latents,
        output_type: str,
        callback_on_step_end_tensor_inputs,
        num_videos_per_prompt: int = 1,
        max_sequence_length: int = DEFAULT_MAX_SEQUENCE_LENGTH,
        negative_guidance_scale: Optional[float] = None,
    ):
        patch = self.transformer.config.patch_size[-1]
        why = f"VAE factor {self.vae_scale_factor_spatial} x patch size {patch}"
        check_multiple("`height`", height, self._size_multiple, why)
        check_multiple("`width`", width, self._size_multiple, why)
        check_frame_count("`num_frames`", num_frames, self.vae_scale_factor_temporal)
        counts = {"num_inference_steps": num_inference_steps, "num_videos_per_prompt": num_videos_per_prompt,
                  "max_sequence_length": max_sequence_length}  # fmt: skip
        for name, value in counts.items():
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"`{name}` must be an integer >= 1; got {value!r}.")
        for name, value in (("guidance_scale", guidance_scale), ("image_guidance_scale", image_guidance_scale)):
            if value is not None and not value >= 1.0:
                raise ValueError(f"`{name}` must be >= 1 (1 turns guidance off); got {value}.")
        if negative_guidance_scale is not None:
            if not negative_guidance_scale >= 0.0:
                raise ValueError(f"`negative_guidance_scale` must be >= 0; got {negative_guidance_scale}.")
            if negative_prompt is None and negative_prompt_embeds is None:
                raise ValueError(
                    "`negative_guidance_scale` guides away from a negative prompt: pass `negative_prompt` or "
                    "`negative_prompt_embeds` too."
                )
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"`output_type` must be one of {OUTPUT_TYPES}; got {output_type!r}.")
        if callback_on_step_end_tensor_inputs is not None:
            unknown = [k for k in callback_on_step_end_tensor_inputs if k not in self._callback_tensor_inputs]
            if unknown:
                raise ValueError(
                    f"`callback_on_step_end_tensor_inputs` may only name {self._callback_tensor_inputs}; got {unknown}."
                )
        if prompt is not None and prompt_embeds is not None:
            raise ValueError("Pass either `prompt` or `prompt_embeds`, not both.")
        if negative_prompt is not None and negative_prompt_embeds is not None:
            raise ValueError("Pass either `negative_prompt` or `negative_prompt_embeds`, not both.")
        for name, value in (("prompt", prompt), ("negative_prompt", negative_prompt)):
            _check_prompt_type(name, value)
        if latents is not None and not torch.isfinite(latents).all():
            raise ValueError("`latents` contain NaN or inf values.")

    # ------------------------------------------------------------------ latents

    def _latent_shape(self, batch_size: int, num_frames: int, height: int, width: int) -> Tuple[int, ...]:
        return (
            batch_size,
            self.transformer.config.out_channels,
            (num_frames - 1) // self.vae_scale_factor_temporal + 1,
            height // self.vae_scale_factor_spatial,
            width // self.vae_scale_factor_spatial,
        )

    def prepare_latents(
        self, shape: Tuple[int, ...], dtype, device, generator, latents: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        if latents is not None:
            if tuple(latents.shape) != tuple(shape):
                raise ValueError(f"`latents` must have shape {tuple(shape)}; got {tuple(latents.shape)}.")
            return latents.to(device=device, dtype=dtype)
        if isinstance(generator, list) and len(generator) != shape[0]:
            raise ValueError(f"Got {len(generator)} generators for a batch of {shape[0]} videos: pass one per video.")
        return randn_tensor(shape, generator=generator, device=device, dtype=dtype)

    def encode_image(
        self, image: PipelineImageInput, height: int, width: int, batch_size: int, device, dtype
    ) -> torch.Tensor:
        """VAE latents `(B, C, 1, h, w)` of the conditioning image(s), normalised like the training latents.

        Images of any mode, dtype or layout are first made 8-bit RGB (`nanoi2v_diffusers.image_inputs`), then
        resized to cover `(height, width)` and center-cropped.
        """
        return self.encode_frames([[image] for image in to_rgb_images(image)], height, width, batch_size, device, dtype)

    def encode_frames(
        self, frames: List[List[PIL.Image.Image]], height: int, width: int, batch_size: int, device, dtype
    ) -> torch.Tensor:
        """VAE latents `(B, C, T, h, w)` of one video per item of `frames` (each a list of `1 + r * m` frames, one
        for an image), normalised like the training latents; one item is repeated for the whole batch."""
        if has_other_aspect_ratio([video[0] for video in frames], height, width):
            logger.info(f"Conditioning frames resized to cover {height}x{width}, then center-cropped (other aspect).")
        pixels = torch.stack([
            self.video_processor.preprocess(video, height=height, width=width, resize_mode=IMAGE_RESIZE_MODE)
            .transpose(0, 1) for video in frames
        ]).to(device=device, dtype=self.vae.dtype)  # (N, C, F, H, W)  # fmt: skip
        # The mode of the posterior: the frames are a condition, so no sampling noise is wanted.
        latents = self.vae.normalize_latents(self.vae.encode(pixels).latent_dist.mode()).to(dtype)
        if latents.shape[0] != batch_size:
            latents = latents.repeat_interleave(batch_size // latents.shape[0], dim=0)
        return latents

    def decode_latents(self, latents: torch.Tensor, output_type: str):
        latents = self.vae.denormalize_latents(latents.to(self.vae.dtype))
        video = self.vae.decode(latents, return_dict=False)[0]  # (B, C, F, H, W) in [-1, 1]
        return self.video_processor.postprocess_video(video, output_type=output_type)

    # ------------------------------------------------------------------ guidance

    @property
    def guidance_scale(self) -> float:
        return self._guidance_scale

    @property
    def do_classifier_free_guidance(self) -> bool:
        return self._guidance_scale > 1.0 or self._image_guidance_scale is not None

    @property
    def num_timesteps(self) -> int:
        return self._num_timesteps

    @property
    def attention_kwargs(self) -> Optional[Dict[str, Any]]:
        return self._attention_kwargs

    @property
    def current_timestep(self) -> Optional[torch.Tensor]:
        """The timestep being denoised (None outside the loop); diffusers' cache configs read it through
        `current_timestep_callback=lambda: pipe.current_timestep`."""
        return self._current_timestep

    @property
    def interrupt(self) -> bool:
        return self._interrupt

    def _check_faster_cache_batch(self) -> None:
        """FasterCache (unless guidance-distilled) approximates the first half of an [uncond, cond] batch."""
        hooks = getattr(self.transformer, "_diffusers_hook", None)
        faster_cache = hooks.get_hook("faster_cache_denoiser") if hooks is not None else None
        if faster_cache is None or faster_cache.is_guidance_distilled:
            return
        extra = [name for name in ("image_guidance_scale", "negative_guidance_scale")
                 if getattr(self, f"_{name}") is not None]  # fmt: skip
        if self._guidance_scale <= 1.0 or extra:
            raise ValueError(
                f"FasterCache (is_guidance_distilled=False) needs plain CFG, two branches [uncond, cond]: got "
                f"guidance_scale={self._guidance_scale}" + "".join(f", {n}={getattr(self, '_' + n)}" for n in extra)
                + "; use guidance_scale > 1 alone, or FasterCacheConfig(is_guidance_distilled=True)."
            )

    def _guided_velocity(self, latents, timestep, condition, null_condition, text, negative_text) -> torch.Tensor:
        """One batched transformer call for all guidance branches, combined into one velocity (or, for a
        noise-prediction model, one prediction of its type: the combination is linear, the same for any).

        With v(text, image) the model's velocity and "-" a dropped condition:
            v = v(-, +image) + s * (v(+text, +image) - v(-, +image))         text CFG (`guidance_scale` s > 1)
                + (s_img - 1) * (v(-, +image) - v(-, -))                     `image_guidance_scale` s_img
                + s_neg * (v(+text, +image) - v(negative, +image))           `negative_guidance_scale` s_neg
        "-" text is the negative prompt unless `negative_guidance_scale` gives it a branch of its own.
        """
        embeds, mask = text
        no_text = negative_text
        branches = {}
        if self._negative_guidance_scale is not None:
            no_text = self._null_text(embeds.shape[0], embeds.device, embeds.dtype)
            branches["negative"] = (condition, *negative_text)
        if self._image_guidance_scale is not None:
            branches["no_image"] = (null_condition, *no_text)
        if self.do_classifier_free_guidance:
            branches["no_text"] = (condition, *no_text)
        # Conditional branch last, as diffusers' pipelines batch [uncond, cond]: FasterCache relies on the order.
        branches["text"] = (condition, embeds, mask)

        inputs = list(branches.values())
        length = max(e.shape[1] for _, e, _ in inputs)
        n = len(inputs)
        with self.transformer.cache_context("cond_uncond"):  # all branches in one call: one state for caches
            velocity = self.transformer(
                hidden_states=torch.cat([latents] * n),
                timestep=timestep.repeat(n),
                encoder_hidden_states=torch.cat([_pad_tokens(e, length) for _, e, _ in inputs]),
                encoder_attention_mask=torch.cat([_pad_tokens(m, length) for _, _, m in inputs]),
                condition=torch.cat([c for c, _, _ in inputs]),
                attention_kwargs=self._attention_kwargs,
                return_dict=False,
            )[0]
        v = dict(zip(branches, velocity.chunk(n)))
        guided = v["text"]
        if "no_text" in v:
            guided = v["no_text"] + self._guidance_scale * (v["text"] - v["no_text"])
        if "no_image" in v:
            guided = guided + (self._image_guidance_scale - 1.0) * (v["no_text"] - v["no_image"])
        if "negative" in v:
            guided = guided + self._negative_guidance_scale * (v["text"] - v["negative"])
        return guided

    # ------------------------------------------------------------------ call

    @torch.no_grad()
    def __call__(
        self,
        image: Optional[PipelineImageInput] = None,
        prompt: Optional[Union[str, List[str]]] = None,
        negative_prompt: Optional[Union[str, List[str]]] = None,
        height: Optional[int] = None,
        width: Optional[int] = None,
        num_frames: int = 17,
        num_inference_steps: int = 20,
        guidance_scale: float = 5.0,
        image_guidance_scale: Optional[float] = None,
        negative_guidance_scale: Optional[float] = None,
        num_videos_per_prompt: int = 1,
        generator: Optional[Union[torch.Generator, List[torch.Generator]]] = None,
        latents: Optional[torch.Tensor] = None,
        prompt_embeds: Optional[torch.Tensor] = None,
        negative_prompt_embeds: Optional[torch.Tensor] = None,
        prompt_attention_mask: Optional[torch.Tensor] = None,
        negative_prompt_attention_mask: Optional[torch.Tensor] = None,
        output_type: str = "np",
        return_dict: bool = True,
        attention_kwargs: Optional[Dict[str, Any]] = None,
        callback_on_step_end: Optional[
            Union[Callable[[Any, int, torch.Tensor, Dict], Dict], PipelineCallback, MultiPipelineCallbacks]
        ] = None,
        callback_on_step_end_tensor_inputs: Tuple[str, ...] = ("latents",),
        max_sequence_length: int = DEFAULT_MAX_SEQUENCE_LENGTH,
        last_image: Optional[PipelineImageInput] = None,
        video: Optional[Any] = None,
        conditions: Optional[List[NanoI2VCondition]] = None,
        eta: float = 0.0,
    ):
        r"""
        Generate videos from an image and a prompt; or from a first and a last frame, keyframes, or the opening
        frames of a clip to continue.

        Args:
            image (PIL image, `np.ndarray`, `torch.Tensor` or a list of them, *optional*): the first frame. Resized
                to cover `(height, width)` and center-cropped; any PIL mode, uint8 / uint16 / float arrays and
                tensors are accepted (transparency is composited on black, 16-bit is scaled to 8-bit; see
                `nanoi2v_diffusers.image_inputs`). None (and no other condition) gives text-to-video.
            prompt (`str` or `List[str]`, *optional*): the motion to generate. None or "" gives no text
                (unconditional generation when there is no image either; use `guidance_scale=1` then).
            negative_prompt (`str` or `List[str]`, *optional*): the text guidance steers away from; None = no text.
            height, width (`int`, *optional*): output size, multiples of VAE factor x patch size (16 by default).
                Default: the image's size rounded to the nearest valid multiple when an image is given, else 64.
            num_frames (`int`, defaults to 17): `1 + 4k` frames.
            num_inference_steps (`int`, defaults to 20): denoising steps (a Heun scheduler calls the model
                twice per step but the last).
            guidance_scale (`float`, defaults to 5.0): text guidance; 1 turns classifier-free guidance off.
            image_guidance_scale (`float`, *optional*): separate image guidance (three branches in one batch);
                None uses the image in both branches.
            negative_guidance_scale (`float`, *optional*): None makes the negative prompt CFG's unconditional
                branch (as in diffusers). A number gives it a branch of its own, the unconditional one keeping no
                text, and adds `negative_guidance_scale * (v(prompt) - v(negative_prompt))` to the guided
                velocity (negation as in composable diffusion); it needs a negative prompt.
            num_videos_per_prompt (`int`, defaults to 1): videos per prompt.
            generator (`torch.Generator` or a list, one per video, *optional*): makes sampling deterministic.
            latents (`torch.Tensor`, *optional*): initial noise `(B, C, T, h, w)`.
            prompt_embeds, negative_prompt_embeds (`torch.Tensor`, *optional*): precomputed text embeddings.
            prompt_attention_mask, negative_prompt_attention_mask (`torch.Tensor`, *optional*): their masks.
            output_type (`str`, defaults to "np"): "np" `(B, F, H, W, C)`, "pt" `(B, F, C, H, W)`, "pil" or "latent".
            return_dict (`bool`, defaults to True): return a [`NanoI2VPipelineOutput`] instead of a tuple.
            attention_kwargs (`dict`, *optional*): passed to the transformer; `{"scale": s}` scales its LoRA
                adapters for this call.
            callback_on_step_end (`Callable`, *optional*): called as `callback(pipe, i, t, tensors)` after each
                model evaluation; may return new values for the tensors it was given; set `pipe._interrupt = True`
                to stop early.
            callback_on_step_end_tensor_inputs (`Tuple[str]`): which tensors the callback receives.
            max_sequence_length (`int`, defaults to 64): prompts are truncated to this many tokens.
            last_image (*optional*): the last frame, like `image` (with `image`: first and last frame to video).
            video (*optional*): the opening frames of a clip to continue (see `NanoI2VCondition.video`: its first
                `1 + 4m` frames open the output, the rest is generated; `continue_video` chains continuations).
            conditions (`List[NanoI2VCondition]`, *optional*): keyframes at other frames (0, 4, 8, ...), videos, and
                a `strength` each. At most one condition per latent frame (4 pixel frames), all frames of one size.
            eta (`float`, defaults to 0.0): stochastic sampling, passed to `scheduler.step` where it takes one:
                DDIM's eta for noise-prediction models, `NanoI2VFlowMatchScheduler`'s (Euler solver) for flow
                models; 0 is deterministic. Another scheduler refuses an eta other than 0.

        Examples:

        Returns:
            [`NanoI2VPipelineOutput`] or `tuple`: the videos, in `.frames` (or the tuple's first element).
        """
        if isinstance(callback_on_step_end, (PipelineCallback, MultiPipelineCallbacks)):
            callback_on_step_end_tensor_inputs = callback_on_step_end.tensor_inputs
        extra_step_kwargs = self._check_sampler(eta, generator)
        check_frame_count("`num_frames`", num_frames, self.vae_scale_factor_temporal)
        known = self._gather_conditions(image, last_image, video, conditions, num_frames,
                                        _prompt_batch_size(prompt, prompt_embeds))  # fmt: skip
        images = [item[0] for condition in known for item in condition.frames] or None  # every video's first frame
        height, width = self._output_size(images, height, width)
        self.check_inputs(  # the frame conditions were checked by _gather_conditions
            prompt, negative_prompt, height, width, num_frames, num_inference_steps, guidance_scale,
            image_guidance_scale, prompt_embeds, negative_prompt_embeds, latents, output_type,
            callback_on_step_end_tensor_inputs, num_videos_per_prompt, max_sequence_length, negative_guidance_scale,
        )
        if self.config.get("input_domain") == "shapes":
            self._warn_if_unlike_shapes(images, prompt, height, width, num_frames)
        self._guidance_scale = guidance_scale
        self._image_guidance_scale = image_guidance_scale if known else None
        self._negative_guidance_scale = negative_guidance_scale
        self._check_faster_cache_batch()
        self._attention_kwargs = attention_kwargs
        self._current_timestep = None
        self._interrupt = False
        device = self._execution_device
        dtype = self.transformer.dtype

        # 1. Text
        if prompt is None and prompt_embeds is None and known:
            prompt = [""] * max(len(condition.frames) for condition in known)
        embeds, mask, null_embeds, null_mask = self.encode_prompt(
            prompt,
            negative_prompt,
            do_classifier_free_guidance=self.do_classifier_free_guidance or negative_guidance_scale is not None,
            num_videos_per_prompt=num_videos_per_prompt,
            prompt_embeds=prompt_embeds,
            negative_prompt_embeds=negative_prompt_embeds,
            prompt_attention_mask=prompt_attention_mask,
            negative_prompt_attention_mask=negative_prompt_attention_mask,
            max_sequence_length=max_sequence_length,
            device=device,
            dtype=dtype,
        )
        batch_size = embeds.shape[0]

        # 2. Noise and the known frames: their latents (B, C, T, h, w), where they are (B, T), and until which step
        shape = self._latent_shape(batch_size, num_frames, height, width)
        latents = self.prepare_latents(shape, torch.float32, device, generator, latents)
        known_latents = torch.zeros(shape, dtype=dtype, device=device)
        known_mask = torch.zeros(shape[0], shape[2], dtype=torch.bool, device=device)
        strengths = torch.ones(shape[2], device=device)  # per latent frame
        for condition in known:
            frames = slice(condition.latent_index, condition.latent_index + condition.num_latent_frames)
            known_latents[:, :, frames] = self.encode_frames(condition.frames, height, width, batch_size, device, dtype)
            known_mask[:, frames] = True
            strengths[frames] = condition.strength

        # 3. Timesteps (a noise-prediction scheduler starts from noise of its `init_noise_sigma`)
        flow = is_flow_scheduler(self.scheduler)
        if flow:
            self.scheduler.set_timesteps(num_inference_steps, device=device, mu=self._dynamic_shift_mu(shape))
        else:
            self.scheduler.set_timesteps(num_inference_steps, device=device)
            latents = latents * self.scheduler.init_noise_sigma
        timesteps = self.scheduler.timesteps
        self._num_timesteps = len(timesteps)
        # A condition of strength s is seen by the first ceil(s * steps) model calls, then dropped.
        last_call = torch.ceil(strengths * len(timesteps))

        # 4. Denoise (the loop is solver-agnostic: a second-order scheduler lists its stages as timesteps)
        with self.progress_bar(total=len(timesteps)) as progress_bar:
            for i, t in enumerate(timesteps):
                if self.interrupt:
                    break
                self._current_timestep = t
                condition = build_condition(known_latents, known_mask & (i < last_call))
                null_condition = torch.zeros_like(condition)
                model_input = latents if flow else self.scheduler.scale_model_input(latents, t)
                velocity = self._guided_velocity(
                    model_input.to(dtype), t.expand(batch_size).to(dtype), condition, null_condition,
                    (embeds, mask), (null_embeds, null_mask),
                )
                latents = self.scheduler.step(velocity.float(), t, latents, **extra_step_kwargs, return_dict=False)[0]

                if callback_on_step_end is not None:
                    tensors = {"latents": latents, "prompt_embeds": embeds, "negative_prompt_embeds": null_embeds}
                    outputs = callback_on_step_end(
                        self, i, t, {k: tensors[k] for k in callback_on_step_end_tensor_inputs}
                    ) or {}
                    latents = outputs.pop("latents", latents)
                    embeds = outputs.pop("prompt_embeds", embeds)
                    null_embeds = outputs.pop("negative_prompt_embeds", null_embeds)
                progress_bar.update()

        # 5. Opening frames (the first frame, a video) are the clip's own latents: the causal VAE then decodes
        # them as the VAE round trip of the given frames, whatever the sampler did there.
        for condition in known:
            if condition.is_prefix and condition.strength == 1.0:
                frames = slice(0, condition.num_latent_frames)
                latents[:, :, frames] = known_latents[:, :, frames].to(latents.dtype)

        self._current_timestep = None
        frames = latents if output_type == "latent" else self.decode_latents(latents, output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (frames,)
        return NanoI2VPipelineOutput(frames=frames)

    def continue_video(
        self,
        video,
        prompt: Optional[str] = None,
        num_frames_total: int = 33,
        num_frames: int = 17,
        context_frames: Optional[int] = None,
        **kwargs,
    ) -> np.ndarray:
        r"""
        Make one video longer than a clip by chaining continuations (`video=` calls): each call is given the last
        `context_frames` frames so far and generates the rest of a `num_frames` clip, until the video has
        `num_frames_total` frames.

        Args:
            video: the opening frames (as `NanoI2VCondition.video`, one video), kept as given in the result.
            prompt (`str`, *optional*): the motion, for every call.
            num_frames_total (`int`, defaults to 33): frames of the result (the last call may overshoot; cut).
            num_frames (`int`, defaults to 17): frames of each call, `1 + 4k`.
            context_frames (`int`, *optional*): frames each call continues from, `1 + 4m` below `num_frames`;
                default about half a clip (9 of 17).
            kwargs: passed to every call (`num_inference_steps`, `guidance_scale`, `generator`, ...).

        Returns:
            `np.ndarray` `(num_frames_total, H, W, C)` floats in [0, 1].
        """
        ratio = self.vae_scale_factor_temporal
        check_frame_count("`num_frames`", num_frames, ratio)
        context_frames = context_frames or 1 + ratio * ((num_frames - 1) // (2 * ratio))
        if context_frames != continuation_frames(context_frames, ratio) or not 1 <= context_frames < num_frames:
            raise ValueError(f"`context_frames` must be 1 + {ratio}m and below `num_frames` ({num_frames}); "
                             f"got {context_frames}.")  # fmt: skip
        frames = np.stack([np.asarray(frame, dtype=np.float32) / 255 for frame in _video_list(video, "video")[0]])
        if not num_frames_total > len(frames):
            raise ValueError(f"`num_frames_total` must exceed the video's {len(frames)} frames; "
                             f"got {num_frames_total}.")  # fmt: skip
        new_per_call = num_frames - context_frames
        calls = math.ceil((num_frames_total - len(frames)) / new_per_call)
        previous = dict(getattr(self, "_progress_bar_config", {}))
        self.set_progress_bar_config(**{**previous, "disable": True})  # one bar over the calls, not one per call
        try:
            for _ in tqdm(range(calls), desc="Continuing the video", unit="call", disable=previous.get("disable")):
                context = frames[-min(context_frames, continuation_frames(len(frames), ratio)):]
                output = self(video=context, prompt=prompt, num_frames=num_frames, output_type="np", **kwargs)
                frames = np.concatenate([frames, output.frames[0][len(context):]])
        finally:
            self.set_progress_bar_config(**previous)
        return frames[:num_frames_total]

    def _warn_if_unlike_shapes(self, images, prompt, height: int, width: int, num_frames: int) -> None:
        """One warning when the input is clearly unlike the shapes clips the model was trained on."""
        prompts = [prompt] if isinstance(prompt, str) else list(prompt or [])
        reasons = unlike_shapes([np.asarray(image) for image in images or []], prompts, height, width, num_frames)
        if reasons:
            logger.warning(f"This model was trained on {SHAPES_DOMAIN}; this input is unlike that "
                           f"({'; '.join(reasons)}): expect a video of little sense.")  # fmt: skip

    def _gather_conditions(
        self, image, last_image, video, conditions, num_frames: int, num_prompts: Optional[int]
    ) -> List[_KnownFrames]:
        """Every frame condition of a call (`image`: frame 0, `video`: a clip to continue, `last_image`: the last
        frame, then `conditions`), checked before any work: what it holds, where, its strength, one condition
        per latent frame, one frame size, and one item or one per prompt."""
        ratio = self.vae_scale_factor_temporal
        given = [(name, NanoI2VCondition(**{field: value, "frame_index": index}))
                 for name, field, value, index in (("image", "image", image, 0), ("video", "video", video, 0),
                                                   ("last_image", "image", last_image, -1)) if value is not None]
        if conditions is not None:
            items = [conditions] if isinstance(conditions, NanoI2VCondition) else conditions
            if not isinstance(items, (list, tuple)) or not all(isinstance(c, NanoI2VCondition) for c in items):
                raise ValueError(f"`conditions` must be a list of NanoI2VCondition; got {conditions!r:.80}.")
            given += [(f"conditions[{i}]", condition) for i, condition in enumerate(items)]
        known, owners = [], {}
        for name, condition in given:
            if (condition.image is None) == (condition.video is None):
                raise ValueError(f"`{name}` needs an image or a video (exactly one of them).")
            strength = condition.strength
            if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not 0 < strength <= 1:
                raise ValueError(f"`{name}` strength must be in (0, 1]; got {strength!r}.")
            if condition.image is not None:
                index = keyframe_latent_index(condition.frame_index, num_frames, ratio, name=f"`{name}` frame_index")
                frames, count = [[frame] for frame in to_rgb_images(condition.image)], 1
            else:
                if condition.frame_index != 0:
                    raise ValueError(f"`{name}` is a video, which starts at frame 0 (the clip it continues); "
                                     f"got frame_index {condition.frame_index}.")  # fmt: skip
                videos = _video_list(condition.video, name)
                length = len(videos[0])
                if any(len(v) != length for v in videos):
                    raise ValueError(f"`{name}` holds videos of {sorted({len(v) for v in videos})} frames: "
                                     "give them one length.")  # fmt: skip
                if length > num_frames:
                    raise ValueError(f"`{name}` has {length} frames, more than `num_frames` ({num_frames}).")
                keep = continuation_frames(length, ratio)
                if keep < length:
                    logger.warning(f"`{name}`: continuing from its first {keep} of {length} frames (1 + {ratio}m "
                                   "frames encode to whole latent frames).")  # fmt: skip
                frames, index, count = [v[:keep] for v in videos], 0, 1 + (keep - 1) // ratio
            if num_prompts is not None and len(frames) not in (1, num_prompts):
                kind = "images" if condition.image is not None else "videos"
                raise ValueError(f"`{name}`: {len(frames)} {kind} for {num_prompts} prompts: pass one, or one "
                                 "per prompt.")  # fmt: skip
            for latent in range(index, index + count):
                if latent in owners:
                    pixels = "frame 0" if latent == 0 else f"frames {ratio * (latent - 1) + 1}-{ratio * latent}"
                    raise ValueError(f"`{owners[latent]}` and `{name}` both condition latent frame {latent} (pixel "
                                     f"{pixels}): one condition per latent frame.")  # fmt: skip
                owners[latent] = name
            known.append(_KnownFrames(name, frames, index, count, float(strength)))
        sizes = {}
        for condition in known:
            for frame in (frame for item in condition.frames for frame in item):
                sizes.setdefault((frame.height, frame.width), condition.name)
        if len(sizes) > 1:
            described = ", ".join(f"`{name}` {h}x{w}" for (h, w), name in sizes.items())
            raise ValueError(f"Condition frames differ in size ({described}): pass frames of one size.")
        return known

    def _output_size(self, images: Optional[List[PIL.Image.Image]], height, width) -> Tuple[int, int]:
        """`height` and `width` as given; each one left None is the first image's, rounded to the nearest valid
        multiple (logged when that changes it), or DEFAULT_RESOLUTION without an image."""
        source = (images[0].height, images[0].width) if images else (DEFAULT_RESOLUTION, DEFAULT_RESOLUTION)
        size = tuple(
            nearest_multiple(default, self._size_multiple) if given is None else given
            for default, given in zip(source, (height, width))
        )
        if images and size != source and None in (height, width):
            logger.warning(
                f"Output size {size[0]}x{size[1]}: the image's {source[0]}x{source[1]} rounded to multiples of "
                f"{self._size_multiple}; pass height and width to choose."
            )
        return size

    def _check_sampler(self, eta, generator) -> Dict[str, Any]:
        """Check, before any work, that the scheduler samples this model's objective and takes `eta`; returns the
        extra `scheduler.step` arguments (`eta`, `generator`, where its `step` takes them)."""
        check_scheduler_matches(self.config.get("prediction_type", "flow"), self.scheduler)
        if isinstance(eta, bool) or not isinstance(eta, (int, float)) or not eta >= 0:
            raise ValueError(f"`eta` must be a number >= 0; got {eta!r}.")
        if isinstance(self.scheduler, NanoI2VFlowMatchScheduler):
            self.scheduler.check_eta(eta)  # as its `step` will, but before any work
        return step_kwargs(self.scheduler, generator, float(eta))

    def _dynamic_shift_mu(self, latent_shape: Tuple[int, ...]) -> Optional[float]:
        """Resolution-dependent timestep shift for schedulers configured with `use_dynamic_shifting`."""
        config = self.scheduler.config
        if not config.get("use_dynamic_shifting", False):
            return None
        pt, ph, pw = self.transformer.config.patch_size
        _, _, t, h, w = latent_shape
        seq_len = (t // pt) * (h // ph) * (w // pw)
        return calculate_shift(
            seq_len, config.base_image_seq_len, config.max_image_seq_len, config.base_shift, config.max_shift
        )


def _as_prompt_list(prompt: Optional[Union[str, List[str]]], batch_size: int = 1) -> List[str]:
    if prompt is None:
        return [""] * batch_size
    if isinstance(prompt, str):
        return [prompt] * batch_size if batch_size > 1 else [prompt]
    return [p or "" for p in prompt]


def _check_prompt_type(name: str, prompt) -> None:
    if prompt is None or isinstance(prompt, str):
        return
    if not isinstance(prompt, list) or not prompt or not all(isinstance(p, str) for p in prompt):
        raise ValueError(f"`{name}` must be a str or a non-empty list of str; got {prompt!r:.80}.")


def _default_mask(embeds: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
    if mask is None:
        return torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device)
    return mask.to(embeds.device)


def _pad_tokens(x: torch.Tensor, length: int) -> torch.Tensor:
    """Zero-pad `(B, L, ...)` embeddings or masks to `length` tokens (padding is masked out)."""
    missing = length - x.shape[1]
    if missing == 0:
        return x
    return torch.cat([x, x.new_zeros((x.shape[0], missing, *x.shape[2:]))], dim=1)


def _video_list(video, name: str) -> List[List[PIL.Image.Image]]:
    """A video condition as a list of videos (each a list of RGB frames): one video (a list of images, an
    `(F, H, W, C)` array, an `(F, C, H, W)` tensor) or several (a list of those, or a 5-D array or tensor)."""
    if isinstance(video, (np.ndarray, torch.Tensor)) and video.ndim == 5:
        videos = list(video)
    elif isinstance(video, (list, tuple)) and video and all(
        isinstance(item, (list, tuple)) or (isinstance(item, (np.ndarray, torch.Tensor)) and item.ndim == 4)
        for item in video
    ):
        videos = list(video)
    else:
        videos = [video]
    try:
        return [to_rgb_images(list(v) if isinstance(v, tuple) else v) for v in videos]
    except ValueError as error:
        raise ValueError(f"`{name}`: {error}") from None


def _prompt_batch_size(prompt, prompt_embeds) -> Optional[int]:
    if isinstance(prompt, list):
        return len(prompt)
    if isinstance(prompt, str):
        return 1
    if prompt_embeds is not None:
        return prompt_embeds.shape[0]
    return None

