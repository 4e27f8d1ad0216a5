"""Our transformer and VAE against diffusers' Wan components at matched size, measured in the same run.

    python benchmarks/bench_models.py                                  # the default sweep (~2.5 min, 2 idle cores)
    python benchmarks/bench_models.py --dit_sizes S --dit_videos 17x128x128 --vae_sizes --out s.json
    python benchmarks/bench_models.py --profile dit:S:17x128x128      # torch.profiler tables, both models
    python benchmarks/bench_models.py --saved_activations dit:S:17x128x128   # activations kept for backward
    python benchmarks/bench_models.py --vae_sizes --plain_autograd     # without the memory-saving Functions

Pairs:
- `NanoI2VTransformer3DModel` vs `WanTransformer3DModel`: Wan's config is derived from ours (width =
  heads x head_dim, depth, heads, ffn_dim, patch, text_dim, freq_dim, in/out channels, QK-norm), so
  both take the same 33 input channels (16 noisy latents + 17 image-condition channels; Wan gets them
  concatenated, as its I2V pipeline does) and the same text states, timestep and noise.
- `AutoencoderKLNanoI2V` vs `AutoencoderKLWan`: same base channels, multipliers, blocks per level,
  latent channels and temporal downsampling; attention in the middle block only.

Each input is given as a video `FxHxW` (frames x height x width in pixels); the DiT sees its latent
grid (F - 1) / 4 + 1 x H / 8 x W / 8, cut into (1, 2, 2) patches. Times are medians over `--repeats`
calls after `--warmup`, ours and Wan's interleaved; the speed-up is the median of the per-repeat
ratios Wan / ours (> 1: ours is faster). Peak memory is measured in a fresh worker process per model
and size (see `_measure.py`): peak RSS growth on CPU, `max_memory_allocated` growth on CUDA.
"""

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from diffusers import AutoencoderKLWan, WanTransformer3DModel
from tqdm.auto import tqdm

from _measure import (
    MIB,
    default_device,
    environment_info,
    markdown_table,
    measure_peak_mib,
    median,
    paired_ratio,
    run_worker,
    saved_activation_bytes,
    time_interleaved,
    write_json,
)
from nanoi2v_diffusers.conditioning import num_condition_channels
from nanoi2v_diffusers.models import transformer_nanoi2v as transformer_module
from nanoi2v_diffusers.models import TRANSFORMER_PRESETS, VAE_PRESETS, AutoencoderKLNanoI2V, NanoI2VTransformer3DModel
from nanoi2v_diffusers.size_rules import check_frame_count, check_multiple

LATENT_CHANNELS = 16
TEXT_DIM = 384  # the built-in MiniLM text encoder
TEXT_TOKENS = 32  # the shapes model's max_sequence_length
TIMESTEP = 500.0
VAE_TEMPORAL_RATIO, VAE_SPATIAL_RATIO = 4, 8
PARAMS_PER_MILLION = 1e6

DEFAULT_DIT_SIZES = ("tiny", "S", "B")
DEFAULT_DIT_VIDEOS = ("17x64x64", "17x128x128")  # 80 and 320 tokens
DEFAULT_VAE_SIZES = ("tiny", "shapes-64")
DEFAULT_VAE_VIDEOS = ("17x64x64", "17x128x128")
DIT_OPS = ("forward", "forward+backward")
VAE_OPS = ("encode", "decode")
VAE_SUM_OP = "encode+decode"

# The targets on CPU: (family, op, minimum speed-up); and the peak-memory ratio ceiling.
SPEED_GOALS = (("dit", "forward+backward", 1.1), ("vae", VAE_SUM_OP, 1.2))
MEMORY_GOAL = 0.9
# Below this peak growth (a few tensors; RSS counts whole pages) a memory ratio says nothing.
MIN_RATIO_MIB = 10.0

