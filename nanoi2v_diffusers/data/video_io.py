"""Reading and writing videos with PyAV.

Frames live in two layouts: `(T, H, W, 3)` uint8 RGB on disk and in numpy, and `(C, T, H, W)` float
in [-1, 1] inside the models. Everything that cannot be decoded (a missing, empty, truncated,
corrupt or audio-only file, or one with too few frames) raises `VideoDecodeError`, so a dataset
needs to catch one exception type to skip a bad file.
"""

import io
import itertools
import logging
import os
from fractions import Fraction
from pathlib import Path
from typing import BinaryIO, Iterable, Iterator, Optional, Sequence, Tuple, Union

import av
import numpy as np
import torch
from av.video.reformatter import VideoReformatter
from PIL import Image

logger = logging.getLogger(__name__)

VideoSource = Union[str, os.PathLike, bytes, BinaryIO]

# Suffixes the folder datasets pick up; PyAV decodes more, these are the ones that were tested.
VIDEO_SUFFIXES = (".mp4", ".webm", ".mkv", ".gif", ".mov")

# Frames are resized with PIL's bicubic filter, which low-passes when shrinking (like antialias=True).
RESIZE_FILTER = Image.Resampling.BICUBIC

# x264 constant-rate factor: 18 is visually lossless for 8-bit video; 0 with libx264rgb is exact.
X264_CRF = 18
# libvpx-vp9 constant-quality level (0-63, lower is better); "b": "0" selects constant quality.
VP9_CRF = 30
# A GIF frame holds at most this many colours.
GIF_PALETTE_SIZE = 256

# PyAV container format for each suffix write_video accepts.
_CONTAINER_FORMATS = {".mp4": "mp4", ".mkv": "matroska", ".webm": "webm", ".gif": "gif"}
# fps resampling gives the last frame the targets up to half a frame interval after it; a video
# of one frame has no interval, and this slack still lets the target at its own time take it.
_TIME_SLACK_S = 1e-3


class VideoDecodeError(RuntimeError):
    """A video that cannot be decoded into the requested frames. The message names the file."""


# ----------------------------------------------------------------------------- reading


def read_video_frames(
    path: VideoSource,
    num_frames: Optional[int] = None,
    stride: int = 1,
    fps: Optional[float] = None,
    start_frame: int = 0,
) -> np.ndarray:
    """Decode frames of a video as a `(T, H, W, 3)` uint8 RGB array.

    Args:
        path: a file path, the file's bytes, or a binary file object (mp4, webm, mkv, gif, ...).
        num_frames: how many frames to return; `None` returns every sampled frame.
        stride: keep every `stride`-th decoded frame.
        fps: resample to this frame rate instead (nearest frame in time to each target time);
            mutually exclusive with `stride != 1`.
        start_frame: index of the first decoded frame to use.

    Raises:
        VideoDecodeError: the file is missing, empty, not a video or corrupt, or has fewer than
            `num_frames` frames after sampling ("too short: has N frames, needs M").
        ValueError: invalid sampling arguments.
    """
    _check_sampling_args(num_frames, stride, fps, start_frame)
    name = _source_name(path)
    try:
        with av.open(_open_source(path, name), mode="r") as container:
            if not container.streams.video:
                raise VideoDecodeError(f"{name}: has no video stream (audio-only or not a video)")
            timed = itertools.islice(_timed_frames(container), start_frame, None)
            if fps is not None:
                sampled = _sample_by_fps(timed, fps)
            else:
                sampled = (frame for _, frame in itertools.islice(timed, 0, None, stride))
            # One reformatter for the whole clip: a frame's own to_ndarray builds a new swscale context.
            to_rgb = VideoReformatter()
            frames = [to_rgb.reformat(f, format="rgb24").to_ndarray() for f in itertools.islice(sampled, num_frames)]
    except (av.error.FFmpegError, OSError, EOFError) as err:
        raise VideoDecodeError(f"{name}: cannot be decoded ({err})") from err
    if not frames:
        reason = "contains no video frames" if start_frame == 0 else f"has no frames from start_frame={start_frame}"
        raise VideoDecodeError(f"{name}: {reason}")
    if num_frames is not None and len(frames) < num_frames:
        raise VideoDecodeError(
            f"{name}: too short: has {len(frames)} frames, needs {num_frames} "
            f"(sampling: {_describe_sampling(stride, fps, start_frame)})"
        )
    return np.stack(frames)


