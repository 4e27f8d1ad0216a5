"""Frame conditioning shared by the pipeline and the training scripts (docs/design.md, "Conditioning").

The transformer sees, concatenated on channels, the noisy latents, a conditioning video that holds the
known latent frames (zeros elsewhere) and a one-channel mask marking them. Which frames are known is the
task: the first frame (image-to-video), the first and the last, the last alone, keyframes, the opening
frames of a clip (continuation), or none (text-to-video). Keeping the layout in one place means training
and sampling can never disagree about it.

Pixel frames and latent frames. The causal VAE compresses time by `r` (4): latent frame 0 is pixel frame 0
alone, latent frame k >= 1 holds pixel frames r(k-1)+1 .. rk. Two kinds of known latent frames follow:
- a clip's opening 1 + rm pixel frames encode to exactly its first m + 1 latent frames (the VAE is causal),
  so a continuation's frames, and the first frame, are the clip's own latents (`prefix`);
- any other keyframe is encoded alone, as a one-frame video (as the first frame is), and placed at the
  latent frame whose last pixel frame it is (`keyframe`): keyframes sit at pixel frames 0, r, 2r, ...
"""

from typing import Dict, Mapping, Optional, Tuple

import torch

# One mask channel: a latent frame is known or not (see the module docstring for what "known" holds).
NUM_MASK_CHANNELS = 1
# What a training clip may be conditioned on (besides nothing: `image_dropout` in the training config).
CONDITIONING_TASKS = ("first_frame", "first_last", "last_frame", "keyframes", "continuation")


def num_condition_channels(latent_channels: int) -> int:
    """Channels of the `condition` tensor the transformer takes beside the noisy latents."""
    return latent_channels + NUM_MASK_CHANNELS


