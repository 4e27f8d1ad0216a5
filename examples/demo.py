"""The main job: videos from built-in first frames and prompts, with a trained shapes model; then a video from
a first and a last frame, and a clip continued to twice its length.

    python examples/demo.py            # `make demo`: use the shipped model, generate, score
    python examples/demo.py --train    # `make train-demo`: run the built-in model's recipe first, score it
                                       # against the shipped model, then make the demo with it

Writes outputs/demo/*.mp4, *.gif and contact_sheet.png (one row per video, prompt underneath), then a quick
score on a few fresh validation scenes and the command of the full evaluation.
`--train` can be stopped at any point and started again: the recipe continues where it stopped.
"""

import argparse
import json
from pathlib import Path
from typing import List, NamedTuple

import numpy as np
import torch
from nanoi2v_diffusers.cli import load_pipeline, video_to_uint8
from nanoi2v_diffusers.contact_sheet import save_contact_sheet
from nanoi2v_diffusers.data import (
    ShapesConfig,
    render_clip,
    sample_scene,
    shapes_split_seed,
    with_motion,
    write_video,
)
from nanoi2v_diffusers.evaluation.report import format_comparison, format_table, json_safe
from nanoi2v_diffusers.evaluation.shapes_metrics import evaluate_pipeline
from nanoi2v_diffusers.training import recipe

REPO = Path(__file__).resolve().parent.parent
SHIPPED_MODEL = REPO / "examples" / "nanoi2v-shapes-64"
RECIPE = REPO / "training" / "configs" / "shapes_64_recipe.yaml"
DEMO_DIR = REPO / "outputs" / "demo"
NUM_COMPARISON_SCENES = 256  # a trained model against the shipped one, scene by scene (evaluate.py --n 256)

# Demo scenes: validation seeds (never trained on), and one image shown with two different motions.
DEMO_SCENE_INDICES = (0, 1, 2)
TEXT_SWAP_DIRECTIONS = ("left", "right")
# Validation scenes for the other conditioning tasks; a one-object scene to continue, since chained continuations
# of two-object scenes drift after the first call (docs/results.md, "Every conditioning task").
FIRST_LAST_SCENE, CONTINUED_SCENE = 5, 12
CONTEXT_FRAMES, CONTINUED_FRAMES = 9, 33  # a continuation from the clip's first 9 frames to 33 frames
NUM_QUICK_SCENES = 8  # a first look in seconds; `nanoi2v evaluate --num_scenes 256` gives the real numbers
NUM_STEPS = 20
GUIDANCE = 5.0
FPS = 8


class DemoScene(NamedTuple):
    name: str
    first_frame: np.ndarray  # (H, W, 3) uint8
    caption: str


def train_and_compare(steps_scale: float, num_scenes: int) -> Path:
    """Run the recipe (or what is left of it), then score its pipeline beside the shipped model on the same scenes."""
    trained = recipe.run(RECIPE, steps_scale=steps_scale, output_dir=None if steps_scale == 1 else
                         f"outputs/shapes-64-scale-{steps_scale:g}")  # fmt: skip
    results = {}
    for name, model in (("shipped", SHIPPED_MODEL), ("trained", trained)):
        print(f"Scoring the {name} model ({model}) on {num_scenes} validation scenes...")
        results[name] = evaluate_pipeline(load_pipeline(str(model)), num_scenes=num_scenes,
                                          num_inference_steps=NUM_STEPS, guidance_scale=GUIDANCE)  # fmt: skip
        path = trained / f"eval_{name}_{num_scenes}.json"
        path.write_text(json.dumps(json_safe(results[name]), indent=1, allow_nan=False) + "\n")
    print(f"\nThe trained model against the shipped one, scene by scene:\n"
          f"{format_comparison(results['shipped'], results['trained'], 'shipped', 'trained')}")
    return trained


def demo_scenes(config: ShapesConfig) -> List[DemoScene]:
    scenes = []
    for index in DEMO_SCENE_INDICES:
        clip = render_clip(sample_scene(shapes_split_seed("validation", index), config), config)
        scenes.append(DemoScene(f"scene{index}", clip.first_frame, clip.caption))
    # The same first frame, two prompts: the motion comes from the text alone.
    objects = sample_scene(shapes_split_seed("validation", len(DEMO_SCENE_INDICES)), config)
    for direction in TEXT_SWAP_DIRECTIONS:
        clip = render_clip(with_motion(objects, direction), config)
        scenes.append(DemoScene(f"swap_{direction}", clip.first_frame, clip.caption))
    return scenes


def generate_demo_videos(pipe, scenes: List[DemoScene]) -> List[np.ndarray]:
    frames = pipe(
        image=[scene.first_frame for scene in scenes],
        prompt=[scene.caption for scene in scenes],
        num_inference_steps=NUM_STEPS,
        guidance_scale=GUIDANCE,
        generator=[torch.Generator().manual_seed(i) for i in range(len(scenes))],
    ).frames
    return [video_to_uint8(video) for video in frames]


