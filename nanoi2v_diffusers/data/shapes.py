"""The built-in synthetic "shapes" dataset (docs/design.md, "The shapes dataset"): no download, deterministic per seed.

Coloured circles, squares and triangles on a black square canvas, each moving at a constant
velocity in one of 8 directions (or standing still) and bouncing off the walls; the caption says
how each one moves. The motion is in the text only: the first frame depends on the seed's
appearance draws alone, so `with_motion` can keep a first frame and give it other motion.

Image coordinates throughout: x to the right, y DOWN, pixel (i, j) has its centre at (j + 0.5, i + 0.5).
"""

import dataclasses
import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from .video_io import frames_to_tensor, write_video

SHAPE_COLOURS: Dict[str, Tuple[int, int, int]] = {
    "red": (255, 0, 0),
    "green": (0, 255, 0),
    "blue": (0, 0, 255),
    "yellow": (255, 255, 0),
    "cyan": (0, 255, 255),
    "magenta": (255, 0, 255),
    "white": (255, 255, 255),
}
SHAPE_KINDS = ("circle", "square", "triangle")

STILL = "still"
_DIAGONAL = 1.0 / math.sqrt(2.0)
# Unit (dx, dy) per direction, dy positive DOWN (image coordinates).
DIRECTIONS: Dict[str, Tuple[float, float]] = {
    "left": (-1.0, 0.0),
    "right": (1.0, 0.0),
    "up": (0.0, -1.0),
    "down": (0.0, 1.0),
    "up-left": (-_DIAGONAL, -_DIAGONAL),
    "up-right": (_DIAGONAL, -_DIAGONAL),
    "down-left": (-_DIAGONAL, _DIAGONAL),
    "down-right": (_DIAGONAL, _DIAGONAL),
    STILL: (0.0, 0.0),
}
MOVING_DIRECTIONS = tuple(name for name in DIRECTIONS if name != STILL)

# Pixels per frame on a REFERENCE_CANVAS-sized canvas; scaled linearly with the canvas.
SPEEDS: Dict[str, float] = {"slowly": 1.0, "normal": 2.0, "quickly": 3.0}
DEFAULT_SPEED = "normal"
REFERENCE_CANVAS = 64

MIN_CANVAS, MAX_CANVAS, CANVAS_MULTIPLE = 32, 256, 8
MAX_OBJECTS = 3
# Objects in the first frame keep at least this many pixels between their bounding boxes.
MIN_GAP_PX = 1
_MAX_PLACEMENT_TRIES = 1000

# Seeds of different splits are disjoint residues modulo len(SPLITS); see `shapes_split_seed`.
SPLITS = ("train", "validation", "test")

_DIRECTION_WORDS = {
    "left": "left",
    "right": "right",
    "up": "up",
    "down": "down",
    "up-left": "up and to the left",
    "up-right": "up and to the right",
    "down-left": "down and to the left",
    "down-right": "down and to the right",
}
_SPEED_WORDS = {"slowly": " slowly", "normal": "", "quickly": " quickly"}  # the default speed goes unsaid
_ARTICLES = ("a", "the")
_JOINERS = (" and ", ", while ")

# Independent random streams per seed: the first frame never depends on the motion draws, and
# the caption wording never depends on either.
_APPEARANCE_STREAM, _MOTION_STREAM, _CAPTION_STREAM = 0, 1, 2


