import importlib.util
import json
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from nanoi2v_diffusers.data import (
    STILL,
    ShapeObject,
    ShapesConfig,
    ShapesDataset,
    generate_shapes_clip,
    render_clip,
    swap_motions,
    with_motion,
)
from nanoi2v_diffusers.evaluation.shapes_metrics import (
    COLOUR_TOLERANCE,
    LOST,
    VIDEO_PSNR_CAP_DB,
    VideoScore,
    direction_accuracy,
    evaluate_pipeline,
    ground_truth_tracks,
    task_known_frames,
    paired_differences,
    predict_directions,
    score_video,
    standard_error,
    static_baseline,
    summarize,
    summarize_standard_errors,
    text_swap_outcome,
    text_swap_partner,
    text_swap_score,
    track_objects,
)
from nanoi2v_diffusers.evaluation.metrics import psnr
from nanoi2v_diffusers.evaluation.report import format_table, json_safe
from nanoi2v_diffusers.schedulers import NanoI2VFlowMatchScheduler

CONFIG = ShapesConfig()  # the evaluation's setting: 64 x 64, 17 frames
SEEDS = range(24)
EVALUATE_SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "evaluate.py"
COMPARE_SCRIPT = EVALUATE_SCRIPT.with_name("compare_evaluations.py")


@pytest.fixture(scope="module")
def clips():
    return [generate_shapes_clip(seed, CONFIG) for seed in SEEDS]


def single_object_clip(shape="square", size=14, x=32.0, y=32.0, direction="right", speed="normal", seed=0):
    obj = ShapeObject(shape=shape, colour="red", size_px=size, x=x, y=y, direction=direction, speed=speed)
    return render_clip([obj], CONFIG, seed=seed)


def test_seed_sample_covers_the_hard_cases(clips):
    """The checks below mean something only if the sample has these cases."""
    objects = [obj for clip in clips for obj in clip.objects]
    assert any(obj.direction == STILL for obj in objects)
    assert any(obj.shape == "triangle" for obj in objects)
    assert any(len(clip.objects) == 2 for clip in clips)
    assert any(ground_truth_tracks(clip).overlapped.any() for clip in clips)


def test_ground_truth_video_scores_perfectly(clips):
    for clip in clips:
        score = score_video(clip.video, clip)
        assert score.direction_accuracy == 1.0, (clip.seed, score.predicted_directions)
        assert score.centroid_error_px == pytest.approx(0.0, abs=1e-6)
        assert score.visibility == 1.0
        assert score.first_frame_psnr > 60 and score.video_psnr == VIDEO_PSNR_CAP_DB  # exact: the cap, not inf


def test_video_psnr_scores_every_frame_against_the_true_clip(clips):
    clip = clips[0]
    dimmed = clip.video / 255.0 * 0.9  # every lit pixel off by a tenth of its value
    expected = 10 * np.log10(1 / np.mean((clip.video / 255.0 * 0.1) ** 2))
    assert score_video(dimmed, clip).video_psnr == pytest.approx(expected, rel=1e-6)
    still = score_video(static_baseline(clip), clip)  # the first frame repeated: right at frame 0 only
    first_frame_only = 10 * np.log10(1 / np.mean((static_baseline(clip) / 255.0 - clip.video / 255.0) ** 2))
    assert still.video_psnr == pytest.approx(first_frame_only, rel=1e-6) and still.first_frame_psnr == float("inf")
    scores = [score_video(clip.video, clip), score_video(dimmed, clip)]
    assert summarize(scores)["video_psnr"] == pytest.approx((VIDEO_PSNR_CAP_DB + expected) / 2)  # a finite mean


def test_uint8_and_float_videos_score_the_same(clips):
    clip = clips[0]
    assert score_video(clip.video, clip) == score_video(clip.video / 255.0, clip)


