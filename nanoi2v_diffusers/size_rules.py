"""The size rules of videos and latents, with errors that state the rule and the nearest valid value.

Videos have `T = 1 + r_t * k` frames (the first frame is encoded on its own, then groups of `r_t`)
and `H`, `W` multiples of the spatial factor; the pipeline, the VAE and the transformer all check
their inputs with these functions so that the messages agree.
"""

import math


def nearest_multiple(value: float, multiple: int) -> int:
    """The positive multiple of `multiple` closest to `value` (halves round up)."""
    return max(multiple, multiple * int(value / multiple + 0.5))


def nearest_frame_count(num_frames: float, ratio: int) -> int:
    """The valid frame count `1 + ratio * k` closest to `num_frames` (ties go to the shorter clip)."""
    return 1 + ratio * max(0, math.ceil((num_frames - 1) / ratio - 0.5))


def check_multiple(name: str, value, multiple: int, why: str = "") -> None:
    """Raise ValueError unless `value` is a positive integer multiple of `multiple`."""
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0 or value % multiple:
        nearest = nearest_multiple(value, multiple) if isinstance(value, (int, float)) else multiple
        reason = f" ({why})" if why else ""
        raise ValueError(f"{name} must be a positive multiple of {multiple}{reason}; got {value}, nearest valid is {nearest}.")


def check_frame_count(name: str, num_frames, ratio: int) -> None:
    """Raise ValueError unless `num_frames` is `1 + ratio * k` for an integer k >= 0."""
    if isinstance(num_frames, bool) or not isinstance(num_frames, int) or num_frames < 1 or (num_frames - 1) % ratio:
        nearest = nearest_frame_count(num_frames, ratio) if isinstance(num_frames, (int, float)) else 1
        examples = ", ".join(str(1 + ratio * k) for k in range(4))
        raise ValueError(f"{name} must be 1 + {ratio}*k ({examples}, ...); got {num_frames}, nearest valid is {nearest}.")
