"""The conditioning layout shared by training and sampling: where each task's known frames go, and which."""

import pytest
import torch

from nanoi2v_diffusers.conditioning import (
    CONDITIONING_TASKS,
    build_condition,
    build_image_condition,
    check_task_weights,
    continuation_frames,
    keyframe_latent_index,
    sample_condition_masks,
)

T = 5  # latent frames of a 17-frame clip


def test_build_condition_puts_latents_and_the_mask_where_frames_are_known():
    latents = torch.randn(2, 3, T, 2, 2)
    mask = torch.tensor([[True, False, False, False, True], [False, False, True, False, False]])
    condition = build_condition(latents, mask)
    assert condition.shape == (2, 4, T, 2, 2)
    for row in range(2):
        for frame in range(T):
            expected = latents[row, :, frame] if mask[row, frame] else torch.zeros(3, 2, 2)
            assert torch.equal(condition[row, :3, frame], expected)
            assert torch.equal(condition[row, 3, frame], torch.full((2, 2), float(mask[row, frame])))


def test_the_image_condition_is_the_first_frame_case():
    image = torch.randn(2, 3, 1, 2, 2)
    mask = torch.zeros(2, T, dtype=torch.bool)
    mask[:, 0] = True
    latents = torch.cat([image, torch.randn(2, 3, T - 1, 2, 2)], dim=2)  # later frames are masked out
    assert torch.equal(build_image_condition(image, T), build_condition(latents, mask))
    empty = build_image_condition(None, T, batch_size=2, latent_channels=3, spatial_shape=(2, 2))
    assert empty.shape == (2, 4, T, 2, 2) and not empty.any()


@pytest.mark.parametrize("index, latent", [(0, 0), (4, 1), (8, 2), (16, 4), (-1, 4), (-5, 3), (-17, 0)])
def test_a_keyframe_goes_to_the_latent_frame_it_ends(index, latent):
    assert keyframe_latent_index(index, 17, 4) == latent


@pytest.mark.parametrize("index, message", [
    (5, r"frame_index 5 \(pixel frame 5\) falls inside a latent frame.*nearest: 4 or 8"),
    (-2, r"frame_index -2 \(pixel frame 15\) falls inside.*nearest: 12 or 16"),
    (17, r"frame_index must be in \[-17, 16\] for a 17-frame video; got 17"),
    (-18, r"got -18"),
    (True, r"must be an integer; got True"),
])  # fmt: skip
def test_keyframe_indices_that_fit_no_latent_frame_are_refused(index, message):
    with pytest.raises(ValueError, match=message):
        keyframe_latent_index(index, 17, 4)


@pytest.mark.parametrize("frames, kept", [(1, 1), (4, 1), (5, 5), (9, 9), (11, 9), (16, 13), (17, 17)])
def test_a_continuation_keeps_the_frames_that_make_whole_latent_frames(frames, kept):
    assert continuation_frames(frames, 4) == kept


def _masks(task, batch=64, seed=0):
    return sample_condition_masks({task: 1.0}, batch, T, torch.Generator().manual_seed(seed))


def test_each_task_marks_its_own_frames():
    prefix, keyframe = _masks("first_frame")
    assert prefix[:, 0].all() and not prefix[:, 1:].any() and not keyframe.any()
    prefix, keyframe = _masks("first_last")
    assert prefix[:, 0].all() and not prefix[:, 1:].any()
    assert keyframe[:, -1].all() and not keyframe[:, :-1].any()
    prefix, keyframe = _masks("last_frame")
    assert not prefix.any() and keyframe[:, -1].all() and not keyframe[:, :-1].any()
    prefix, keyframe = _masks("continuation")
    lengths = prefix.sum(1)
    assert (lengths >= 2).all() and (lengths <= T - 1).all() and len(set(lengths.tolist())) == T - 2
    assert torch.equal(prefix, torch.arange(T)[None] < lengths[:, None])  # always the opening frames
    assert not keyframe.any()


def test_keyframes_are_random_frames_at_least_one_with_frame_0_counted_as_prefix():
    prefix, keyframe = _masks("keyframes", batch=256)
    known = prefix | keyframe
    assert known.any(1).all()  # at least one frame per clip
    assert not keyframe[:, 0].any() and not prefix[:, 1:].any()  # frame 0's one-frame latent is the clip's own
    rates = known.float().mean(0)
    assert ((rates > 0.4) & (rates < 0.75)).all()  # about half of each frame (a little more: at least one)
    assert len({tuple(row.tolist()) for row in known}) > 20


def test_a_mix_follows_its_weights_and_a_generator_repeats_it():
    weights = {"first_frame": 3.0, "last_frame": 1.0}
    prefix, keyframe = sample_condition_masks(weights, 4000, T, torch.Generator().manual_seed(1))
    share_first = prefix[:, 0].float().mean().item()
    assert share_first == pytest.approx(0.75, abs=0.03)
    assert torch.equal(prefix[:, 0], ~keyframe[:, -1])  # each clip one task
    again = sample_condition_masks(weights, 4000, T, torch.Generator().manual_seed(1))
    assert torch.equal(again[0], prefix) and torch.equal(again[1], keyframe)
    # The same number of draws whatever the tasks: what follows in the stream does not depend on them.
    streams = []
    for task in CONDITIONING_TASKS:
        generator = torch.Generator().manual_seed(2)
        sample_condition_masks({task: 1.0}, 8, T, generator)
        streams.append(torch.rand(1, generator=generator).item())
    assert len(set(streams)) == 1


@pytest.mark.parametrize("weights, message", [
    ({}, "must map tasks"),
    ({"first_frame": 1.0, "middle": 1.0}, r"may name .*got \['middle'\]"),
    ({"first_frame": -1.0, "last_frame": 2.0}, "must be >= 0 with a positive sum"),
    ({"first_frame": 0.0}, "must be >= 0 with a positive sum"),
    ("first_frame", "must map tasks"),
])  # fmt: skip
def test_task_weights_are_checked(weights, message):
    with pytest.raises(ValueError, match=message):
        check_task_weights(weights)
