import json
import math
import re

import numpy as np
import pytest
import torch

from nanoi2v_diffusers.data import (
    DIRECTIONS,
    SHAPE_COLOURS,
    SPEEDS,
    ShapeObject,
    ShapesConfig,
    ShapesDataset,
    caption_for,
    generate_shapes_clip,
    read_video_frames,
    render_clip,
    sample_scene,
    swap_motions,
    with_motion,
    write_shapes_folder,
)

TINY = ShapesConfig(canvas_size=32, num_frames=5)
THREE = ShapesConfig(canvas_size=64, num_frames=3, min_objects=3, max_objects=3)
SEEDS = range(40)

# The wording docs/design.md ("The shapes dataset") fixes, written out independently of the module's tables.
SPEC_COLOURS = {
    "red": (255, 0, 0),
    "green": (0, 255, 0),
    "blue": (0, 0, 255),
    "yellow": (255, 255, 0),
    "cyan": (0, 255, 255),
    "magenta": (255, 0, 255),
    "white": (255, 255, 255),
}
SPEC_DIRECTION_WORDS = {
    "left": "left",
    "right": "right",
    "up": "up",
    "down": "down",
    "up-left": "up and to the left",
    "up-right": "up and to the right",
    "down-left": "down and to the left",
    "down-right": "down and to the right",
}
SPEC_SPEED_WORDS = {"slowly": " slowly", "normal": "", "quickly": " quickly"}


def object_mask(obj, config):
    """Pixels of `obj` alone in the first frame."""
    return render_clip([obj], config).first_frame.any(axis=-1)


def test_colour_table_is_the_spec():
    assert SHAPE_COLOURS == SPEC_COLOURS


@pytest.mark.parametrize("config", [TINY, THREE])
def test_every_pixel_is_black_or_an_object_colour(config):
    for seed in range(10):
        clip = generate_shapes_clip(seed, config)
        allowed = {(0, 0, 0)} | {SHAPE_COLOURS[o.colour] for o in clip.objects}
        present = {tuple(int(c) for c in p) for p in np.unique(clip.video.reshape(-1, 3), axis=0)}
        assert present <= allowed
        first = {tuple(int(c) for c in p) for p in np.unique(clip.first_frame.reshape(-1, 3), axis=0)}
        assert first == allowed  # every object is visible in frame 0


@pytest.mark.parametrize("canvas", [32, 64, 256])
def test_object_count_sizes_and_distinct_colours(canvas):
    config = ShapesConfig(canvas_size=canvas, num_frames=1, max_objects=3)
    counts = set()
    for seed in SEEDS:
        objects = sample_scene(seed, config)
        counts.add(len(objects))
        assert len({o.colour for o in objects}) == len(objects)
        for obj in objects:
            assert 0.20 <= obj.size_px / canvas <= 0.28
            assert obj.size_px / 2 <= obj.x <= canvas - obj.size_px / 2
            assert obj.size_px / 2 <= obj.y <= canvas - obj.size_px / 2
    assert counts == {1, 2, 3}


def test_square_covers_exactly_its_size_at_any_subpixel_position():
    for x in (16.0, 16.3, 16.5, 16.75):
        square = ShapeObject("square", "red", 10, x, 16.0)
        assert object_mask(square, TINY).sum() == 10 * 10


def test_objects_do_not_overlap_in_first_frame():
    for seed in SEEDS:
        clip = generate_shapes_clip(seed, THREE)
        masks = [object_mask(obj, THREE) for obj in clip.objects]
        assert sum(m.astype(int) for m in masks).max() == 1
        for obj, mask in zip(clip.objects, masks):
            assert (clip.first_frame[mask] == SHAPE_COLOURS[obj.colour]).all()


def reference_track(start, velocity, lo, hi, num_frames):
    """Step-by-step simulation with velocity flips at the walls."""
    position, speed, track = start, velocity, []
    for _ in range(num_frames):
        track.append(position)
        position += speed
        if position > hi:
            position, speed = 2 * hi - position, -speed
        elif position < lo:
            position, speed = 2 * lo - position, -speed
    return np.array(track)


