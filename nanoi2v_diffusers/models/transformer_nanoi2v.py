"""NanoI2VTransformer3DModel: the diffusion transformer over video latents (docs/design.md, "Components").

The noisy latents and the image condition are concatenated on channels, cut into 3D patches and
embedded as tokens `(B, N, dim)` with `N = T' * H' * W'` (the patch grid). Each block applies
adaLN-modulated self-attention (QK RMSNorm, 3D RoPE), cross-attention to the text tokens and an MLP;
a final adaLN + linear maps the tokens back to patches. Optional text-refiner blocks let the text
tokens attend to each other before the video tokens read them.

Attention is diffusers' kind (docs/design.md, "diffusers' contracts"): `NanoI2VAttention` modules with
`to_q`/`to_k`/`to_v`/`to_out.0` and a processor that calls diffusers' attention dispatch, so attention
backends, processors, QKV fusion, attention slicing, LoRA's default targets and the step caches work as
on Wan. RoPE tables are built once per (grid, device, dtype) outside the blocks, and the blocks have no
data-dependent Python control flow, so `compile_repeated_blocks()` compiles them without graph breaks. In training, the
adaLN norms, the feed-forward and (off CUDA) the QK RMSNorm keep fewer activations for backward than
plain autograd would (`_LayerNormModulate`, `_GELULinear`, `_RMSNorm`).
"""

import copy
import math
from collections import OrderedDict
from typing import Any, Dict, Optional, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.loaders import PeftAdapterMixin
from diffusers.models.attention import AttentionMixin, AttentionModuleMixin, FeedForward
from diffusers.models.attention_dispatch import dispatch_attention_fn
from diffusers.models.cache_utils import CacheMixin
from diffusers.models.embeddings import PixArtAlphaTextProjection, TimestepEmbedding, Timesteps
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from diffusers.models.modeling_utils import ModelMixin
from diffusers.utils import apply_lora_scale

from ..safe_loading import SafeLoadingMixin, check_config_minimums
from ..size_rules import check_multiple

# Size presets, DiT-style: S and B follow DiT-S/B (width 384/768, 12 layers, 6/12 heads of 64).
TRANSFORMER_PRESETS: Dict[str, Dict[str, int]] = {
    "tiny": {"num_layers": 4, "num_attention_heads": 4, "attention_head_dim": 32, "ffn_dim": 512},
    "S": {"num_layers": 12, "num_attention_heads": 6, "attention_head_dim": 64, "ffn_dim": 1536},
    "B": {"num_layers": 12, "num_attention_heads": 12, "attention_head_dim": 64, "ffn_dim": 3072},
}

ATTENTION_TYPES = ("full", "factorized")
# Modulation vectors (shift, scale, gate) per adaLN-modulated sub-layer.
MODULATIONS_PER_SUBLAYER = 3
# RoPE tables kept per model: one per (grid, device, dtype) seen recently; enough for a
# resolution sweep without growing without bound.
MAX_CACHED_ROPE_GRIDS = 8


def _num_modulations(attention_type: str) -> int:
    """Modulation vectors per block, ordered self-attention, MLP, [temporal self-attention].

    Cross-attention is not modulated (its output projection starts at zero instead)."""
    num_self_attentions = 2 if attention_type == "factorized" else 1
    return MODULATIONS_PER_SUBLAYER * (num_self_attentions + 1)