def test_tracker_follows_the_generator_trajectories(clips):
    for clip in clips:
        truth = ground_truth_tracks(clip)
        tracks = track_objects(clip.video, clip, truth)
        for index, obj in enumerate(clip.objects):
            visible = ~truth.overlapped[index]
            np.testing.assert_allclose(tracks[index, visible], truth.centroids[index, visible])
            if obj.shape != "triangle":  # a triangle's centroid is below its box centre
                error = np.abs(truth.centroids[index] - clip.trajectories[index])
                assert error.max() <= 0.5  # pixel quantisation only


def test_static_baseline_gets_only_still_objects_right(clips):
    moving_errors = []
    for clip in clips:
        score = score_video(static_baseline(clip), clip)
        still = [obj.direction == STILL for obj in clip.objects]
        assert score.direction_accuracy == pytest.approx(np.mean(still))
        assert score.first_frame_psnr == float("inf")
        if not any(still):
            moving_errors.append(score.centroid_error_px)
    # Even the slowest object is 8 px away on average over a 17-frame clip.
    assert min(moving_errors) > 3.0


def test_another_motion_is_scored_wrong(clips):
    for clip in clips:
        partner = text_swap_partner(clip, CONFIG)
        assert np.array_equal(partner.first_frame, clip.first_frame)
        assert all(a.direction != b.direction for a, b in zip(clip.objects, partner.objects))
        assert direction_accuracy(partner.video, clip) == 0.0


def test_the_wrong_speed_in_the_right_direction_is_still_the_right_direction(clips):
    for clip in clips[:8]:
        for speed in ("slowly", "quickly"):
            other_speed = render_clip(with_motion(clip.objects, [o.direction for o in clip.objects], speed), CONFIG)
            assert direction_accuracy(other_speed.video, clip) == 1.0


def test_colour_noise_within_tolerance_is_still_tracked(clips):
    rng = np.random.default_rng(0)
    margin = 0.05
    for clip in clips[:6]:
        video = clip.video / 255.0
        noisy = np.clip(video + rng.uniform(-1, 1, video.shape) * (COLOUR_TOLERANCE - margin), 0, 1)
        score = score_video(noisy, clip)
        assert score.direction_accuracy == 1.0
        assert score.centroid_error_px == pytest.approx(0.0, abs=1e-6)
        # A colour shifted past the tolerance is a different colour: nothing is found.
        shifted = np.clip(video - (COLOUR_TOLERANCE + margin), 0, 1)
        assert score_video(shifted, clip).visibility == 0.0


def test_direction_counts_bounces():
    # Starts 2 px from the right wall moving right: it bounces at once and ends up far to the left.
    clip = single_object_clip(x=64 - 7 - 2, direction="right", speed="quickly")
    net_dx = clip.trajectories[0, -1, 0] - clip.trajectories[0, 0, 0]
    assert net_dx < -20
    assert predict_directions(clip.video, clip) == ["right"]


@pytest.mark.parametrize("y, direction, same_path", [(7.0, "up", "down"), (57.0, "down", "up")])
def test_a_motion_indistinguishable_from_the_caption_counts_as_the_caption(y, direction, same_path):
    # Touching a wall and moving into it, the object bounces at once: its path is the opposite one.
    clip = single_object_clip(y=y, direction=direction, speed="slowly")
    twin = render_clip(with_motion(clip.objects, same_path), CONFIG)
    assert np.array_equal(twin.video, clip.video)
    assert predict_directions(clip.video, clip) == [direction]
    # ... so the text-swap partner, drawn at random from the other motions, never asks for the twin.
    for seed in range(40):
        partner = text_swap_partner(single_object_clip(y=y, direction=direction, speed="slowly", seed=seed), CONFIG)
        assert partner.objects[0].direction != same_path


def drifting_video(clip, px_per_frame):
    """The clip's single object drifting right at a speed no caption states."""
    obj = clip.objects[0]
    frames = [
        render_clip([ShapeObject(obj.shape, obj.colour, obj.size_px, obj.x + px_per_frame * t, obj.y)], CONFIG).video[0]
        for t in range(CONFIG.num_frames)
    ]
    return np.stack(frames)


