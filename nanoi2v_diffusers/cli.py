"""The `nanoi2v` command, installed with the package: `nanoi2v generate` and `nanoi2v evaluate`.

    nanoi2v generate --model examples/nanoi2v-shapes-64 --image first_frame.png --prompt "a red circle moves left"
    nanoi2v generate --model examples/nanoi2v-shapes-64 --image first.png --last_image last.png --prompt "..."
    nanoi2v generate --model examples/nanoi2v-shapes-64 --video clip.mp4 --prompt "..."   # continue a clip
    nanoi2v generate --model outputs/dit-eps --scheduler dpm++ --prompt "..."   # a noise-prediction model
    nanoi2v evaluate --model examples/nanoi2v-shapes-64 --num_scenes 64 [--task flf2v]

The flags are the pipeline's argument names (`--num_inference_steps`, `--guidance_scale`, ...), and
`--help` shows each default; `--config file.yaml` may set any of them. Every argument is checked before
the model loads: a bad one ends the command with one line naming the flag, the value and the rule, and
exit status 2. Images go through the pipeline's own clean-up (transparency composited on black, other
aspect ratios center-cropped), as they do through the Python API.
"""

import json
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence

from .safe_loading import MODEL_INDEX, check_local_path
from .schedulers.objectives import FLOW_SCHEDULER_NAMES, NOISE_SCHEDULER_NAMES, SCHEDULER_NAMES
from .settings import parse_config
from .size_rules import check_frame_count, check_multiple

SOLVERS = ("euler", "heun")
DTYPES = ("float32", "bfloat16", "float16")
DEVICES = ("auto", "cpu", "cuda", "mps")
WRITABLE_SUFFIXES = (".mp4", ".gif", ".mkv", ".webm", ".mov")  # data.video_io.write_video's formats
LORA_ADAPTER_NAME = "lora"


class UsageError(ValueError):
    """A command-line argument breaks its rule; the message names the flag, the value and the rule."""


class CommandError(RuntimeError):
    """The command could not do its work (a model that does not load, a file that cannot be written)."""


def _fail(flag: str, value, rule: str) -> None:
    raise UsageError(f"--{flag} {value!r}: {rule}")