def _rope_axis_dims(attention_head_dim: int) -> Tuple[int, int, int]:
    """Split a head's channels over (t, h, w): height and width get equal even shares, time the rest."""
    spatial = 2 * (attention_head_dim // 6)
    return attention_head_dim - 2 * spatial, spatial, spatial


def apply_rotary_emb(x: torch.Tensor, freqs_cos: torch.Tensor, freqs_sin: torch.Tensor) -> torch.Tensor:
    """Rotate channel pairs (i, i + D/2) of `x` (B, N, heads, D) with the (N, 1, D) tables of
    `NanoI2VRotaryPosEmbed`: `freqs_cos = [cos, cos]`, `freqs_sin = [-sin, sin]` over the two halves."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.addcmul(x * freqs_cos, torch.cat((x2, x1), dim=-1), freqs_sin)


# The memory-saving autograd Functions below in training; False gives plain autograd (the same values), so that
# benchmarks/bench_train_gpu.py --plain_autograd can measure what they cost or save under torch.compile.
SAVE_ACTIVATION_MEMORY = True


def _modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return torch.addcmul(shift, x, 1 + scale)  # one fused pass for x * (1 + scale) + shift


class _LayerNormModulate(torch.autograd.Function):
    """LayerNorm without affine, then `_modulate`, keeping only the normalised `x_hat` for backward.

    Autograd would keep both the norm's input (for the norm's gradient) and `x_hat` (for the scale's).
    The norm's gradient needs only `x_hat` and the rows' rstd: torch's fused LayerNorm backward, given
    `x_hat` as an input with mean 0 and rstd 1, returns it divided by rstd (bit for bit the same
    gradient). One activation of the residual width less per norm, and nothing recomputed."""

    @staticmethod
    def forward(ctx, x, shift, scale, eps):
        normalized, _, rstd = torch.native_layer_norm(x, x.shape[-1:], None, None, eps)
        ctx.save_for_backward(normalized, rstd, scale)
        ctx.shift_shape, ctx.shift_dtype = shift.shape, shift.dtype
        return _modulate(normalized, shift, scale)

    @staticmethod
    def backward(ctx, grad):
        normalized, rstd, scale = ctx.saved_tensors
        grad_x = grad_shift = grad_scale = None
        if ctx.needs_input_grad[0]:
            grad_normalized = (grad * (1 + scale)).to(normalized.dtype)
            mean0, rstd1 = torch.zeros_like(rstd), torch.ones_like(rstd)
            grad_x = torch.ops.aten.native_layer_norm_backward(
                grad_normalized, normalized, normalized.shape[-1:], mean0, rstd1, None, None, [True, False, False]
            )[0]
            grad_x = grad_x.mul_(rstd).to(normalized.dtype)
        if ctx.needs_input_grad[1]:
            grad_shift = grad.sum_to_size(ctx.shift_shape).to(ctx.shift_dtype)
        if ctx.needs_input_grad[2]:
            grad_scale = (grad * normalized).sum_to_size(scale.shape).to(scale.dtype)
        return grad_x, grad_shift, grad_scale, None


class ModulatedLayerNorm(nn.Module):
    """adaLN: LayerNorm without affine parameters, then `* (1 + scale) + shift` per sample.

    x: (B, N, dim); shift, scale: (B, 1, dim). The same values as `nn.LayerNorm(dim, elementwise_affine=False)`
    followed by the modulation; with autograd on, one saved activation instead of two (`_LayerNormModulate`).
    """

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.dim = dim
        self.eps = eps

    def forward(self, x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and SAVE_ACTIVATION_MEMORY:
            return _LayerNormModulate.apply(x, shift, scale, self.eps)
        return _modulate(F.layer_norm(x, (self.dim,), eps=self.eps), shift, scale)

    def extra_repr(self) -> str:
        return f"{self.dim}, eps={self.eps}"


class _RMSNorm(torch.autograd.Function):
    """RMSNorm (computed in at least float32) that keeps its input and the rows' rstd for backward, not the
    normalised output: what torch's fused CUDA kernel keeps, where its composite CPU path keeps both."""

    @staticmethod
    def forward(ctx, x, weight, eps):
        x_wide = x.to(torch.promote_types(x.dtype, torch.float32))
        rstd = torch.rsqrt(x_wide.square().mean(-1, keepdim=True) + eps)
        ctx.save_for_backward(x, rstd, weight)
        return (x_wide * rstd * weight).to(x.dtype)

    @staticmethod
    def backward(ctx, grad):
        x, rstd, weight = ctx.saved_tensors
        normalized = x.to(rstd.dtype) * rstd  # recomputed: one multiply
        grad = grad.to(rstd.dtype)
        grad_weight = (grad * normalized).sum_to_size(weight.shape) if ctx.needs_input_grad[1] else None
        grad_normalized = grad * weight
        grad_x = rstd * (grad_normalized - normalized * (grad_normalized * normalized).mean(-1, keepdim=True))
        return grad_x.to(x.dtype), grad_weight, None


class QKRMSNorm(nn.RMSNorm):
    """`nn.RMSNorm` (same parameters) for per-head queries and keys.

    Training off CUDA it is `_RMSNorm` (float32 accumulation, the input's dtype out, so bf16 under autocast
    with a float32 weight), which keeps one activation per call fewer than torch's composite CPU path.
    Otherwise it is torch's `rms_norm` with the weight cast to the input's dtype: its fused CUDA kernel
    needs one dtype for both, and keeps no more for backward than `_RMSNorm`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and not x.is_cuda and SAVE_ACTIVATION_MEMORY:
            return _RMSNorm.apply(x, self.weight, self.eps)
        return F.rms_norm(x, self.normalized_shape, self.weight.to(x.dtype), self.eps)


class _GELULinear(torch.autograd.Function):
    """`F.linear(F.gelu(hidden), weight, bias)` keeping only `hidden` for backward.

    Autograd would keep both the GELU's input (for its gradient) and its output (for the weight's
    gradient), 2 x ffn_dim values per token; the output is recomputed in backward instead (one GELU,
    no matrix product). Under autocast the product runs in the dtype it ran in forward."""

    @staticmethod
    def forward(ctx, hidden, weight, bias):
        out = F.linear(F.gelu(hidden), weight, bias)
        ctx.save_for_backward(hidden, weight)
        ctx.has_bias = bias is not None
        return out

    @staticmethod
    def backward(ctx, grad_out):
        hidden, weight = ctx.saved_tensors
        compute_weight = weight.to(grad_out.dtype)
        grad_hidden = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_activation = (grad_out @ compute_weight).to(hidden.dtype)
            grad_hidden = torch.ops.aten.gelu_backward(grad_activation, hidden)
        if ctx.needs_input_grad[1]:
            activation = F.gelu(hidden).to(grad_out.dtype).flatten(0, -2)  # recomputed: (tokens, ffn_dim)
            grad_weight = (grad_out.flatten(0, -2).T @ activation).to(weight.dtype)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = grad_out.flatten(0, -2).sum(0).to(weight.dtype)  # nn.Linear: bias dtype = weight dtype
        return grad_hidden, grad_weight, grad_bias


def _is_bare_linear(module: nn.Module) -> bool:
    """An `nn.Linear` whose weights can be used without calling it: no LoRA layer in its place, no hooks
    (DeepSpeed ZeRO-3 gathers a layer's weights in one, diffusers' layerwise casting replaces `forward`)."""
    return (
        type(module) is nn.Linear
        and not module._forward_pre_hooks
        and not module._forward_hooks
        and "forward" not in vars(module)
    )


class NanoI2VFeedForward(FeedForward):
    """diffusers' GELU `FeedForward` (same modules, so the same weight names) whose training forward
    keeps one (B, N, ffn_dim) activation instead of two (`_GELULinear`)."""

    def __init__(self, dim: int, ffn_dim: int):
        super().__init__(dim, inner_dim=ffn_dim, activation_fn="gelu")  # exact GELU, no dropout

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        activation, output = self.net[0], self.net[-1]
        hidden = activation.proj(hidden_states)  # (B, N, ffn_dim)
        if torch.is_grad_enabled() and SAVE_ACTIVATION_MEMORY and _is_bare_linear(output):
            return _GELULinear.apply(hidden, output.weight, output.bias)
        return output(activation.gelu(hidden))


def _qk_norm(head_dim: int, enabled: bool, eps: float) -> nn.Module:
    return QKRMSNorm(head_dim, eps=eps) if enabled else nn.Identity()


class NanoI2VRotaryPosEmbed(nn.Module):
    """3D rotary position embedding for any (T', H', W') patch grid, computed at call time.

    Tables hold no parameters and are not saved; they are cached per grid, device, dtype and
    inference mode (a table made under `torch.inference_mode` cannot be used for autograd).
    """

    def __init__(self, attention_head_dim: int, theta: float = 10000.0):
        super().__init__()
        self.axis_dims = _rope_axis_dims(attention_head_dim)
        self.theta = theta
        self._cache: "OrderedDict[tuple, Tuple[torch.Tensor, torch.Tensor]]" = OrderedDict()

    def _axis_angles(self, length: int, dim: int) -> torch.Tensor:
        inv_freq = self.theta ** (-torch.arange(0, dim, 2, dtype=torch.float64) / dim)
        return torch.outer(torch.arange(length, dtype=torch.float64), inv_freq)  # (length, dim / 2)

    def _angles(self, grid: Tuple[int, int, int]) -> torch.Tensor:
        """Rotation angle of each token and frequency: (N, 1, D / 2), the middle axis broadcasts over heads."""
        t, h, w = grid
        angles_t, angles_h, angles_w = (self._axis_angles(n, d) for n, d in zip(grid, self.axis_dims))
        angles = torch.cat(
            [
                angles_t[:, None, None].expand(t, h, w, -1),
                angles_h[None, :, None].expand(t, h, w, -1),
                angles_w[None, None, :].expand(t, h, w, -1),
            ],
            dim=-1,
        )
        return angles.reshape(t * h * w, 1, -1)

    def forward(
        self, grid: Tuple[int, int, int], device: torch.device, dtype: torch.dtype
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """-> (freqs_cos, freqs_sin), each (N, 1, D), laid out for `apply_rotary_emb`."""
        key = (tuple(grid), torch.device(device), dtype, torch.is_inference_mode_enabled())
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        # Built in float64 on the CPU (exact angles; some devices lack float64), then cast once.
        angles = self._angles(grid)
        cos, sin = angles.cos(), angles.sin()
        tables = tuple(torch.cat(halves, dim=-1).to(device, dtype) for halves in ((cos, cos), (-sin, sin)))
        self._cache[key] = tables
        if len(self._cache) > MAX_CACHED_ROPE_GRIDS:
            self._cache.popitem(last=False)
        return tables


def attend(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    axes: str = "full",
    num_frames: int = 1,
    attention_mask: Optional[torch.Tensor] = None,
    backend=None,
    slice_size: Optional[int] = None,
) -> torch.Tensor:
    """Attention of (B, N, heads, D) queries over (B, L, heads, D) keys and values through diffusers'
    `dispatch_attention_fn` (so `set_attention_backend` picks the kernel), `slice_size` heads at a time when set.

    `axes` picks which tokens attend to each other: "full" (all), "spatial" (within a frame: (B*T, S) rows) or
    "temporal" (one position across frames: (B*S, T) rows), for N = T * S video tokens of `num_frames` frames.
    """
    batch, tokens, heads, dim = query.shape
    per_frame = tokens // num_frames
    if axes == "spatial":
        query, key, value = (x.reshape(batch * num_frames, per_frame, heads, dim) for x in (query, key, value))
    elif axes == "temporal":
        query, key, value = (
            x.reshape(batch, num_frames, per_frame, heads, dim).transpose(1, 2).reshape(-1, num_frames, heads, dim)
            for x in (query, key, value)
        )
    step = slice_size or heads
    if step >= heads:
        out = dispatch_attention_fn(query, key, value, attn_mask=attention_mask, backend=backend)
    else:
        out = torch.cat([dispatch_attention_fn(query[:, :, i : i + step], key[:, :, i : i + step],
                                               value[:, :, i : i + step], attn_mask=attention_mask, backend=backend)
                         for i in range(0, heads, step)], dim=2)  # fmt: skip
    if axes == "spatial":
        return out.reshape(batch, tokens, heads, dim)
    if axes == "temporal":
        return out.reshape(batch, per_frame, num_frames, heads, dim).transpose(1, 2).reshape(batch, tokens, heads, dim)
    return out


def _qkv_projections(attn: "NanoI2VAttention", hidden_states: torch.Tensor, encoder_hidden_states):
    """(query, key, value), each (B, tokens, inner_dim), from the separate projections or the fused ones."""
    context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
    if not attn.fused_projections:
        return attn.to_q(hidden_states), attn.to_k(context), attn.to_v(context)
    if attn.is_cross_attention:
        return (attn.to_q(hidden_states), *attn.to_kv(context).chunk(2, dim=-1))
    return attn.to_qkv(hidden_states).chunk(3, dim=-1)


class NanoI2VAttnProcessor:
    """`NanoI2VAttention`'s computation: projections, per-head QK RMSNorm, 3D RoPE (self-attention), attention
    through diffusers' dispatch (`_attention_backend`, set by `set_attention_backend`), output projection."""

    _attention_backend = None
    _parallel_config = None

    def __call__(
        self,
        attn: "NanoI2VAttention",
        hidden_states: torch.Tensor,
        encoder_hidden_states: Optional[torch.Tensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        rotary_emb: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
        num_frames: int = 1,
    ) -> torch.Tensor:
        query, key, value = _qkv_projections(attn, hidden_states, encoder_hidden_states)
        query = attn.norm_q(query.unflatten(-1, (attn.heads, -1)))  # (B, N, heads, D)
        key = attn.norm_k(key.unflatten(-1, (attn.heads, -1)))
        value = value.unflatten(-1, (attn.heads, -1))
        if rotary_emb is not None:
            query, key = apply_rotary_emb(query, *rotary_emb), apply_rotary_emb(key, *rotary_emb)
        out = attend(query, key, value, attn.axes, num_frames, attention_mask, self._attention_backend, attn.slice_size)
        return attn.to_out[1](attn.to_out[0](out.flatten(2)))


class NanoI2VAttention(nn.Module, AttentionModuleMixin):
    """Multi-head attention with diffusers' projection names (`to_q`, `to_k`, `to_v`, `to_out.0`), per-head QK
    RMSNorm, and its computation in a processor (`NanoI2VAttnProcessor`), as diffusers' own attention modules:
    `set_attn_processor`, `set_attention_backend`, `fuse_qkv_projections` and LoRA's default targets work on it.

    Self-attention (`is_cross_attention=False`) gets the 3D RoPE; `axes` restricts it to "spatial" (same frame)
    or "temporal" (same position) tokens. RoPE is relative, so the full 3D table serves all three: the angles
    of the axes a token pair shares cancel in q.k.
    """

    _default_processor_cls = NanoI2VAttnProcessor
    _available_processors = [NanoI2VAttnProcessor]

    def __init__(self, dim: int, heads: int, dim_head: int, qk_norm: bool = True, eps: float = 1e-6,
                 is_cross_attention: bool = False, axes: str = "full", processor=None):  # fmt: skip
        super().__init__()
        self.heads, self.inner_dim, self.axes = heads, heads * dim_head, axes
        self.is_cross_attention = is_cross_attention
        self.slice_size: Optional[int] = None  # heads per attention call (attention slicing); None: all at once
        self.to_q = nn.Linear(dim, self.inner_dim)
        self.to_k = nn.Linear(dim, self.inner_dim)
        self.to_v = nn.Linear(dim, self.inner_dim)
        self.to_out = nn.ModuleList([nn.Linear(self.inner_dim, dim), nn.Dropout(0.0)])
        self.norm_q = _qk_norm(dim_head, qk_norm, eps)
        self.norm_k = _qk_norm(dim_head, qk_norm, eps)
        self.set_processor(processor or self._default_processor_cls())

    @torch.no_grad()
    def fuse_projections(self) -> None:
        """One projection for query, key and value (self-attention), or for key and value (cross-attention)."""
        if self.fused_projections:
            return
        names = ("to_k", "to_v") if self.is_cross_attention else ("to_q", "to_k", "to_v")
        layers = [getattr(self, name) for name in names]
        fused = nn.Linear(layers[0].in_features, sum(layer.out_features for layer in layers), device="meta")
        fused.load_state_dict({"weight": torch.cat([layer.weight for layer in layers]),
                               "bias": torch.cat([layer.bias for layer in layers])}, assign=True)  # fmt: skip
        setattr(self, "to_kv" if self.is_cross_attention else "to_qkv", fused)
        self.fused_projections = True

    def unfuse_projections(self) -> None:
        for name in ("to_qkv", "to_kv"):
            if hasattr(self, name):
                delattr(self, name)
        self.fused_projections = False

    def set_attention_slice(self, slice_size: Optional[int]) -> None:
        """Compute attention `slice_size` heads at a time (less memory, more calls); None: all heads at once."""
        if slice_size is not None and not 1 <= slice_size <= self.heads:
            raise ValueError(f"slice_size must be between 1 and the number of heads ({self.heads}); got {slice_size}.")
        self.slice_size = slice_size

    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: Optional[torch.Tensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        rotary_emb: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
        num_frames: int = 1,
        has_text: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        out = self.processor(self, hidden_states, encoder_hidden_states, attention_mask, rotary_emb,
                             num_frames=num_frames)  # fmt: skip
        return out if has_text is None else out * has_text  # rows whose tokens are all padding get no text signal


def convert_fused_attention_keys(state_dict: Dict[str, torch.Tensor], lora: bool = False) -> Dict[str, torch.Tensor]:
    """Keys saved before the attention took diffusers' names, in place: `to_qkv` -> `to_q`, `to_k`, `to_v`;
    `to_kv` -> `to_k`, `to_v`; `to_out` -> `to_out.0`. With `lora`, a fused projection's LoRA is split exactly: its
    `lora_A` goes to each part, its `lora_B` is cut like the weight. Returns `state_dict`."""
    parts = {"to_qkv": ("to_q", "to_k", "to_v"), "to_kv": ("to_k", "to_v")}
    for key in list(state_dict):
        path, _, leaf = key.rpartition(".")  # e.g. "blocks.0.attn1.to_qkv", "weight" (or "...to_qkv.lora_A", "weight")
        if lora:
            path, _, adapter = path.rpartition(".")
            leaf = f"{adapter}.{leaf}"
        module, _, name = path.rpartition(".")
        if name in parts:
            value = state_dict.pop(key)
            chunks = [value] * len(parts[name]) if leaf.startswith("lora_A") else value.chunk(len(parts[name]))
            for part, chunk in zip(parts[name], chunks):
                state_dict.setdefault(f"{module}.{part}.{leaf}", chunk)
        elif name == "to_out" and (leaf in ("weight", "bias") or lora):
            state_dict[f"{path}.0.{leaf}"] = state_dict.pop(key)
    return state_dict


class NanoI2VTextRefinerBlock(nn.Module):
    """Self-attention + MLP over the projected text tokens, before any video token reads them (as the
    token refiner of HunyuanVideo or the context refiner of Lumina 2).

    A frozen text encoder's token for a motion word knows little of which object its clause names;
    letting the tokens mix again, trained for this task, can put both in one token. Both output
    projections start at zero, so a fresh block is the identity: blocks can be added to a trained model.
    """

    def __init__(self, dim: int, ffn_dim: int, num_heads: int, head_dim: int, qk_norm: bool, eps: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        # Called with the text as both query and context: self-attention over the text, without RoPE.
        self.attn = NanoI2VAttention(dim, num_heads, head_dim, qk_norm, eps, is_cross_attention=True)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.ffn = NanoI2VFeedForward(dim, ffn_dim)

    def forward(
        self,
        context: torch.Tensor,
        attention_mask: Optional[torch.Tensor] = None,
        has_text: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        # context: (B, L, dim); padding tokens are masked as keys, and rows without text stay as they are.
        normed = self.norm1(context)
        context = context + self.attn(normed, normed, attention_mask, has_text=has_text)
        return context + self.ffn(self.norm2(context))


class NanoI2VTransformerBlock(nn.Module):
    """adaLN-modulated self-attention (full, or spatial then temporal) + cross-attention + MLP.

    All gates come from the modulation, which starts at zero, so a fresh block is the identity.
    """

    def __init__(
        self,
        dim: int,
        ffn_dim: int,
        num_heads: int,
        head_dim: int,
        qk_norm: bool = True,
        cross_attn_norm: bool = True,
        eps: float = 1e-6,
        attention_type: str = "full",
    ):
        super().__init__()
        factorized = attention_type == "factorized"
        self.norm1 = ModulatedLayerNorm(dim, eps=eps)
        self.attn1 = NanoI2VAttention(dim, num_heads, head_dim, qk_norm, eps, axes="spatial" if factorized else "full")
        self.attn_temporal = (
            NanoI2VAttention(dim, num_heads, head_dim, qk_norm, eps, axes="temporal") if factorized else None
        )
        self.norm2 = nn.LayerNorm(dim, eps=eps) if cross_attn_norm else nn.Identity()
        self.attn2 = NanoI2VAttention(dim, num_heads, head_dim, qk_norm, eps, is_cross_attention=True)
        self.norm3 = ModulatedLayerNorm(dim, eps=eps)
        # Exact (erf) GELU: the tanh form only approximates it and is 2x slower forward + backward on CPU.
        self.ffn = NanoI2VFeedForward(dim, ffn_dim)
        # Per-block offsets on the shared timestep modulation (adaLN-single, as PixArt-alpha and Wan).
        self.scale_shift_table = nn.Parameter(torch.zeros(1, _num_modulations(attention_type), dim))

    def _modulated_attention(self, attn, hidden_states, shift, scale, gate, rotary_emb, num_frames):
        attn_output = attn(self.norm1(hidden_states, shift, scale), rotary_emb=rotary_emb, num_frames=num_frames)
        return torch.addcmul(hidden_states, attn_output, gate)

    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        modulation: torch.Tensor,
        rotary_emb: Tuple[torch.Tensor, torch.Tensor],
        num_frames: int,
        encoder_attention_mask: Optional[torch.Tensor] = None,
        has_text: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        # hidden_states: (B, N, dim); modulation: (B, num_modulations, dim) -> one (shift, scale, gate)
        # triple per modulated sub-layer, each (B, 1, dim); the temporal triple exists only if factorized.
        groups = (self.scale_shift_table + modulation).split(MODULATIONS_PER_SUBLAYER, dim=1)
        attn_mod, ffn_mod, *temporal_mod = (group.chunk(MODULATIONS_PER_SUBLAYER, dim=1) for group in groups)

        hidden_states = self._modulated_attention(self.attn1, hidden_states, *attn_mod, rotary_emb, num_frames)
        if self.attn_temporal is not None:
            hidden_states = self._modulated_attention(
                self.attn_temporal, hidden_states, *temporal_mod[0], rotary_emb, num_frames
            )

        hidden_states = hidden_states + self.attn2(
            self.norm2(hidden_states), encoder_hidden_states, encoder_attention_mask, has_text=has_text
        )

        ffn_shift, ffn_scale, ffn_gate = ffn_mod
        ff_output = self.ffn(self.norm3(hidden_states, ffn_shift, ffn_scale))
        return torch.addcmul(hidden_states, ff_output, ffn_gate)


def _register_block_for_caches() -> None:
    """Tell diffusers' cache hooks where a block's hidden states are: its first argument and its only output.

    Done on first use, not at import: diffusers' registry imports all of its own transformers first (seconds)."""
    from diffusers.hooks._helpers import TransformerBlockMetadata, TransformerBlockRegistry

    metadata = TransformerBlockMetadata(return_hidden_states_index=0, return_encoder_hidden_states_index=None)
    TransformerBlockRegistry.register(model_class=NanoI2VTransformerBlock, metadata=metadata)


class NanoI2VTransformer3DModel(
    SafeLoadingMixin, ModelMixin, ConfigMixin, PeftAdapterMixin, CacheMixin, AttentionMixin
):
    r"""
    Diffusion transformer for image-to-video flow matching: predicts the velocity `noise - x0`.

    Args:
        patch_size (`Tuple[int, int, int]`, defaults to `(1, 2, 2)`): Patch size over (T, H, W) of the latents.
        in_channels (`int`, defaults to 33): All input channels: noisy latents + image condition
            (latents + mask, see `nanoi2v_diffusers.conditioning`).
        out_channels (`int`, defaults to 16): Latent channels of the noisy input and of the output.
        num_layers (`int`, defaults to 12): Number of transformer blocks.
        num_attention_heads (`int`, defaults to 6): Attention heads; width = heads * head dim.
        attention_head_dim (`int`, defaults to 64): Channels per head (even, at least 6, for 3D RoPE).
        ffn_dim (`int`, defaults to 1536): Hidden size of the MLP.
        text_dim (`int`, defaults to 384): Hidden size of the text encoder.
        freq_dim (`int`, defaults to 256): Size of the sinusoidal timestep embedding.
        qk_norm (`bool`, defaults to `True`): RMSNorm on each head's queries and keys.
        cross_attn_norm (`bool`, defaults to `True`): LayerNorm before cross-attention.
        eps (`float`, defaults to 1e-6): Epsilon of the normalisation layers.
        attention_type (`str`, defaults to `"full"`): `"full"` 3D attention, or `"factorized"`: spatial
            attention within each frame, then temporal attention across frames.
        rope_theta (`float`, defaults to 10000.0): Base of the rotary embedding frequencies.
        num_text_refiner_layers (`int`, defaults to 0): `NanoI2VTextRefinerBlock`s applied to the projected
            text tokens before the transformer blocks; 0 reads the text encoder's tokens as they are.
    """

    # The smallest value of each count and size: a config below them is refused, naming the key.
    _config_minimums = {"patch_size": 1, "in_channels": 1, "out_channels": 1, "num_layers": 1, "num_attention_heads": 1,
                        "attention_head_dim": 6, "ffn_dim": 1, "text_dim": 1, "freq_dim": 2,
                        "num_text_refiner_layers": 0}  # fmt: skip
    _supports_gradient_checkpointing = True
    _no_split_modules = ["NanoI2VTransformerBlock"]
    _repeated_blocks = ["NanoI2VTransformerBlock"]
    _skip_layerwise_casting_patterns = ["patch_embedding", "time_embedder", "time_modulation", "norm"]
    # Configs saved before these keys existed load with their defaults (see nanoi2v_diffusers.safe_loading).
    _config_keys_added_later = ("num_text_refiner_layers",)

    @register_to_config
    def __init__(
        self,
        patch_size: Tuple[int, int, int] = (1, 2, 2),
        in_channels: int = 33,
        out_channels: int = 16,
        num_layers: int = 12,
        num_attention_heads: int = 6,
        attention_head_dim: int = 64,
        ffn_dim: int = 1536,
        text_dim: int = 384,
        freq_dim: int = 256,
        qk_norm: bool = True,
        cross_attn_norm: bool = True,
        eps: float = 1e-6,
        attention_type: str = "full",
        rope_theta: float = 10000.0,
        num_text_refiner_layers: int = 0,
    ):
        super().__init__()
        check_config_minimums(type(self), self.config, type(self).__name__)
        self._check_config(patch_size, in_channels, out_channels, attention_head_dim, attention_type)
        inner_dim = num_attention_heads * attention_head_dim
        num_modulations = _num_modulations(attention_type)

        self.rope = NanoI2VRotaryPosEmbed(attention_head_dim, rope_theta)
        self.patch_embedding = nn.Linear(in_channels * math.prod(patch_size), inner_dim)
        self.timesteps_proj = Timesteps(freq_dim, flip_sin_to_cos=True, downscale_freq_shift=0)
        self.time_embedder = TimestepEmbedding(freq_dim, inner_dim)
        self.time_modulation = nn.Sequential(nn.SiLU(), nn.Linear(inner_dim, num_modulations * inner_dim))
        self.text_embedder = PixArtAlphaTextProjection(text_dim, inner_dim, act_fn="gelu_tanh")
        self.text_refiner = nn.ModuleList(
            [
                NanoI2VTextRefinerBlock(inner_dim, ffn_dim, num_attention_heads, attention_head_dim, qk_norm, eps)
                for _ in range(num_text_refiner_layers)
            ]
        )

        self.blocks = nn.ModuleList(
            [
                NanoI2VTransformerBlock(
                    inner_dim,
                    ffn_dim,
                    num_attention_heads,
                    attention_head_dim,
                    qk_norm,
                    cross_attn_norm,
                    eps,
                    attention_type,
                )
                for _ in range(num_layers)
            ]
        )

        self.norm_out = ModulatedLayerNorm(inner_dim, eps=eps)
        self.scale_shift_table = nn.Parameter(torch.zeros(1, 2, inner_dim))  # final (shift, scale) offsets
        self.proj_out = nn.Linear(inner_dim, out_channels * math.prod(patch_size))
        self.gradient_checkpointing = False
        self._zero_init_outputs()
        self._register_load_state_dict_pre_hook(self._convert_legacy_keys)

    def enable_cache(self, config) -> None:
        """Turn on one of diffusers' step caches, as on its own transformers (`CacheMixin.enable_cache`): the
        block-level ones (`FirstBlockCacheConfig`, `MagCacheConfig`, `TaylorSeerCacheConfig` with
        `cache_identifiers=[r"^blocks\\.\\d+$"]`) and the attention-level ones (`PyramidAttentionBroadcastConfig`,
        `FasterCacheConfig`), which find the `NanoI2VAttention` modules of `blocks`. FasterCache's unconditional
        skipping expects the pipeline's plain CFG batch [uncond, cond] (two branches)."""
        from diffusers.hooks import FasterCacheConfig

        _register_block_for_caches()
        names = getattr(config, "_unconditional_conditional_input_kwargs_identifiers", ())
        if isinstance(config, FasterCacheConfig) and "condition" not in names:
            # The image condition is batched per guidance branch like the latents: FasterCache must split it too.
            config = copy.copy(config)
            config._unconditional_conditional_input_kwargs_identifiers = (*names, "condition")
        super().enable_cache(config)

    def set_attention_slice(self, slice_size: Union[str, int, None]) -> None:
        """Attention `slice_size` heads at a time in every attention module ("auto": half the heads, "max": one;
        None: all at once), which `DiffusionPipeline.enable_attention_slicing` calls."""
        heads = self.config.num_attention_heads
        size = {"auto": max(1, heads // 2), "max": 1}.get(slice_size, slice_size)
        for module in self.modules():
            if isinstance(module, NanoI2VAttention):
                module.set_attention_slice(size)

    def _fix_state_dict_keys_on_load(self, state_dict: Dict[str, torch.Tensor]) -> None:
        """diffusers' hook on loading a checkpoint: weights saved with the fused projection names load unchanged."""
        super()._fix_state_dict_keys_on_load(state_dict)
        convert_fused_attention_keys(state_dict)

    @staticmethod
    def _convert_legacy_keys(state_dict, *args) -> None:
        """`load_state_dict` pre-hook (a training checkpoint, a state dict in memory): the same conversion."""
        convert_fused_attention_keys(state_dict)

    @staticmethod
    def _check_config(patch_size, in_channels, out_channels, attention_head_dim, attention_type):
        if len(patch_size) != 3:
            raise ValueError(f"patch_size must be 3 ints (t, h, w); got {patch_size}.")
        if in_channels < out_channels:
            raise ValueError(
                f"in_channels (noisy latents + condition) must be >= out_channels; got {in_channels} < {out_channels}."
            )
        if attention_head_dim % 2 or attention_head_dim < 6:
            raise ValueError(
                "attention_head_dim must be even and at least 6 to split 3D RoPE over (t, h, w); "
                f"got {attention_head_dim}, nearest valid is {max(6, attention_head_dim + 1)}."
            )
        if attention_type not in ATTENTION_TYPES:
            raise ValueError(f"attention_type must be one of {ATTENTION_TYPES}; got {attention_type!r}.")

    def _zero_init_outputs(self):
        """adaLN-Zero: the modulation (so every gate), the cross-attention outputs and the final
        projection start at zero: each fresh block is the identity and the model outputs zeros. The
        text refiner's attention and MLP outputs too, so each fresh refiner block is the identity."""
        refiner_outputs = [layer for block in self.text_refiner for layer in (block.attn.to_out[0], block.ffn.net[-1])]
        cross_attention_outputs = [block.attn2.to_out[0] for block in self.blocks]
        for module in (self.time_modulation[1], self.proj_out, *cross_attention_outputs, *refiner_outputs):
            nn.init.zeros_(module.weight)
            nn.init.zeros_(module.bias)

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> "NanoI2VTransformer3DModel":
        """Build a model from `TRANSFORMER_PRESETS[name]`; keyword overrides win over the preset."""
        if name not in TRANSFORMER_PRESETS:
            raise ValueError(f"Unknown transformer preset {name!r}; choose one of {sorted(TRANSFORMER_PRESETS)}.")
        return cls(**{**TRANSFORMER_PRESETS[name], **overrides})

    def _check_inputs(self, hidden_states, encoder_hidden_states, encoder_attention_mask, condition):
        config = self.config
        if hidden_states.ndim != 5:
            raise ValueError(f"hidden_states must be (B, C, T, H, W); got shape {tuple(hidden_states.shape)}.")
        batch_size, channels, *sizes = hidden_states.shape
        if channels != config.out_channels:
            raise ValueError(
                f"hidden_states must have out_channels={config.out_channels} channels (the noisy latents; the image "
                f"condition goes in `condition`); got {channels}."
            )
        for axis, size, patch in zip(("frames (T)", "height (H)", "width (W)"), sizes, config.patch_size):
            check_multiple(f"hidden_states {axis}", size, patch, why="the patch size")
        expected = (batch_size, config.in_channels - config.out_channels, *sizes)
        if condition is not None and tuple(condition.shape) != expected:
            raise ValueError(
                f"condition must have shape {expected} (in_channels - out_channels = {expected[1]} channels); "
                f"got {tuple(condition.shape)}."
            )
        if encoder_hidden_states.ndim != 3 or encoder_hidden_states.shape[::2] != (batch_size, config.text_dim):
            raise ValueError(
                f"encoder_hidden_states must be (B={batch_size}, L, text_dim={config.text_dim}); "
                f"got {tuple(encoder_hidden_states.shape)}."
            )
        expected = tuple(encoder_hidden_states.shape[:2])
        if encoder_attention_mask is not None and tuple(encoder_attention_mask.shape) != expected:
            raise ValueError(
                f"encoder_attention_mask must be (B, L) = {expected}; got {tuple(encoder_attention_mask.shape)}."
            )

    def _patchify(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, T, H, W) -> (B, N, C * p_t * p_h * p_w), tokens in (t, h, w) raster order."""
        b, c, t, h, w = x.shape
        p_t, p_h, p_w = self.config.patch_size
        x = x.view(b, c, t // p_t, p_t, h // p_h, p_h, w // p_w, p_w)
        return x.permute(0, 2, 4, 6, 1, 3, 5, 7).reshape(b, -1, c * p_t * p_h * p_w)

    def _unpatchify(self, x: torch.Tensor, grid: Tuple[int, int, int]) -> torch.Tensor:
        """(B, N, C * p_t * p_h * p_w) -> (B, C, T, H, W), the inverse of `_patchify`."""
        t, h, w = grid
        p_t, p_h, p_w = self.config.patch_size
        x = x.view(x.shape[0], t, h, w, -1, p_t, p_h, p_w)
        return x.permute(0, 4, 1, 5, 2, 6, 3, 7).reshape(x.shape[0], -1, t * p_t, h * p_h, w * p_w)

    def _embed_timestep(self, timestep, batch_size: int, dtype: torch.dtype, device: torch.device):
        """-> temb (B, dim) and the shared block modulation (B, num_modulations, dim)."""
        timestep = torch.as_tensor(timestep, device=device)
        if timestep.numel() == 1:
            timestep = timestep.reshape(1).expand(batch_size)
        elif tuple(timestep.shape) != (batch_size,):
            raise ValueError(f"timestep must be a scalar or (B={batch_size},); got shape {tuple(timestep.shape)}.")
        temb = self.time_embedder(self.timesteps_proj(timestep).to(dtype))
        modulation = self.time_modulation(temb).unflatten(1, (-1, temb.shape[-1]))
        return temb, modulation

    @staticmethod
    def _text_attention_mask(encoder_attention_mask: Optional[torch.Tensor], dtype: torch.dtype):
        """(B, L) keep-mask -> SDPA boolean mask (B, 1, 1, L) and a (B, 1, 1) flag of rows with any text.

        A row whose tokens are all padding (e.g. an empty negative prompt) would softmax over nothing
        and give NaN; it attends to its padding instead and its cross-attention output is zeroed.
        """
        if encoder_attention_mask is None:
            return None, None
        keep = encoder_attention_mask.bool()
        has_text = keep.any(dim=1)  # (B,)
        keep = keep | ~has_text[:, None]
        return keep[:, None, None, :], has_text.to(dtype).view(-1, 1, 1)

    @apply_lora_scale("attention_kwargs")
    def forward(
        self,
        hidden_states: torch.Tensor,
        timestep: Union[torch.Tensor, float],
        encoder_hidden_states: torch.Tensor,
        encoder_attention_mask: Optional[torch.Tensor] = None,
        condition: Optional[torch.Tensor] = None,
        return_dict: bool = True,
        attention_kwargs: Optional[Dict[str, Any]] = None,
    ) -> Union[Transformer2DModelOutput, Tuple[torch.Tensor]]:
        """
        Args:
            hidden_states (`torch.Tensor` of shape `(B, out_channels, T, H, W)`): Noisy latents.
            timestep (`torch.Tensor` of shape `(B,)` or scalar): Float timesteps in `[0, num_train_timesteps]`,
                i.e. `sigma * 1000` with the default scheduler.
            encoder_hidden_states (`torch.Tensor` of shape `(B, L, text_dim)`): Text encoder hidden states.
            encoder_attention_mask (`torch.Tensor` of shape `(B, L)`, *optional*): 1 keeps a text token, 0 marks
                padding. `None` keeps all.
            condition (`torch.Tensor` of shape `(B, in_channels - out_channels, T, H, W)`, *optional*): The image
                condition from `nanoi2v_diffusers.conditioning.build_image_condition`; `None` means no image.
            return_dict (`bool`, defaults to `True`): Return a `Transformer2DModelOutput` instead of a tuple.
            attention_kwargs (`dict`, *optional*): `{"scale": float}` scales the LoRA layers for this call.

        Returns:
            `Transformer2DModelOutput` with `sample` of shape `(B, out_channels, T, H, W)` (the predicted
            velocity), or the tuple `(sample,)`.
        """
        self._check_inputs(hidden_states, encoder_hidden_states, encoder_attention_mask, condition)
        batch_size, _, num_frames, height, width = hidden_states.shape
        p_t, p_h, p_w = self.config.patch_size
        grid = (num_frames // p_t, height // p_h, width // p_w)

        if condition is None:  # no image: zero latents and mask 0 (docs/design.md, "Conditioning")
            condition_channels = self.config.in_channels - self.config.out_channels
            condition = hidden_states.new_zeros((batch_size, condition_channels, num_frames, height, width))
        tokens = self.patch_embedding(self._patchify(torch.cat([hidden_states, condition], dim=1)))  # (B, N, dim)

        rotary_emb = self.rope(grid, tokens.device, tokens.dtype)
        temb, modulation = self._embed_timestep(timestep, batch_size, tokens.dtype, tokens.device)
        context = self.text_embedder(encoder_hidden_states.to(tokens.dtype))  # (B, L, dim)
        text_mask, has_text = self._text_attention_mask(encoder_attention_mask, tokens.dtype)
        for refiner_block in self.text_refiner:
            context = refiner_block(context, text_mask, has_text)

        block_args = (context, modulation, rotary_emb, grid[0], text_mask, has_text)
        for block in self.blocks:
            if torch.is_grad_enabled() and self.gradient_checkpointing:
                tokens = self._gradient_checkpointing_func(block, tokens, *block_args)
            else:
                tokens = block(tokens, *block_args)

        shift, scale = (self.scale_shift_table + temb[:, None]).chunk(2, dim=1)  # each (B, 1, dim)
        tokens = self.proj_out(self.norm_out(tokens, shift, scale))
        output = self._unpatchify(tokens, grid)

        if not return_dict:
            return (output,)
        return Transformer2DModelOutput(sample=output)