@pytest.mark.parametrize(
    "direction,speed,canvas",
    [("right", "quickly", 64), ("up-left", "normal", 64), ("down", "slowly", 128), ("still", "normal", 64)],
)
def test_trajectory_follows_velocity_and_bounces(direction, speed, canvas):
    config = ShapesConfig(canvas_size=canvas, num_frames=33)
    obj = ShapeObject("square", "blue", 12, 20.0, 30.0, direction, speed)
    track = render_clip([obj], config).trajectories[0]  # (T, 2)
    pixels_per_frame = SPEEDS[speed] * canvas / 64
    (dx, dy) = DIRECTIONS[direction]
    for axis, (start, unit) in enumerate(((20.0, dx), (30.0, dy))):
        expected = reference_track(start, unit * pixels_per_frame, 6.0, canvas - 6.0, 33)
        np.testing.assert_allclose(track[:, axis], expected, atol=1e-4)
    if direction != "still":
        first_step = np.linalg.norm(track[1] - track[0])
        assert first_step == pytest.approx(pixels_per_frame, abs=1e-4)


def test_video_is_drawn_at_the_trajectory():
    config = ShapesConfig(canvas_size=64, num_frames=17)
    obj = ShapeObject("square", "green", 12, 40.0, 20.0, "down-right", "quickly")
    clip = render_clip([obj], config)
    for frame, (x, y) in zip(clip.video, clip.trajectories[0]):
        rows, cols = np.nonzero(frame.any(axis=-1))
        assert cols.mean() + 0.5 == pytest.approx(x, abs=0.5)
        assert rows.mean() + 0.5 == pytest.approx(y, abs=0.5)
    steps_x = np.diff(clip.trajectories[0, :, 0])
    assert (steps_x > 0).any() and (steps_x < 0).any()  # it bounced off the right wall


def test_deterministic_per_seed_and_different_across_seeds():
    a, b = generate_shapes_clip(7, TINY), generate_shapes_clip(7, TINY)
    assert np.array_equal(a.video, b.video) and a.caption == b.caption
    np.testing.assert_array_equal(a.trajectories, b.trajectories)
    videos = {generate_shapes_clip(seed, TINY).video.tobytes() for seed in range(12)}
    assert len(videos) == 12


def expected_clause(obj):
    if obj.direction == "still":
        return f"{obj.colour} {obj.shape} stays still"
    return f"{obj.colour} {obj.shape} moves {SPEC_DIRECTION_WORDS[obj.direction]}{SPEC_SPEED_WORDS[obj.speed]}"


def test_caption_grammar_names_colour_shape_direction_and_speed():
    config = ShapesConfig(canvas_size=32, num_frames=1, max_objects=3, still_probability=0.3)
    seen_directions, seen_speeds = set(), set()
    for seed in range(60):
        clip = generate_shapes_clip(seed, config)
        clauses = [rf"(a|the) {re.escape(expected_clause(o))}" for o in clip.objects]
        assert re.fullmatch("( and |, while )".join(clauses), clip.caption), clip.caption
        seen_directions |= {o.direction for o in clip.objects}
        seen_speeds |= {o.speed for o in clip.objects if o.direction != "still"}
    assert seen_directions == set(DIRECTIONS) and seen_speeds == set(SPEEDS)


def test_same_objects_other_motion_keep_first_frame_change_video_and_caption():
    for seed in range(10):
        objects = sample_scene(seed, TINY)
        others = with_motion(objects, ["left" if o.direction != "left" else "right" for o in objects], "quickly")
        original, swapped = render_clip(objects, TINY, seed=seed), render_clip(others, TINY, seed=seed)
        assert np.array_equal(original.first_frame, swapped.first_frame)
        assert not np.array_equal(original.video, swapped.video)
        assert original.caption != swapped.caption
        assert swapped.caption == caption_for(others, seed)
        assert original.caption == generate_shapes_clip(seed, TINY).caption


