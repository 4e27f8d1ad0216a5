"""The main job: videos from built-in first frames and prompts, with a trained shapes model.

    python examples/demo.py            # `make demo`: use the shipped model (or train one), generate, score
    python examples/demo.py --train    # `make train-demo`: retrain the built-in model from scratch first

Writes outputs/demo/*.mp4, *.gif and contact_sheet.png (one row per video, prompt underneath), then
prints the evaluation metrics on fresh validation scenes, the same as `evaluate.py --n 64 --steps 20`.
"""

import argparse
import collections
import subprocess
import sys
from pathlib import Path
from typing import List, NamedTuple

import numpy as np
import torch

from evaluate import format_table  # examples/ is on sys.path when this file runs as a script
from generate import load_pipeline, video_to_uint8

from nanoi2v_diffusers.contact_sheet import save_contact_sheet
from nanoi2v_diffusers.data import (
    ShapesConfig,
    render_clip,
    sample_scene,
    shapes_split_seed,
    with_motion,
    write_video,
)
from nanoi2v_diffusers.evaluation.shapes_metrics import evaluate_pipeline

REPO = Path(__file__).resolve().parent.parent
SHIPPED_MODEL = REPO / "examples" / "nanoi2v-shapes-64"
TRAINED_MODEL = REPO / "outputs" / "nanoi2v-shapes-64-stage8"
DEMO_DIR = REPO / "outputs" / "demo"

# The recipe of the built-in model, in order (README "Training"): the VAE on first frames, on clips, then
# its decoder alone, stage after stage (from the second on weighting frame 0); the DiT on 4000 cached
# clips, then continued on 8000, 16000 and 32000, longer on the same 32000, and then on 8000 clips whose
# captions are encoded clause by clause (text_clause_separator), twice. This comment does not count
# the stages (its counts drifted with every new stage): `find_or_train_model` counts them.
LAST_VAE_STAGE = 23  # vae_shapes_64_stage5.yaml to _stage{LAST_VAE_STAGE}.yaml, each from the one before
TRAINING_STEPS = (
    ["training/train_vae.py", "--config", "training/configs/vae_shapes_64_images.yaml"],
    ["training/train_vae.py", "--config", "training/configs/vae_shapes_64.yaml"],
    ["training/train_vae.py", "--config", "training/configs/vae_shapes_64_decoder.yaml"],
    ["training/train_vae.py", "--config", "training/configs/vae_shapes_64_first_frame.yaml"],
    *(["training/train_vae.py", "--config", f"training/configs/vae_shapes_64_stage{n}.yaml"]
      for n in range(5, LAST_VAE_STAGE + 1)),
    ["training/precompute_latents.py", "--config", "training/configs/shapes_64.yaml"],
    ["training/train_dit.py", "--config", "training/configs/shapes_64.yaml"],
    ["training/precompute_latents.py", "--config", "training/configs/shapes_64_continue.yaml"],
    ["training/train_dit.py", "--config", "training/configs/shapes_64_continue.yaml"],
    ["training/precompute_latents.py", "--config", "training/configs/shapes_64_stage3.yaml"],
    ["training/train_dit.py", "--config", "training/configs/shapes_64_stage3.yaml"],
    ["training/precompute_latents.py", "--config", "training/configs/shapes_64_stage4.yaml"],
    ["training/train_dit.py", "--config", "training/configs/shapes_64_stage4.yaml"],
    # Stages 5 and 6 train longer on stage 4's cache, so they have no precompute of their own.
    ["training/train_dit.py", "--config", "training/configs/shapes_64_stage5.yaml"],
    ["training/train_dit.py", "--config", "training/configs/shapes_64_stage6.yaml"],
    ["training/precompute_latents.py", "--config", "training/configs/shapes_64_stage7.yaml"],
    ["training/train_dit.py", "--config", "training/configs/shapes_64_stage7.yaml"],
    # Stage 8 trains longer on stage 7's cache.
    ["training/train_dit.py", "--config", "training/configs/shapes_64_stage8.yaml"],  # writes TRAINED_MODEL
)

# Demo scenes: validation seeds (never trained on), and one image shown with two different motions.
DEMO_SCENE_INDICES = (0, 1, 2)
TEXT_SWAP_DIRECTIONS = ("left", "right")
NUM_EVAL_SCENES = 64  # as `evaluate.py --n 64`, the README's table and the targets (about 45 s)
NUM_STEPS = 20
GUIDANCE = 5.0
FPS = 8


class DemoScene(NamedTuple):
    name: str
    first_frame: np.ndarray  # (H, W, 3) uint8
    caption: str


def find_or_train_model(retrain: bool) -> Path:
    """The shipped model, else one trained earlier by this script, else train one now."""
    if not retrain:
        for home in (SHIPPED_MODEL, TRAINED_MODEL):
            if (home / "model_index.json").is_file():
                return home
    stages = collections.Counter(Path(script).name for script, *_ in TRAINING_STEPS)
    print(f"No trained model found: training the built-in shapes model ({stages['train_vae.py']} VAE stages, "
          f"{stages['train_dit.py']} DiT stages)...")
    for step in TRAINING_STEPS:
        subprocess.run([sys.executable, *step], cwd=REPO, check=True)
    return TRAINED_MODEL


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


def print_metrics(pipe) -> None:
    results = evaluate_pipeline(
        pipe,
        num_scenes=NUM_EVAL_SCENES,
        num_inference_steps=NUM_STEPS,
        guidance_scale=GUIDANCE,
    )
    print(f"\nEvaluation on fresh validation scenes:\n{format_table(results)}")
    print(
        f"The same as: python examples/evaluate.py --model <model> --n {NUM_EVAL_SCENES} --steps {NUM_STEPS}; "
        "--n 256 for about half the standard error"
    )


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--train", action="store_true", help="retrain the built-in model first")
    parser.add_argument("--skip-eval", action="store_true", help="only write the demo videos")
    args = parser.parse_args(argv)

    model = find_or_train_model(args.train)
    print(f"Model: {model}")
    pipe = load_pipeline(str(model))
    scenes = demo_scenes(ShapesConfig())
    videos = generate_demo_videos(pipe, scenes)

    DEMO_DIR.mkdir(parents=True, exist_ok=True)
    for scene, video in zip(scenes, videos):
        for suffix in (".mp4", ".gif"):
            write_video(DEMO_DIR / f"{scene.name}{suffix}", video, fps=FPS)
        print(f"{scene.name}: {scene.caption!r} -> {DEMO_DIR / scene.name}.mp4/.gif")
    sheet = save_contact_sheet(DEMO_DIR / "contact_sheet.png", videos, [s.caption for s in scenes], scale=2)
    print(f"Contact sheet: {sheet}")
    if not args.skip_eval:
        print_metrics(pipe)


if __name__ == "__main__":
    main()