def load_video(
    path: VideoSource,
    num_frames: int,
    height: int,
    width: int,
    stride: int = 1,
    fps: Optional[float] = None,
) -> torch.Tensor:
    """Decode `num_frames` frames, resize + center-crop to `height` x `width`: `(C, T, H, W)` in [-1, 1]."""
    frames = read_video_frames(path, num_frames=num_frames, stride=stride, fps=fps)
    return frames_to_tensor(resize_center_crop(frames, height, width))


def _check_sampling_args(num_frames, stride, fps, start_frame) -> None:
    if num_frames is not None and num_frames < 1:
        raise ValueError(f"num_frames must be >= 1 (or None for all frames), got {num_frames}.")
    if stride < 1:
        raise ValueError(f"stride must be >= 1, got {stride}.")
    if start_frame < 0:
        raise ValueError(f"start_frame must be >= 0, got {start_frame}.")
    if fps is not None:
        if stride != 1:
            raise ValueError(f"Pass either fps or stride, not both: got fps={fps} and stride={stride}.")
        if fps <= 0:
            raise ValueError(f"fps must be > 0, got {fps}.")


def _describe_sampling(stride, fps, start_frame) -> str:
    rule = f"resampled to fps={fps}" if fps is not None else f"stride={stride}"
    return f"{rule}, start_frame={start_frame}"


def _source_name(path: VideoSource) -> str:
    if isinstance(path, (bytes, bytearray)):
        return f"<{len(path)} bytes in memory>"
    if isinstance(path, (str, os.PathLike)):
        return str(path)
    return str(getattr(path, "name", "<file object>"))


def _open_source(path: VideoSource, name: str):
    """What `av.open` reads; missing and empty files are caught here with a plainer message."""
    if isinstance(path, (bytes, bytearray)):
        if not path:
            raise VideoDecodeError(f"{name}: is empty (0 bytes)")
        return io.BytesIO(path)
    if not isinstance(path, (str, os.PathLike)):
        return path
    if not os.path.isfile(path):
        raise VideoDecodeError(f"{name}: file not found")
    if os.path.getsize(path) == 0:
        raise VideoDecodeError(f"{name}: is empty (0 bytes)")
    return os.fspath(path)


def _timed_frames(container) -> Iterator[Tuple[float, "av.VideoFrame"]]:
    """Decoded frames of the first video stream with their presentation time in seconds."""
    stream = container.streams.video[0]
    rate = stream.average_rate or stream.guessed_rate or 1
    for index, frame in enumerate(container.decode(stream)):
        yield (frame.time if frame.time is not None else index / float(rate)), frame


def _sample_by_fps(timed: Iterable[Tuple[float, "av.VideoFrame"]], fps: float) -> Iterator["av.VideoFrame"]:
    """Frames at times t0 + k / fps, each the decoded frame nearest in time (earlier one on ties).

    Works in one pass, so a long video is never held in memory: a frame is emitted for every
    target time closer to it than to the next frame; after the last frame, targets up to half a
    frame interval past it still get it.
    """
    timed = iter(timed)
    first = next(timed, None)
    if first is None:
        return
    start, _ = first
    previous_time, previous = first
    interval, k = 0.0, 0
    for time, frame in timed:
        midpoint = 0.5 * (previous_time + time)
        while start + k / fps <= midpoint:
            yield previous
            k += 1
        previous_time, previous, interval = time, frame, time - previous_time
    while start + k / fps < previous_time + max(0.5 * interval, _TIME_SLACK_S):
        yield previous
        k += 1


# ----------------------------------------------------------------------------- layouts


def resize_center_crop(frames: np.ndarray, height: int, width: int) -> np.ndarray:
    """Resize `(T, H, W, 3)` uint8 frames so the short side fits, then center-crop to `height` x `width`."""
    _check_uint8_frames(frames)
    if height < 1 or width < 1:
        raise ValueError(f"height and width must be >= 1, got {height} x {width}.")
    _, in_h, in_w, _ = frames.shape
    scale = max(height / in_h, width / in_w)
    new_h, new_w = max(height, round(in_h * scale)), max(width, round(in_w * scale))
    if (new_h, new_w) != (in_h, in_w):
        frames = np.stack([np.asarray(Image.fromarray(f).resize((new_w, new_h), RESIZE_FILTER)) for f in frames])
    top, left = (new_h - height) // 2, (new_w - width) // 2
    return np.ascontiguousarray(frames[:, top : top + height, left : left + width])