COLUMNS = (
    ("model", "family", ""),
    ("size", "size", ""),
    ("params ours (M)", "params_ours_m", ".2f"),
    ("params Wan (M)", "params_wan_m", ".2f"),
    ("video FxHxW", "video", ""),
    ("tokens", "tokens", "d"),
    ("op", "op", ""),
    ("ours (ms)", "ours_ms", ".1f"),
    ("Wan (ms)", "wan_ms", ".1f"),
    ("speed-up Wan/ours", "speedup", ".2f"),
    ("peak ours (MiB)", "peak_ours_mib", ".1f"),
    ("peak Wan (MiB)", "peak_wan_mib", ".1f"),
    ("memory ours/Wan", "memory_ratio", ".2f"),
)


# --------------------------------------------------------------------------------------------------
# Matched models
# --------------------------------------------------------------------------------------------------


def build_transformer(kind: str, size: str) -> torch.nn.Module:
    """`kind` "ours" or "wan"; Wan's hyper-parameters are read off ours so the pair cannot drift apart."""
    ours = NanoI2VTransformer3DModel.from_preset(
        size,
        in_channels=LATENT_CHANNELS + num_condition_channels(LATENT_CHANNELS),
        out_channels=LATENT_CHANNELS,
        text_dim=TEXT_DIM,
    )
    if kind == "ours":
        return ours
    config = ours.config
    return WanTransformer3DModel(
        patch_size=tuple(config.patch_size),
        num_attention_heads=config.num_attention_heads,
        attention_head_dim=config.attention_head_dim,
        in_channels=config.in_channels,
        out_channels=config.out_channels,
        text_dim=config.text_dim,
        freq_dim=config.freq_dim,
        ffn_dim=config.ffn_dim,
        num_layers=config.num_layers,
        cross_attn_norm=config.cross_attn_norm,
        qk_norm="rms_norm_across_heads" if config.qk_norm else None,
        eps=config.eps,
    )