def build_condition(latents: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The `(B, C + 1, T, h, w)` condition: `latents` `(B, C, T, h, w)` where `mask` `(B, T)` is set, zeros
    elsewhere, and the mask as the last channel."""
    weight = mask.to(latents.dtype)[:, None, :, None, None]  # (B, 1, T, 1, 1)
    return torch.cat([latents * weight, weight.expand(-1, -1, -1, *latents.shape[3:])], dim=1)


def build_image_condition(
    image_latents: Optional[torch.Tensor],
    num_latent_frames: int,
    *,
    batch_size: Optional[int] = None,
    latent_channels: Optional[int] = None,
    spatial_shape: Optional[tuple] = None,
    dtype: Optional[torch.dtype] = None,
    device: Optional[torch.device] = None,
) -> torch.Tensor:
    """Build the `(B, C + 1, T, h, w)` conditioning video from image latents `(B, C, 1, h, w)` (the first frame).

    With `image_latents=None` (text-to-video / unconditional) the condition is all zeros with mask
    0; then `batch_size`, `latent_channels` and `spatial_shape` say its size.
    """
    if image_latents is None:
        if batch_size is None or latent_channels is None or spatial_shape is None:
            raise ValueError("Without image_latents, pass batch_size, latent_channels and spatial_shape.")
        shape = (batch_size, latent_channels + NUM_MASK_CHANNELS, num_latent_frames, *spatial_shape)
        return torch.zeros(shape, dtype=dtype, device=device)
    if image_latents.ndim != 5 or image_latents.shape[2] != 1:
        raise ValueError(
            "image_latents must be (B, C, 1, h, w), the VAE latent of a one-frame video; "
            f"got {tuple(image_latents.shape)}."
        )
    b, c, _, h, w = image_latents.shape  # (B, C, 1, h, w)
    latents = image_latents.new_zeros((b, c, num_latent_frames, h, w))
    latents[:, :, :1] = image_latents
    mask = torch.zeros(b, num_latent_frames, dtype=torch.bool, device=image_latents.device)
    mask[:, 0] = True
    condition = build_condition(latents, mask)
    return condition if dtype is None else condition.to(dtype)


def keyframe_latent_index(frame_index: int, num_frames: int, temporal_ratio: int, name: str = "frame_index") -> int:
    """The latent frame a keyframe at pixel frame `frame_index` (negative: counted from the end) goes to.

    Raises ValueError naming `name` for an index outside the video, or one between the last pixel frames of
    two latent frames (a latent frame holds `temporal_ratio` pixel frames, and a keyframe is its last one)."""
    if isinstance(frame_index, bool) or not isinstance(frame_index, int):
        raise ValueError(f"{name} must be an integer; got {frame_index!r}.")
    if not -num_frames <= frame_index < num_frames:
        raise ValueError(f"{name} must be in [-{num_frames}, {num_frames - 1}] for a {num_frames}-frame video; "
                         f"got {frame_index}.")  # fmt: skip
    pixel = frame_index % num_frames
    if pixel % temporal_ratio:
        below = pixel - pixel % temporal_ratio
        raise ValueError(
            f"{name} {frame_index} (pixel frame {pixel}) falls inside a latent frame: keyframes go at pixel frames "
            f"0, {temporal_ratio}, {2 * temporal_ratio}, ... (the last frame of each of the causal VAE's latent "
            f"frames); nearest: {below} or {below + temporal_ratio}."
        )
    return pixel // temporal_ratio


def continuation_frames(num_video_frames: int, temporal_ratio: int) -> int:
    """How many opening frames of a `num_video_frames`-frame video a continuation keeps: 1 + r * m, the most
    that encode to whole latent frames."""
    return 1 + temporal_ratio * ((num_video_frames - 1) // temporal_ratio)


def check_task_weights(weights: Mapping[str, float], name: str = "conditioning_tasks") -> Dict[str, float]:
    """`weights` as a plain dict, after checking its keys are tasks and its values non-negative with a positive sum."""
    if not isinstance(weights, Mapping) or not weights:
        raise ValueError(f"{name} must map tasks of {CONDITIONING_TASKS} to weights; got {weights!r}.")
    unknown = sorted(set(weights) - set(CONDITIONING_TASKS))
    if unknown:
        raise ValueError(f"{name} may name {CONDITIONING_TASKS}; got {unknown}.")
    values = {task: float(weight) for task, weight in weights.items()}
    if any(not weight >= 0 for weight in values.values()) or not sum(values.values()) > 0:
        raise ValueError(f"{name} weights must be >= 0 with a positive sum; got {values}.")
    return values


def sample_condition_masks(
    weights: Mapping[str, float], batch_size: int, num_latent_frames: int, generator: torch.Generator
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Draw a task per clip (with `weights`, see `CONDITIONING_TASKS`) -> `(prefix, keyframe)` masks `(B, T)`.

    `prefix` marks latent frames known as the clip's own latents (the first frame, a continuation's opening
    frames), `keyframe` those known as one-frame latents of their last pixel frame (the last frame, keyframes).
    "keyframes" takes each latent frame with probability 1/2 (at least one); "continuation" the first 2 to T - 1.
    The same draws are made whatever the tasks, so a run's random stream does not depend on its outcomes.
    """
    tasks = list(weights)
    probabilities = torch.tensor([weights[task] for task in tasks], dtype=torch.float64)
    drawn = torch.multinomial(probabilities, batch_size, replacement=True, generator=generator)  # (B,)
    coins = torch.rand(batch_size, num_latent_frames, generator=generator) < 0.5  # (B, T) for "keyframes"
    fallback = torch.randint(0, num_latent_frames, (batch_size,), generator=generator)  # when no coin came up
    lengths = torch.randint(2, max(num_latent_frames, 3), (batch_size,), generator=generator)  # "continuation"
    frames = torch.arange(num_latent_frames)
    prefix = torch.zeros(batch_size, num_latent_frames, dtype=torch.bool)
    keyframe = torch.zeros_like(prefix)
    for row, task in enumerate(tasks[i] for i in drawn.tolist()):
        if task in ("first_frame", "first_last"):
            prefix[row, 0] = True
        if task in ("first_last", "last_frame"):
            keyframe[row, -1] = True
        if task == "keyframes":
            chosen = coins[row] if coins[row].any() else frames == fallback[row]
            keyframe[row] = chosen
        if task == "continuation":
            prefix[row] = frames < min(lengths[row].item(), num_latent_frames)
    # Frame 0's one-frame latent is the clip's own latent frame 0 (the VAE is causal): count it as prefix.
    prefix[:, 0] |= keyframe[:, 0]
    keyframe[:, 0] = False
    return prefix, keyframe
