"""End-to-end `NanoI2VPipeline` speed, and VAE decode memory against the number of frames.

    python benchmarks/bench_pipeline.py                              # 17x64x64 and 17x128x128, then VAE memory
    python benchmarks/bench_pipeline.py --videos 33x128x128 --steps 20 --no_vae_memory --out pipe.json
    python benchmarks/bench_pipeline.py --model examples/nanoi2v-shapes-64 --videos 17x64x64 --steps 20 \
        --first_block_cache 0.1 0.2 --no_vae_memory            # the shipped model, with step caching

The pipeline is the built-in shapes model's architecture (transformer from
training/configs/shapes_64.yaml, VAE preset "shapes-64", the built-in MiniLM text encoder) with
random weights: speed does not depend on the weights, except with a step cache. `--model DIR` takes a
saved pipeline folder instead (e.g. examples/nanoi2v-shapes-64, whose text encoder is the built-in one).
Variants, run interleaved, median of `--repeats` calls after `--warmup`:

- `euler, CFG batched`: the pipeline as shipped, conditional and unconditional branches in one
  transformer call of batch 2;
- `euler, CFG 2 calls`: the same, with each transformer call split into two calls of batch 1;
- `euler, no CFG`: guidance_scale 1, one branch;
- `heun, CFG batched`: the second-order solver (two transformer calls per step but the last);
- `euler, CFG batched + negative guidance`: `negative_guidance_scale` with the prompt's swapped-motion
  caption (`data.swap_motions`), a third branch in the batch;
- `euler, CFG batched, first block cache T`: diffusers' First Block Cache at each `--first_block_cache`
  threshold T (which steps it skips depends on the weights: use it with `--model`);
- `euler, CFG batched, pyramid attention broadcast` and `euler, CFG batched, faster cache`: diffusers'
  attention-level caches with the settings of their documentation (`ATTENTION_CACHES`): spatial
  self-attention reused every other step inside a timestep window, and for FasterCache also the
  unconditional branch approximated on 4 steps in 5 (`--no_attention_caches` leaves them out);
- `euler, CFG batched, offload`: `enable_model_cpu_offload()`, only when a GPU is present.

Columns: seconds per video (the whole call: text, image encoding, denoising, VAE decode), transformer
seconds per denoising step and per call, the time relative to `euler, CFG batched`, and on CUDA the
growth of `max_memory_allocated` during the call (with offload it includes moving the weights in).
The second table is `bench_vae_memory.py`'s decode sweep:
peak memory for 17/33/65/129 frames, chunked vs whole, and chunked with spatial tiling.
"""

import argparse
import math
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import PIL.Image
import torch
import yaml
from diffusers.hooks import FasterCacheConfig, FirstBlockCacheConfig, PyramidAttentionBroadcastConfig
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from tqdm.auto import tqdm

import bench_vae_memory
from bench_models import parse_video
from _measure import (
    PeakMemory,
    default_device,
    environment_info,
    markdown_table,
    median,
    synchronize,
    time_interleaved,
    write_json,
)
from nanoi2v_diffusers import (
    AutoencoderKLNanoI2V,
    NanoI2VFlowMatchScheduler,
    NanoI2VPipeline,
    NanoI2VTransformer3DModel,
)
from nanoi2v_diffusers.conditioning import num_condition_channels
from nanoi2v_diffusers.data import ShapesConfig, generate_shapes_clip, swap_motions
from nanoi2v_diffusers.models import TRANSFORMER_PRESETS, VAE_PRESETS
from nanoi2v_diffusers.text_encoders import load_text_encoder

REPO_ROOT = Path(__file__).resolve().parents[1]
DEMO_DIT_CONFIG = REPO_ROOT / "training" / "configs" / "shapes_64.yaml"
DEMO_TRANSFORMER = "demo"
PROMPT = "a red circle moves left and a blue square moves up quickly"
NEGATIVE_GUIDANCE = 2.0  # as `make demo`
SHAPES_CANVAS_RANGE = (32, 256)  # the shapes generator's canvas limits, for the conditioning image
DEFAULT_VIDEOS = ("17x64x64", "17x128x128")
DEFAULT_VAE_FRAMES = (17, 33, 65, 129)
# (mode, tiling) settings of the decode-memory sweep: tiling alone does not bound growth in time.
VAE_MEMORY_SETTINGS = ((("chunked", "whole"), ("off",)), (("chunked",), ("on",)))

