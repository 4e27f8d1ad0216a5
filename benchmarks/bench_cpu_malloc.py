"""CPU training steps with glibc's default malloc vs `keep_freed_cpu_memory()` (what the training scripts call on CPU).

    python benchmarks/bench_cpu_malloc.py                     # the built-in VAE and DiT, 3 rounds
    python benchmarks/bench_cpu_malloc.py --models vae --rounds 5 --out malloc.json

The built-in model's training steps, as its training stages run them on CPU: the shapes-64 VAE training
its decoder on 2 clips of 17x64x64 (VAE stages 3 to 14), and the shipped DiT architecture on a batch of 32
clips' latents (`bench_train_gpu.TrainingStep`, float32). The malloc setting is process-wide, so each
(model, setting) runs in a fresh worker process; a round runs both settings back to back, in alternating
order, and the speed-up is the median over rounds of the per-round ratio default / kept. Peak memory is the
worker's peak resident set size (weights, optimizer state and all).
"""

import argparse
import json
import resource
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from _measure import environment_info, markdown_table, median, paired_ratio, run_worker, write_json
from bench_models import VAE_PRESETS, parse_video
from bench_train_gpu import TrainingStep
from nanoi2v_diffusers.models import AutoencoderKLNanoI2V, NanoI2VTransformer3DModel
from nanoi2v_diffusers.cpu_malloc import keep_freed_cpu_memory

SHIPPED_TRANSFORMER = Path(__file__).resolve().parents[1] / "examples" / "nanoi2v-shapes-64" / "transformer"
SETTINGS = ("default", "kept")
MODELS = ("vae", "dit")
DEFAULT_BATCH_SIZES = {"vae": 2, "dit": 32}
LEARNING_RATE = 1e-4

COLUMNS = (
    ("model", "model", ""),
    ("video", "video", ""),
    ("batch", "batch_size", "d"),
    ("default malloc (ms/step)", "default_ms", ".1f"),
    ("kept (ms/step)", "kept_ms", ".1f"),
    ("speed-up default/kept", "speedup", ".2f"),
    ("peak RSS default (MiB)", "default_peak_mib", ".0f"),
    ("peak RSS kept (MiB)", "kept_peak_mib", ".0f"),
)


class VAEDecoderStep:
    """One step of decoder-only VAE training: frozen encoder, MSE to the clip, AdamW on the decoder."""

    def __init__(self, batch_size: int, video):
        torch.manual_seed(0)
        self.vae = AutoencoderKLNanoI2V(**VAE_PRESETS["shapes-64"])
        self.vae.encoder.requires_grad_(False)
        decoder_params = [p for p in self.vae.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(decoder_params, lr=LEARNING_RATE)
        self.pixels = torch.rand(batch_size, 3, *video) * 2 - 1  # (B, C, T, H, W) in [-1, 1]

    def __call__(self) -> None:
        with torch.no_grad():
            latents = self.vae.encode(self.pixels).latent_dist.sample()
        F.mse_loss(self.vae.decode(latents).sample, self.pixels).backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


def build_step(model: str, batch_size: int, video):
    if model == "vae":
        return VAEDecoderStep(batch_size, video)
    torch.manual_seed(0)
    transformer = NanoI2VTransformer3DModel.from_config(NanoI2VTransformer3DModel.load_config(SHIPPED_TRANSFORMER))
    return TrainingStep(transformer.train(), batch_size, video, torch.device("cpu"), precision="no")


def worker_main(args) -> dict:
    """Time `args.steps` steps of one model under one malloc setting, in this (fresh) process."""
    if args.setting == "kept" and not keep_freed_cpu_memory():
        raise RuntimeError("keep_freed_cpu_memory() changed nothing here (not Linux with glibc?).")
    torch.set_num_threads(args.threads)
    step = build_step(args.model, args.batch_size, parse_video(args.video, args.model))
    for _ in range(args.warmup):
        step()
    seconds = []
    for _ in range(args.steps):
        start = time.perf_counter()
        step()
        seconds.append(time.perf_counter() - start)
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
    return {"ms": median(seconds) * 1e3, "peak_mib": peak_mib}


def run_setting(args, model: str, setting: str) -> dict:
    """One worker process, started with glibc's default malloc settings."""
    worker_args = ["--model", model, "--setting", setting, "--batch_size", args.batch_sizes[model],
                   "--video", args.video, "--steps", args.steps, "--warmup", args.warmup, "--threads", args.threads]  # fmt: skip
    return run_worker(__file__, worker_args, pin_malloc=False)


def compare(args) -> List[dict]:
    rows = []
    with tqdm(total=len(args.models) * args.rounds * len(SETTINGS), desc="bench_cpu_malloc", file=sys.stderr) as bar:
        for model in args.models:
            results: Dict[str, List[dict]] = {setting: [] for setting in SETTINGS}
            for round_index in range(args.rounds):
                for setting in SETTINGS if round_index % 2 == 0 else reversed(SETTINGS):
                    results[setting].append(run_setting(args, model, setting))
                    bar.update()
            ms = {setting: [r["ms"] for r in results[setting]] for setting in SETTINGS}
            rows.append({
                "model": model, "video": args.video, "batch_size": args.batch_sizes[model],
                "default_ms": median(ms["default"]), "kept_ms": median(ms["kept"]),
                "speedup": paired_ratio(ms["default"], ms["kept"]),
                "default_peak_mib": max(r["peak_mib"] for r in results["default"]),
                "kept_peak_mib": max(r["peak_mib"] for r in results["kept"]),
            })  # fmt: skip
    return rows


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    parser.add_argument("--video", default="17x64x64", help="FxHxW pixels of each clip")
    parser.add_argument("--vae_batch_size", type=int, default=DEFAULT_BATCH_SIZES["vae"])
    parser.add_argument("--dit_batch_size", type=int, default=DEFAULT_BATCH_SIZES["dit"])
    parser.add_argument("--rounds", type=int, default=3, help="worker pairs per model")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per worker")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per worker first")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, help="also write the rows and the environment as JSON here")
    # Internal: one worker (see worker_main).
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--model", choices=MODELS, help=argparse.SUPPRESS)
    parser.add_argument("--setting", choices=SETTINGS, help=argparse.SUPPRESS)
    parser.add_argument("--batch_size", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.batch_sizes = {"vae": args.vae_batch_size, "dit": args.dit_batch_size}
    if min(args.rounds, args.steps, args.threads, *args.batch_sizes.values()) < 1 or args.warmup < 0:
        parser.error(f"need rounds, steps, threads, batch sizes >= 1 and warmup >= 0; got {args.rounds}, "
                     f"{args.steps}, {args.threads}, {args.batch_sizes}, {args.warmup}")  # fmt: skip
    return args


def main(argv: Optional[Sequence[str]] = None) -> List[dict]:
    args = parse_args(argv)
    if args.worker:
        print(json.dumps(worker_main(args)))
        return []
    rows = compare(args)
    print(f"\nCPU training steps, glibc's default malloc vs keep_freed_cpu_memory(), {args.threads} threads, "
          f"median of {args.steps} steps per worker, {args.rounds} worker pairs per model\n")  # fmt: skip
    print(markdown_table(rows, COLUMNS))
    if args.out:
        meta = environment_info(torch.device("cpu"), args.threads)
        meta.update(rounds=args.rounds, steps=args.steps, warmup=args.warmup)
        write_json(args.out, meta, rows)
    return rows


if __name__ == "__main__":
    main()
