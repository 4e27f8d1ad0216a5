"""Conditioning images of any common kind -> 8-bit RGB PIL images, with documented, logged fix-ups.

`NanoI2VPipeline` passes every conditioning image through `to_rgb_images` before diffusers'
`VideoProcessor` resizes it (to cover the target size, then center-crop). The rules (README "Robustness"):

- PIL images with transparency (RGBA, LA, PA, P or L/RGB with a transparency key) are composited on
  black, the background of the built-in shapes data; a warning says so when any pixel is not opaque.
- 16-bit PIL images ("I;16*" and "I", read as 0..65535) and uint16 arrays are scaled by 255 / 65535,
  not clipped. "F" PIL images and float arrays / tensors are read as [0, 1], or as [-1, 1] when they
  hold negative values (diffusers' convention); values outside those ranges, NaN and inf raise ValueError.
- Every other mode (L, P, CMYK, YCbCr, 1, ...) is converted to RGB.
- numpy arrays are channels-last: (H, W), (H, W, C) or (N, H, W, C); tensors are channels-first:
  (H, W), (C, H, W) or (N, C, H, W); C is 1, 3 or 4 (4 = RGBA). Other integer dtypes than uint8 and
  uint16 raise ValueError (their range is unknown).
"""

from typing import List, Sequence, Set

import numpy as np
import PIL.Image
import torch
from diffusers.utils import logging

logger = logging.get_logger(__name__)

UINT8_MAX = 255
UINT16_MAX = 65535
SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")
ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
CHANNEL_COUNTS = (1, 3, 4)
# Float images may overshoot [0, 1] by rounding error; beyond this they are taken to be on another scale.
FLOAT_RANGE_TOLERANCE = 1e-3
_CHANNEL_MODES = {1: "L", 3: "RGB", 4: "RGBA"}


def to_rgb_images(image) -> List[PIL.Image.Image]:
    """Every image in `image` (one image, a batch array / tensor, or a list of them) as an 8-bit RGB PIL image."""
    items = list(image) if isinstance(image, (list, tuple)) else [image]
    pil_images = [pil for item in items for pil in _as_pil_images(item)]
    if not pil_images:
        raise ValueError("`image` is empty: pass at least one image, or None for text-to-video.")
    notes: Set[str] = set()  # one log line per kind of fix-up, not one per image
    rgb = [_to_rgb(pil, notes) for pil in pil_images]
    for note in sorted(notes):
        logger.warning(note)
    return rgb


# ----------------------------------------------------------------------------- arrays and tensors -> PIL


def _as_pil_images(item) -> List[PIL.Image.Image]:
    if isinstance(item, PIL.Image.Image):
        return [item]
    if isinstance(item, torch.Tensor):
        return [_array_to_pil(frame) for frame in _tensor_to_nhwc(item)]
    if isinstance(item, np.ndarray):
        return [_array_to_pil(frame) for frame in _array_to_nhwc(item)]
    raise ValueError(
        f"`image` must be a PIL image, a numpy array, a torch tensor or a list of them; got {type(item).__name__}."
    )


def _array_to_nhwc(array: np.ndarray) -> np.ndarray:
    """(H, W), (H, W, C) or (N, H, W, C) -> (N, H, W, C)."""
    shape = array.shape
    if array.ndim == 2:
        array = array[..., None]
    if array.ndim == 3:
        array = array[None]
    if array.ndim != 4 or array.shape[-1] not in CHANNEL_COUNTS:
        raise ValueError(
            f"numpy images must be (H, W), (H, W, C) or (N, H, W, C) with C in {CHANNEL_COUNTS} (channels last); "
            f"got shape {shape}."
        )
    return array


