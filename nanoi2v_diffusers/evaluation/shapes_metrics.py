"""Motion metrics for generated "shapes" videos, scored against the generator's ground truth.

A generated video is matched to the `ShapesClip` its first frame and caption came from:

- colour tracking: the palette colours are exact and far apart, so each object is found by its
  colour, frame by frame; its track is the centroid (x, y) of its pixels, NaN when not visible;
- direction accuracy: the fraction of objects whose generated motion goes the caption's way
  (8 directions or "still"): the direction whose bouncing path, at any caption speed, best fits
  the generated track (see `predict_directions`);
- centroid error: the mean distance in pixels between the generated track and the ground truth;
- first-frame PSNR: the generated frame 0 against the conditioning image;
- text-swap: same first frame, two captions with different motions: does each video follow its
  own caption better than the other one (see `text_swap_outcome`)?

Tasks beyond image-to-video (`EVAL_TASKS`, frames given per `task_known_frames`) add: the PSNR of the given
keyframes beyond frame 0 (first and last frame: the last one), the centroid error on the frames between the
first and the last given frame, and for a continuation the direction accuracy of the generated part alone and
the PSNR at the seam (the first generated frame).

`static_baseline` (the first frame repeated) is scored with the same functions, so reports can
show what a model that ignores the text and never moves would get. Means over scenes come with
their standard error (`standard_error`): at 64 scenes it is about 0.05 for direction accuracy, so
two models closer than about twice that are not told apart by one evaluation.

Frames where two objects overlap in the ground truth are left out of the tracking metrics: the
centroid of a partly hidden object is not where the object is.
"""

import contextlib
import dataclasses
import time
from dataclasses import asdict, dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from ..data.shapes import (
    DEFAULT_SPEED,
    DIRECTIONS,
    MOVING_DIRECTIONS,
    REFERENCE_CANVAS,
    SHAPE_COLOURS,
    SPEEDS,
    STILL,
    ShapeObject,
    ShapesClip,
    ShapesConfig,
    ShapesDataset,
    render_clip,
    trajectories_for,
    with_motion,
)
from .frechet import FrechetDistance
from .metrics import psnr

# A pixel shows a palette colour when every channel is within this distance (in [0, 1] units) of
# it. Generated colours are only approximately the palette's (the VAE and sampling blur edges and
# shift hues by tens of levels), so the tolerance is wide; it stays below 0.5 because every palette
# colour and the black background have channels of exactly 0 or 1 and differ from each other by 1
# in at least one channel: below 0.5, a pixel matches at most one of them.
COLOUR_TOLERANCE = 0.4
# An object is visible in a frame when at least this fraction of its ground-truth pixel count
# there shows its colour; fewer pixels are stray noise of that colour, not the object.
MIN_VISIBLE_FRACTION = 0.2
# An object found on fewer than this fraction of its scored frames has no direction (it is
# "lost"), which counts as wrong.
MIN_TRACKED_FRACTION = 0.5
LOST = "lost"
# Every motion a caption can state, as (direction, speed); "still" has one speed.
CAPTION_MOTIONS: Tuple[Tuple[str, str], ...] = ((STILL, DEFAULT_SPEED),) + tuple(
    (direction, speed) for direction in MOVING_DIRECTIONS for speed in SPEEDS
)
# Mean distances (px) within this of each other are a tie between candidate paths (see
# `predict_directions`); real differences between distinct paths are whole pixels.
PATH_TIE_PX = 1e-3
# A text-swap partner's path keeps at least this mean distance (px at 64 px, scaled with the
# canvas) from the original's, so the two captions ask for clearly different videos: tracked
# centroids are exact to about half a pixel, and this leaves room for a generated object's jitter.
MIN_SWAP_SEPARATION_PX = 4.0
# Random stream for drawing a clip's text-swap partner, apart from the generator's own streams.
_TEXT_SWAP_STREAM = 101


def video_as_float(video) -> np.ndarray:
    """(T, H, W, 3) uint8, or floats in [0, 1] -> float32 in [0, 1]."""
    video = np.asarray(video)
    if video.ndim != 4 or video.shape[-1] != 3:
        raise ValueError(f"A video must be (T, H, W, 3), uint8 or floats in [0, 1]; got shape {video.shape}.")
    if video.dtype == np.uint8:
        return video.astype(np.float32) / 255.0
    return video.astype(np.float32, copy=False)


def colour_masks(video, colour: str) -> np.ndarray:
    """(T, H, W) bool: pixels within `COLOUR_TOLERANCE` of the palette colour `colour`."""
    target = np.asarray(SHAPE_COLOURS[colour], dtype=np.float32) / 255.0
    return np.all(np.abs(video_as_float(video) - target) <= COLOUR_TOLERANCE, axis=-1)


