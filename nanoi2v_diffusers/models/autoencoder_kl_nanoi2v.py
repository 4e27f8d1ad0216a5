"""Causal 3D VAE: videos (B, 3, 1 + 4k, H, W) in [-1, 1] <-> latents (B, 16, 1 + k, H / 8, W / 8).

Every convolution is causal in time (padded on the past side only) and every normalisation works on
one frame at a time, so output frame t never depends on input frames after t. Two things follow:

- the first frame is encoded on its own: an image (a one-frame video) encodes to exactly the first
  latent frame of any video that starts with it, which is how image conditioning works;
- a video can be processed chunk by chunk (the first frame, then `temporal_compression_ratio`
  frames per latent frame) with a small cache of each conv's last input frames, giving the same
  result as processing it whole while memory stays flat in the number of frames.
"""

from functools import partial
from typing import Callable, Dict, List, Optional, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.autoencoders.vae import AutoencoderMixin, DecoderOutput, DiagonalGaussianDistribution
from diffusers.models.modeling_outputs import AutoencoderKLOutput
from diffusers.models.modeling_utils import ModelMixin
from diffusers.utils.accelerate_utils import apply_forward_hook

from ..safe_loading import SafeLoadingMixin, check_config_minimums
from ..size_rules import check_frame_count, check_multiple

# Size presets: "tiny" for tests, "shapes-64" for the built-in shapes demo, "base" for real video.
VAE_PRESETS: Dict[str, dict] = {
    "tiny": dict(block_out_channels=(8, 8, 16, 16), layers_per_block=1, latent_channels=4, norm_num_groups=4),
    "shapes-64": dict(block_out_channels=(16, 32, 64, 128), layers_per_block=1, latent_channels=16, norm_num_groups=8),
    "base": dict(block_out_channels=(96, 192, 384, 384), layers_per_block=2, latent_channels=16, norm_num_groups=32),
}

# Spatial tiling defaults, in pixels (as diffusers' video VAEs).
DEFAULT_TILE_SAMPLE_SIZE = 256
DEFAULT_TILE_SAMPLE_STRIDE = 192


def _triple(value: Union[int, Tuple[int, int, int]]) -> Tuple[int, int, int]:
    return (value, value, value) if isinstance(value, int) else tuple(value)


class CausalConvCache:
    """The last input frames of each causal conv, carried from one time chunk to the next.

    One cache lives for one pass over one video; each `CausalConv3d` reads its entry, then replaces
    it with the frames the next chunk's first window needs.
    """

    def __init__(self) -> None:
        self._frames: Dict[nn.Module, torch.Tensor] = {}

    def __contains__(self, conv: nn.Module) -> bool:
        return conv in self._frames

    def pop(self, conv: nn.Module) -> Optional[torch.Tensor]:
        return self._frames.pop(conv, None)

    def store(self, conv: nn.Module, frames: torch.Tensor) -> None:
        # A copy, so that the whole padded chunk these frames were sliced from can be freed.
        self._frames[conv] = frames.clone()