@dataclass(frozen=True)
class ShapesConfig:
    """What the shapes generator draws from. Sizes are fractions of the canvas side."""

    canvas_size: int = 64
    num_frames: int = 17
    min_objects: int = 1
    max_objects: int = 2
    min_size: float = 0.20
    max_size: float = 0.28
    still_probability: float = 0.1
    colours: Tuple[str, ...] = tuple(SHAPE_COLOURS)
    shapes: Tuple[str, ...] = SHAPE_KINDS

    def __post_init__(self):
        _check_canvas_size(self.canvas_size)
        if self.num_frames < 1:
            raise ValueError(f"num_frames must be >= 1, got {self.num_frames}.")
        if not 1 <= self.min_objects <= self.max_objects <= MAX_OBJECTS:
            raise ValueError(
                f"Need 1 <= min_objects <= max_objects <= {MAX_OBJECTS}, "
                f"got {self.min_objects} and {self.max_objects}."
            )
        if not 0.0 < self.min_size <= self.max_size <= 1.0 / MAX_OBJECTS:
            raise ValueError(
                f"Need 0 < min_size <= max_size <= 1/{MAX_OBJECTS}, got {self.min_size} and {self.max_size}."
            )
        lo, hi = self.size_range_px
        if lo > hi:
            raise ValueError(
                f"No whole pixel size in [{self.min_size}, {self.max_size}] x {self.canvas_size} px; widen the range."
            )
        if not 0.0 <= self.still_probability <= 1.0:
            raise ValueError(f"still_probability must be in [0, 1], got {self.still_probability}.")
        _check_names("colours", self.colours, SHAPE_COLOURS)
        _check_names("shapes", self.shapes, SHAPE_KINDS)
        if len(set(self.colours)) < self.max_objects:
            raise ValueError(
                f"Objects get distinct colours: need >= max_objects={self.max_objects} colours, got {self.colours}."
            )

    @property
    def size_range_px(self) -> Tuple[int, int]:
        """Smallest and largest object size (bounding-box side) in whole pixels."""
        # round() first so that e.g. 0.2 * 40 = 8.000000000000002 does not ceil to 9.
        return (
            math.ceil(round(self.min_size * self.canvas_size, 6)),
            math.floor(round(self.max_size * self.canvas_size, 6)),
        )

    @property
    def speed_scale(self) -> float:
        return self.canvas_size / REFERENCE_CANVAS


def _check_canvas_size(size: int) -> None:
    if size % CANVAS_MULTIPLE or not MIN_CANVAS <= size <= MAX_CANVAS:
        nearest = min(max(CANVAS_MULTIPLE * round(size / CANVAS_MULTIPLE), MIN_CANVAS), MAX_CANVAS)
        raise ValueError(
            f"canvas_size must be a multiple of {CANVAS_MULTIPLE} in [{MIN_CANVAS}, {MAX_CANVAS}], "
            f"got {size}; nearest valid value: {nearest}."
        )


def _check_names(field: str, names: Sequence[str], allowed) -> None:
    unknown = [name for name in names if name not in allowed]
    if unknown or not names:
        raise ValueError(f"{field} must be a non-empty subset of {list(allowed)}, got {tuple(names)}.")


@dataclass(frozen=True)
class ShapeObject:
    """One object: its look, its centre at frame 0 (float px), and its motion."""

    shape: str
    colour: str
    size_px: int
    x: float
    y: float
    direction: str = STILL
    speed: str = DEFAULT_SPEED

    def __post_init__(self):
        for field, value, allowed in (
            ("shape", self.shape, SHAPE_KINDS),
            ("colour", self.colour, SHAPE_COLOURS),
            ("direction", self.direction, DIRECTIONS),
            ("speed", self.speed, SPEEDS),
        ):
            if value not in allowed:
                raise ValueError(f"Unknown {field} {value!r}; choose one of {list(allowed)}.")
        if self.size_px < 1:
            raise ValueError(f"size_px must be >= 1, got {self.size_px}.")

    def velocity(self, canvas_size: int) -> Tuple[float, float]:
        """(vx, vy) in px per frame on a canvas of this size (before any bounce)."""
        dx, dy = DIRECTIONS[self.direction]
        pixels = SPEEDS[self.speed] * canvas_size / REFERENCE_CANVAS
        return dx * pixels, dy * pixels


@dataclass
class ShapesClip:
    """A rendered clip with everything needed to score a generated one against it."""

    video: np.ndarray  # (T, H, W, 3) uint8
    caption: str
    first_frame: np.ndarray  # (H, W, 3) uint8, the conditioning image
    objects: List[ShapeObject]
    trajectories: np.ndarray  # (num_objects, T, 2) centre (x, y) per frame, float32
    seed: Optional[int]


# ----------------------------------------------------------------------------- sampling


def sample_scene(seed: int, config: Optional[ShapesConfig] = None) -> List[ShapeObject]:
    """Draw the objects of clip `seed`: appearance and motion come from separate random streams."""
    config = config or ShapesConfig()
    _check_seed(seed)
    appearance_rng = np.random.default_rng([seed, _APPEARANCE_STREAM])
    motion_rng = np.random.default_rng([seed, _MOTION_STREAM])
    looks = _sample_appearance(appearance_rng, config)
    return [ShapeObject(**look, **_sample_motion(motion_rng, config)) for look in looks]


def _check_seed(seed) -> None:
    if not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}.")