def mask_centroids(masks: np.ndarray, min_pixels) -> Tuple[np.ndarray, np.ndarray]:
    """Centroids (T, 2) as (x, y) of boolean masks (T, H, W), in the generator's coordinates (pixel
    (i, j) has its centre at (j + 0.5, i + 0.5)); NaN where a mask has fewer than `min_pixels`
    (a number or one per frame). Also returns the pixel counts (T,)."""
    counts = masks.sum(axis=(1, 2))
    rows = np.arange(masks.shape[1]) + 0.5
    cols = np.arange(masks.shape[2]) + 0.5
    with np.errstate(invalid="ignore", divide="ignore"):
        x = (masks.sum(axis=1) * cols).sum(axis=1) / counts
        y = (masks.sum(axis=2) * rows).sum(axis=1) / counts
    centroids = np.stack([x, y], axis=-1)
    centroids[(counts < np.asarray(min_pixels)) | (counts == 0)] = np.nan
    return centroids, counts


def _clip_config(clip: ShapesClip) -> ShapesConfig:
    num_frames, canvas_size = clip.video.shape[:2]
    return ShapesConfig(canvas_size=canvas_size, num_frames=num_frames)


@dataclass
class GroundTruthTracks:
    """What a perfect video would show, per object, from each object rendered on its own."""

    centroids: np.ndarray  # (N, T, 2) pixel centroid (x, y): the trajectory centre as drawn
    pixel_counts: np.ndarray  # (N, T) how many pixels the object covers
    overlapped: np.ndarray  # (N, T) bool, the object shares a pixel with another one in this frame


def ground_truth_tracks(clip: ShapesClip) -> GroundTruthTracks:
    """Render each object alone to get its exact pixels, then mark the frames where objects overlap."""
    config = _clip_config(clip)
    solo = np.stack([render_clip([obj], config).video.any(axis=-1) for obj in clip.objects])  # (N, T, H, W)
    centroids, counts = mask_centroids(solo.reshape(-1, *solo.shape[2:]), min_pixels=1)
    others = solo.sum(axis=0, keepdims=True) - solo  # (N, T, H, W) how many other objects cover each pixel
    overlapped = np.any(solo & (others > 0), axis=(2, 3))
    num_objects, num_frames = solo.shape[:2]
    return GroundTruthTracks(
        centroids=centroids.reshape(num_objects, num_frames, 2),
        pixel_counts=counts.reshape(num_objects, num_frames),
        overlapped=overlapped,
    )


def track_objects(video, clip: ShapesClip, truth: Optional[GroundTruthTracks] = None) -> np.ndarray:
    """Colour-track every object of `clip` in `video` (T, H, W, 3): centroids (N, T, 2), NaN when
    the object shows fewer than `MIN_VISIBLE_FRACTION` of its ground-truth pixels in a frame."""
    truth = truth or ground_truth_tracks(clip)
    video = video_as_float(video)
    if video.shape != clip.video.shape:
        raise ValueError(f"The video must have the ground truth's shape {clip.video.shape}; got {video.shape}.")
    tracks = [
        mask_centroids(colour_masks(video, obj.colour), MIN_VISIBLE_FRACTION * counts)[0]
        for obj, counts in zip(clip.objects, truth.pixel_counts)
    ]
    return np.stack(tracks)


def _candidate_paths(obj: ShapeObject, config: ShapesConfig, offset: np.ndarray) -> np.ndarray:
    """(len(CAPTION_MOTIONS), T, 2): where `obj`'s pixel centroid goes under each caption motion."""
    directions, speeds = zip(*CAPTION_MOTIONS)
    candidates = with_motion([obj] * len(CAPTION_MOTIONS), list(directions), list(speeds))
    return trajectories_for(candidates, config).astype(np.float64) + offset


def _motions_in_direction(direction: str) -> List[int]:
    return [index for index, (name, _) in enumerate(CAPTION_MOTIONS) if name == direction]


