"""Peak memory of `AutoencoderKLNanoI2V.decode` against the number of frames: chunked vs whole clip, tiled or not.

    python benchmarks/bench_vae_memory.py                       # 17, 33, 65, 129 frames at 128 x 128
    python benchmarks/bench_vae_memory.py --frames 17 33 65 --resolution 256
    python benchmarks/bench_vae_memory.py --tilings off on --tile 64   # also with 64 px spatial tiles

Each setting runs in a fresh subprocess, so that one measurement never inherits another's
allocator state, after a warm-up decode of one latent frame. On CPU the number is the growth of
the process's peak resident set size during the decode (Linux: the peak is reset just before it
through /proc/self/clear_refs); on GPU it is `torch.cuda.max_memory_allocated` growth (see
`_measure.py`). The decoded video itself (the "output" column) must be held whatever the method,
so chunked decoding should stay flat apart from that column. The seconds are indicative only: the
worker's pinned malloc threshold (see `_measure.py`) makes large allocations slower.
"""

import argparse
import json
import time
from pathlib import Path
from typing import List, Optional, Sequence

import torch

from _measure import MIB, PeakMemory, default_device, markdown_table, run_worker
from nanoi2v_diffusers.models import VAE_PRESETS, AutoencoderKLNanoI2V

MODES = ("chunked", "whole")
TILINGS = ("off", "on")
# Tiles overlap by a quarter of their size, as diffusers' default 256 / 192 px.
TILE_STRIDE_FRACTION = 0.75
DEFAULT_TILE = 64

COLUMNS = (
    ("frames", "frames", "d"),
    ("mode", "mode", ""),
    ("tiling", "tiling", ""),
    ("peak growth (MiB)", "peak_growth_mib", ".1f"),
    ("of which output video (MiB)", "output_mib", ".1f"),
    ("seconds", "seconds", ".2f"),
)


def build_vae(args) -> AutoencoderKLNanoI2V:
    vae = AutoencoderKLNanoI2V(**VAE_PRESETS[args.preset]).to(args.device).eval()
    vae.use_framewise_decoding = args.mode == "chunked"
    if args.tiling == "on":
        stride = int(args.tile * TILE_STRIDE_FRACTION) // vae.spatial_compression_ratio * vae.spatial_compression_ratio
        vae.enable_tiling(args.tile, args.tile, stride, stride)
    return vae


def measure(args) -> dict:
    """Decode once (in this process) and return the memory numbers as a dict."""
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    vae = build_vae(args)
    ratio_t, ratio_s = vae.temporal_compression_ratio, vae.spatial_compression_ratio
    latent_frames = 1 + (args.num_frames - 1) // ratio_t
    size = args.resolution // ratio_s
    z = torch.randn(1, vae.config.latent_channels, latent_frames, size, size, device=device)
    with torch.no_grad():
        # Warm-up on one latent frame: one-time costs (thread pools, kernel caches) are then left out.
        # Its working memory goes back to the OS (run_worker pins glibc's mmap threshold), so it cannot
        # hide the measured decode's needs.
        vae.decode(z[:, :, :1])
        start = time.perf_counter()
        with PeakMemory(device) as memory:
            video = vae.decode(z).sample
        seconds = time.perf_counter() - start
    return {
        "frames": args.num_frames,
        "mode": args.mode,
        "tiling": args.tiling,
        "peak_growth_mib": memory.growth_mib,
        "output_mib": video.numel() * video.element_size() / MIB,
        "seconds": seconds,
    }


def sweep(
    frames: Sequence[int],
    modes: Sequence[str] = MODES,
    tilings: Sequence[str] = ("off",),
    preset: str = "shapes-64",
    resolution: int = 128,
    tile: int = DEFAULT_TILE,
    device: Optional[str] = None,
    threads: int = 2,
) -> List[dict]:
    """One fresh worker process per (frames, mode, tiling); returns the rows of `measure`."""
    device = device or default_device()
    rows = []
    for num_frames in frames:
        for mode in modes:
            for tiling in tilings:
                args = ["--num_frames", num_frames, "--mode", mode, "--tiling", tiling, "--preset", preset,
                        "--resolution", resolution, "--tile", tile, "--device", device,
                        "--threads", threads]  # fmt: skip
                rows.append(run_worker(__file__, args))
    return rows


def format_table(rows: Sequence[dict], preset: str, resolution: int, device: str) -> str:
    unit = "GPU max_memory_allocated growth" if device.startswith("cuda") else "peak RSS growth"
    title = f"VAE decode, preset {preset}, {resolution}x{resolution}, device {device}; {unit} in MiB"
    return f"{title}\n\n{markdown_table(rows, COLUMNS)}"


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, nargs="+", default=[17, 33, 65, 129])
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--tilings", nargs="+", default=["off"], choices=TILINGS)
    parser.add_argument("--tile", type=int, default=DEFAULT_TILE, help="tile size in pixels when tiling is on")
    parser.add_argument("--preset", default="shapes-64", choices=sorted(VAE_PRESETS))
    parser.add_argument("--resolution", type=int, default=128)
    parser.add_argument("--device", default=default_device())
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, help="also write the rows here")
    # Internal: one measurement in this process.
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--num_frames", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--mode", choices=MODES, help=argparse.SUPPRESS)
    parser.add_argument("--tiling", choices=TILINGS, default="off", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> List[dict]:
    args = parse_args(argv)
    if args.worker:
        print(json.dumps(measure(args)))
        return []
    rows = sweep(args.frames, args.modes, args.tilings, args.preset, args.resolution, args.tile, args.device,
                 args.threads)  # fmt: skip
    print(format_table(rows, args.preset, args.resolution, args.device))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return rows


if __name__ == "__main__":
    main()