def test_still_means_slower_than_half_the_slowest_caption_speed():
    slowest = 1.0  # "slowly" at 64 px
    clip = single_object_clip(x=20.0, direction=STILL)
    assert predict_directions(drifting_video(clip, 0.35 * slowest), clip) == [STILL]
    assert predict_directions(drifting_video(clip, 0.65 * slowest), clip) == ["right"]


def test_a_vanished_object_is_lost():
    clip = single_object_clip(direction="left")
    video = clip.video.copy()
    video[2:] = 0  # gone after two frames
    assert predict_directions(video, clip) == [LOST]
    score = score_video(video, clip)
    assert score.direction_accuracy == 0.0
    assert score.visibility == pytest.approx(2 / CONFIG.num_frames)


def test_text_swap_known_answers(clips):
    partners = [text_swap_partner(clip, CONFIG) for clip in clips[:8]]
    videos_a = [clip.video for clip in clips[:8]]
    videos_b = [partner.video for partner in partners]
    assert text_swap_score(videos_a, videos_b, clips[:8], partners) == 1.0
    assert text_swap_score(videos_b, videos_a, clips[:8], partners) == 0.0  # each follows the other's caption
    frozen = [static_baseline(clip) for clip in clips[:8]]
    assert text_swap_score(frozen, frozen, clips[:8], partners) == 0.0
    # One video right, the other frozen: the pair fails.
    assert not text_swap_outcome(videos_a[0], frozen[0], clips[0], partners[0])


def test_bad_video_shape_is_rejected(clips):
    with pytest.raises(ValueError, match=r"\(T, H, W, 3\)"):
        score_video(clips[0].video[..., 0], clips[0])
    with pytest.raises(ValueError, match="ground truth's shape"):
        score_video(clips[0].video[:5], clips[0])


def test_summary_splits_direction_accuracy_by_object_count():
    def score(accuracy, predicted):
        return VideoScore(accuracy, centroid_error_px=1.0, visibility=1.0, first_frame_psnr=30.0,
                          video_psnr=20.0, predicted_directions=predicted)

    scores = [score(1.0, ("left",)), score(0.5, ("up", "up")), score(0.0, ("down", LOST)), score(1.0, ("up",))]
    summary = summarize(scores)
    assert summary["direction_accuracy"] == pytest.approx(0.625)
    assert summary["direction_accuracy_one_object"] == pytest.approx(1.0)
    assert summary["direction_accuracy_several_objects"] == pytest.approx(0.25)
    assert np.isnan(summarize(scores[1:3])["direction_accuracy_one_object"])  # no such scene: not a 0


def test_standard_error_known_answers():
    assert standard_error([0.0, 1.0, 0.0, 1.0]) == pytest.approx(np.sqrt(1 / 3) / 2)  # sample std / sqrt(4)
    assert standard_error([0.0, float("nan"), 1.0, 0.0, 1.0]) == pytest.approx(np.sqrt(1 / 3) / 2)  # NaN left out
    assert standard_error([0.7, 0.7, 0.7]) == pytest.approx(0.0, abs=1e-12)
    assert np.isnan(standard_error([1.0])) and np.isnan(standard_error([]))  # no spread from one value
    assert np.isnan(standard_error([30.0, float("inf")]))  # a perfect frame's PSNR


def test_standard_errors_come_per_summary_metric_and_per_group():
    def score(accuracy, predicted):
        return VideoScore(accuracy, centroid_error_px=accuracy, visibility=1.0, first_frame_psnr=30.0,
                          video_psnr=20.0, predicted_directions=predicted)

    scores = [score(1.0, ("left",)), score(0.0, ("up",)), score(0.5, ("up", "up")), score(0.5, ("down", LOST))]
    errors = summarize_standard_errors(scores)
    assert errors.keys() == summarize(scores).keys()
    assert errors["direction_accuracy_one_object"] == pytest.approx(standard_error([1.0, 0.0]))
    assert errors["direction_accuracy_several_objects"] == 0.0  # the two-object scenes agree
    assert errors["direction_accuracy"] == pytest.approx(standard_error([1.0, 0.0, 0.5, 0.5]))
    assert errors["visibility"] == 0.0