# diffusers' documented settings for its video pipelines (timesteps on the 0-1000 scale the pipeline reports).
ATTENTION_CACHES = {
    "pyramid attention broadcast": lambda pipe: PyramidAttentionBroadcastConfig(
        spatial_attention_block_skip_range=2, spatial_attention_timestep_skip_range=(100, 800),
        current_timestep_callback=lambda: pipe.current_timestep,
    ),
    "faster cache": lambda pipe: FasterCacheConfig(
        spatial_attention_block_skip_range=2, spatial_attention_timestep_skip_range=(-1, 681),
        unconditional_batch_skip_range=5, unconditional_batch_timestep_skip_range=(-1, 781),
        attention_weight_callback=lambda _: 0.3, current_timestep_callback=lambda: pipe.current_timestep,
        tensor_format="BCFHW",
    ),
}

COLUMNS = (
    ("video FxHxW", "video", ""),
    ("tokens", "tokens", "d"),
    ("variant", "variant", ""),
    ("steps", "steps", "d"),
    ("transformer calls (forwards)", "calls_and_forwards", ""),
    ("s / video", "seconds_per_video", ".2f"),
    ("transformer s / step", "transformer_seconds_per_step", ".3f"),
    ("transformer s / call", "transformer_seconds_per_call", ".3f"),
    ("vs CFG batched", "relative", ".2f"),
    ("peak (MiB)", "peak_mib", ".0f"),
)


# --------------------------------------------------------------------------------------------------
# Components
# --------------------------------------------------------------------------------------------------


def transformer_kwargs(name: str) -> dict:
    """The demo DiT (preset + overrides from training/configs/shapes_64.yaml) or a named preset."""
    if name != DEMO_TRANSFORMER:
        return dict(TRANSFORMER_PRESETS[name])
    config = yaml.safe_load(DEMO_DIT_CONFIG.read_text())
    return {**TRANSFORMER_PRESETS[config["transformer_preset"]], **(config.get("transformer_overrides") or {})}