@dataclass
class LoadingSettings:
    """How to load the pipeline and which sampler runs it: shared by `generate` and `evaluate`."""

    model: Optional[str] = None  # a pipeline folder or Hub id (required)
    solver: Optional[str] = None  # "euler" or "heun"; default: the saved scheduler's
    # The sampler: euler or heun (flow models); ddpm, ddim, dpm++, unipc or euler_discrete (noise-prediction
    # models, diffusers' schedulers on the saved noise schedule). Default: the saved scheduler.
    scheduler: Optional[str] = None
    shift: Optional[float] = None  # timestep shift; default: the saved scheduler's
    eta: float = 0.0  # stochastic sampling (ddim; euler on flow models), 0: deterministic, 1: DDPM-like
    lora: Optional[str] = None  # LoRA weights (a folder or Hub id with pytorch_lora_weights.safetensors)
    lora_scale: float = 1.0
    first_block_cache: Optional[float] = None  # diffusers' First Block Cache threshold, in (0, 1]
    dtype: str = "float32"  # the weights' dtype while sampling: float32, bfloat16 or float16
    device: str = "auto"  # auto: cuda when there is one, else cpu

    def __post_init__(self) -> None:
        if not self.model:
            _fail("model", self.model, "required: a pipeline folder or Hub id, e.g. examples/nanoi2v-shapes-64")
        for flag in ("model", "lora"):
            try:
                check_local_path(flag, getattr(self, flag))
            except ValueError:
                _fail(flag, getattr(self, flag), "no such folder (and not a Hub repo id here)")
        if Path(self.model).is_dir() and not (Path(self.model) / MODEL_INDEX).is_file():
            _fail("model", self.model, f"not a pipeline folder: it has no {MODEL_INDEX}")
        if self.solver is not None and self.solver not in SOLVERS:
            _fail("solver", self.solver, f"must be one of {', '.join(SOLVERS)}")
        if self.scheduler is not None:
            if self.scheduler not in SCHEDULER_NAMES:
                _fail("scheduler", self.scheduler, f"must be one of {', '.join(SCHEDULER_NAMES)}")
            if self.solver is not None:
                _fail("solver", self.solver, "give --scheduler or --solver, not both")
        prediction_type = self.saved_prediction_type()
        if prediction_type not in (None, "flow"):
            if self.scheduler is not None and self.scheduler not in NOISE_SCHEDULER_NAMES:
                _fail("scheduler", self.scheduler, f"this model predicts {prediction_type!r} (a noise-prediction "
                      f"model): choose one of {', '.join(NOISE_SCHEDULER_NAMES)}")  # fmt: skip
            for flag in ("solver", "shift"):
                if getattr(self, flag) is not None:
                    _fail(flag, getattr(self, flag), f"applies to flow models; this one predicts {prediction_type!r} "
                          "(use --scheduler)")  # fmt: skip
        elif prediction_type == "flow" and self.scheduler is not None and self.scheduler not in FLOW_SCHEDULER_NAMES:
            _fail("scheduler", self.scheduler, f"this model is a flow-matching model: choose one of "
                  f"{', '.join(FLOW_SCHEDULER_NAMES)}")  # fmt: skip
        if self.shift is not None and not self.shift > 0:
            _fail("shift", self.shift, "must be > 0")
        if not (math.isfinite(self.eta) and self.eta >= 0):
            _fail("eta", self.eta, "must be a number >= 0 (0: deterministic)")
        if self.eta > 0:
            sampler = self.scheduler or self.solver
            if sampler is not None and sampler not in ("ddim", "euler"):
                _fail("eta", self.eta, f"the {sampler} scheduler takes no eta: use --scheduler ddim (noise-prediction "
                      "models) or euler (flow models)")  # fmt: skip
            if prediction_type == "flow" and self.eta > 1:
                _fail("eta", self.eta, "must be in [0, 1] for a flow model")
        if not math.isfinite(self.lora_scale):
            _fail("lora_scale", self.lora_scale, "must be a finite number")
        if self.first_block_cache is not None and not 0 < self.first_block_cache <= 1:
            _fail("first_block_cache", self.first_block_cache, "must be in (0, 1]")
        if self.dtype not in DTYPES:
            _fail("dtype", self.dtype, f"must be one of {', '.join(DTYPES)}")
        if self.device not in DEVICES:
            _fail("device", self.device, f"must be one of {', '.join(DEVICES)}")
        if self.device == "cuda" and not _cuda_available():
            _fail("device", self.device, "no CUDA device here (use cpu, or auto)")

    def saved_prediction_type(self) -> Optional[str]:
        """The objective a local pipeline folder records ("flow" when it names none); None for a Hub id."""
        try:
            return json.loads((Path(self.model) / MODEL_INDEX).read_text()).get("prediction_type") or "flow"
        except (OSError, ValueError, AttributeError):
            return None  # not readable here: the pipeline checks the pairing once loaded

    def size_multiples(self):
        """(spatial, temporal) size multiples of a local pipeline folder, read from its configs; None for a Hub id."""
        folder = Path(self.model)
        try:
            vae = json.loads((folder / "vae" / "config.json").read_text())
            transformer = json.loads((folder / "transformer" / "config.json").read_text())
            spatial = 2 ** (len(vae["block_out_channels"]) - 1) * transformer["patch_size"][-1]
            return spatial, 2 ** sum(bool(flag) for flag in vae.get("temporal_downsample", (False, True, True)))
        except (OSError, ValueError, KeyError, TypeError, IndexError):
            return None  # not readable here: the pipeline checks the sizes once loaded