def predict_directions(video, clip: ShapesClip, truth: Optional[GroundTruthTracks] = None) -> List[Optional[str]]:
    """The caption direction that best explains each object's track in `video`.

    For every motion a caption can state (`CAPTION_MOTIONS`: still, or one of the 8 directions at
    one of the 3 speeds) the generator's own physics (`trajectories_for`: the object's start,
    constant velocity, bounces off the walls) gives the path the object would follow. The
    prediction is the direction of the path nearest to the generated track (mean distance over
    the frames where the object is found and no objects overlap in the ground truth).

    Why not the direction of the net displacement with a threshold: bounces scramble it (a
    square moving up from near the top wall spends most of the clip moving down), the frames
    before the first bounce number anywhere from 1 to 16, and unfolding the track by the ground
    truth's bounces punishes a right direction at a wrong speed, whose bounces come at other
    times. The fit is bounce-aware and speed-agnostic (any caption speed counts), and it needs no
    separate still threshold: a track is "still" when it is nearer to standing still than to the
    slowest path, i.e. below about half the slowest speed (0.5 px per frame at 64 px; it scales
    with the canvas like the speeds do). When the caption's own path ties the best one within
    `PATH_TIE_PX` (an object touching the top wall and moving "up" bounces at once and follows
    the "down" path exactly) the caption's direction is predicted.

    Entries are "lost" when the object is found on fewer than `MIN_TRACKED_FRACTION` of the
    scored frames, and None when overlaps leave no frame to score.
    """
    truth = truth or ground_truth_tracks(clip)
    return _directions_from_tracks(track_objects(video, clip, truth), clip, truth)


def _directions_from_tracks(tracks: np.ndarray, clip: ShapesClip, truth: GroundTruthTracks) -> List[Optional[str]]:
    """`predict_directions` for tracks (N, T, 2) already measured."""
    scored = ~truth.overlapped  # (N, T)
    found = scored & ~np.isnan(tracks).any(axis=-1)
    # The generator's trajectories are box centres; the tracker sees pixel centroids (a
    # triangle's sits lower). Frame 0 never has overlaps, so it gives each object's offset.
    offsets = truth.centroids[:, 0] - clip.trajectories[:, 0]  # (N, 2)
    config = _clip_config(clip)
    predictions = []
    for obj, track, object_scored, object_found, offset in zip(clip.objects, tracks, scored, found, offsets):
        if not object_scored.any():
            predictions.append(None)
        elif object_found.sum() < MIN_TRACKED_FRACTION * object_scored.sum():
            predictions.append(LOST)
        else:
            paths = _candidate_paths(obj, config, offset)[:, object_found]  # (M, F, 2)
            distances = np.linalg.norm(paths - track[object_found], axis=-1).mean(axis=1)  # (M,)
            own = min(_motions_in_direction(obj.direction), key=distances.__getitem__)
            best = own if distances[own] <= distances.min() + PATH_TIE_PX else int(np.argmin(distances))
            predictions.append(CAPTION_MOTIONS[best][0])
    return predictions


def _only_frames(truth: GroundTruthTracks, frames: np.ndarray) -> GroundTruthTracks:
    """`truth` with every frame outside the boolean `frames` (T,) left out of scoring (as an overlap is)."""
    return dataclasses.replace(truth, overlapped=truth.overlapped | ~frames[None])


def direction_accuracy(video, clip: ShapesClip, truth: Optional[GroundTruthTracks] = None) -> float:
    """Fraction of the scored objects of `clip` that move in `video` the way the caption says."""
    return _accuracy(predict_directions(video, clip, truth), clip)


def _accuracy(predictions: Sequence[Optional[str]], clip: ShapesClip) -> float:
    hits = [guess == obj.direction for guess, obj in zip(predictions, clip.objects) if guess is not None]
    return float(np.mean(hits)) if hits else float("nan")


def first_frame_psnr(video, clip: ShapesClip) -> float:
    """PSNR (dB) of the video's frame 0 against the conditioning image; inf when identical."""
    generated = torch.from_numpy(video_as_float(video)[0]).permute(2, 0, 1)[None]  # (1, 3, H, W)
    reference = torch.from_numpy(video_as_float(clip.first_frame[None])[0]).permute(2, 0, 1)[None]
    return float(psnr(generated, reference)[0])


# PSNR of identical videos (and frames): a finite cap, so that a mean over scenes stays finite when a video is
# exact (the static baseline of a scene whose objects all stay still). 8-bit rounding alone scores about 59 dB.
VIDEO_PSNR_CAP_DB = 60.0


def video_psnr(video, clip: ShapesClip) -> float:
    """PSNR (dB) of the whole video against the generator's true clip, at most `VIDEO_PSNR_CAP_DB`: the shapes
    task is deterministic given frame 0 and the caption, so this scores every frame, not only the direction."""
    generated, truth = (torch.from_numpy(video_as_float(v))[None] for v in (video, clip.video))  # (1, T, H, W, 3)
    if generated.shape != truth.shape:
        shapes = f"{tuple(truth.shape[1:])}; got {tuple(generated.shape[1:])}"
        raise ValueError(f"video_psnr needs a video of the clip's shape {shapes}.")
    return min(float(psnr(generated, truth)[0]), VIDEO_PSNR_CAP_DB)