class FakePipeline:
    """Answers each (first frame, caption) with the generator's own video, or the frozen first frame."""

    def __init__(self, clips, static=False):
        self.videos = {(clip.caption, clip.first_frame.tobytes()): clip.video for clip in clips}
        self.static = static
        self.calls = []
        self._progress_bar_config = {"desc": "steps"}

    def set_progress_bar_config(self, **kwargs):
        self._progress_bar_config = kwargs

    def __call__(self, image, prompt, num_frames, num_inference_steps, guidance_scale, generator, output_type,
                 negative_prompt=None, negative_guidance_scale=None, eta=None):  # fmt: skip
        assert output_type == "np" and len(image) == len(prompt) == len(generator)
        seeds = [g.initial_seed() for g in generator]
        quiet = self._progress_bar_config.get("disable", False)
        self.calls.append(dict(prompts=prompt, seeds=seeds, steps=num_inference_steps, quiet=quiet,
                               negative_prompts=negative_prompt, negative_scale=negative_guidance_scale, eta=eta))  # fmt: skip
        videos = []
        for frame, caption in zip(image, prompt):
            video = self.videos[(caption, np.asarray(frame).tobytes())]  # KeyError: not a validation scene
            videos.append(static_baseline_of(video) if self.static else video)
        return types.SimpleNamespace(frames=np.stack(videos).astype(np.float32) / 255.0)


def static_baseline_of(video):
    return np.repeat(video[:1], len(video), axis=0)


def validation_clips(num_scenes, seed=0, config=CONFIG):
    dataset = ShapesDataset(num_scenes, split="validation", config=config, seed=seed * num_scenes)
    scenes = [dataset.clip(index) for index in range(num_scenes)]
    return scenes + [text_swap_partner(clip, config) for clip in scenes]


def test_evaluate_pipeline_with_a_perfect_fake():
    pipe = FakePipeline(validation_clips(4))
    results = evaluate_pipeline(pipe, num_scenes=4, num_inference_steps=3, batch_size=3, progress=False)
    model, baseline = results["model"], results["static_baseline"]
    assert model["direction_accuracy"] == 1.0 and model["text_swap"] == 1.0
    assert model["centroid_error_px"] == pytest.approx(0.0, abs=1e-6)
    assert model["frechet_distance"] == pytest.approx(0.0, abs=1e-9)
    assert baseline["direction_accuracy"] < 1.0 and baseline["text_swap"] == 0.0
    assert baseline["centroid_error_px"] > 1.0 and baseline["frechet_distance"] > 0
    # 4 scenes + 4 partners in batches of 3; each partner gets its scene's noise seed.
    assert [len(call["prompts"]) for call in pipe.calls] == [3, 3, 2]
    assert all(call["steps"] == 3 for call in pipe.calls)
    # The pipeline's own step bar is off while evaluating, and restored afterwards.
    assert all(call["quiet"] for call in pipe.calls) and pipe._progress_bar_config == {"desc": "steps"}
    seeds = [seed for call in pipe.calls for seed in call["seeds"]]
    assert seeds[:4] == seeds[4:] and len(set(seeds[:4])) == 4
    assert len(results["scenes"]) == 4 and results["seconds_per_video"] >= 0
    assert all(scene["text_swap"] is True for scene in results["scenes"])
    errors = results["model_standard_error"]
    assert errors["direction_accuracy"] == 0.0 and errors["text_swap"] == 0.0  # every scene right
    assert "frechet_distance" not in errors  # one number for the whole set, not a mean over scenes