def frames_to_tensor(frames: np.ndarray) -> torch.Tensor:
    """`(T, H, W, 3)` uint8 -> `(C, T, H, W)` float32 in [-1, 1]."""
    _check_uint8_frames(frames)
    # numpy, not torch, does the arithmetic: data loading runs beside training, and torch's
    # intra-op threads on a busy CPU make these small element-wise ops up to 100x slower.
    video = np.ascontiguousarray(frames.transpose(3, 0, 1, 2)).astype(np.float32)  # (C, T, H, W)
    video /= np.float32(127.5)
    video -= np.float32(1.0)
    return torch.from_numpy(video)


def tensor_to_frames(video: Union[torch.Tensor, np.ndarray]) -> np.ndarray:
    """`(C, T, H, W)` float in [-1, 1] (tensor or array) -> `(T, H, W, 3)` uint8, values clamped."""
    video = torch.as_tensor(video)
    if video.ndim != 4 or video.shape[0] != 3:
        raise ValueError(f"Expected a (C=3, T, H, W) video in [-1, 1], got shape {tuple(video.shape)}.")
    if not video.is_floating_point():
        raise ValueError(f"Expected a float video in [-1, 1], got dtype {video.dtype}.")
    pixels = ((video.detach().float().cpu() + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8)
    return pixels.permute(1, 2, 3, 0).contiguous().numpy()  # (T, H, W, C)


def _check_uint8_frames(frames) -> None:
    if not isinstance(frames, np.ndarray) or frames.dtype != np.uint8:
        raise ValueError(
            f"Expected a numpy uint8 array of frames, got {type(frames).__name__} {getattr(frames, 'dtype', '')}."
        )
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.shape[0] < 1:
        raise ValueError(f"Expected frames shaped (T >= 1, H, W, 3), got {frames.shape}.")


# ----------------------------------------------------------------------------- writing

FramesLike = Union[np.ndarray, torch.Tensor, Sequence[Image.Image]]


def write_video(path: Union[str, os.PathLike], frames: FramesLike, fps: float = 8, lossless: bool = False) -> Path:
    """Write frames to `path`; the suffix picks the format. Returns the path.

    `frames` is `(T, H, W, 3)` uint8 (array or tensor), a list of PIL images, or a float
    `(C, T, H, W)` tensor or array in [-1, 1] (the layout of the datasets and the VAE).

    - `.mp4` / `.mkv`: libx264 yuv420p (crf 18); odd sizes, which 4:2:0 cannot hold, use yuv444p
      so the size is kept (some browsers do not play 4:4:4). `lossless=True`: libx264rgb crf 0,
      which round-trips the RGB frames exactly.
    - `.webm`: libvpx-vp9 yuv420p; `lossless=True`: vp9 lossless in gbrp (exact RGB).
    - `.gif`: PyAV's GIF encoder fed with a per-frame adaptive palette computed by PIL (median cut,
      no dithering); PyAV's own RGB -> palette conversion uses a fixed 3-3-2 palette, and PIL's
      GIF writer merges identical consecutive frames, which would change the frame count.
      Exact when a frame has at most 256 colours; `lossless=True` raises if one has more.

    The file is written to a temporary name and renamed, so an interrupted write never leaves a
    half-written video under `path`.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in _CONTAINER_FORMATS:
        raise ValueError(f"Cannot write {path.name!r}: the suffix must be one of {sorted(_CONTAINER_FORMATS)}.")
    if fps <= 0:
        raise ValueError(f"fps must be > 0, got {fps}.")
    frames = _as_uint8_frames(frames)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial")
    try:
        with av.open(str(partial), mode="w", format=_CONTAINER_FORMATS[suffix]) as container:
            if suffix == ".gif":
                _encode_gif(container, frames, fps, lossless)
            else:
                _encode_rgb(container, frames, fps, *_video_codec(suffix, lossless, frames.shape[1:3]))
        os.replace(partial, path)
    except (av.error.FFmpegError, OSError) as error:  # PyAV's errors name neither the file nor the folder
        raise OSError(f"Cannot write the video {path}: {error}") from error
    finally:
        partial.unlink(missing_ok=True)
    return path


def _as_uint8_frames(frames: FramesLike) -> np.ndarray:
    if isinstance(frames, (list, tuple)):
        if not frames or not all(isinstance(f, Image.Image) for f in frames):
            raise ValueError("A list of frames must be a non-empty list of PIL images.")
        frames = np.stack([np.asarray(f.convert("RGB")) for f in frames])
    elif torch.is_tensor(frames):
        frames = frames.detach().cpu().numpy() if frames.dtype == torch.uint8 else tensor_to_frames(frames)
    elif isinstance(frames, np.ndarray) and frames.dtype != np.uint8:
        frames = tensor_to_frames(frames)
    _check_uint8_frames(frames)
    return frames


def _video_codec(suffix: str, lossless: bool, size: Tuple[int, int]) -> Tuple[str, str, dict]:
    """(codec, pixel format, options) for a non-GIF suffix."""
    if suffix == ".webm":
        if lossless:
            return "libvpx-vp9", "gbrp", {"lossless": "1"}
        return "libvpx-vp9", "yuv420p", {"crf": str(VP9_CRF), "b": "0"}
    if lossless:
        return "libx264rgb", "rgb24", {"crf": "0"}
    if any(side % 2 for side in size):
        logger.debug("Odd frame size %s: writing yuv444p, since yuv420p needs even sizes.", size)
        return "libx264", "yuv444p", {"crf": str(X264_CRF)}
    return "libx264", "yuv420p", {"crf": str(X264_CRF)}


def _encode_rgb(container, frames: np.ndarray, fps: float, codec: str, pix_fmt: str, options: dict) -> None:
    stream = _add_video_stream(container, codec, frames, fps, pix_fmt)
    stream.options = options
    _mux_all(container, stream, (av.VideoFrame.from_ndarray(f, format="rgb24") for f in frames))


def _encode_gif(container, frames: np.ndarray, fps: float, lossless: bool) -> None:
    stream = _add_video_stream(container, "gif", frames, fps, "pal8")
    _mux_all(container, stream, (_palette_frame(f, lossless) for f in frames))


def _add_video_stream(container, codec: str, frames: np.ndarray, fps: float, pix_fmt: str):
    stream = container.add_stream(codec, rate=Fraction(fps).limit_denominator(1001))
    stream.height, stream.width = frames.shape[1:3]
    stream.pix_fmt = pix_fmt
    return stream


def _mux_all(container, stream, video_frames: Iterable["av.VideoFrame"]) -> None:
    for frame in video_frames:
        container.mux(stream.encode(frame))
    container.mux(stream.encode(None))  # flush the encoder's delayed packets


def _palette_frame(frame: np.ndarray, lossless: bool) -> "av.VideoFrame":
    """An RGB frame as a pal8 frame with its own adaptive palette."""
    image = Image.fromarray(frame)
    if lossless:
        num_colours = len(image.getcolors(maxcolors=GIF_PALETTE_SIZE) or ())
        if num_colours == 0:
            raise ValueError(
                f"lossless=True: a GIF frame holds at most {GIF_PALETTE_SIZE} colours; this one has more."
            )
    paletted = image.quantize(GIF_PALETTE_SIZE, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
    rgb = np.asarray(paletted.getpalette(), dtype=np.uint8).reshape(-1, 3)
    argb = np.zeros((GIF_PALETTE_SIZE, 4), dtype=np.uint8)  # PyAV wants ARGB rows
    argb[:, 0] = 255
    argb[: len(rgb), 1:] = rgb
    return av.VideoFrame.from_ndarray((np.asarray(paletted, dtype=np.uint8), argb), format="pal8")


def write_side_by_side(path: Union[str, os.PathLike], videos: Sequence[torch.Tensor], fps: float = 8) -> Path:
    """Write videos `(C, T, H, W)` in [-1, 1] next to each other (e.g. original | reconstruction)."""
    frames = min(video.shape[1] for video in videos)
    row = torch.cat([video[:, :frames].detach().float().cpu() for video in videos], dim=-1)  # (C, T, H, sum W)
    return write_video(path, row, fps=fps)


__all__ = [
    "VIDEO_SUFFIXES",
    "VideoDecodeError",
    "frames_to_tensor",
    "load_video",
    "read_video_frames",
    "resize_center_crop",
    "tensor_to_frames",
    "write_side_by_side",
    "write_video",
]