def build_pipeline(args, solver: str, text_encoder, tokenizer) -> NanoI2VPipeline:
    if args.model:
        pipe = NanoI2VPipeline.from_pretrained(args.model, text_encoder=text_encoder, tokenizer=tokenizer)
        pipe.scheduler = NanoI2VFlowMatchScheduler.from_config(pipe.scheduler.config, solver=solver)
        pipe.set_progress_bar_config(disable=True)
        return pipe.to(args.device)
    torch.manual_seed(0)
    vae = AutoencoderKLNanoI2V(**VAE_PRESETS[args.vae_preset]).eval()
    latent_channels = vae.config.latent_channels
    transformer = NanoI2VTransformer3DModel(
        **transformer_kwargs(args.transformer),
        in_channels=latent_channels + num_condition_channels(latent_channels),
        out_channels=latent_channels,
        text_dim=text_encoder.config.hidden_size,
    ).eval()
    pipe = NanoI2VPipeline(
        vae=vae,
        transformer=transformer,
        scheduler=NanoI2VFlowMatchScheduler(solver=solver),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(args.device)


def num_tokens(pipe: NanoI2VPipeline, video: Tuple[int, int, int]) -> int:
    """Transformer tokens of one video: its latent grid divided by the patch size."""
    frames, height, width = video
    grid = (
        (frames - 1) // pipe.vae_scale_factor_temporal + 1,
        height // pipe.vae_scale_factor_spatial,
        width // pipe.vae_scale_factor_spatial,
    )
    return math.prod(size // patch for size, patch in zip(grid, pipe.transformer.config.patch_size))


def conditioning_image(height: int) -> PIL.Image.Image:
    low, high = SHAPES_CANVAS_RANGE
    canvas = min(max(height, low), high)
    clip = generate_shapes_clip(seed=0, config=ShapesConfig(canvas_size=canvas, num_frames=1))
    return PIL.Image.fromarray(clip.first_frame)


# --------------------------------------------------------------------------------------------------
# Instrumentation
# --------------------------------------------------------------------------------------------------


class TransformerTimer:
    """Wraps `transformer.forward`: records the seconds of every call the pipeline makes and counts the
    forwards; with `split_batch`, runs each batched call as one forward per sample ("CFG 2 calls")."""

    def __init__(self, transformer: torch.nn.Module, device: torch.device, split_batch: bool = False):
        self.seconds: List[float] = []
        self.forwards = 0
        self.device = device
        self.split_batch = split_batch
        self._forward = transformer.forward
        transformer.forward = self

    def __call__(self, **kwargs):
        synchronize(self.device)
        start = time.perf_counter()
        if self.split_batch:
            output = self._split_forward(**kwargs)
        else:
            output = self._forward(**kwargs)
            self.forwards += 1
        synchronize(self.device)
        self.seconds.append(time.perf_counter() - start)
        return output

    def _split_forward(self, return_dict: bool = True, **kwargs):
        batch_size = kwargs["hidden_states"].shape[0]
        samples = []
        for i in range(batch_size):
            one = {k: v[i : i + 1] if torch.is_tensor(v) and v.ndim > 0 else v for k, v in kwargs.items()}
            samples.append(self._forward(**one, return_dict=False)[0])
            self.forwards += 1
        sample = torch.cat(samples)
        return Transformer2DModelOutput(sample=sample) if return_dict else (sample,)


class Variant:
    """One pipeline configuration: a pipeline, its call arguments and its transformer timer."""

    def __init__(self, name: str, pipe: NanoI2VPipeline, call_kwargs: dict, device, split_batch: bool = False):
        self.name = name
        self.pipe = pipe
        self.call_kwargs = call_kwargs
        self.device = device
        self.timer = TransformerTimer(pipe.transformer, device, split_batch)
        self.transformer_seconds: List[float] = []
        self.calls = 0
        self.forwards = 0
        self.peak_mib: Optional[float] = None

    def __call__(self) -> None:
        self.timer.seconds.clear()
        self.timer.forwards = 0
        if self.device.type == "cuda":
            with PeakMemory(self.device) as memory:
                self.pipe(**self.call_kwargs, generator=torch.Generator().manual_seed(0))
            self.peak_mib = memory.growth_mib
        else:
            self.pipe(**self.call_kwargs, generator=torch.Generator().manual_seed(0))
        self.transformer_seconds.append(sum(self.timer.seconds))
        self.calls = len(self.timer.seconds)
        self.forwards = self.timer.forwards


def make_variants(args, pipes: Dict[str, NanoI2VPipeline], video: Tuple[int, int, int]) -> List[Variant]:
    frames, height, width = video
    base = dict(
        image=conditioning_image(height), prompt=PROMPT, num_frames=frames, height=height, width=width,
        num_inference_steps=args.steps, guidance_scale=args.guidance_scale, output_type="np",
    )  # fmt: skip
    device = torch.device(args.device)
    variants = [
        Variant("euler, CFG batched", pipes["euler"], base, device),
        Variant("euler, CFG 2 calls", pipes["euler_split"], base, device, split_batch=True),
        Variant("euler, no CFG", pipes["euler_nocfg"], {**base, "guidance_scale": 1.0}, device),
        Variant("heun, CFG batched", pipes["heun"], base, device),
        Variant(
            "euler, CFG batched + negative guidance",
            pipes["euler_negative"],
            {**base, "negative_prompt": swap_motions(PROMPT), "negative_guidance_scale": NEGATIVE_GUIDANCE},
            device,
        ),
    ]
    for threshold in args.first_block_cache:
        name = f"euler, CFG batched, first block cache {threshold:g}"
        variants.append(Variant(name, pipes[f"fbc_{threshold:g}"], base, device))
    for cache in ATTENTION_CACHES if args.attention_caches else ():
        variants.append(Variant(f"euler, CFG batched, {cache}", pipes[cache], base, device))
    if "offload" in pipes:
        variants.append(Variant("euler, CFG batched, offload", pipes["offload"], base, device))
    return variants


def build_pipelines(args) -> Dict[str, NanoI2VPipeline]:
    """A separate pipeline per variant, so that each one's transformer wrapper stays in place."""
    text = load_text_encoder(args.text_encoder)  # frozen, so the pipelines can share it
    names = ("euler", "euler_split", "euler_nocfg", "heun", "euler_negative",
             *(f"fbc_{threshold:g}" for threshold in args.first_block_cache),
             *(ATTENTION_CACHES if args.attention_caches else ()))  # fmt: skip
    pipes = {name: build_pipeline(args, "heun" if name == "heun" else "euler", *text) for name in names}
    for threshold in args.first_block_cache:
        pipes[f"fbc_{threshold:g}"].transformer.enable_cache(FirstBlockCacheConfig(threshold=threshold))
    for cache, config in ATTENTION_CACHES.items() if args.attention_caches else ():
        pipes[cache].transformer.enable_cache(config(pipes[cache]))
    if torch.device(args.device).type == "cuda":
        offload = build_pipeline(args, "euler", *load_text_encoder(args.text_encoder)).to("cpu")
        offload.enable_model_cpu_offload(device=args.device)
        pipes["offload"] = offload
    return pipes


# --------------------------------------------------------------------------------------------------
# Sweeps
# --------------------------------------------------------------------------------------------------


def bench_speed(args, pipes: Dict[str, NanoI2VPipeline]) -> List[dict]:
    rows = []
    for text in tqdm(args.videos, desc="bench_pipeline", file=sys.stderr):
        video = parse_video(text, "dit")  # the pipeline's rule: VAE factor x patch size
        variants = make_variants(args, pipes, video)
        times = time_interleaved({v.name: v for v in variants}, args.repeats, args.warmup, torch.device(args.device))
        reference = median(times[variants[0].name])
        for variant in variants:
            transformer_seconds = median(variant.transformer_seconds[args.warmup :])
            rows.append({
                "video": text, "tokens": num_tokens(pipes["euler"], video), "variant": variant.name,
                "steps": args.steps,
                "calls": variant.calls, "forwards": variant.forwards,
                "calls_and_forwards": f"{variant.calls} ({variant.forwards})",
                "seconds_per_video": median(times[variant.name]),
                "transformer_seconds_per_step": transformer_seconds / args.steps,
                "transformer_seconds_per_call": transformer_seconds / variant.calls,
                "relative": median(times[variant.name]) / reference,
                "peak_mib": variant.peak_mib,
            })  # fmt: skip
    return rows


def bench_vae_decode_memory(args) -> List[dict]:
    rows = []
    for modes, tilings in VAE_MEMORY_SETTINGS:
        rows += bench_vae_memory.sweep(args.vae_frames, modes, tilings, args.vae_preset, args.vae_resolution,
                                       args.vae_tile, args.device, args.threads)  # fmt: skip
    return sorted(rows, key=lambda row: (row["frames"], row["mode"], row["tiling"]))


# --------------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------------


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--videos", nargs="*", default=list(DEFAULT_VIDEOS), help="FxHxW videos to generate")
    parser.add_argument("--steps", type=int, default=10, help="num_inference_steps")
    parser.add_argument("--guidance_scale", type=float, default=5.0)
    parser.add_argument("--transformer", default=DEMO_TRANSFORMER, choices=[DEMO_TRANSFORMER, *TRANSFORMER_PRESETS])
    parser.add_argument("--vae_preset", default="shapes-64", choices=sorted(VAE_PRESETS))
    parser.add_argument("--text_encoder", help="a local transformers folder; default: the built-in MiniLM")
    parser.add_argument("--model", help="a saved pipeline folder: its weights instead of random ones")
    parser.add_argument("--first_block_cache", type=float, nargs="*", default=[], metavar="T",
                        help="also time diffusers' First Block Cache at these thresholds")
    parser.add_argument("--no_attention_caches", dest="attention_caches", action="store_false",
                        help="leave out the Pyramid Attention Broadcast and FasterCache variants")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--vae_frames", type=int, nargs="+", default=list(DEFAULT_VAE_FRAMES))
    parser.add_argument("--vae_resolution", type=int, default=128)
    parser.add_argument("--vae_tile", type=int, default=bench_vae_memory.DEFAULT_TILE, help="tile size in pixels")
    parser.add_argument("--no_vae_memory", dest="vae_memory", action="store_false")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default=default_device())
    parser.add_argument("--out", type=Path, help="also write both tables and the environment as JSON here")
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.warmup < 0 or args.steps < 1:
        parser.error(f"need repeats >= 1, warmup >= 0, steps >= 1; got {args.repeats}, {args.warmup}, {args.steps}")
    return args


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, List[dict]]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    meta = environment_info(device, args.threads)
    meta.update(repeats=args.repeats, warmup=args.warmup, steps=args.steps, guidance_scale=args.guidance_scale,
                transformer=args.transformer, vae_preset=args.vae_preset, model=args.model)  # fmt: skip
    results = {"pipeline": [], "vae_decode_memory": []}

    if args.videos:
        results["pipeline"] = bench_speed(args, build_pipelines(args))
        weights = f"transformer {args.transformer!r}, VAE {args.vae_preset!r}"
        weights = f"weights of {args.model}" if args.model else weights
        print(f"\nNanoI2VPipeline, {weights}, device "
              f"{meta['device_name']} ({args.device}), {args.threads} threads, {args.steps} steps, "
              f"median of {args.repeats} (+{args.warmup} warm-up)\n")  # fmt: skip
        print(markdown_table(results["pipeline"], COLUMNS))
        if device.type != "cuda":
            print("\nModel CPU offload: not measured (no GPU; offloading only applies to an accelerator).")

    if args.vae_memory:
        results["vae_decode_memory"] = bench_vae_decode_memory(args)
        print()
        print(bench_vae_memory.format_table(results["vae_decode_memory"], args.vae_preset, args.vae_resolution,
                                            args.device))  # fmt: skip
    if args.out:
        write_json(args.out, meta, [{"table": name, **row} for name, rows in results.items() for row in rows])
    return results


if __name__ == "__main__":
    main()
