"""Score a trained shapes pipeline on fresh validation scenes, next to the static baseline.

    python examples/evaluate.py --model examples/nanoi2v-shapes-64 --n 64 --steps 20 \
        [--guidance 5] [--seed 0] [--heun] [--shift 3] [--first-block-cache T]
        [--swap-motions-negative [--negative-guidance S]] [--batch-size 8] [--out outputs/eval.json]

Prints a markdown table (model vs the "repeat the first frame" baseline, with the project's
targets) and writes every number, with the settings that produced it, to the JSON file.
"""

import argparse
import json
import math
from pathlib import Path

from generate import add_loading_arguments, load_pipeline, loading_options  # examples/ is on sys.path when this file runs as a script

from nanoi2v_diffusers.data import ShapesConfig, swap_motions
from nanoi2v_diffusers.evaluation.shapes_metrics import evaluate_pipeline

# (key in the results, label, target); the targets are the project's (issue 6).
TABLE_ROWS = (
    ("direction_accuracy", "direction accuracy", ">= 0.90"),
    ("direction_accuracy_one_object", "direction accuracy, one-object scenes", "-"),
    ("direction_accuracy_several_objects", "direction accuracy, 2+ object scenes (binding)", "-"),
    ("text_swap", "text-swap score", ">= 0.85"),
    ("first_frame_psnr", "first-frame PSNR (dB)", ">= 28"),
    ("video_psnr", "whole-video PSNR vs the true clip (dB)", ">= 25"),
    ("centroid_error_px", "centroid error (px)", "lower"),
    ("visibility", "objects found", "1.0"),
    ("frechet_distance", "Frechet distance (colour/motion features, not FVD)", "lower"),
)


def format_number(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if isinstance(value, float) and math.isinf(value):
        return "inf"
    return f"{value:.3f}" if abs(value) < 10 else f"{value:.2f}"


def format_table(results: dict) -> str:
    """Markdown table of the model's metrics beside the static baseline's."""
    settings = results["settings"]
    header = (
        f"{settings['num_scenes']} {settings['split']} scenes, {settings['num_inference_steps']} steps, "
        f"guidance {settings['guidance_scale']}, seed {settings['seed']}"
    )
    default_objects = (ShapesConfig.min_objects, ShapesConfig.max_objects)  # also for results written before the flag
    objects = (settings.get("min_objects", default_objects[0]), settings.get("max_objects", default_objects[1]))
    if objects != default_objects:
        header += f", {objects[0]}-{objects[1]} objects"
    if settings.get("lora"):
        header += f", LoRA {settings['lora']} at scale {settings['lora_scale']}"
    if settings.get("negative_prompt"):
        header += f", negative prompt {settings['negative_prompt']}"
        if settings.get("negative_guidance_scale") is not None:
            header += f" on its own guidance {settings['negative_guidance_scale']}"
    lines = [
        header,
        "",
        "| metric | model +- standard error | static baseline | target |",
        "|---|---|---|---|",
    ]
    for key, label, target in TABLE_ROWS:
        # .get: there is no "text_swap" under --no-text-swap, no standard error for the Frechet distance.
        model, baseline = results["model"].get(key), results["static_baseline"].get(key)
        error = results["model_standard_error"].get(key)
        cell = format_number(model)
        if error is not None and math.isfinite(error):
            cell += f" +- {format_number(error)}"
        lines.append(f"| {label} | {cell} | {format_number(baseline)} | {target} |")
    seconds = format_number(results["seconds_per_video"])
    lines.append(f"| seconds per video (batches of {settings['batch_size']}) | {seconds} | - | <= 30 |")
    return "\n".join(lines)


def _json_safe(value):
    """Strict JSON has no inf/nan (a perfect first frame has infinite PSNR): write them as strings."""
    if isinstance(value, dict):
        return {key: _json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(item) for item in value]
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="pipeline folder or Hub id")
    parser.add_argument("--n", type=int, default=64, help="number of validation scenes")
    parser.add_argument("--steps", type=int, default=20, help="sampling steps")
    parser.add_argument("--guidance", type=float, default=5.0, help="text guidance scale (1 = off)")
    parser.add_argument("--seed", type=int, default=0, help="which block of --n validation scenes (and their noise); seeds never share a scene")
    add_loading_arguments(parser)
    parser.add_argument("--swap-motions-negative", action="store_true",
                        help="negative prompt: the caption with the objects' motions exchanged (data.swap_motions)")
    parser.add_argument("--negative-guidance", type=float, default=None, metavar="S",
                        help="give the negative prompt its own guidance term of this scale (negative_guidance_scale)")
    parser.add_argument("--objects", type=int, nargs=2, default=(ShapesConfig.min_objects, ShapesConfig.max_objects),
                        metavar=("MIN", "MAX"), help="objects per scene (the generator draws 1 to 3)")
    parser.add_argument("--batch-size", type=int, default=8, help="videos per pipeline call")
    parser.add_argument("--no-text-swap", action="store_true", help="skip the second-caption videos (halves the time)")
    parser.add_argument("--out", default="outputs/eval.json")
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    pipe = load_pipeline(args.model, **loading_options(args))
    results = evaluate_pipeline(
        pipe,
        num_scenes=args.n,
        num_inference_steps=args.steps,
        guidance_scale=args.guidance,
        seed=args.seed,
        batch_size=args.batch_size,
        text_swap=not args.no_text_swap,
        negative_prompt=swap_motions if args.swap_motions_negative else None,
        negative_guidance_scale=args.negative_guidance,
        config=ShapesConfig(min_objects=args.objects[0], max_objects=args.objects[1]),
    )
    results["model_path"] = args.model
    results["settings"].update(
        solver=pipe.scheduler.config.solver,
        shift=pipe.scheduler.config.shift,
        first_block_cache=args.first_block_cache,
        lora=args.lora,
        lora_scale=args.lora_scale if args.lora else None,
    )
    print(format_table(results))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(_json_safe(results), indent=2, allow_nan=False) + "\n")
    print(f"wrote {out}")
    return results


if __name__ == "__main__":
    main()