class CausalConv3d(nn.Module):
    """A (kt, kh, kw) convolution of frames-major video (B, T, C, H, W), padded in time on the past side only.

    It runs as one 2D convolution over kt consecutive frames stacked on channels. The result is that of
    a Conv3d, but PyTorch's CPU conv3d falls back to a slow im2col kernel for batch 1 while conv2d uses
    oneDNN (5-8x faster here), and the frames-major layout lets norms, attention and resizing work per
    frame without transposes. The past is zeros at the start of a video, else the cached frames.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: Union[int, Tuple[int, int, int]] = 3,
        stride: Union[int, Tuple[int, int, int]] = 1,
    ) -> None:
        super().__init__()
        (kernel_t, kernel_h, kernel_w), (stride_t, stride_h, stride_w) = _triple(kernel_size), _triple(stride)
        self.kernel_t, self.stride_t = kernel_t, stride_t
        self.conv = nn.Conv2d(
            kernel_t * in_channels, out_channels, (kernel_h, kernel_w), stride=(stride_h, stride_w),
            padding=(kernel_h // 2, kernel_w // 2),
        )  # fmt: skip

    def forward(self, x: torch.Tensor, cache: Optional[CausalConvCache] = None) -> torch.Tensor:
        if self.kernel_t > 1 and x.shape[1] == 1 and cache is None:
            return self._image_alone(x)
        if self.kernel_t > 1 or self.stride_t > 1:
            x = self._stack_windows(x, cache)  # (B, T_out, kt * C, H, W)
        b, t = x.shape[:2]
        return self.conv(x.flatten(0, 1)).unflatten(0, (b, t))  # (B, T_out, C_out, H', W')

    def _image_alone(self, x: torch.Tensor) -> torch.Tensor:
        # A one-frame video with no cache (image training, whole-clip encode of an image): its past is all
        # zeros, so only the last temporal tap sees data. That tap alone gives the same result kt times cheaper.
        # Chunked passes take the general path: their one-frame first chunk must also fill the cache.
        last_tap = self.conv.weight[:, -x.shape[2] :]  # (C_out, C, kh, kw): the weights of the newest frame
        out = F.conv2d(x[:, 0], last_tap, self.conv.bias, self.conv.stride, self.conv.padding)
        return out.unsqueeze(1)  # (B, 1, C_out, H', W')

    def _stack_windows(self, x: torch.Tensor, cache: Optional[CausalConvCache]) -> torch.Tensor:
        past = cache.pop(self) if cache is not None else None
        if past is None:  # start of the video
            past = x.new_zeros(x.shape[0], self.kernel_t - 1, *x.shape[2:])
        x = torch.cat([past, x], dim=1)  # (B, past + T, C, H, W)
        num_windows = (x.shape[1] - self.kernel_t) // self.stride_t + 1
        if cache is not None:  # frames from where the next, unfinished window starts
            cache.store(self, x[:, num_windows * self.stride_t :])
        span = (num_windows - 1) * self.stride_t + 1
        return torch.cat([x[:, i : i + span : self.stride_t] for i in range(self.kernel_t)], dim=2)


def _per_frame(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """Apply an image op `fn` (N, C, H, W) -> (N, C', H', W') to every frame of (B, T, C, H, W)."""
    return fn(x.flatten(0, 1)).unflatten(0, x.shape[:2])


class FrameGroupNorm(nn.GroupNorm):
    """GroupNorm with statistics per frame, so that normalisation never mixes time steps."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, C, H, W)
        return _per_frame(super().forward, x)


class ResnetBlock3D(nn.Module):
    """norm -> SiLU -> causal conv, twice, plus a (1x1x1 conv) shortcut."""

    def __init__(self, in_channels: int, out_channels: int, num_groups: int, eps: float, dropout: float) -> None:
        super().__init__()
        self.norm1 = FrameGroupNorm(num_groups, in_channels, eps=eps)
        self.conv1 = CausalConv3d(in_channels, out_channels)
        self.norm2 = FrameGroupNorm(num_groups, out_channels, eps=eps)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = CausalConv3d(out_channels, out_channels)
        self.conv_shortcut = CausalConv3d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: torch.Tensor, cache: Optional[CausalConvCache] = None) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)), cache)
        h = self.conv2(self.dropout(F.silu(self.norm2(h))), cache)
        shortcut = x if self.conv_shortcut is None else self.conv_shortcut(x)
        return shortcut + h


class SpatialAttention(nn.Module):
    """Single-head self-attention over the H * W positions of each frame (time stays causal)."""

    def __init__(self, channels: int, num_groups: int, eps: float) -> None:
        super().__init__()
        self.norm = FrameGroupNorm(num_groups, channels, eps=eps)
        self.to_qkv = nn.Linear(channels, 3 * channels)
        self.to_out = nn.Linear(channels, channels)

    def forward(self, x: torch.Tensor, cache: Optional[CausalConvCache] = None) -> torch.Tensor:
        b, t, c, h, w = x.shape
        tokens = self.norm(x).view(b * t, c, h * w).transpose(1, 2)  # (B*T, HW, C)
        q, k, v = self.to_qkv(tokens).chunk(3, dim=-1)
        out = self.to_out(F.scaled_dot_product_attention(q, k, v))  # (B*T, HW, C)
        return x + out.transpose(1, 2).reshape(b, t, c, h, w)


class Downsample3D(nn.Module):
    """Halves H and W, and T when `temporal`: 1 + 2k frames -> 1 + k (the first frame on its own).

    One causal conv with stride 2 in time: with two zero frames of past, window 0 holds frame 0
    alone and window j holds frames 2j - 2, 2j - 1, 2j.
    """

    def __init__(self, channels: int, temporal: bool) -> None:
        super().__init__()
        self.conv = CausalConv3d(channels, channels, kernel_size=3, stride=(2 if temporal else 1, 2, 2))

    def forward(self, x: torch.Tensor, cache: Optional[CausalConvCache] = None) -> torch.Tensor:
        return self.conv(x, cache)


class Upsample3D(nn.Module):
    """Doubles H and W, and T when `temporal`: 1 + k frames -> 1 + 2k, mirroring `Downsample3D`."""

    def __init__(self, in_channels: int, out_channels: int, temporal: bool) -> None:
        super().__init__()
        # Each frame becomes a pair of frames: twice the channels, unfolded into time.
        self.time_conv = CausalConv3d(in_channels, 2 * in_channels, kernel_size=(3, 1, 1)) if temporal else None
        self.conv = CausalConv3d(in_channels, out_channels, kernel_size=(1, 3, 3))

    def forward(self, x: torch.Tensor, cache: Optional[CausalConvCache] = None) -> torch.Tensor:
        if self.time_conv is not None:
            x = self._double_frames(x, cache)
        x = _per_frame(partial(F.interpolate, scale_factor=2.0, mode="nearest"), x)
        return self.conv(x, cache)

    def _double_frames(self, x: torch.Tensor, cache: Optional[CausalConvCache]) -> torch.Tensor:
        at_video_start = cache is None or self.time_conv not in cache
        b, t, c, h, w = x.shape
        x = self.time_conv(x, cache).reshape(b, 2 * t, c, h, w)  # (B, T, 2C, H, W) -> (B, 2T, C, H, W)
        # The first latent frame stands for the first pixel frame alone: keep one frame of its pair.
        return x[:, 1:] if at_video_start else x


class DownBlock3D(nn.Module):
    def __init__(
        self, in_channels: int, out_channels: int, num_layers: int, num_groups: int, eps: float, dropout: float,
        downsample: bool, temporal: bool,
    ) -> None:  # fmt: skip
        super().__init__()
        self.resnets = nn.ModuleList(
            ResnetBlock3D(in_channels if i == 0 else out_channels, out_channels, num_groups, eps, dropout)
            for i in range(num_layers)
        )
        self.downsampler = Downsample3D(out_channels, temporal) if downsample else None

    def forward(self, x: torch.Tensor, cache: Optional[CausalConvCache] = None) -> torch.Tensor:
        for resnet in self.resnets:
            x = resnet(x, cache)
        return x if self.downsampler is None else self.downsampler(x, cache)


class UpBlock3D(nn.Module):
    def __init__(
        self, channels: int, num_layers: int, num_groups: int, eps: float, dropout: float,
        upsample_channels: Optional[int], temporal: bool,
    ) -> None:  # fmt: skip
        super().__init__()
        self.resnets = nn.ModuleList(
            ResnetBlock3D(channels, channels, num_groups, eps, dropout) for _ in range(num_layers)
        )
        # The upsampler already maps to the next level's width: no full-resolution conv runs wider than needed.
        self.upsampler = None if upsample_channels is None else Upsample3D(channels, upsample_channels, temporal)

    def forward(self, x: torch.Tensor, cache: Optional[CausalConvCache] = None) -> torch.Tensor:
        for resnet in self.resnets:
            x = resnet(x, cache)
        return x if self.upsampler is None else self.upsampler(x, cache)


class MidBlock3D(nn.Module):
    def __init__(self, channels: int, num_groups: int, eps: float, dropout: float, attention: bool) -> None:
        super().__init__()
        self.resnet1 = ResnetBlock3D(channels, channels, num_groups, eps, dropout)
        self.attention = SpatialAttention(channels, num_groups, eps) if attention else None
        self.resnet2 = ResnetBlock3D(channels, channels, num_groups, eps, dropout)

    def forward(self, x: torch.Tensor, cache: Optional[CausalConvCache] = None) -> torch.Tensor:
        x = self.resnet1(x, cache)
        if self.attention is not None:
            x = self.attention(x)
        return self.resnet2(x, cache)


class _CheckpointedStack(nn.Module):
    """Runs blocks with gradient checkpointing (diffusers' `gradient_checkpointing` convention)."""

    def __init__(self) -> None:
        super().__init__()
        self.gradient_checkpointing = False

    def run_block(self, block: nn.Module, x: torch.Tensor, cache: Optional[CausalConvCache]) -> torch.Tensor:
        # Recomputing a block in backward would advance the conv cache twice, so chunked passes never checkpoint.
        if cache is None and self.gradient_checkpointing and torch.is_grad_enabled():
            return self._gradient_checkpointing_func(block, x)
        return block(x, cache)


class CausalEncoder3D(_CheckpointedStack):
    def __init__(
        self, in_channels: int, latent_channels: int, block_out_channels: Tuple[int, ...], layers_per_block: int,
        temporal_downsample: Tuple[bool, ...], num_groups: int, eps: float, dropout: float, mid_block_attention: bool,
    ) -> None:  # fmt: skip
        super().__init__()
        self.conv_in = CausalConv3d(in_channels, block_out_channels[0])
        num_levels = len(block_out_channels)
        self.down_blocks = nn.ModuleList(
            DownBlock3D(
                block_out_channels[max(i - 1, 0)], block_out_channels[i], layers_per_block, num_groups, eps, dropout,
                downsample=i < num_levels - 1, temporal=i < num_levels - 1 and temporal_downsample[i],
            )  # fmt: skip
            for i in range(num_levels)
        )
        self.mid_block = MidBlock3D(block_out_channels[-1], num_groups, eps, dropout, mid_block_attention)
        self.norm_out = FrameGroupNorm(num_groups, block_out_channels[-1], eps=eps)
        # Mean and log-variance of the posterior, stacked on channels.
        self.conv_out = CausalConv3d(block_out_channels[-1], 2 * latent_channels)

    def forward(self, x: torch.Tensor, cache: Optional[CausalConvCache] = None) -> torch.Tensor:
        x = self.conv_in(x.transpose(1, 2), cache)  # (B, C, T, H, W) -> frames-major (B, T, C', H, W)
        for block in [*self.down_blocks, self.mid_block]:
            x = self.run_block(block, x, cache)
        moments = self.conv_out(F.silu(self.norm_out(x)), cache)  # (B, t, 2 * latent_channels, h, w)
        return moments.transpose(1, 2).contiguous()  # (B, 2 * latent_channels, t, h, w)


class CausalDecoder3D(_CheckpointedStack):
    def __init__(
        self, latent_channels: int, out_channels: int, block_out_channels: Tuple[int, ...], layers_per_block: int,
        temporal_upsample: Tuple[bool, ...], num_groups: int, eps: float, dropout: float, mid_block_attention: bool,
    ) -> None:  # fmt: skip
        super().__init__()
        channels = tuple(reversed(block_out_channels))
        self.conv_in = CausalConv3d(latent_channels, channels[0])
        self.mid_block = MidBlock3D(channels[0], num_groups, eps, dropout, mid_block_attention)
        num_levels = len(channels)
        self.up_blocks = nn.ModuleList(
            UpBlock3D(
                channels[i], layers_per_block + 1, num_groups, eps, dropout,
                upsample_channels=channels[i + 1] if i < num_levels - 1 else None,
                temporal=i < num_levels - 1 and temporal_upsample[i],
            )  # fmt: skip
            for i in range(num_levels)
        )
        self.norm_out = FrameGroupNorm(num_groups, channels[-1], eps=eps)
        self.conv_out = CausalConv3d(channels[-1], out_channels)

    def forward(self, z: torch.Tensor, cache: Optional[CausalConvCache] = None) -> torch.Tensor:
        x = self.conv_in(z.transpose(1, 2), cache)  # (B, C, t, h, w) -> frames-major (B, t, C', h, w)
        for block in [self.mid_block, *self.up_blocks]:
            x = self.run_block(block, x, cache)
        video = self.conv_out(F.silu(self.norm_out(x)), cache)  # (B, T, out_channels, H, W)
        return video.transpose(1, 2).contiguous()  # (B, out_channels, T, H, W)


def _tile_starts(size: int, tile: int, stride: int) -> List[int]:
    """Tile offsets covering [0, size); the last tile is moved back to end exactly at `size`."""
    if size <= tile:
        return [0]
    starts = list(range(0, size - tile + 1, stride))
    if starts[-1] + tile < size:
        starts.append(size - tile)
    return starts


def _blend_ramp(length: int, overlap: int, rise: bool, fall: bool, device: torch.device) -> torch.Tensor:
    """1D tile weight: ramps over `overlap` at edges shared with a neighbour tile, 1 elsewhere."""
    weight = torch.ones(length, device=device)
    overlap = min(overlap, length)
    if overlap > 0:
        ramp = torch.arange(1, overlap + 1, device=device, dtype=weight.dtype) / (overlap + 1)
        if rise:
            weight[:overlap] = ramp
        if fall:
            weight[-overlap:] = torch.minimum(weight[-overlap:], ramp.flip(0))
    return weight


def _tiled_apply(
    fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, tile: Tuple[int, int], stride: Tuple[int, int],
    in_scale: int, out_scale: int,
) -> torch.Tensor:  # fmt: skip
    """Apply `fn` to overlapping spatial tiles of `x` (B, C, T, H, W) and blend the outputs.

    Tiles are laid on the latent grid: `tile` and `stride` count latent pixels, and one latent pixel
    is `in_scale` pixels of `x` and `out_scale` pixels of the output. Overlaps are cross-faded with
    linear ramps (a weighted average of the tiles), so seams do not show.
    """
    grid_h, grid_w = x.shape[-2] // in_scale, x.shape[-1] // in_scale
    tile_h, tile_w = min(tile[0], grid_h), min(tile[1], grid_w)
    overlap_h, overlap_w = (tile[0] - stride[0]) * out_scale, (tile[1] - stride[1]) * out_scale
    output = weight_sum = None
    for top in _tile_starts(grid_h, tile_h, stride[0]):
        for left in _tile_starts(grid_w, tile_w, stride[1]):
            rows_in = slice(top * in_scale, (top + tile_h) * in_scale)
            cols_in = slice(left * in_scale, (left + tile_w) * in_scale)
            piece = fn(x[..., rows_in, cols_in])  # (B, C', T', tile_h * out_scale, tile_w * out_scale)
            if output is None:
                output = piece.new_zeros(*piece.shape[:3], grid_h * out_scale, grid_w * out_scale)
                weight_sum = piece.new_zeros(grid_h * out_scale, grid_w * out_scale)
            ramp_h = _blend_ramp(piece.shape[-2], overlap_h, top > 0, top + tile_h < grid_h, x.device)
            ramp_w = _blend_ramp(piece.shape[-1], overlap_w, left > 0, left + tile_w < grid_w, x.device)
            weight = torch.outer(ramp_h, ramp_w).to(piece.dtype)  # (tile_h', tile_w')
            rows_out = slice(top * out_scale, (top + tile_h) * out_scale)
            cols_out = slice(left * out_scale, (left + tile_w) * out_scale)
            output[..., rows_out, cols_out] += piece * weight
            weight_sum[rows_out, cols_out] += weight
    return output / weight_sum


class AutoencoderKLNanoI2V(SafeLoadingMixin, ModelMixin, AutoencoderMixin, ConfigMixin):
    r"""
    A causal 3D VAE with a KL posterior, encoding videos into latents and decoding latents into videos.

    Videos are `(B, C, T, H, W)` in [-1, 1] with `T = 1 + temporal_compression_ratio * k` and `H`, `W`
    multiples of `spatial_compression_ratio`; their latents are
    `(B, latent_channels, 1 + k, H / spatial_compression_ratio, W / spatial_compression_ratio)`.

    Without autograd, `encode` and `decode` run chunk by chunk in time (set `use_framewise_encoding` /
    `use_framewise_decoding` to False to process whole clips), so memory does not grow with the
    number of frames; the result equals whole-clip processing up to float rounding. With autograd
    (training) clips are processed whole, where gradient checkpointing applies.

    Args:
        in_channels (`int`, defaults to 3): Channels of the input video.
        out_channels (`int`, defaults to 3): Channels of the decoded video.
        latent_channels (`int`, defaults to 16): Channels of the latents.
        block_out_channels (`Tuple[int, ...]`, defaults to `(96, 192, 384, 384)`): Width of each resolution
            level; every level but the last halves H and W, so the spatial compression is
            `2 ** (len(block_out_channels) - 1)`.
        layers_per_block (`int`, defaults to 2): ResNet blocks per encoder level (the decoder has one more).
        temporal_downsample (`Tuple[bool, ...]`, defaults to `(False, True, True)`): For each downsampling step,
            whether it also halves time; the temporal compression is `2 ** sum(temporal_downsample)`.
        norm_num_groups (`int`, defaults to 32): Groups of the group norms, whose statistics are taken per frame.
        norm_eps (`float`, defaults to 1e-6): Epsilon of the group norms.
        dropout (`float`, defaults to 0.0): Dropout inside the ResNet blocks.
        mid_block_attention (`bool`, defaults to `True`): Spatial self-attention in the middle blocks.
        latents_mean (`Tuple[float, ...]`, *optional*): Per-channel latent mean, used by `normalize_latents`.
        latents_std (`Tuple[float, ...]`, *optional*): Per-channel latent standard deviation, likewise.
    """

    # The smallest value of each count and size: a config below them is refused, naming the key.
    _config_minimums = {"in_channels": 1, "out_channels": 1, "latent_channels": 1, "block_out_channels": 1,
                        "layers_per_block": 1, "norm_num_groups": 1}  # fmt: skip
    _supports_gradient_checkpointing = True
    _no_split_modules = ["ResnetBlock3D"]
    _group_offload_block_modules = ["encoder", "decoder"]

    @register_to_config
    def __init__(
        self,
        in_channels: int = 3,
        out_channels: int = 3,
        latent_channels: int = 16,
        block_out_channels: Tuple[int, ...] = (96, 192, 384, 384),
        layers_per_block: int = 2,
        temporal_downsample: Tuple[bool, ...] = (False, True, True),
        norm_num_groups: int = 32,
        norm_eps: float = 1e-6,
        dropout: float = 0.0,
        mid_block_attention: bool = True,
        latents_mean: Optional[Tuple[float, ...]] = None,
        latents_std: Optional[Tuple[float, ...]] = None,
    ) -> None:
        super().__init__()
        check_config_minimums(type(self), self.config, type(self).__name__)
        block_out_channels, temporal_downsample = tuple(block_out_channels), tuple(temporal_downsample)
        self._check_config(latent_channels, block_out_channels, temporal_downsample, norm_num_groups)
        self._check_latent_stats(latent_channels, latents_mean, latents_std)
        common = dict(num_groups=norm_num_groups, eps=norm_eps, dropout=dropout, mid_block_attention=mid_block_attention)
        self.encoder = CausalEncoder3D(
            in_channels, latent_channels, block_out_channels, layers_per_block, temporal_downsample, **common
        )
        self.decoder = CausalDecoder3D(
            latent_channels, out_channels, block_out_channels, layers_per_block, temporal_downsample[::-1], **common
        )
        self.spatial_compression_ratio = 2 ** (len(block_out_channels) - 1)
        self.temporal_compression_ratio = 2 ** sum(temporal_downsample)

        self.use_slicing = False
        self.use_tiling = False
        self.use_framewise_encoding = True
        self.use_framewise_decoding = True
        self.tile_sample_min_height = DEFAULT_TILE_SAMPLE_SIZE
        self.tile_sample_min_width = DEFAULT_TILE_SAMPLE_SIZE
        self.tile_sample_stride_height = DEFAULT_TILE_SAMPLE_STRIDE
        self.tile_sample_stride_width = DEFAULT_TILE_SAMPLE_STRIDE

    @staticmethod
    def _check_config(latent_channels, block_out_channels, temporal_downsample, norm_num_groups) -> None:
        if len(temporal_downsample) != len(block_out_channels) - 1:
            raise ValueError(
                f"temporal_downsample needs one flag per downsampling step, len(block_out_channels) - 1 = "
                f"{len(block_out_channels) - 1}; got {len(temporal_downsample)}: {temporal_downsample}."
            )
        for channels in block_out_channels:
            if channels % norm_num_groups:
                raise ValueError(
                    f"Every entry of block_out_channels must be divisible by norm_num_groups={norm_num_groups}; "
                    f"got {channels} in {block_out_channels}."
                )

    @staticmethod
    def _check_latent_stats(latent_channels, latents_mean, latents_std) -> None:
        for name, stats in (("latents_mean", latents_mean), ("latents_std", latents_std)):
            if stats is not None and len(stats) != latent_channels:
                raise ValueError(f"{name} needs latent_channels={latent_channels} values; got {len(stats)}.")
        if latents_std is not None and min(latents_std) <= 0:
            raise ValueError(f"latents_std must be positive; got {tuple(latents_std)}.")

    # ----------------------------------------------------------------------------------------------
    # Options
    # ----------------------------------------------------------------------------------------------

    def enable_tiling(
        self,
        tile_sample_min_height: Optional[int] = None,
        tile_sample_min_width: Optional[int] = None,
        tile_sample_stride_height: Optional[int] = None,
        tile_sample_stride_width: Optional[int] = None,
    ) -> None:
        r"""
        Encode and decode in overlapping spatial tiles, blended in the overlaps, when H or W exceeds the tile size.

        Args:
            tile_sample_min_height (`int`, *optional*): Tile height in pixels (default 256).
            tile_sample_min_width (`int`, *optional*): Tile width in pixels (default 256).
            tile_sample_stride_height (`int`, *optional*): Vertical distance between tiles in pixels (default 192).
            tile_sample_stride_width (`int`, *optional*): Horizontal distance between tiles in pixels (default 192).
        """
        height = tile_sample_min_height or self.tile_sample_min_height
        width = tile_sample_min_width or self.tile_sample_min_width
        stride_height = tile_sample_stride_height or self.tile_sample_stride_height
        stride_width = tile_sample_stride_width or self.tile_sample_stride_width
        ratio = self.spatial_compression_ratio
        for name, value in (("tile_sample_min_height", height), ("tile_sample_min_width", width),
                            ("tile_sample_stride_height", stride_height), ("tile_sample_stride_width", stride_width)):  # fmt: skip
            check_multiple(name, value, ratio)
        if stride_height > height or stride_width > width:
            raise ValueError(
                f"Tile strides must not exceed the tile size (tiles would leave gaps); got stride "
                f"{(stride_height, stride_width)} for tiles of {(height, width)}."
            )
        self.tile_sample_min_height, self.tile_sample_min_width = height, width
        self.tile_sample_stride_height, self.tile_sample_stride_width = stride_height, stride_width
        self.use_tiling = True

    def _needs_tiling(self, height: int, width: int) -> bool:
        return self.use_tiling and (height > self.tile_sample_min_height or width > self.tile_sample_min_width)

    def _latent_tiling(self) -> Tuple[Tuple[int, int], Tuple[int, int]]:
        ratio = self.spatial_compression_ratio
        tile = (self.tile_sample_min_height // ratio, self.tile_sample_min_width // ratio)
        stride = (self.tile_sample_stride_height // ratio, self.tile_sample_stride_width // ratio)
        return tile, stride

    # ----------------------------------------------------------------------------------------------
    # Input checks
    # ----------------------------------------------------------------------------------------------

    def _check_video(self, x: torch.Tensor) -> None:
        if x.ndim != 5 or x.shape[1] != self.config.in_channels:
            raise ValueError(
                f"Expected a video (B, C={self.config.in_channels}, T, H, W); got shape {tuple(x.shape)}."
            )
        check_frame_count("num_frames", x.shape[2], self.temporal_compression_ratio)
        check_multiple("height", x.shape[3], self.spatial_compression_ratio)
        check_multiple("width", x.shape[4], self.spatial_compression_ratio)

    def _check_latents(self, z: torch.Tensor) -> None:
        if z.ndim != 5 or z.shape[1] != self.config.latent_channels:
            raise ValueError(
                f"Expected latents (B, C={self.config.latent_channels}, T, H, W); got shape {tuple(z.shape)}."
            )

    # ----------------------------------------------------------------------------------------------
    # Encoding
    # ----------------------------------------------------------------------------------------------

    def _encode(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, T, H, W) video -> (B, 2 * latent_channels, t, h, w) posterior parameters."""
        if self._needs_tiling(x.shape[-2], x.shape[-1]):
            tile, stride = self._latent_tiling()
            return _tiled_apply(self._encode_clip, x, tile, stride, self.spatial_compression_ratio, 1)
        return self._encode_clip(x)

    def _encode_clip(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.use_framewise_encoding and not torch.is_grad_enabled()):
            return self.encoder(x)
        cache = CausalConvCache()
        # The first frame alone, then one latent frame's worth of frames at a time.
        chunks = [x[:, :, :1], *x[:, :, 1:].split(self.temporal_compression_ratio, dim=2)]
        return torch.cat([self.encoder(chunk, cache) for chunk in chunks], dim=2)

    @apply_forward_hook
    def encode(
        self, x: torch.Tensor, return_dict: bool = True
    ) -> Union[AutoencoderKLOutput, Tuple[DiagonalGaussianDistribution]]:
        r"""
        Encode a batch of videos into latent distributions.

        Args:
            x (`torch.Tensor`): Videos `(B, C, T, H, W)` in [-1, 1].
            return_dict (`bool`, *optional*, defaults to `True`):
                Whether to return an [`~models.modeling_outputs.AutoencoderKLOutput`] instead of a plain tuple.

        Returns:
            [`~models.modeling_outputs.AutoencoderKLOutput`] with `latent_dist`, a `DiagonalGaussianDistribution`
            over latents `(B, latent_channels, t, h, w)`, or the tuple `(latent_dist,)`.
        """
        self._check_video(x)
        if self.use_slicing and x.shape[0] > 1:
            moments = torch.cat([self._encode(sample) for sample in x.split(1)])
        else:
            moments = self._encode(x)
        posterior = DiagonalGaussianDistribution(moments)
        if not return_dict:
            return (posterior,)
        return AutoencoderKLOutput(latent_dist=posterior)

    # ----------------------------------------------------------------------------------------------
    # Decoding
    # ----------------------------------------------------------------------------------------------

    def _decode(self, z: torch.Tensor) -> torch.Tensor:
        """(B, latent_channels, t, h, w) latents -> (B, C, T, H, W) video."""
        ratio = self.spatial_compression_ratio
        if self._needs_tiling(z.shape[-2] * ratio, z.shape[-1] * ratio):
            tile, stride = self._latent_tiling()
            return _tiled_apply(self._decode_clip, z, tile, stride, 1, ratio)
        return self._decode_clip(z)

    def _decode_clip(self, z: torch.Tensor) -> torch.Tensor:
        if not (self.use_framewise_decoding and not torch.is_grad_enabled()):
            return self.decoder(z)
        cache = CausalConvCache()
        num_frames = 1 + (z.shape[2] - 1) * self.temporal_compression_ratio
        video, start = None, 0
        for latent_frame in z.split(1, dim=2):
            frames = self.decoder(latent_frame, cache)  # (B, C, 1 or ratio_t, H, W)
            if video is None:  # written in place rather than concatenated: no second copy of the video
                video = frames.new_empty(*frames.shape[:2], num_frames, *frames.shape[3:])
            video[:, :, start : start + frames.shape[2]] = frames
            start += frames.shape[2]
        return video

    @apply_forward_hook
    def decode(self, z: torch.Tensor, return_dict: bool = True) -> Union[DecoderOutput, Tuple[torch.Tensor]]:
        r"""
        Decode a batch of latents into videos.

        Args:
            z (`torch.Tensor`): Latents `(B, latent_channels, t, h, w)` (not normalized).
            return_dict (`bool`, *optional*, defaults to `True`):
                Whether to return a [`~models.autoencoders.vae.DecoderOutput`] instead of a plain tuple.

        Returns:
            [`~models.autoencoders.vae.DecoderOutput`] whose `sample` is the video
            `(B, out_channels, 1 + temporal_compression_ratio * (t - 1), H, W)`, nominally in [-1, 1]
            (not clamped), or the tuple `(sample,)`.
        """
        self._check_latents(z)
        if self.use_slicing and z.shape[0] > 1:
            video = torch.cat([self._decode(sample) for sample in z.split(1)])
        else:
            video = self._decode(z)
        if not return_dict:
            return (video,)
        return DecoderOutput(sample=video)

    def forward(
        self,
        sample: torch.Tensor,
        sample_posterior: bool = False,
        return_dict: bool = True,
        generator: Optional[torch.Generator] = None,
    ) -> Union[DecoderOutput, Tuple[torch.Tensor]]:
        r"""
        Encode and decode a video.

        Args:
            sample (`torch.Tensor`): Videos `(B, C, T, H, W)` in [-1, 1].
            sample_posterior (`bool`, *optional*, defaults to `False`):
                Decode a sample of the posterior instead of its mode.
            return_dict (`bool`, *optional*, defaults to `True`):
                Whether to return a [`~models.autoencoders.vae.DecoderOutput`] instead of a plain tuple.
            generator (`torch.Generator`, *optional*): Generator for the posterior sample.
        """
        posterior = self.encode(sample).latent_dist
        z = posterior.sample(generator=generator) if sample_posterior else posterior.mode()
        return self.decode(z, return_dict=return_dict)

    # ----------------------------------------------------------------------------------------------
    # Latent normalisation
    # ----------------------------------------------------------------------------------------------

    def _latent_stats(self, z: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """(1, C, 1, 1, 1) mean and std from the config (0 and 1 where unset), on z's device and dtype."""
        self._check_latents(z)
        channels = self.config.latent_channels
        mean, std = self.config.latents_mean, self.config.latents_std
        self._check_latent_stats(channels, mean, std)  # the config may have been changed since __init__
        mean = torch.zeros(channels) if mean is None else torch.tensor(mean, dtype=torch.float32)
        std = torch.ones(channels) if std is None else torch.tensor(std, dtype=torch.float32)
        shape = (1, channels, 1, 1, 1)
        return mean.view(shape).to(z.device, z.dtype), std.view(shape).to(z.device, z.dtype)

    def normalize_latents(self, z: torch.Tensor) -> torch.Tensor:
        """Per-channel `(z - latents_mean) / latents_std`: VAE latents -> the scale the diffusion model works in."""
        mean, std = self._latent_stats(z)
        return (z - mean) / std

    def denormalize_latents(self, z: torch.Tensor) -> torch.Tensor:
        """Inverse of `normalize_latents`: `z * latents_std + latents_mean`."""
        mean, std = self._latent_stats(z)
        return z * std + mean