def test_evaluate_pipeline_passes_each_captions_negative_prompt():
    pipe = FakePipeline(validation_clips(4))
    plain = evaluate_pipeline(pipe, num_scenes=4, batch_size=3, progress=False)
    assert plain["settings"]["negative_prompt"] is None and all(c["negative_prompts"] is None for c in pipe.calls)
    pipe.calls.clear()
    results = evaluate_pipeline(pipe, num_scenes=4, batch_size=3, negative_prompt=swap_motions,
                                negative_guidance_scale=2.0, progress=False)  # fmt: skip
    assert results["settings"]["negative_prompt"] == "swap_motions"
    assert results["settings"]["negative_guidance_scale"] == 2.0
    for call in pipe.calls:
        assert call["negative_prompts"] == [swap_motions(prompt) for prompt in call["prompts"]]
        assert call["negative_scale"] == 2.0
    assert any(call["negative_prompts"] != [""] * len(call["prompts"]) for call in pipe.calls)  # two-object scenes


def test_evaluate_pipeline_passes_eta_and_records_it():
    pipe = FakePipeline(validation_clips(2))
    assert evaluate_pipeline(pipe, num_scenes=2, progress=False)["settings"]["eta"] == 0.0
    assert all(call["eta"] is None for call in pipe.calls)  # deterministic: the pipeline's own default
    pipe.calls.clear()
    results = evaluate_pipeline(pipe, num_scenes=2, eta=1.0, progress=False)
    assert results["settings"]["eta"] == 1.0 and pipe.calls and all(call["eta"] == 1.0 for call in pipe.calls)
    assert ", eta 1.0" in format_table(results).splitlines()[0]


def test_evaluation_seeds_pick_disjoint_scene_sets():
    seeds = [{scene["seed"] for scene in evaluate_pipeline(FakePipeline(validation_clips(5, seed)), num_scenes=5,
                                                           seed=seed, text_swap=False, progress=False)["scenes"]}
             for seed in (0, 1)]
    assert len(seeds[0]) == len(seeds[1]) == 5 and not seeds[0] & seeds[1]


def test_evaluate_pipeline_with_a_static_fake_matches_the_baseline():
    pipe = FakePipeline(validation_clips(3, seed=5), static=True)
    results = evaluate_pipeline(pipe, num_scenes=3, seed=5, text_swap=True, progress=False)
    for key in ("direction_accuracy", "centroid_error_px", "visibility", "text_swap", "frechet_distance"):
        assert results["model"][key] == pytest.approx(results["static_baseline"][key])


def test_evaluate_script_prints_a_table_and_writes_json(tmp_path, monkeypatch, capsys):
    """examples/evaluate.py (its own flags) runs `nanoi2v evaluate`: each flag reaches the loader, the pipeline
    calls and the record."""
    from nanoi2v_diffusers import cli

    loaded = {}

    def fake_load_pipeline(model, shift=None, **options):
        loaded.update(options)
        pipe = FakePipeline(validation_clips(2, config=ShapesConfig(min_objects=3, max_objects=3)))
        pipe.scheduler = NanoI2VFlowMatchScheduler(shift=1.0 if shift is None else shift)
        return pipe

    monkeypatch.setattr(cli, "load_pipeline", fake_load_pipeline)
    model = tmp_path / "model"
    model.mkdir()
    (model / "model_index.json").write_text("{}")
    monkeypatch.syspath_prepend(str(EVALUATE_SCRIPT.parent))
    spec = importlib.util.spec_from_file_location("evaluate_script", EVALUATE_SCRIPT)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    out = tmp_path / "eval.json"
    script.main(["--model", str(model), "--n", "2", "--steps", "2", "--batch-size", "4", "--shift", "2.5",
                 "--first-block-cache", "0.1", "--swap-motions-negative", "--negative-guidance", "2",
                 "--lora", str(model), "--lora-scale", "0.5", "--objects", "3", "3", "--out", str(out)])
    table = capsys.readouterr().out
    assert "| direction accuracy | 1.000 +- 0.000 |" in table and "static baseline" in table
    assert f"LoRA {model} at scale 0.5, negative prompt swap_motions on its own guidance 2.0" in table.splitlines()[0]
    assert "| Frechet distance (colour/motion features, not FVD) | 0.000 |" in table  # no standard error
    written = json.loads(out.read_text())  # strict JSON: the perfect first frame's infinite PSNR is a string
    assert written["model"]["first_frame_psnr"] == "inf"
    assert written["settings"]["num_scenes"] == 2 and written["model_path"] == str(model)
    settings = written["settings"]  # each flag reached the loader or the pipeline calls, and the record
    assert settings["shift"] == 2.5 and settings["first_block_cache"] == loaded["first_block_cache"] == 0.1
    assert settings["negative_prompt"] == "swap_motions" and settings["negative_guidance_scale"] == 2.0
    assert (settings["lora"], settings["lora_scale"]) == (loaded["lora"], loaded["lora_scale"]) == (str(model), 0.5)
    # Three-object scenes: the fake pipeline knows only those, so any other scene would raise KeyError.
    assert (settings["min_objects"], settings["max_objects"]) == (3, 3)
    assert [len(scene["directions"]) for scene in written["scenes"]] == [3, 3] and "3-3 objects" in table