# What a generated video is conditioned on in an evaluation: see `task_known_frames`.
EVAL_TASKS = ("i2v", "flf2v", "keyframes", "continue")


def task_known_frames(task: str, num_frames: int, temporal_ratio: int = 4) -> Tuple[int, ...]:
    """The pixel frames an evaluation `task` gives the model: "i2v" the first frame, "flf2v" the first and the
    last, "keyframes" the first and the middle one (a latent frame's last, e.g. 8 of 17), "continue" the
    opening half of the clip (1 + r * m frames: 9 of 17)."""
    latent_frames = (num_frames - 1) // temporal_ratio
    if task == "i2v":
        return (0,)
    if task == "flf2v":
        return (0, num_frames - 1)
    if task == "keyframes":
        return (0, temporal_ratio * (latent_frames // 2))
    if task == "continue":
        return tuple(range(1 + temporal_ratio * (latent_frames // 2)))
    raise ValueError(f"task must be one of {EVAL_TASKS}; got {task!r}.")


@dataclass
class VideoScore:
    """The metrics of one generated video against its ground-truth clip."""

    direction_accuracy: float  # fraction of the objects moving the caption's way
    # Mean distance to the ground truth's pixel centroids (its trajectories as drawn), over the
    # objects and frames where the object is found and does not overlap another in the ground truth.
    centroid_error_px: float
    visibility: float  # fraction of the non-overlapping object-frames where the object is found
    first_frame_psnr: float  # dB, generated frame 0 vs the conditioning image
    video_psnr: float  # dB, the whole generated video vs the true clip
    predicted_directions: Tuple[Optional[str], ...]  # per object, see `predict_directions`
    # Tasks beyond image-to-video (NaN where the task has no such frames):
    keyframe_psnr: float = float("nan")  # dB, mean over the given keyframes after frame 0 (flf2v, keyframes)
    between_centroid_error_px: float = float("nan")  # centroid error strictly between the first and last keyframe
    continuation_direction_accuracy: float = float("nan")  # direction accuracy of the generated part (continue)
    seam_psnr: float = float("nan")  # dB, the first generated frame vs the truth (continue)


def _frame_psnr(video: np.ndarray, clip: ShapesClip, frame: int) -> float:
    """PSNR (dB) of one frame against the clip's, capped as `video_psnr` (a still scene's baseline is exact)."""
    generated, truth = (torch.from_numpy(v[frame]).permute(2, 0, 1)[None] for v in (video, video_as_float(clip.video)))
    return min(float(psnr(generated, truth)[0]), VIDEO_PSNR_CAP_DB)


def score_video(video, clip: ShapesClip, task: str = "i2v") -> VideoScore:
    """Score a generated video (T, H, W, 3), uint8 or floats in [0, 1], against `clip`, with the metrics of the
    evaluation `task` it was generated for (see `EVAL_TASKS`)."""
    truth = ground_truth_tracks(clip)
    tracks = track_objects(video, clip, truth)
    scored = ~truth.overlapped  # (N, T)
    found = scored & ~np.isnan(tracks).any(axis=-1)
    distances = np.linalg.norm(tracks - truth.centroids, axis=-1)  # (N, T), NaN where not found
    errors = distances[found]
    predictions = _directions_from_tracks(tracks, clip, truth)
    score = VideoScore(
        direction_accuracy=_accuracy(predictions, clip),
        centroid_error_px=float(errors.mean()) if errors.size else float("nan"),
        visibility=float(found.sum() / scored.sum()) if scored.any() else float("nan"),
        first_frame_psnr=first_frame_psnr(video, clip),
        video_psnr=video_psnr(video, clip),
        predicted_directions=tuple(predictions),
    )
    known = task_known_frames(task, clip.video.shape[0])
    frames, floats = np.arange(clip.video.shape[0]), video_as_float(video)
    if task in ("flf2v", "keyframes"):
        score.keyframe_psnr = float(np.mean([_frame_psnr(floats, clip, frame) for frame in known[1:]]))
        between = found & ((frames > known[0]) & (frames < known[-1]))[None]
        score.between_centroid_error_px = float(distances[between].mean()) if between.any() else float("nan")
    if task == "continue":
        generated = frames > known[-1]
        score.continuation_direction_accuracy = _accuracy(
            _directions_from_tracks(tracks, clip, _only_frames(truth, generated)), clip
        )
        score.seam_psnr = _frame_psnr(floats, clip, known[-1] + 1)
    return score


def static_baseline(clip: ShapesClip) -> np.ndarray:
    """The "repeat the first frame" video (T, H, W, 3) uint8: perfect frame 0, no motion at all."""
    return np.repeat(clip.first_frame[None], clip.video.shape[0], axis=0)


def text_swap_partner(clip: ShapesClip, config: Optional[ShapesConfig] = None) -> ShapesClip:
    """The same first frame with other motion, for the text-swap score.

    Every object gets a direction (one of the 8 or "still") other than its own whose path stays on
    average at least `MIN_SWAP_SEPARATION_PX` (scaled with the canvas) from its own path, drawn
    from the clip's seed; speeds and caption wording are kept. Paths that nearly coincide (moving
    "up" from the top wall is moving "down") would make a pair that no video can tell apart.
    """
    config = config or _clip_config(clip)
    rng = np.random.default_rng([clip.seed or 0, _TEXT_SWAP_STREAM])
    min_separation = MIN_SWAP_SEPARATION_PX * config.canvas_size / REFERENCE_CANVAS
    directions = []
    for obj, own_path in zip(clip.objects, clip.trajectories):
        others = [name for name in DIRECTIONS if name != obj.direction]
        paths = trajectories_for(with_motion([obj] * len(others), others), config)  # (D, T, 2)
        separations = np.linalg.norm(paths - own_path, axis=-1).mean(axis=1)  # (D,)
        distinct = [name for name, separation in zip(others, separations) if separation >= min_separation]
        directions.append(str(rng.choice(distinct)) if distinct else others[int(np.argmax(separations))])
    return render_clip(with_motion(clip.objects, directions), config, seed=clip.seed)


def text_swap_outcome(video_a, video_b, clip_a: ShapesClip, clip_b: ShapesClip) -> bool:
    """True when each video of a text-swap pair follows its own caption more than the other one.

    `clip_a` and `clip_b` share a first frame and differ in motion; `video_a` was generated from
    `clip_a`'s caption, `video_b` from `clip_b`'s. The pair passes when
    `direction_accuracy(video_a, clip_a) > direction_accuracy(video_a, clip_b)` and
    `direction_accuracy(video_b, clip_b) > direction_accuracy(video_b, clip_a)`: strict, so two
    identical videos (a model that ignores the text, or the static baseline) always fail.
    """
    truth_a, truth_b = ground_truth_tracks(clip_a), ground_truth_tracks(clip_b)
    own_a, other_a = direction_accuracy(video_a, clip_a, truth_a), direction_accuracy(video_a, clip_b, truth_b)
    own_b, other_b = direction_accuracy(video_b, clip_b, truth_b), direction_accuracy(video_b, clip_a, truth_a)
    return bool(own_a > other_a and own_b > other_b)


def text_swap_outcomes(videos_a, videos_b, clips_a: Sequence[ShapesClip], clips_b: Sequence[ShapesClip]) -> List[bool]:
    """`text_swap_outcome` of each pair."""
    return [text_swap_outcome(*pair) for pair in zip(videos_a, videos_b, clips_a, clips_b)]


def text_swap_score(videos_a, videos_b, clips_a: Sequence[ShapesClip], clips_b: Sequence[ShapesClip]) -> float:
    """Fraction of text-swap pairs that pass `text_swap_outcome`."""
    return _mean_of_numbers(text_swap_outcomes(videos_a, videos_b, clips_a, clips_b))


def _without_nan(values: Sequence[float]) -> np.ndarray:
    """The values without the NaNs (a scene with nothing to score, or outside a group)."""
    values = np.array(values, dtype=np.float64)
    return values[~np.isnan(values)]


def _mean_of_numbers(values: Sequence[float]) -> float:
    """Mean without the NaNs; NaN when nothing is left."""
    values = _without_nan(values)
    return float(values.mean()) if values.size else float("nan")


def standard_error(values: Sequence[float]) -> float:
    """Standard error of `_mean_of_numbers(values)`: sample standard deviation / sqrt(n), NaNs left
    out; NaN below two values. Scenes are the independent samples (the objects of one scene share
    its noise), so this is what tells two models' scores apart on the same number of scenes."""
    values = _without_nan(values)
    if values.size < 2 or np.isinf(values).any():  # a perfect frame's infinite PSNR has no finite spread
        return float("nan")
    return float(values.std(ddof=1) / np.sqrt(values.size))


# The `VideoScore` fields that are one number per scene, averaged by `summarize`.
_SCENE_METRICS = ("direction_accuracy", "centroid_error_px", "visibility", "first_frame_psnr", "video_psnr",
                  "keyframe_psnr", "between_centroid_error_px", "continuation_direction_accuracy", "seam_psnr")


def _per_scene_values(scores: Sequence[VideoScore]) -> Dict[str, List[float]]:
    """Each summary metric's value per scene; direction accuracy also apart for one-object scenes and
    for scenes with several objects (NaN for the scenes of the other group)."""
    values = {key: [getattr(score, key) for score in scores] for key in _SCENE_METRICS}
    counts = [len(score.predicted_directions) for score in scores]
    values["direction_accuracy_one_object"] = [
        accuracy if count == 1 else float("nan") for accuracy, count in zip(values["direction_accuracy"], counts)
    ]
    values["direction_accuracy_several_objects"] = [
        accuracy if count > 1 else float("nan") for accuracy, count in zip(values["direction_accuracy"], counts)
    ]
    return values


def summarize(scores: Sequence[VideoScore]) -> Dict[str, float]:
    """Mean of every metric over videos, and direction accuracy apart for one-object scenes and for
    scenes with several objects, where each motion must go to the object its clause names."""
    return {key: _mean_of_numbers(values) for key, values in _per_scene_values(scores).items()}


def summarize_standard_errors(scores: Sequence[VideoScore]) -> Dict[str, float]:
    """`standard_error` of each mean in `summarize(scores)`, same keys."""
    return {key: standard_error(values) for key, values in _per_scene_values(scores).items()}


def _scene_record_values(scenes: Sequence[dict]) -> Dict[str, List[float]]:
    """`_per_scene_values` of `evaluate_pipeline`'s "scenes" records (as read back from its JSON, where
    inf and NaN are strings), plus "text_swap" when every record has its outcome."""
    scores = [
        VideoScore(
            **{key: float(scene.get(key, "nan")) for key in _SCENE_METRICS},  # results from before video_psnr: NaN
            predicted_directions=tuple(scene["predicted_directions"]),
        )
        for scene in scenes
    ]
    values = _per_scene_values(scores)
    if scenes and all("text_swap" in scene for scene in scenes):
        values["text_swap"] = [float(scene["text_swap"]) for scene in scenes]
    return values


def paired_differences(scenes_a: Sequence[dict], scenes_b: Sequence[dict]) -> Dict[str, Tuple[float, float]]:
    """Mean and standard error of B - A, scene by scene, for every metric both records have.

    `scenes_a` and `scenes_b` are the "scenes" of two `evaluate_pipeline` results on the same scenes
    (same seed, split and number; models, steps or sampler may differ). Two models tend to pass
    and fail the same scenes, so the standard error of the paired difference is smaller than either
    mean's own: this tells apart models that two separate tables do not. Scenes where either
    value is NaN (not in the group, nothing to score) are left out of that metric.
    """
    seeds_a, seeds_b = [scene["seed"] for scene in scenes_a], [scene["seed"] for scene in scenes_b]
    if seeds_a != seeds_b:
        raise ValueError(
            "paired differences need the same scenes in the same order (scene seeds "
            f"{seeds_a[:3]}... vs {seeds_b[:3]}...): evaluate both with the same --n and --seed."
        )
    values_a, values_b = _scene_record_values(scenes_a), _scene_record_values(scenes_b)
    differences = {}
    for key in [key for key in values_a if key in values_b]:
        with np.errstate(invalid="ignore"):  # inf - inf (two perfect first frames) is NaN: left out
            delta = np.array(values_b[key]) - np.array(values_a[key])  # NaN where either is NaN
        differences[key] = (_mean_of_numbers(delta), standard_error(delta))
    return differences


@contextlib.contextmanager
def _inner_progress_bar_disabled(pipe):
    """Silence a diffusers pipeline's per-call step bar (it would interleave with ours), then restore it."""
    if not hasattr(pipe, "set_progress_bar_config"):
        yield
        return
    previous = dict(getattr(pipe, "_progress_bar_config", {}))
    pipe.set_progress_bar_config(**{**previous, "disable": True})
    try:
        yield
    finally:
        pipe.set_progress_bar_config(**previous)


def task_inputs(task: str, clips: Sequence[ShapesClip]) -> dict:
    """The pipeline arguments that give a batch of clips' known frames (`task_known_frames`) to the model."""
    from ..pipelines.pipeline_nanoi2v import NanoI2VCondition  # the pipeline builds on this module's package

    known = task_known_frames(task, clips[0].video.shape[0])
    # PIL images: their value range (0-255) is unambiguous, unlike an integer array's.
    first = [Image.fromarray(clip.first_frame) for clip in clips]
    if task == "continue":
        return {"video": [clip.video[: len(known)] for clip in clips]}
    inputs = {"image": first}
    if task == "flf2v":
        inputs["last_image"] = [Image.fromarray(clip.video[-1]) for clip in clips]
    if task == "keyframes":
        keyframes = [Image.fromarray(clip.video[known[-1]]) for clip in clips]
        inputs["conditions"] = [NanoI2VCondition(image=keyframes, frame_index=known[-1])]
    return inputs


def _generate_videos(
    pipe,
    clips: Sequence[ShapesClip],
    noise_seeds: Sequence[int],
    batch_size: int,
    progress: bool,
    negative_prompt: Optional[Callable[[str], str]] = None,
    task: str = "i2v",
    **call_kwargs,
) -> Tuple[List[np.ndarray], float]:
    """Run `pipe` on the clips' known frames (`task_inputs`) and captions in batches: videos (T, H, W, 3) floats
    in [0, 1] and the seconds spent inside the pipeline. `negative_prompt` maps a caption to its
    negative prompt."""
    videos, seconds = [], 0.0
    bar = tqdm(total=len(clips), desc="Generating evaluation videos", unit="video", disable=not progress)
    with bar, _inner_progress_bar_disabled(pipe):
        for start in range(0, len(clips), batch_size):
            batch = clips[start : start + batch_size]
            if negative_prompt is not None:
                call_kwargs["negative_prompt"] = [negative_prompt(clip.caption) for clip in batch]
            began = time.perf_counter()
            frames = pipe(
                **task_inputs(task, batch),
                prompt=[clip.caption for clip in batch],
                num_frames=batch[0].video.shape[0],
                generator=[torch.Generator().manual_seed(s) for s in noise_seeds[start : start + batch_size]],
                output_type="np",
                **call_kwargs,
            ).frames
            seconds += time.perf_counter() - began
            videos.extend(np.asarray(frames))
            bar.update(len(batch))
    return videos, seconds


def frechet_to_ground_truth(videos: Sequence[np.ndarray], clips: Sequence[ShapesClip]) -> float:
    """Frechet distance between the videos and the clips' own videos, on `ColourMotionFeatures`
    (cheap colour/layout/motion statistics, not I3D: not comparable with published FVD)."""
    if len(clips) < 2:
        return float("nan")  # a covariance needs two samples
    metric = FrechetDistance()
    metric.update(np.stack([clip.video for clip in clips]), real=True)
    metric.update(np.stack([video_as_float(video) for video in videos]), real=False)
    return metric.compute()


def _score_with_baseline(
    videos: Sequence[np.ndarray],
    partner_videos: Sequence[np.ndarray],
    clips: Sequence[ShapesClip],
    partners: Sequence[ShapesClip],
    progress: bool = True,
    task: str = "i2v",
) -> Tuple[Dict[str, float], Dict[str, float], Dict[str, float], List[VideoScore], List[bool]]:
    """Mean metrics of the generated videos, their standard errors, the static baseline's means, and
    the per-video scores and text-swap outcomes (empty without partners)."""
    scenes = tqdm(zip(videos, clips), total=len(clips), desc="Scoring", unit="video", disable=not progress)
    scores = [score_video(video, clip, task) for video, clip in scenes]
    baselines = [static_baseline(clip) for clip in clips]
    model, model_errors = summarize(scores), summarize_standard_errors(scores)
    baseline = summarize([score_video(video, clip, task) for video, clip in zip(baselines, clips)])
    model["frechet_distance"] = frechet_to_ground_truth(videos, clips)
    baseline["frechet_distance"] = frechet_to_ground_truth(baselines, clips)
    swaps = text_swap_outcomes(videos, partner_videos, clips, partners)  # empty without partners
    if swaps:
        model["text_swap"], model_errors["text_swap"] = _mean_of_numbers(swaps), standard_error(swaps)
        # A partner has the same first frame, so the baseline's two videos are the same video.
        baseline["text_swap"] = text_swap_score(baselines, baselines, clips, partners)
    return model, model_errors, baseline, scores, swaps


def evaluate_pipeline(
    pipe,
    num_scenes: int = 64,
    num_inference_steps: int = 20,
    guidance_scale: float = 5.0,
    seed: int = 0,
    split: str = "validation",
    batch_size: int = 8,
    config: Optional[ShapesConfig] = None,
    text_swap: bool = True,
    negative_prompt: Optional[Callable[[str], str]] = None,
    negative_guidance_scale: Optional[float] = None,
    progress: bool = True,
    task: str = "i2v",
    eta: float = 0.0,
) -> dict:
    """Generate videos for fresh shapes scenes and score them, next to the static baseline.

    Scenes are the `seed`-th block of `num_scenes` clips of the split, clips `seed * num_scenes ..
    (seed + 1) * num_scenes - 1` of `ShapesDataset(split=split)`, so two seeds never share a scene
    (a dataset's own `seed` shifts its window by one clip only); the validation split's seeds never
    occur in training. Each scene is generated from its first frame and caption with noise seeded by
    the scene's seed. With `text_swap`, each scene is generated a second time from the same first
    frame and noise with the caption of `text_swap_partner`, and the pairs give the text-swap score.

    Args:
        pipe: a `NanoI2VPipeline`, or any callable with its `(image=, prompt=, num_frames=,
            num_inference_steps=, guidance_scale=, generator=, output_type="np")` signature
            returning an object whose `.frames` is (B, T, H, W, 3) in [0, 1].
        config: the shapes generator's settings (default: 64 x 64, 17 frames).
        negative_prompt: maps each caption to the negative prompt it is generated with, e.g.
            `nanoi2v_diffusers.data.swap_motions`; None generates without one (guidance against no text).
        negative_guidance_scale: passed to the pipeline when given (see `NanoI2VPipeline.__call__`).
        task: what each scene is generated from besides its caption (`EVAL_TASKS`, `task_known_frames`): "i2v"
            its first frame; "flf2v", "keyframes" and "continue" add their metrics (see `VideoScore`) and need a
            `NanoI2VPipeline` (or a callable taking `last_image=`, `conditions=`, `video=`). The text-swap score
            is for "i2v" only (given later frames already say where the objects go).
        eta: passed to the pipeline when not 0: stochastic sampling (DDIM's eta; the flow Euler scheduler's).

    Returns:
        `{"model": {metric: mean over scenes}, "model_standard_error": {metric: its standard error
        over scenes, see `standard_error`}, "static_baseline": {...}, "ground_truth": {...}, "seconds_per_video",
        "settings": {...}, "scenes": [per-scene scores of the model, and its text-swap outcome]}`,
        metrics as in `VideoScore` plus "text_swap" (when computed) and "frechet_distance" (to the
        ground-truth videos, see `frechet_to_ground_truth`; no standard error); seconds are spent
        inside `pipe` only.
    """
    if num_scenes < 1 or batch_size < 1:
        raise ValueError(f"num_scenes and batch_size must be >= 1; got {num_scenes} and {batch_size}.")
    if task not in EVAL_TASKS:
        raise ValueError(f"task must be one of {EVAL_TASKS}; got {task!r}.")
    text_swap = text_swap and task == "i2v"
    config = config or ShapesConfig()
    dataset = ShapesDataset(num_scenes, split=split, config=config, seed=seed * num_scenes)
    clips = [dataset.clip(index) for index in range(num_scenes)]
    partners = [text_swap_partner(clip, config) for clip in clips] if text_swap else []
    jobs = clips + partners
    noise_seeds = [clip.seed for clip in jobs]  # a partner shares its scene's noise: only the text differs
    extra = {} if negative_guidance_scale is None else {"negative_guidance_scale": negative_guidance_scale}
    if eta:
        extra["eta"] = eta
    videos, seconds = _generate_videos(
        pipe,
        jobs,
        noise_seeds,
        batch_size,
        progress,
        negative_prompt,
        task,
        num_inference_steps=num_inference_steps,
        guidance_scale=guidance_scale,
        **extra,
    )
    generated, generated_partners = videos[:num_scenes], videos[num_scenes:]
    model, model_errors, baseline, scores, swaps = _score_with_baseline(
        generated, generated_partners, clips, partners, progress, task
    )
    settings = dict(
        task=task,
        num_scenes=num_scenes,
        num_inference_steps=num_inference_steps,
        guidance_scale=guidance_scale,
        seed=seed,
        split=split,
        batch_size=batch_size,
        canvas_size=config.canvas_size,
        num_frames=config.num_frames,
        min_objects=config.min_objects,
        max_objects=config.max_objects,
        negative_prompt=None if negative_prompt is None else negative_prompt.__name__,
        negative_guidance_scale=negative_guidance_scale,
        eta=eta,
    )
    # The true clips scored the same way: the ceiling of each metric (1.0, 0 px, the PSNR cap), a check on it.
    ground_truth = summarize([score_video(clip.video, clip, task) for clip in clips])
    scenes = [
        dict(seed=clip.seed, caption=clip.caption, directions=[obj.direction for obj in clip.objects], **asdict(score))
        for clip, score in zip(clips, scores)
    ]
    for scene, passed in zip(scenes, swaps):
        scene["text_swap"] = passed
    return {
        "model": model,
        "model_standard_error": model_errors,
        "static_baseline": baseline,
        "ground_truth": ground_truth,
        "seconds_per_video": seconds / len(jobs),
        "settings": settings,
        "scenes": scenes,
    }