def build_vae(kind: str, size: str) -> torch.nn.Module:
    ours = AutoencoderKLNanoI2V(**VAE_PRESETS[size])
    if kind == "ours":
        return ours.eval()
    config = ours.config
    base = config.block_out_channels[0]
    if any(channels % base for channels in config.block_out_channels):
        raise ValueError(
            f"AutoencoderKLWan needs block_out_channels = base * multipliers; got {config.block_out_channels}."
        )
    zeros, ones = [0.0] * config.latent_channels, [1.0] * config.latent_channels
    return AutoencoderKLWan(
        base_dim=base,
        z_dim=config.latent_channels,
        dim_mult=[channels // base for channels in config.block_out_channels],
        num_res_blocks=config.layers_per_block,
        attn_scales=[],  # attention in the middle block only, as ours
        temperal_downsample=list(config.temporal_downsample),
        dropout=config.dropout,
        in_channels=config.in_channels,
        out_channels=config.out_channels,
        latents_mean=zeros,
        latents_std=ones,
    ).eval()


def build_model(family: str, kind: str, size: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return (build_transformer if family == "dit" else build_vae)(kind, size)


def count_params_m(model: torch.nn.Module) -> float:
    return sum(p.numel() for p in model.parameters()) / PARAMS_PER_MILLION


# --------------------------------------------------------------------------------------------------
# Inputs and operations
# --------------------------------------------------------------------------------------------------


def parse_video(text: str, family: str) -> Tuple[int, int, int]:
    """"17x64x64" -> (17, 64, 64), checked against the VAE (and DiT patch) size rules."""
    try:
        frames, height, width = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise ValueError(f"A video size must be FRAMESxHEIGHTxWIDTH, e.g. 17x64x64; got {text!r}.") from None
    multiple = VAE_SPATIAL_RATIO * (2 if family == "dit" else 1)  # DiT patches are 2 latent pixels wide
    check_frame_count(f"frames in {text!r}", frames, VAE_TEMPORAL_RATIO)
    check_multiple(f"height in {text!r}", height, multiple)
    check_multiple(f"width in {text!r}", width, multiple)
    return frames, height, width


def latent_grid(video: Tuple[int, int, int]) -> Tuple[int, int, int]:
    frames, height, width = video
    return 1 + (frames - 1) // VAE_TEMPORAL_RATIO, height // VAE_SPATIAL_RATIO, width // VAE_SPATIAL_RATIO


def dit_tokens(video: Tuple[int, int, int], patch_size: Tuple[int, int, int] = (1, 2, 2)) -> int:
    return math.prod(size // patch for size, patch in zip(latent_grid(video), patch_size))


def dit_inputs(video: Tuple[int, int, int], batch_size: int, device: torch.device) -> Dict[str, torch.Tensor]:
    torch.manual_seed(1)
    grid = latent_grid(video)
    return {
        "latents": torch.randn(batch_size, LATENT_CHANNELS, *grid, device=device),
        "condition": torch.randn(batch_size, num_condition_channels(LATENT_CHANNELS), *grid, device=device),
        "text": torch.randn(batch_size, TEXT_TOKENS, TEXT_DIM, device=device),
        "timestep": torch.full((batch_size,), TIMESTEP, device=device),
    }


def dit_forward(kind: str, model: torch.nn.Module, inputs: Dict[str, torch.Tensor]) -> torch.Tensor:
    if kind == "ours":
        return model(
            inputs["latents"], inputs["timestep"], inputs["text"], condition=inputs["condition"], return_dict=False
        )[0]
    # Wan takes the condition inside in_channels, concatenated as in its I2V pipeline.
    hidden_states = torch.cat([inputs["latents"], inputs["condition"]], dim=1)
    return model(hidden_states, inputs["timestep"], inputs["text"], return_dict=False)[0]


def dit_ops(kind: str, model: torch.nn.Module, inputs: Dict[str, torch.Tensor]) -> Dict[str, Callable[[], None]]:
    def forward():
        with torch.no_grad():
            dit_forward(kind, model, inputs)

    def forward_backward():
        dit_forward(kind, model, inputs).float().square().mean().backward()
        # Freed here, so that every call (and every memory measurement) allocates the gradients anew.
        model.zero_grad(set_to_none=True)

    return {"forward": forward, "forward+backward": forward_backward}


def vae_ops(
    model: torch.nn.Module, latent_channels: int, video: Tuple[int, int, int], device: torch.device
) -> Dict[str, Callable[[], None]]:
    torch.manual_seed(1)
    frames, height, width = video
    pixels = torch.rand(1, model.config.in_channels, frames, height, width, device=device) * 2 - 1  # in [-1, 1]
    latents = torch.randn(1, latent_channels, *latent_grid(video), device=device)

    def encode():
        with torch.no_grad():
            model.encode(pixels).latent_dist.mode()

    def decode():
        with torch.no_grad():
            model.decode(latents).sample

    return {"encode": encode, "decode": decode}


def model_ops(family, kind, size, model, video, batch_size, device) -> Dict[str, Callable[[], None]]:
    if family == "dit":
        return dit_ops(kind, model, dit_inputs(video, batch_size, device))
    return vae_ops(model, VAE_PRESETS[size]["latent_channels"], video, device)


# --------------------------------------------------------------------------------------------------
# Memory worker: one fresh process per (family, kind, size)
# --------------------------------------------------------------------------------------------------


def worker_main(args) -> dict:
    """Peak memory of every (video, op) for one model, smallest video first, each after one warm-up call."""
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    model = build_model(args.family, args.kind, args.size).to(device)
    peaks = {}
    for text in args.videos:
        video = parse_video(text, args.family)
        ops = model_ops(args.family, args.kind, args.size, model, video, args.batch_size, device)
        for op, fn in ops.items():
            fn()  # warm-up: one-time costs (kernel caches, thread pools) are not the model's working memory
            peaks[f"{text}|{op}"] = measure_peak_mib(fn, device)
    return peaks


def measure_memory(args, family: str, size: str, videos: Sequence[str]) -> Dict[str, Dict[str, float]]:
    common = ["--family", family, "--size", size, "--videos", *videos, "--device", args.device,
              "--threads", args.threads, "--batch_size", args.batch_size,
              *(["--plain_autograd"] if args.plain_autograd else [])]  # fmt: skip
    return {kind: run_worker(__file__, ["--kind", kind, *common]) for kind in ("ours", "wan")}


# --------------------------------------------------------------------------------------------------
# The sweep
# --------------------------------------------------------------------------------------------------


def _row(family, size, params, video, op, times=None, peaks=None) -> dict:
    parsed = parse_video(video, family)
    row = {
        "family": family,
        "size": size,
        "params_ours_m": params["ours"],
        "params_wan_m": params["wan"],
        "video": video,
        "tokens": dit_tokens(parsed) if family == "dit" else None,
        "op": op,
    }
    if times is not None:
        row.update(
            ours_ms=1e3 * median(times["ours"]),
            wan_ms=1e3 * median(times["wan"]),
            speedup=paired_ratio(times["wan"], times["ours"]),
            speedup_of_min_times=min(times["wan"]) / min(times["ours"]),  # load only ever adds time
            ours_times_s=times["ours"],
            wan_times_s=times["wan"],
        )
    if peaks is not None:
        measurable = min(peaks.values()) >= MIN_RATIO_MIB
        row.update(
            peak_ours_mib=peaks["ours"],
            peak_wan_mib=peaks["wan"],
            memory_ratio=peaks["ours"] / peaks["wan"] if measurable else None,
        )
    return row


def _sum_row(family, size, params, video, encode_row, decode_row) -> dict:
    """encode + decode: times summed per repeat (both ran in the same rounds), peak = the larger one."""
    times = {kind: [a + b for a, b in zip(encode_row[f"{kind}_times_s"], decode_row[f"{kind}_times_s"])]
             for kind in ("ours", "wan")}  # fmt: skip
    peaks = None
    if "peak_ours_mib" in encode_row:
        peaks = {kind: max(encode_row[f"peak_{kind}_mib"], decode_row[f"peak_{kind}_mib"]) for kind in ("ours", "wan")}
    return _row(family, size, params, video, VAE_SUM_OP, times, peaks)


def bench_family(args, family: str, size: str, videos: Sequence[str], progress: tqdm) -> List[dict]:
    device = torch.device(args.device)
    models = {kind: build_model(family, kind, size).to(device) for kind in ("ours", "wan")}
    params = {kind: count_params_m(model) for kind, model in models.items()}
    memory = measure_memory(args, family, size, videos) if args.memory else None
    rows = []
    for video in videos:
        parsed = parse_video(video, family)
        ops = {
            kind: model_ops(family, kind, size, model, parsed, args.batch_size, device)
            for kind, model in models.items()
        }
        video_rows = {}
        for op in ops["ours"]:
            progress.set_postfix_str(f"{family} {size} {video} {op}")
            times = time_interleaved({kind: ops[kind][op] for kind in models}, args.repeats, args.warmup, device)
            peaks = None if memory is None else {kind: memory[kind][f"{video}|{op}"] for kind in models}
            video_rows[op] = _row(family, size, params, video, op, times, peaks)
            progress.update()
        rows.extend(video_rows.values())
        if family == "vae":
            rows.append(_sum_row(family, size, params, video, video_rows["encode"], video_rows["decode"]))
    return rows


def goal_lines(rows: Sequence[dict]) -> List[str]:
    """One line per goal of the issue: the worst measured value against the target."""
    lines = []
    for family, op, target in SPEED_GOALS:
        speedups = [r["speedup"] for r in rows if r["family"] == family and r["op"] == op]
        if speedups:
            verdict = "met" if min(speedups) >= target else "NOT met"
            lines.append(f"- {family} {op} speed-up >= {target}: min {min(speedups):.2f}, "
                         f"median {median(speedups):.2f} -> {verdict}")  # fmt: skip
    ratios = [r["memory_ratio"] for r in rows if r.get("memory_ratio") is not None]
    if ratios:
        verdict = "met" if max(ratios) <= MEMORY_GOAL else "NOT met"
        lines.append(f"- peak memory ours/Wan <= {MEMORY_GOAL}: max {max(ratios):.2f}, "
                     f"median {median(ratios):.2f} -> {verdict}")  # fmt: skip
    return lines


# --------------------------------------------------------------------------------------------------
# Profiling
# --------------------------------------------------------------------------------------------------


def profile(args, spec: str, steps: int = 3, row_limit: int = 20) -> None:
    """Print torch.profiler's top ops (self time) over `steps` calls of each op of both models at
    `FAMILY:SIZE:FxHxW` (DiT: forward + backward; VAE: encode and decode)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    family, size, video = spec.split(":")
    device = torch.device(args.device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    sort_by = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    profiled_ops = ("forward+backward",) if family == "dit" else VAE_OPS
    ops_by_kind = {}
    for kind in ("ours", "wan"):
        model = build_model(family, kind, size).to(device)
        ops_by_kind[kind] = model_ops(family, kind, size, model, parse_video(video, family), args.batch_size, device)
    # Warm up every op of both models before profiling either: the first large matmuls of a process run up
    # to twice as slow even after a warm-up call of their own, which would count against the model profiled first.
    for ops in ops_by_kind.values():
        for op in profiled_ops:
            ops[op]()
    for kind, ops in ops_by_kind.items():
        for op in profiled_ops:
            with torch_profile(activities=activities) as prof:
                for _ in range(steps):
                    ops[op]()
            print(f"\n## {kind}: {family} {size}, video {video}, {op}, {steps} calls\n")
            print(prof.key_averages().table(sort_by=sort_by, row_limit=row_limit))


def saved_activations_mib(
    model: torch.nn.Module, forward: Callable[[], torch.Tensor]
) -> Tuple[float, Dict[str, float]]:
    """MiB of the distinct tensors autograd keeps for backward during `forward()`, parameters excluded, in
    total and by the module class whose forward saved them first.

    The module stack is kept by global module hooks, not hooks on each module: a layer with hooks of its
    own is not bare (`transformer_nanoi2v._is_bare_linear`), so the feed-forward would keep more."""
    from torch.nn.modules.module import register_module_forward_hook, register_module_forward_pre_hook

    module_stack = ["(model)"]

    def enter(module, args) -> None:
        module_stack.append(type(module).__name__)

    def leave(module, args, output) -> None:  # returns None: the output stays as it is
        module_stack.pop()

    hooks = [register_module_forward_pre_hook(enter), register_module_forward_hook(leave)]
    try:
        by_module = saved_activation_bytes(forward, exclude=list(model.parameters()), label=lambda: module_stack[-1])
    finally:
        for handle in hooks:
            handle.remove()
    return sum(by_module.values()) / MIB, {name: size / MIB for name, size in by_module.items()}


def report_saved_activations(args, spec: str) -> None:
    """Print the activations each DiT keeps for backward at `dit:SIZE:FxHxW`, by module class."""
    family, size, video = spec.split(":")
    if family != "dit":
        raise ValueError(f"--saved_activations compares the transformers: dit:SIZE:FxHxW; got {spec!r}.")
    device = torch.device(args.device)
    inputs = dit_inputs(parse_video(video, family), args.batch_size, device)
    for kind in ("ours", "wan"):
        model = build_model(family, kind, size).to(device)
        total, by_module = saved_activations_mib(model, lambda: dit_forward(kind, model, inputs))
        print(f"\n## {kind}: {total:.1f} MiB of activations saved for backward ({size}, video {video})\n")
        for name, mib in sorted(by_module.items(), key=lambda item: -item[1]):
            print(f"- {name}: {mib:.1f} MiB")


# --------------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------------


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dit_sizes", nargs="*", default=list(DEFAULT_DIT_SIZES), choices=sorted(TRANSFORMER_PRESETS))
    parser.add_argument("--dit_videos", nargs="+", default=list(DEFAULT_DIT_VIDEOS), help="FxHxW pixel videos")
    parser.add_argument("--vae_sizes", nargs="*", default=list(DEFAULT_VAE_SIZES), choices=sorted(VAE_PRESETS))
    parser.add_argument("--vae_videos", nargs="+", default=list(DEFAULT_VAE_VIDEOS), help="FxHxW pixel videos")
    parser.add_argument("--batch_size", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default=default_device())
    parser.add_argument("--plain_autograd", action="store_true", help="our DiT with plain autograd instead of its "
                        "memory-saving autograd Functions (transformer_nanoi2v.SAVE_ACTIVATION_MEMORY = False)")
    parser.add_argument("--no_memory", dest="memory", action="store_false", help="skip the peak-memory workers")
    parser.add_argument("--out", type=Path, help="also write the rows and the environment as JSON here")
    parser.add_argument("--profile", metavar="FAMILY:SIZE:FxHxW", help="torch.profiler tables instead of the sweep, "
                        "e.g. dit:S:17x128x128 or vae:shapes-64:17x64x64")
    parser.add_argument("--saved_activations", metavar="dit:SIZE:FxHxW", help="instead of the sweep, the activations "
                        "each transformer keeps for backward (saved-tensor hooks), by module, e.g. dit:S:17x128x128")
    # Internal: one memory worker (see worker_main).
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--family", choices=("dit", "vae"), help=argparse.SUPPRESS)
    parser.add_argument("--kind", choices=("ours", "wan"), help=argparse.SUPPRESS)
    parser.add_argument("--size", help=argparse.SUPPRESS)
    parser.add_argument("--videos", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.warmup < 0 or args.batch_size < 1 or args.threads < 1:
        parser.error(f"need repeats >= 1, warmup >= 0, batch_size >= 1, threads >= 1; got {args.repeats}, "
                     f"{args.warmup}, {args.batch_size}, {args.threads}")  # fmt: skip
    return args


def main(argv: Optional[Sequence[str]] = None) -> List[dict]:
    args = parse_args(argv)
    transformer_module.SAVE_ACTIVATION_MEMORY = not args.plain_autograd
    if args.worker:
        print(json.dumps(worker_main(args)))
        return []
    torch.set_num_threads(args.threads)
    if args.profile:
        profile(args, args.profile)
        return []
    if args.saved_activations:
        report_saved_activations(args, args.saved_activations)
        return []
    for family, videos in (("dit", args.dit_videos), ("vae", args.vae_videos)):
        for video in videos:
            parse_video(video, family)  # fail before any measurement
    plan = [("dit", size, args.dit_videos) for size in args.dit_sizes]
    plan += [("vae", size, args.vae_videos) for size in args.vae_sizes]
    total = sum(len(videos) * len(DIT_OPS if family == "dit" else VAE_OPS) for family, _, videos in plan)
    rows = []
    with tqdm(total=total, desc="bench_models", file=sys.stderr) as progress:
        for family, size, videos in plan:
            rows.extend(bench_family(args, family, size, videos, progress))

    meta = environment_info(torch.device(args.device), args.threads)
    meta.update(repeats=args.repeats, warmup=args.warmup, batch_size=args.batch_size, text_tokens=TEXT_TOKENS,
                plain_autograd=args.plain_autograd)
    memory_unit = "max_memory_allocated growth" if args.device.startswith("cuda") else "peak RSS growth"
    print(f"\nOurs vs diffusers' Wan, device {meta['device_name']} ({args.device}), {args.threads} threads, "
          f"batch {args.batch_size}, median of {args.repeats} (+{args.warmup} warm-up); "
          f"memory: {memory_unit}; our DiT's autograd: {'plain' if args.plain_autograd else 'memory-saving'}"
          "\n")  # fmt: skip
    print(markdown_table(rows, COLUMNS))
    print("\nGoals:\n" + "\n".join(goal_lines(rows)))
    if args.out:
        write_json(args.out, meta, rows)
    return rows


if __name__ == "__main__":
    main()