def task_demo_videos(pipe, config: ShapesConfig) -> List[tuple]:
    """(name, video, label) of two more conditioning tasks: a first and a last frame, and a continued clip."""
    first_last = render_clip(sample_scene(shapes_split_seed("validation", FIRST_LAST_SCENE), config), config)
    video = pipe(image=first_last.video[0], last_image=first_last.video[-1], prompt=first_last.caption,
                 num_inference_steps=NUM_STEPS, guidance_scale=GUIDANCE,
                 generator=torch.Generator().manual_seed(0)).frames[0]  # fmt: skip
    opening = render_clip(sample_scene(shapes_split_seed("validation", CONTINUED_SCENE), config), config)
    continued = pipe.continue_video(opening.video[:CONTEXT_FRAMES], prompt=opening.caption,
                                    num_frames_total=CONTINUED_FRAMES, num_inference_steps=NUM_STEPS,
                                    guidance_scale=GUIDANCE, generator=torch.Generator().manual_seed(0))  # fmt: skip
    return [
        ("first_last", video_to_uint8(video), f"first + last frame given: {first_last.caption}"),
        ("continued", video_to_uint8(continued), f"{CONTEXT_FRAMES} frames given, continued: {opening.caption}"),
    ]


def limits_scenes(config: ShapesConfig) -> List[DemoScene]:
    """A validation scene as the model knows them, then inputs unlike its training data, one change at a time."""
    clip = render_clip(sample_scene(shapes_split_seed("validation", 0), config), config)
    ramp = np.linspace(0, 255, config.canvas_size, dtype=np.float32)
    photo = np.stack([ramp[None, :].repeat(config.canvas_size, 0), ramp[:, None].repeat(config.canvas_size, 1),
                      np.full((config.canvas_size,) * 2, 160.0)], axis=-1).astype(np.uint8)  # fmt: skip
    grey = clip.first_frame.copy()
    grey[grey.max(axis=-1) > 0] = 128
    return [
        DemoScene("known", clip.first_frame, clip.caption),
        DemoScene("photo", photo, clip.caption),
        DemoScene("grey", grey, clip.caption),
        DemoScene("words", clip.first_frame, "red ball going right"),
        DemoScene("french", clip.first_frame, "le cercle rouge va vers la gauche"),
    ]


def write_limits_sheet(pipe, path: Path) -> Path:
    """One row per `limits_scenes` input: what the shipped model makes of inputs unlike its training data."""
    scenes = limits_scenes(ShapesConfig())
    videos = generate_demo_videos(pipe, scenes)
    labels = ["as trained: " + scenes[0].caption, "a non-black image (a colour ramp)", "grey objects",
              "prompt: 'red ball going right'", "prompt in French"]  # fmt: skip
    return save_contact_sheet(path, videos, labels, scale=2)


def print_quick_score(pipe, model: Path) -> None:
    results = evaluate_pipeline(pipe, num_scenes=NUM_QUICK_SCENES, num_inference_steps=NUM_STEPS,
                                guidance_scale=GUIDANCE)
    print(f"\nA quick score on {NUM_QUICK_SCENES} fresh validation scenes (a standard error of about 0.1):\n"
          f"{format_table(results)}\n\nThe full evaluation (about 4 minutes on 2 CPU cores):\n"
          f"  nanoi2v evaluate --model {model} --num_scenes 256 --num_inference_steps {NUM_STEPS}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--train", action="store_true", help="run the built-in model's recipe first and use its model")
    parser.add_argument("--steps-scale", type=float, default=1.0,
                        help="with --train: every phase this fraction of its steps (a quick look at the recipe)")
    parser.add_argument("--compare-scenes", type=int, default=NUM_COMPARISON_SCENES,
                        help="with --train: scenes the trained and the shipped model are scored on")
    parser.add_argument("--skip-eval", action="store_true", help="only write the demo videos")
    parser.add_argument("--limits", action="store_true",
                        help="also write limits.png: what the model makes of inputs unlike its training data")
    args = parser.parse_args(argv)

    model = train_and_compare(args.steps_scale, args.compare_scenes) if args.train else SHIPPED_MODEL
    print(f"Model: {model}")
    pipe = load_pipeline(str(model))
    scenes = demo_scenes(ShapesConfig())
    videos = generate_demo_videos(pipe, scenes)

    named = [(scene.name, video, scene.caption) for scene, video in zip(scenes, videos)]
    named += task_demo_videos(pipe, ShapesConfig())

    DEMO_DIR.mkdir(parents=True, exist_ok=True)
    for name, video, label in named:
        for suffix in (".mp4", ".gif"):
            write_video(DEMO_DIR / f"{name}{suffix}", video, fps=FPS)
        print(f"{name}: {label!r} -> {DEMO_DIR / name}.mp4/.gif")
    sheet = save_contact_sheet(DEMO_DIR / "contact_sheet.png", [video for _, video, _ in named],
                               [label for _, _, label in named], scale=2)  # fmt: skip
    print(f"Contact sheet: {sheet}")
    if args.limits:
        print(f"Inputs unlike the training data: {write_limits_sheet(pipe, DEMO_DIR / 'limits.png')}")
    if not args.skip_eval:
        print_quick_score(pipe, model)


if __name__ == "__main__":
    main()
