"""Tables and JSON of shapes evaluations (`evaluate_pipeline`'s results), for `nanoi2v evaluate` and the examples."""

import math
from typing import Any

from ..data.shapes import ShapesConfig
from .shapes_metrics import paired_differences

# (key in the results, label, target); the targets are the project's.
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
# Rows of the tasks beyond image-to-video, shown when the evaluation has them.
TASK_TABLE_ROWS = (
    ("keyframe_psnr", "PSNR of the given keyframes after frame 0 (dB)", ">= 28"),
    ("between_centroid_error_px", "centroid error between the keyframes (px)", "<= 3"),
    ("continuation_direction_accuracy", "direction accuracy of the generated part", ">= 0.90"),
    ("seam_psnr", "PSNR of the first generated frame (dB)", "-"),
)
TASK_ROWS = tuple(key for key, _, _ in TASK_TABLE_ROWS)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not math.isnan(value)


def format_number(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if isinstance(value, float) and math.isinf(value):
        return "inf"
    return f"{value:.3f}" if abs(value) < 10 else f"{value:.2f}"


def format_table(results: dict) -> str:
    """Markdown table of the model's metrics beside the static baseline's."""
    settings = results["settings"]
    header = (f"{settings['num_scenes']} {settings['split']} scenes, task {settings.get('task', 'i2v')}, "
              f"{settings['num_inference_steps']} steps, guidance {settings['guidance_scale']}, "
              f"seed {settings['seed']}")  # fmt: skip
    default_objects = (ShapesConfig.min_objects, ShapesConfig.max_objects)  # also for results from before the flag
    objects = (settings.get("min_objects", default_objects[0]), settings.get("max_objects", default_objects[1]))
    if objects != default_objects:
        header += f", {objects[0]}-{objects[1]} objects"
    if settings.get("eta"):
        header += f", eta {settings['eta']}"
    if settings.get("lora"):
        header += f", LoRA {settings['lora']} at scale {settings['lora_scale']}"
    if settings.get("negative_prompt"):
        header += f", negative prompt {settings['negative_prompt']}"
        if settings.get("negative_guidance_scale") is not None:
            header += f" on its own guidance {settings['negative_guidance_scale']}"
    lines = [header, "", "| metric | model +- standard error | static baseline | ground truth | target |",
             "|---|---|---|---|---|"]  # fmt: skip
    truth = results.get("ground_truth", {})  # results from before the ground-truth row have none
    for key, label, target in (*TABLE_ROWS, *TASK_TABLE_ROWS):
        # .get: there is no "text_swap" without partners, no standard error for the Frechet distance.
        model, baseline = results["model"].get(key), results["static_baseline"].get(key)
        if key in TASK_ROWS and not _is_number(model):
            continue  # not a metric of this task
        error = results["model_standard_error"].get(key)
        cell = format_number(model)
        if error is not None and math.isfinite(error):
            cell += f" +- {format_number(error)}"
        lines.append(f"| {label} | {cell} | {format_number(baseline)} | {format_number(truth.get(key))} | {target} |")
    seconds = format_number(results["seconds_per_video"])
    lines.append(f"| seconds per video (batches of {settings['batch_size']}) | {seconds} | - | - | <= 30 |")
    return "\n".join(lines)


def format_comparison(results_a: dict, results_b: dict, name_a: str = "A", name_b: str = "B") -> str:
    """Markdown table: metric, A's mean, B's mean, B - A +- its paired standard error (scene by scene)."""
    differences = paired_differences(results_a["scenes"], results_b["scenes"])
    lines = [f"| metric | {name_a} | {name_b} | {name_b} - {name_a} +- standard error |", "|---|---|---|---|"]
    for key, label, _ in (*TABLE_ROWS, *TASK_TABLE_ROWS):
        if key not in differences:
            continue  # the Frechet distance is one number per set; no text-swap without partners
        mean, error = differences[key]
        cells = [format_number(float(results["model"].get(key, "nan"))) for results in (results_a, results_b)]
        difference = f"{mean:+.3f} +- {format_number(error)}" if math.isfinite(mean) else "n/a"
        lines.append(f"| {label} | {cells[0]} | {cells[1]} | {difference} |")
    return "\n".join(lines)


def json_safe(value: Any) -> Any:
    """Strict JSON has no inf/nan (a perfect first frame has infinite PSNR): write them as strings."""
    if isinstance(value, dict):
        return {key: json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(item) for item in value]
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value