def _tensor_to_nhwc(tensor: torch.Tensor) -> np.ndarray:
    """(H, W), (C, H, W) or (N, C, H, W) tensor -> (N, H, W, C) numpy array."""
    shape = tuple(tensor.shape)
    tensor = tensor.detach().cpu()
    if tensor.is_floating_point():
        tensor = tensor.float()  # numpy has no bfloat16
    if tensor.ndim == 2:
        tensor = tensor[None]
    if tensor.ndim == 3:
        tensor = tensor[None]
    if tensor.ndim != 4 or tensor.shape[1] not in CHANNEL_COUNTS:
        raise ValueError(
            f"tensor images must be (H, W), (C, H, W) or (N, C, H, W) with C in {CHANNEL_COUNTS} (channels first); "
            f"got shape {shape}."
        )
    return tensor.permute(0, 2, 3, 1).numpy()


def _array_to_pil(frame: np.ndarray) -> PIL.Image.Image:
    """One (H, W, C) array -> a PIL image of mode L, RGB or RGBA."""
    pixels = _to_uint8(frame)
    channels = pixels.shape[-1]
    return PIL.Image.fromarray(pixels[..., 0] if channels == 1 else pixels, mode=_CHANNEL_MODES[channels])


def _to_uint8(pixels: np.ndarray) -> np.ndarray:
    if pixels.dtype == np.uint8:
        return pixels
    if pixels.dtype == np.uint16:
        return _scale_16_bit(pixels)
    if pixels.dtype == np.bool_:
        return pixels.astype(np.uint8) * UINT8_MAX
    if np.issubdtype(pixels.dtype, np.floating):
        return _float_to_uint8(pixels)
    raise ValueError(
        f"integer images must be uint8 (0..255) or uint16 (0..65535); got {pixels.dtype}. Convert with "
        ".astype(np.uint8), or pass floats in [0, 1]."
    )


def _scale_16_bit(pixels: np.ndarray) -> np.ndarray:
    scaled = np.clip(pixels.astype(np.float64), 0, UINT16_MAX) * (UINT8_MAX / UINT16_MAX)
    return np.round(scaled).astype(np.uint8)


def _float_to_uint8(pixels: np.ndarray) -> np.ndarray:
    if not np.isfinite(pixels).all():
        raise ValueError("`image` contains NaN or inf values.")
    low, high = float(pixels.min()), float(pixels.max())
    if low < 0:  # diffusers' (deprecated) [-1, 1] convention
        pixels = (pixels + 1) / 2
    if pixels.min() < -FLOAT_RANGE_TOLERANCE or pixels.max() > 1 + FLOAT_RANGE_TOLERANCE:
        raise ValueError(
            f"float images must be in [0, 1] (or [-1, 1]); got values in [{low:g}, {high:g}]. "
            "Divide 0..255 images by 255."
        )
    return np.round(np.clip(pixels, 0, 1) * UINT8_MAX).astype(np.uint8)


# ----------------------------------------------------------------------------- PIL modes -> RGB


def _to_rgb(image: PIL.Image.Image, notes: Set[str]) -> PIL.Image.Image:
    if image.mode == "RGB":
        return image
    if image.mode in SIXTEEN_BIT_MODES:
        notes.add(f"16-bit conditioning image (mode {image.mode}) scaled to 8 bits (x 255/65535).")
        return PIL.Image.fromarray(_scale_16_bit(np.asarray(image)), mode="L").convert("RGB")
    if image.mode == "F":
        return PIL.Image.fromarray(_float_to_uint8(np.asarray(image)), mode="L").convert("RGB")
    if image.mode in ALPHA_MODES or "transparency" in image.info:
        return _composite_on_black(image.convert("RGBA"), notes)
    return image.convert("RGB")


def _composite_on_black(rgba: PIL.Image.Image, notes: Set[str]) -> PIL.Image.Image:
    if rgba.getchannel("A").getextrema()[0] < UINT8_MAX:
        notes.add("Transparent pixels in the conditioning image were composited on black.")
    black = PIL.Image.new("RGBA", rgba.size, (0, 0, 0, UINT8_MAX))
    return PIL.Image.alpha_composite(black, rgba).convert("RGB")


def has_other_aspect_ratio(images: Sequence[PIL.Image.Image], height: int, width: int) -> bool:
    """Whether any image must lose a border to the center crop that fits it to (height, width)."""
    return any(image.width * height != image.height * width for image in images)