@dataclass
class GenerateSettings(LoadingSettings):
    """nanoi2v generate: a video from a first frame and a prompt (without --image: text-to-video)."""

    image: Optional[str] = None  # the first frame (PNG, JPEG, ...); none for text-to-video
    last_image: Optional[str] = None  # the last frame (with --image: first and last frame to video)
    video: Optional[str] = None  # a clip to continue: its last frames (--context_frames) open the output
    context_frames: int = 9  # with --video: 1 + 4m frames below --num_frames
    prompt: str = ""  # the motion to generate; empty: no text
    negative_prompt: Optional[str] = None
    num_frames: int = 17  # 1 + 4k
    height: Optional[int] = None  # default: the image's height (rounded to the model's multiple), else 64
    width: Optional[int] = None
    num_inference_steps: int = 20
    guidance_scale: float = 5.0  # text guidance; 1 turns it off
    image_guidance_scale: Optional[float] = None  # a separate image guidance (>= 1)
    negative_guidance_scale: Optional[float] = None  # with a negative prompt: a guidance term of its own (>= 0)
    num_videos_per_prompt: int = 1  # several videos are written as NAME-0.mp4, NAME-1.mp4, ...
    seed: int = 0
    output: str = "outputs/generated.mp4"  # .mp4, .gif, .mkv, .webm or .mov
    fps: int = 8
    lossless: bool = False  # exact RGB frames (.mp4/.mkv: libx264rgb crf 0, .webm: vp9 lossless), larger files

    def __post_init__(self) -> None:
        super().__post_init__()
        for flag in ("image", "last_image"):
            if getattr(self, flag) is not None:
                check_image_file(flag, getattr(self, flag))
        if self.video is not None:
            if self.image is not None:
                _fail("video", self.video, "opens the output itself: give --image or --video, not both")
            check_video_file("video", self.video)
            if self.context_frames < 1 or (self.context_frames - 1) % 4 or self.context_frames >= self.num_frames:
                rule = f"must be 1 + 4m and below --num_frames ({self.num_frames})"
                _fail("context_frames", self.context_frames, rule)
        multiples = self.size_multiples()
        spatial, temporal = multiples or (16, 4)
        for flag, value in (("num_frames", self.num_frames), ("height", self.height), ("width", self.width)):
            try:
                if flag == "num_frames":
                    check_frame_count(flag, value, temporal)
                elif value is not None and multiples is not None:
                    check_multiple(flag, value, spatial, "the model's VAE factor x patch size")
                elif value is not None and value < 1:
                    raise ValueError("must be a positive number of pixels")
            except ValueError as error:
                _fail(flag, value, str(error).removeprefix(f"{flag} "))
        for flag in ("num_inference_steps", "num_videos_per_prompt", "fps"):
            if getattr(self, flag) < 1:
                _fail(flag, getattr(self, flag), "must be >= 1")
        for flag in ("guidance_scale", "image_guidance_scale"):
            value = getattr(self, flag)
            if value is not None and not value >= 1:
                _fail(flag, value, "must be >= 1 (1 turns guidance off)")
        if self.negative_guidance_scale is not None:
            if not self.negative_guidance_scale >= 0:
                _fail("negative_guidance_scale", self.negative_guidance_scale, "must be >= 0")
            if self.negative_prompt is None:
                _fail("negative_guidance_scale", self.negative_guidance_scale, "needs a --negative_prompt")
        if self.seed < 0:
            _fail("seed", self.seed, "must be >= 0")
        check_output_file("output", self.output)


@dataclass
class EvaluateSettings(LoadingSettings):
    """nanoi2v evaluate: score a shapes pipeline on fresh validation scenes, beside the static baseline."""

    task: str = "i2v"  # what each scene is generated from: i2v, flf2v, keyframes or continue
    num_scenes: int = 64
    num_inference_steps: int = 20
    guidance_scale: float = 5.0
    seed: int = 0  # which block of num_scenes validation scenes (and their noise); seeds never share a scene
    batch_size: int = 8
    min_objects: int = 1
    max_objects: int = 2
    text_swap: bool = True  # also generate each scene with a second caption (the text-swap score)
    swap_motions_negative: bool = False  # negative prompt: the caption with the objects' motions exchanged
    negative_guidance_scale: Optional[float] = None  # give that negative prompt a guidance term of its own
    output: str = "outputs/eval.json"

    def __post_init__(self) -> None:
        super().__post_init__()
        from .evaluation.shapes_metrics import EVAL_TASKS

        if self.task not in EVAL_TASKS:
            _fail("task", self.task, f"must be one of {', '.join(EVAL_TASKS)}")
        for flag in ("num_scenes", "num_inference_steps", "batch_size", "min_objects"):
            if getattr(self, flag) < 1:
                _fail(flag, getattr(self, flag), "must be >= 1")
        if not self.min_objects <= self.max_objects <= 3:
            _fail("max_objects", self.max_objects, f"must be between --min_objects ({self.min_objects}) and 3")
        if not self.guidance_scale >= 1:
            _fail("guidance_scale", self.guidance_scale, "must be >= 1 (1 turns guidance off)")
        if self.negative_guidance_scale is not None and not self.negative_guidance_scale >= 0:
            _fail("negative_guidance_scale", self.negative_guidance_scale, "must be >= 0")
        if self.negative_guidance_scale is not None and not self.swap_motions_negative:
            _fail("negative_guidance_scale", self.negative_guidance_scale, "needs --swap_motions_negative")
        if self.seed < 0:
            _fail("seed", self.seed, "must be >= 0")
        if not self.output.endswith(".json"):
            _fail("output", self.output, "must end in .json")
        check_writable_folder("output", self.output)