def _sample_appearance(rng: np.random.Generator, config: ShapesConfig) -> List[dict]:
    count = int(rng.integers(config.min_objects, config.max_objects + 1))
    colours = rng.choice(config.colours, size=count, replace=False)
    shapes = rng.choice(config.shapes, size=count)
    lo, hi = config.size_range_px
    sizes = [int(size) for size in rng.integers(lo, hi + 1, size=count)]
    corners = _place_boxes(rng, sizes, config.canvas_size)
    return [
        dict(shape=str(shape), colour=str(colour), size_px=int(size), x=left + size / 2.0, y=top + size / 2.0)
        for shape, colour, size, (left, top) in zip(shapes, colours, sizes, corners)
    ]


def _place_boxes(rng: np.random.Generator, sizes: List[int], canvas: int) -> List[Tuple[int, int]]:
    """Whole-pixel top-left corners of non-overlapping boxes (edges on pixel borders: crisp frame 0)."""
    placed: List[Tuple[int, int, int]] = []
    for size in sizes:
        for _ in range(_MAX_PLACEMENT_TRIES):
            left, top = (int(v) for v in rng.integers(0, canvas - size + 1, size=2))
            if all(_boxes_apart((left, top, size), other) for other in placed):
                placed.append((left, top, size))
                break
        else:
            raise RuntimeError(f"Could not place {len(sizes)} objects of sizes {sizes} on a {canvas} px canvas.")
    return [(left, top) for left, top, _ in placed]


def _boxes_apart(a: Tuple[int, int, int], b: Tuple[int, int, int]) -> bool:
    (ax, ay, asz), (bx, by, bsz) = a, b
    apart_x = ax + asz + MIN_GAP_PX <= bx or bx + bsz + MIN_GAP_PX <= ax
    apart_y = ay + asz + MIN_GAP_PX <= by or by + bsz + MIN_GAP_PX <= ay
    return apart_x or apart_y


def _sample_motion(rng: np.random.Generator, config: ShapesConfig) -> dict:
    # Always the same three draws, so one object standing still does not shift the others' motion.
    still = rng.random() < config.still_probability
    direction = str(rng.choice(MOVING_DIRECTIONS))
    speed = str(rng.choice(tuple(SPEEDS)))
    return dict(direction=STILL, speed=DEFAULT_SPEED) if still else dict(direction=direction, speed=speed)


def with_motion(
    objects: Sequence[ShapeObject],
    directions: Union[str, Sequence[str]],
    speeds: Union[None, str, Sequence[str]] = None,
) -> List[ShapeObject]:
    """The same objects (same first frame) with other motion: one direction (and speed) per object.

    A single string applies to every object; `speeds=None` keeps each object's speed.
    """
    directions = _per_object("directions", directions, len(objects))
    speeds = [obj.speed for obj in objects] if speeds is None else _per_object("speeds", speeds, len(objects))
    return [dataclasses.replace(obj, direction=d, speed=s) for obj, d, s in zip(objects, directions, speeds)]


def _per_object(name: str, values: Union[str, Sequence[str]], count: int) -> List[str]:
    if isinstance(values, str):
        return [values] * count
    if len(values) != count:
        raise ValueError(f"Need one of {name} per object: got {len(values)} for {count} objects.")
    return list(values)


# ----------------------------------------------------------------------------- captions


def caption_for(objects: Sequence[ShapeObject], rng_or_seed: Union[int, np.random.Generator]) -> str:
    """One clause per object ("the blue square moves up and to the right quickly"), joined by
    " and " or ", while ". The seed picks only the wording (articles, joiners), with a fixed number
    of draws, so two motions of the same scene and seed get the same wording."""
    if not objects:
        raise ValueError("A caption needs at least one object.")
    rng = rng_or_seed if isinstance(rng_or_seed, np.random.Generator) else _caption_rng(rng_or_seed)
    articles = rng.choice(_ARTICLES, size=len(objects))
    joiners = rng.choice(_JOINERS, size=len(objects) - 1)
    clauses = [_clause(obj, str(article)) for obj, article in zip(objects, articles)]
    caption = clauses[0]
    for joiner, clause in zip(joiners, clauses[1:]):
        caption += str(joiner) + clause
    return caption


def _caption_rng(seed: Optional[int]) -> np.random.Generator:
    return np.random.default_rng([0 if seed is None else int(seed), _CAPTION_STREAM])


