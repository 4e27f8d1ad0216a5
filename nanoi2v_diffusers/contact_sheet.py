"""Contact sheets: videos as rows of frames with a caption under each row (for READMEs and logs)."""

from pathlib import Path
from typing import Sequence, Union

import numpy as np
from PIL import Image, ImageDraw, ImageFont

CAPTION_HEIGHT = 14
GAP = 2
TEXT_COLOUR = (235, 235, 235)
BACKGROUND = (32, 32, 32)


def make_contact_sheet(
    videos: Sequence[np.ndarray],
    captions: Sequence[str],
    frame_step: int = 2,
    scale: int = 1,
) -> Image.Image:
    """One row per video `(F, H, W, 3)` uint8, every `frame_step`-th frame, the caption below the row."""
    if len(videos) != len(captions):
        raise ValueError(f"Got {len(videos)} videos but {len(captions)} captions: pass one caption per video.")
    if frame_step < 1:
        raise ValueError(f"frame_step must be >= 1; got {frame_step}.")
    rows = [np.concatenate(_with_gaps(list(video[::frame_step])), axis=1) for video in videos]
    width = max(row.shape[1] for row in rows) * scale
    font = ImageFont.load_default()
    row_heights = [row.shape[0] * scale + CAPTION_HEIGHT for row in rows]
    sheet = Image.new("RGB", (width, sum(row_heights) + GAP * (len(rows) - 1)), BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    top = 0
    for row, caption, height in zip(rows, captions, row_heights):
        image = Image.fromarray(row).resize((row.shape[1] * scale, row.shape[0] * scale), Image.NEAREST)
        sheet.paste(image, (0, top))
        draw.text((2, top + image.height + 1), caption, fill=TEXT_COLOUR, font=font)
        top += height + GAP
    return sheet


def _with_gaps(frames: Sequence[np.ndarray]) -> Sequence[np.ndarray]:
    gap = np.full((frames[0].shape[0], GAP, 3), BACKGROUND, dtype=np.uint8)
    out = []
    for index, frame in enumerate(frames):
        out.extend([frame] if index == 0 else [gap, frame])
    return out


def save_contact_sheet(
    path: Union[str, Path], videos: Sequence[np.ndarray], captions: Sequence[str], frame_step: int = 2, scale: int = 1
) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    make_contact_sheet(videos, captions, frame_step=frame_step, scale=scale).save(path)
    return path