def check_image_file(flag: str, path: str) -> None:
    """Raise `UsageError` unless `path` is a file PIL can read as an image."""
    from PIL import Image, UnidentifiedImageError

    if not Path(path).is_file():
        _fail(flag, path, "no such file")
    try:
        with Image.open(path) as image:
            image.load()
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as error:
        _fail(flag, path, f"not a readable image ({type(error).__name__}: {error})")


def check_video_file(flag: str, path: str) -> None:
    """Raise `UsageError` unless `path` is a video PyAV can decode."""
    from .data.video_io import VideoDecodeError, read_video_frames

    if not Path(path).is_file():
        _fail(flag, path, "no such file")
    try:
        read_video_frames(path, num_frames=1)
    except VideoDecodeError as error:
        _fail(flag, path, f"not a readable video ({error})")


def check_output_file(flag: str, path: str) -> None:
    if Path(path).suffix.lower() not in WRITABLE_SUFFIXES:
        _fail(flag, path, f"the suffix must be one of {', '.join(WRITABLE_SUFFIXES)}")
    check_writable_folder(flag, path)


def check_writable_folder(flag: str, path: str) -> None:
    """Raise `UsageError` unless the folder of `path` exists and is writable, or can be made."""
    folder = Path(path).resolve().parent
    existing = next(parent for parent in (folder, *folder.parents) if parent.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK):
        _fail(flag, path, f"{existing} is not a writable folder")


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


# --------------------------------------------------------------------------------------------------
# Loading and running
# --------------------------------------------------------------------------------------------------


def load_pipeline(model: str, solver: Optional[str] = None, shift: Optional[float] = None,
                  first_block_cache: Optional[float] = None, lora: Optional[str] = None, lora_scale: float = 1.0,
                  dtype: str = "float32", device: str = "auto", scheduler: Optional[str] = None):  # fmt: skip
    """A pipeline folder or Hub id, ready to sample: the built-in text encoder filled in when it was saved without
    one; `scheduler` (a name of `schedulers.objectives.SCHEDULER_NAMES` that fits the model's objective) replaces
    the saved scheduler, built from its config; `solver` and `shift` replace the saved flow scheduler's; `lora`
    loaded as the adapter "lora" at `lora_scale`; `first_block_cache` turns on diffusers' First Block Cache at that
    threshold."""
    import torch
    from diffusers.hooks import FirstBlockCacheConfig

    from .pipelines.pipeline_nanoi2v import NanoI2VPipeline
    from .schedulers.objectives import scheduler_from_name
    from .text_encoders import load_minilm

    torch_dtype = getattr(torch, dtype)
    pipe = NanoI2VPipeline.from_pretrained(model, dtype=torch_dtype)
    if pipe.text_encoder is None:
        text_encoder, tokenizer = load_minilm(dtype=torch_dtype)
        pipe.register_modules(text_encoder=text_encoder, tokenizer=tokenizer)
    if scheduler is not None:
        pipe.scheduler = scheduler_from_name(scheduler, pipe.scheduler, pipe.config.get("prediction_type", "flow"))
    overrides = {"solver": solver} if solver else {}
    if shift is not None:
        overrides["shift"] = shift
    if overrides:
        pipe.scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config, **overrides)
    if lora is not None:
        pipe.load_lora_weights(lora, adapter_name=LORA_ADAPTER_NAME)
        pipe.set_adapters([LORA_ADAPTER_NAME], adapter_weights=[lora_scale])
    if first_block_cache is not None:
        pipe.transformer.enable_cache(FirstBlockCacheConfig(threshold=first_block_cache))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return pipe.to(device)


def _load(settings: LoadingSettings):
    try:
        return load_pipeline(settings.model, **loading_options(settings))
    except (OSError, ValueError) as error:  # not found, offline, a refused or broken folder: said in its message
        raise CommandError(f"{type(error).__name__}: {error}") from error


def loading_options(settings: LoadingSettings) -> dict:
    return {name: getattr(settings, name) for name in ("solver", "shift", "first_block_cache", "lora", "lora_scale",
                                                      "dtype", "device", "scheduler")}  # fmt: skip


def video_to_uint8(video):
    """`(F, H, W, 3)` floats in [0, 1] -> uint8."""
    return (video * 255).round().clip(0, 255).astype("uint8")