def test_paired_differences_of_a_perfect_and_a_static_model():
    # Seed 1 of 6 scenes: one with a still object, which the static model gets right.
    perfect = evaluate_pipeline(FakePipeline(validation_clips(6, seed=1)), num_scenes=6, seed=1, progress=False)
    static = evaluate_pipeline(FakePipeline(validation_clips(6, seed=1), static=True), num_scenes=6, seed=1,
                               progress=False)
    differences = paired_differences(perfect["scenes"], static["scenes"])
    mean, error = differences["direction_accuracy"]
    assert mean == pytest.approx(static["model"]["direction_accuracy"] - 1.0)
    per_scene = [scene["direction_accuracy"] - 1.0 for scene in static["scenes"]]
    assert error == pytest.approx(standard_error(per_scene)) and error > 0
    assert differences["text_swap"] == (-1.0, 0.0)  # every pair passes for one, fails for the other
    assert "frechet_distance" not in differences
    assert np.isnan(differences["first_frame_psnr"][0])  # both exact copies: inf - inf has no value
    with pytest.raises(ValueError, match="same scenes"):
        paired_differences(perfect["scenes"], static["scenes"][::-1])


def test_compare_script_reads_two_evaluation_files(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(EVALUATE_SCRIPT.parent))  # as when the script runs: examples/ on sys.path
    spec = importlib.util.spec_from_file_location("compare_script", COMPARE_SCRIPT)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    paths = []
    for name, static in (("perfect", False), ("static", True)):
        results = evaluate_pipeline(FakePipeline(validation_clips(3), static=static), num_scenes=3, progress=False)
        paths.append(tmp_path / f"{name}.json")
        paths[-1].write_text(json.dumps(json_safe(results), allow_nan=False))  # "inf" strings
    table = script.main([str(path) for path in paths])
    assert "| metric | perfect | static | static - perfect +- standard error |" in table
    assert "| text-swap score | 1.000 | 0.000 | -1.000 +- 0.000 |" in table
    assert "| first-frame PSNR (dB) | inf | inf | n/a |" in table
    assert "Frechet" not in table


# ------------------------------------------------------------------------------------------- tasks


def test_each_task_gives_its_frames():
    assert task_known_frames("i2v", 17) == (0,)
    assert task_known_frames("flf2v", 17) == (0, 16)
    assert task_known_frames("keyframes", 17) == (0, 8)
    assert task_known_frames("continue", 17) == tuple(range(9))
    assert task_known_frames("keyframes", 33) == (0, 16) and task_known_frames("continue", 33) == tuple(range(17))
    with pytest.raises(ValueError, match="task must be one of"):
        task_known_frames("middle", 17)