def _clause(obj: ShapeObject, article: str) -> str:
    if obj.direction == STILL:
        motion = "stays still"
    else:
        motion = f"moves {_DIRECTION_WORDS[obj.direction]}{_SPEED_WORDS[obj.speed]}"
    return f"{article} {obj.colour} {obj.shape} {motion}"


def _clause_pattern() -> "re.Pattern[str]":
    """Matches one clause of `caption_for`: groups "subject" ("the red circle") and "motion" (with its speed)."""
    # Longest first: "moves up and to the left" must not match as "moves up".
    motions = sorted([f"moves {words}" for words in _DIRECTION_WORDS.values()] + ["stays still"], key=len, reverse=True)
    speeds = [words for words in _SPEED_WORDS.values() if words]
    articles = "|".join(_ARTICLES)
    subject = rf"(?:{articles}) (?:{'|'.join(SHAPE_COLOURS)}) (?:{'|'.join(SHAPE_KINDS)})"
    motion = rf"(?:{'|'.join(motions)})(?:{'|'.join(speeds)})?"
    clause_end = rf"$|(?:{'|'.join(_JOINERS)})(?:{articles}) "  # the caption's end or the next clause
    return re.compile(rf"\b(?P<subject>{subject}) (?P<motion>{motion})(?={clause_end})")


_CLAUSE = _clause_pattern()
# Where `caption_for` joins two clauses: a joiner followed by the next clause's article (so the "and" of
# "moves up and to the left" is not one). For `NanoI2VPipeline(text_clause_separator=...)` and the DiT training
# config's `text_clause_separator`: each object's clause is then encoded on its own.
CAPTION_CLAUSE_SEPARATOR = rf"(?:{'|'.join(_JOINERS)})(?=(?:{'|'.join(_ARTICLES)}) )"


# What the built-in model was trained on, in words, and the limits `unlike_shapes` holds an input to.
SHAPES_DOMAIN = ("64 x 64 coloured circles, squares and triangles on black, moving as English captions like "
                 "'the red circle moves left' say, over 17 frames")  # fmt: skip
_LIT_LEVEL = 0.25  # a pixel brighter than this in any channel is not background
_MAX_LIT_FRACTION = 0.5  # objects cover at most about a sixth of a shapes frame


def unlike_shapes(images: Sequence[np.ndarray], prompts: Sequence[str], height: int, width: int,
                  num_frames: int) -> List[str]:  # fmt: skip
    """How an input is clearly unlike the shapes clips, in words (empty when it is like them).

    `images` are `(H, W, 3)` arrays (uint8, or floats in [0, 1]) as the pipeline uses them. Only clear cases
    count: a mostly non-black image, a prompt that names no known colour or shape (or is not English), another
    size or length than the clips'.
    """
    reasons = []
    lit = [_lit_fraction(image) for image in images]
    if lit and max(lit) > _MAX_LIT_FRACTION:
        reasons.append(f"an image is {max(lit):.0%} non-black")
    for prompt in (p for p in prompts if p):
        words = set(re.findall(r"[a-z]+", prompt.lower()))
        if not prompt.isascii():
            reasons.append(f"the prompt {prompt[:40]!r} is not English")
        elif not words & set(SHAPE_COLOURS) or not words & set(SHAPE_KINDS):
            reasons.append(f"the prompt {prompt[:40]!r} names no known colour and shape")
    if (height, width) != (64, 64):
        reasons.append(f"the size is {width} x {height}")
    if num_frames != 17:
        reasons.append(f"{num_frames} frames")
    return reasons


def _lit_fraction(image: np.ndarray) -> float:
    """The fraction of an image's pixels that are not background (black)."""
    image = np.asarray(image)
    scale = 255.0 if image.dtype == np.uint8 else 1.0
    return float(np.mean(image.astype(np.float32).max(axis=-1) / scale > _LIT_LEVEL))


def swap_motions(caption: str) -> str:
    """The caption with each object's motion handed to the next object (two objects: exchanged), same wording
    otherwise; "" when the caption names fewer than two objects in `caption_for`'s grammar.

    A negative prompt for binding: a small DiT often gives an object its partner's motion, which guidance
    against no text does not penalise (both captions name the same motions). Use it on a guidance term of its
    own (`NanoI2VPipeline(..., negative_guidance_scale=2)`); as CFG's unconditional branch it loses objects.
    README "Sampling against swapped motions" has the measurements.
    """
    clauses = list(_CLAUSE.finditer(caption))
    if len(clauses) < 2:
        return ""
    motions = [clause.group("motion") for clause in clauses]
    pieces, end = [], 0
    for clause, motion in zip(clauses, motions[1:] + motions[:1]):
        pieces += [caption[end : clause.start("motion")], motion]
        end = clause.end("motion")
    return "".join(pieces) + caption[end:]