def output_paths(output: str, count: int) -> List[Path]:
    """`output` itself for one video; NAME-0.SUFFIX, NAME-1.SUFFIX, ... for several."""
    path = Path(output)
    return [path] if count == 1 else [path.with_name(f"{path.stem}-{index}{path.suffix}") for index in range(count)]


def generate(settings: GenerateSettings) -> List[Path]:
    """Load the pipeline, generate, write the videos; returns their paths."""
    import torch
    from PIL import Image

    from .data import write_video

    from .data.video_io import read_video_frames

    pipe = _load(settings)
    # Any image mode: the pipeline cleans it up.
    image, last_image = (Image.open(path) if path else None for path in (settings.image, settings.last_image))
    video = read_video_frames(settings.video)[-settings.context_frames :] if settings.video else None
    generator = torch.Generator().manual_seed(settings.seed)
    videos = pipe(
        image=image, last_image=last_image, video=video, prompt=settings.prompt,
        negative_prompt=settings.negative_prompt, height=settings.height,
        width=settings.width, num_frames=settings.num_frames, num_inference_steps=settings.num_inference_steps,
        guidance_scale=settings.guidance_scale, image_guidance_scale=settings.image_guidance_scale,
        negative_guidance_scale=settings.negative_guidance_scale,
        num_videos_per_prompt=settings.num_videos_per_prompt, generator=generator, eta=settings.eta,
    ).frames  # (N, F, H, W, 3) in [0, 1]  # fmt: skip
    paths = output_paths(settings.output, len(videos))
    for path, video in zip(paths, videos):
        try:
            write_video(path, video_to_uint8(video), fps=settings.fps, lossless=settings.lossless)
        except OSError as error:
            raise CommandError(str(error)) from error
        print(f"wrote {path} ({video.shape[0]} frames, {video.shape[2]}x{video.shape[1]})")
    return paths


def evaluate(settings: EvaluateSettings) -> dict:
    """Score the pipeline on fresh validation scenes; print the table and write every number to the JSON."""
    from .data import ShapesConfig, swap_motions
    from .evaluation.report import format_table, json_safe
    from .evaluation.shapes_metrics import evaluate_pipeline

    pipe = _load(settings)
    results = evaluate_pipeline(
        pipe, num_scenes=settings.num_scenes, num_inference_steps=settings.num_inference_steps,
        guidance_scale=settings.guidance_scale, seed=settings.seed, batch_size=settings.batch_size,
        text_swap=settings.text_swap, negative_prompt=swap_motions if settings.swap_motions_negative else None,
        negative_guidance_scale=settings.negative_guidance_scale, task=settings.task, eta=settings.eta,
        config=ShapesConfig(min_objects=settings.min_objects, max_objects=settings.max_objects),
    )  # fmt: skip
    results["model_path"] = settings.model
    results["settings"].update(solver=pipe.scheduler.config.get("solver"), shift=pipe.scheduler.config.get("shift"),
                               scheduler=type(pipe.scheduler).__name__,
                               first_block_cache=settings.first_block_cache, lora=settings.lora,
                               lora_scale=settings.lora_scale if settings.lora else None)  # fmt: skip
    print(format_table(results))
    out = Path(settings.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(json_safe(results), indent=2, allow_nan=False) + "\n")
    print(f"wrote {out}")
    return results


COMMANDS = {"generate": (GenerateSettings, generate), "evaluate": (EvaluateSettings, evaluate)}


def run_command(command: str, argv: Sequence[str]):
    """Parse the flags of `command`; a bad one exits with status 2 and one line, before anything loads."""
    settings_class, function = COMMANDS[command]
    try:
        settings = parse_config(settings_class, argv, prog=f"nanoi2v {command}")
    except ValueError as error:
        print(f"nanoi2v {command}: error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    try:
        return function(settings)
    except CommandError as error:
        print(f"nanoi2v {command}: error: {error}", file=sys.stderr)
        raise SystemExit(1) from None


def main(argv: Optional[Sequence[str]] = None) -> None:
    """The console script. It returns None: its wrapper exits with the return value, and prints any other."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in COMMANDS:
        commands = " | ".join(COMMANDS)
        print(f"usage: nanoi2v {{{commands}}} [--help] [flags]\n\n{__doc__.split(chr(10) * 2)[0]}", file=sys.stderr)
        raise SystemExit(0 if argv and argv[0] in ("-h", "--help") else 2)
    run_command(argv[0], argv[1:])


if __name__ == "__main__":
    main()