class TaskFakePipeline:
    """Answers any task's call with the true clip (found by caption and the first given frame), or its first
    frame frozen; records what each call was given."""

    def __init__(self, clips, static=False):
        self.videos = {(clip.caption, clip.video[0].tobytes()): clip.video for clip in clips}
        self.static, self.calls = static, []

    def set_progress_bar_config(self, **kwargs):
        pass

    def __call__(self, prompt, num_frames, num_inference_steps, guidance_scale, generator, output_type, image=None,
                 last_image=None, video=None, conditions=None):  # fmt: skip
        self.calls.append(dict(image=image, last_image=last_image, video=video, conditions=conditions))
        firsts = [np.asarray(item[0]) for item in video] if video is not None else [np.asarray(i) for i in image]
        videos = [self.videos[(caption, first.tobytes())] for caption, first in zip(prompt, firsts)]
        videos = [static_baseline_of(v) if self.static else v for v in videos]
        return types.SimpleNamespace(frames=np.stack(videos).astype(np.float32) / 255.0)


@pytest.mark.parametrize("task", ["flf2v", "keyframes", "continue"])
def test_a_perfect_model_gets_each_tasks_metrics_right_and_is_given_the_tasks_frames(task):
    clips = validation_clips(4)[:4]
    pipe = TaskFakePipeline(clips)
    results = evaluate_pipeline(pipe, num_scenes=4, batch_size=2, task=task, progress=False)
    model, truth = results["model"], results["ground_truth"]
    assert "text_swap" not in model and results["settings"]["task"] == task  # given frames already tell the motion
    assert model["direction_accuracy"] == 1.0 == truth["direction_accuracy"]
    if task == "continue":
        assert model["continuation_direction_accuracy"] == 1.0 and model["seam_psnr"] == VIDEO_PSNR_CAP_DB
        assert np.isnan(model["keyframe_psnr"]) and np.isnan(model["between_centroid_error_px"])
        given = [video for call in pipe.calls for video in call["video"]]
        assert all(np.array_equal(video, clip.video[:9]) for video, clip in zip(given, clips))
    else:
        assert model["keyframe_psnr"] == VIDEO_PSNR_CAP_DB and model["between_centroid_error_px"] == pytest.approx(0.0)
        assert np.isnan(model["continuation_direction_accuracy"])
        index = 16 if task == "flf2v" else 8
        if task == "flf2v":
            given = [image for call in pipe.calls for image in call["last_image"]]
        else:
            assert all(call["conditions"][0].frame_index == 8 for call in pipe.calls)
            given = [image for call in pipe.calls for image in call["conditions"][0].image]
        assert all(np.array_equal(np.asarray(image), clip.video[index]) for image, clip in zip(given, clips))
    table = format_table(results)
    assert ("direction accuracy of the generated part" in table) == (task == "continue")
    assert ("between the keyframes" in table) == (task != "continue")


def test_task_metrics_of_a_frozen_first_frame_are_known():
    clip = next(c for c in validation_clips(8)[:8] if any(obj.direction != STILL for obj in c.objects))
    frozen = static_baseline(clip)
    as_image = lambda frame: torch.from_numpy(frame.astype(np.float32) / 255).permute(2, 0, 1)[None]  # noqa: E731
    score = score_video(frozen, clip, "flf2v")
    expected = float(psnr(as_image(clip.video[0]), as_image(clip.video[16]))[0])
    assert score.keyframe_psnr == pytest.approx(expected, rel=1e-5)
    truth, tracks = ground_truth_tracks(clip), track_objects(frozen, clip)
    between = ~truth.overlapped & ~np.isnan(tracks).any(-1)
    between[:, [0, 16]] = False
    distances = np.linalg.norm(tracks - truth.centroids, axis=-1)[between]
    assert score.between_centroid_error_px == pytest.approx(distances.mean())
    score = score_video(frozen, clip, "continue")
    assert score.seam_psnr == pytest.approx(float(psnr(as_image(clip.video[0]), as_image(clip.video[9]))[0]), rel=1e-5)
    assert score.continuation_direction_accuracy < 1.0  # something moves, the frozen video does not
    assert np.isnan(score_video(frozen, clip).keyframe_psnr)  # not a metric of image-to-video