@pytest.mark.parametrize("num_objects", [2, 3])
def test_swap_motions_hands_each_motion_to_the_next_object(num_objects):
    config = ShapesConfig(canvas_size=64, num_frames=1, min_objects=num_objects, max_objects=num_objects,
                          still_probability=0.3)  # fmt: skip
    for seed in range(60):
        clip = generate_shapes_clip(seed, config)
        rotated = clip.objects[1:] + clip.objects[:1]
        expected = with_motion(clip.objects, [o.direction for o in rotated], [o.speed for o in rotated])
        assert swap_motions(clip.caption) == caption_for(expected, seed), clip.caption


def test_swap_motions_needs_two_objects_in_the_caption_grammar():
    assert swap_motions(generate_shapes_clip(0, ShapesConfig(max_objects=1)).caption) == ""
    assert swap_motions("a red car moves left and a blue car moves right") == ""
    assert swap_motions("") == ""


def test_with_motion_rejects_bad_input():
    objects = sample_scene(0, THREE)
    with pytest.raises(ValueError, match="one of directions per object"):
        with_motion(objects, ["left"])
    with pytest.raises(ValueError, match="Unknown direction 'sideways'"):
        with_motion(objects, "sideways")


def test_train_and_validation_seeds_are_disjoint():
    train = ShapesDataset(200, "train", TINY)
    validation = ShapesDataset(200, "validation", TINY, seed=13)
    train_seeds = {train.clip_seed(i) for i in range(len(train))}
    validation_seeds = {validation.clip_seed(i) for i in range(len(validation))}
    assert len(train_seeds) == 200 and len(validation_seeds) == 200
    assert not train_seeds & validation_seeds


def test_dataset_items():
    dataset = ShapesDataset(3, "validation", TINY)
    item = dataset[2]
    assert item["pixel_values"].shape == (3, 5, 32, 32) and item["pixel_values"].dtype == torch.float32
    assert item["pixel_values"].min() == -1.0 and item["pixel_values"].max() == 1.0
    clip = generate_shapes_clip(item["seed"], TINY)
    assert item["caption"] == clip.caption
    assert torch.equal(ShapesDataset(3, "validation", TINY)[2]["pixel_values"], item["pixel_values"])
    with pytest.raises(IndexError):
        dataset[3]


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(canvas_size=60), "nearest valid value: 64"),
        (dict(canvas_size=300), "nearest valid value: 256"),
        (dict(canvas_size=20), "nearest valid value: 32"),
        (dict(max_objects=4), "max_objects <= 3"),
        (dict(colours=("red",)), "distinct colours"),
        (dict(shapes=("hexagon",)), "shapes must be"),
    ],
)
def test_config_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ShapesConfig(**kwargs)


def test_object_outside_canvas_is_rejected():
    with pytest.raises(ValueError, match="leaves the 32 px canvas"):
        render_clip([ShapeObject("circle", "red", 8, 2.0, 16.0)], TINY)


def test_write_shapes_folder_round_trips_exactly(tmp_path):
    out = write_shapes_folder(tmp_path / "shapes", 2, split="validation", config=TINY, seed=4)
    records = [json.loads(line) for line in (out / "metadata.jsonl").read_text().splitlines()]
    assert [r["file_name"] for r in records] == ["clip_00000.mp4", "clip_00001.mp4"]
    for record in records:
        clip = generate_shapes_clip(record["seed"], TINY)
        assert record["text"] == clip.caption
        assert np.array_equal(read_video_frames(out / record["file_name"]), clip.video)
    assert records[1]["seed"] == ShapesDataset(2, "validation", TINY, seed=4).clip_seed(1)


def test_diagonal_direction_vectors_are_unit_and_y_points_down():
    for name, (dx, dy) in DIRECTIONS.items():
        assert math.hypot(dx, dy) == pytest.approx(0.0 if name == "still" else 1.0)
    assert DIRECTIONS["down"][1] > 0 and DIRECTIONS["up-right"] == pytest.approx((2**-0.5, -(2**-0.5)))