# ----------------------------------------------------------------------------- rendering


def trajectories_for(objects: Sequence[ShapeObject], config: Optional[ShapesConfig] = None) -> np.ndarray:
    """Centre (x, y) of every object at every frame, bouncing off the walls: (num_objects, T, 2)."""
    config = config or ShapesConfig()
    frames = np.arange(config.num_frames, dtype=np.float64)
    tracks = np.zeros((len(objects), config.num_frames, 2), dtype=np.float64)
    for index, obj in enumerate(objects):
        radius = obj.size_px / 2.0
        for axis, (start, speed) in enumerate(zip((obj.x, obj.y), obj.velocity(config.canvas_size))):
            tracks[index, :, axis] = _bounce(start + speed * frames, radius, config.canvas_size - radius)
    return tracks.astype(np.float32)


def _bounce(unfolded: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Fold free-flight positions back into [lo, hi] as elastic reflections off both walls."""
    span = hi - lo
    if span <= 0:
        return np.full_like(unfolded, lo)
    phase = np.mod(unfolded - lo, 2.0 * span)
    return lo + np.where(phase > span, 2.0 * span - phase, phase)


def render_clip(
    objects: Sequence[ShapeObject], config: Optional[ShapesConfig] = None, seed: Optional[int] = None
) -> ShapesClip:
    """Draw the objects' motion into a clip (later objects drawn on top); `seed` picks the caption
    wording and is recorded in the clip."""
    config = config or ShapesConfig()
    _check_objects_fit(objects, config)
    tracks = trajectories_for(objects, config)  # (N, T, 2)
    size = config.canvas_size
    video = np.zeros((config.num_frames, size, size, 3), dtype=np.uint8)  # (T, H, W, 3), black
    for t in range(config.num_frames):
        for obj, (x, y) in zip(objects, tracks[:, t]):
            _draw(video[t], obj, float(x), float(y))
    return ShapesClip(
        video=video,
        caption=caption_for(objects, _caption_rng(seed)),
        first_frame=video[0].copy(),
        objects=list(objects),
        trajectories=tracks,
        seed=seed,
    )


def _check_objects_fit(objects: Sequence[ShapeObject], config: ShapesConfig) -> None:
    if not objects:
        raise ValueError("A clip needs at least one object.")
    for obj in objects:
        radius, limit = obj.size_px / 2.0, config.canvas_size - obj.size_px / 2.0
        if not (radius <= obj.x <= limit and radius <= obj.y <= limit):
            raise ValueError(
                f"{obj.colour} {obj.shape} (size {obj.size_px}) at ({obj.x}, {obj.y}) leaves the "
                f"{config.canvas_size} px canvas: its centre must lie in [{radius}, {limit}]."
            )


def _draw(frame: np.ndarray, obj: ShapeObject, x: float, y: float) -> None:
    """Paint `obj` centred at (x, y) into `frame` (H, W, 3), testing only pixels of its bounding box."""
    radius = obj.size_px / 2.0
    top, left = max(0, math.floor(y - radius)), max(0, math.floor(x - radius))
    bottom, right = min(frame.shape[0], math.ceil(y + radius) + 1), min(frame.shape[1], math.ceil(x + radius) + 1)
    dx = np.arange(left, right, dtype=np.float64)[None, :] + 0.5 - x  # pixel centres sit at +0.5
    dy = np.arange(top, bottom, dtype=np.float64)[:, None] + 0.5 - y
    frame[top:bottom, left:right][_shape_mask(obj.shape, dx, dy, radius)] = SHAPE_COLOURS[obj.colour]


def _shape_mask(shape: str, dx: np.ndarray, dy: np.ndarray, radius: float) -> np.ndarray:
    """Pixels whose centre lies inside the shape; dx, dy are offsets from its centre.

    Half-open extents keep a square exactly `2 * radius` pixels wide at any sub-pixel position.
    """
    inside_y = (dy >= -radius) & (dy < radius)
    if shape == "square":
        return inside_y & (dx >= -radius) & (dx < radius)
    if shape == "circle":
        return dx * dx + dy * dy < radius * radius
    # Triangle pointing up: apex at the top centre, base along the bottom edge of the box.
    return inside_y & (np.abs(dx) <= 0.5 * (dy + radius))


def generate_shapes_clip(seed: int, config: Optional[ShapesConfig] = None) -> ShapesClip:
    """Clip number `seed`: `sample_scene` + `render_clip`."""
    config = config or ShapesConfig()
    return render_clip(sample_scene(seed, config), config, seed=seed)


# ----------------------------------------------------------------------------- dataset


def shapes_split_seed(split: str, index: int, base_seed: int = 0) -> int:
    """Seed of clip `index` of `split`: `(base_seed + index) * len(SPLITS) + SPLITS.index(split)`.

    Splits take different residues modulo 3, so train, validation and test never share a seed,
    whatever their lengths; `base_seed` shifts the window within a split.
    """
    if split not in SPLITS:
        raise ValueError(f"Unknown split {split!r}; choose one of {list(SPLITS)}.")
    if index < 0 or base_seed < 0:
        raise ValueError(f"index and base_seed must be >= 0, got {index} and {base_seed}.")
    return (base_seed + index) * len(SPLITS) + SPLITS.index(split)


class ShapesDataset(Dataset):
    """Map-style dataset of shapes clips, generated on the fly (any length, deterministic).

    Items: `{"pixel_values": (C, T, H, W) float32 in [-1, 1], "caption": str, "seed": int}`.
    No flips or other augmentation: a horizontal flip would contradict "left" / "right" captions.
    """

    def __init__(self, num_samples: int, split: str = "train", config: Optional[ShapesConfig] = None, seed: int = 0):
        if num_samples < 0:
            raise ValueError(f"num_samples must be >= 0, got {num_samples}.")
        shapes_split_seed(split, 0, seed)  # validates split and seed
        self.num_samples = num_samples
        self.split = split
        self.config = config or ShapesConfig()
        self.seed = seed

    def __len__(self) -> int:
        return self.num_samples

    def clip_seed(self, index: int) -> int:
        if not -self.num_samples <= index < self.num_samples:
            raise IndexError(f"index {index} out of range for a dataset of {self.num_samples} clips.")
        return shapes_split_seed(self.split, index % self.num_samples, self.seed)

    def clip(self, index: int) -> ShapesClip:
        """The full clip (video, caption, objects, trajectories) behind item `index`."""
        return generate_shapes_clip(self.clip_seed(index), self.config)

    def __getitem__(self, index: int) -> dict:
        clip = self.clip(index)
        return {"pixel_values": frames_to_tensor(clip.video), "caption": clip.caption, "seed": clip.seed}


def write_shapes_folder(
    out_dir: Union[str, os.PathLike],
    num_clips: int,
    split: str = "train",
    config: Optional[ShapesConfig] = None,
    seed: int = 0,
    fps: float = 8,
    lossless: bool = True,
) -> Path:
    """Write clips `clip_00000.mp4`, ... and `metadata.jsonl` (`file_name`, `text`, `seed`) to
    `out_dir`: the video-folder layout that `VideoFolderDataset` and `datasets`' videofolder read."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    dataset = ShapesDataset(num_clips, split=split, config=config, seed=seed)
    records = []
    for index in tqdm(range(num_clips), desc=f"Writing {split} shapes clips", unit="clip"):
        clip = dataset.clip(index)
        file_name = f"clip_{index:05d}.mp4"
        write_video(out_dir / file_name, clip.video, fps=fps, lossless=lossless)
        records.append({"file_name": file_name, "text": clip.caption, "seed": clip.seed})
    metadata = out_dir / "metadata.jsonl"
    partial = out_dir / ".metadata.jsonl.partial"
    partial.write_text("".join(json.dumps(record) + "\n" for record in records), encoding="utf-8")
    os.replace(partial, metadata)  # readers never see a half-written metadata file
    return out_dir


__all__ = [
    "CAPTION_CLAUSE_SEPARATOR",
    "DEFAULT_SPEED",
    "DIRECTIONS",
    "SHAPE_COLOURS",
    "SHAPE_KINDS",
    "SPEEDS",
    "SPLITS",
    "STILL",
    "ShapeObject",
    "ShapesClip",
    "ShapesConfig",
    "ShapesDataset",
    "caption_for",
    "generate_shapes_clip",
    "render_clip",
    "sample_scene",
    "shapes_split_seed",
    "trajectories_for",
    "with_motion",
    "write_shapes_folder",
]
