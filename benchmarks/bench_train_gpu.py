"""Training-step throughput and model FLOPs utilisation (MFU) of `NanoI2VTransformer3DModel`.

    python benchmarks/bench_train_gpu.py                                    # CUDA: DiT-B, 17x256x256, batch 8
    python benchmarks/bench_train_gpu.py --device cpu                       # CPU: tiny DiT, 17x64x64, batch 2
    python benchmarks/bench_train_gpu.py --preset S --batch_size 16 --gradient_checkpointing --out mfu.json

One step is what training/train_dit.py does per batch on cached latents: flow-matching inputs
(random latents, image condition from latent frame 0, text states with a mask, logit-normal
sigmas), bf16 autocast forward, float32 MSE to the velocity, backward, fused AdamW. Data loading
and the VAE are left out. On CUDA the transformer blocks are compiled with
`compile_repeated_blocks(fullgraph=True)` (a graph break is an error), and recompiling during the
timed steps is made an error too; SDPA picks its flash kernel by itself for bf16.

MFU = model FLOPs per step * steps/s / peak, with model FLOPs per step =
  6 * (parameters applied to every video token) * batch * tokens
  + 6 * (parameters applied to every text token) * batch * text_tokens
  + 12 * layers * width * batch * (attended pairs per query * tokens)  (self- and cross-attention
    scores and weighted sums, forward + backward),
counting no recomputation (gradient checkpointing does not raise MFU). Peak: 989 TFLOP/s, dense bf16
on H100/H200 SXM. On CPU there is no meaningful peak: only tokens/s and achieved TFLOP/s are printed.
"""

import argparse
import math
import time
from pathlib import Path
from typing import Dict, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from _measure import MIB, default_device, environment_info, markdown_table, rss_peak_bytes, synchronize, write_json
from bench_models import LATENT_CHANNELS, TEXT_DIM, latent_grid, parse_video
from nanoi2v_diffusers.conditioning import build_image_condition, num_condition_channels
from nanoi2v_diffusers.models import TRANSFORMER_PRESETS, NanoI2VTransformer3DModel
from nanoi2v_diffusers.models import transformer_nanoi2v as transformer_module
from nanoi2v_diffusers.schedulers.scheduling_nanoi2v_flow_match import NanoI2VFlowMatchScheduler

H100_BF16_DENSE_FLOPS = 989e12
TEXT_TOKENS = 64  # padded length; half of them are masked padding, as in training
LEARNING_RATE = 1e-4
# Forward + backward FLOPs per multiply-accumulate: 2 forward, 4 backward (input and weight gradients).
TRAIN_FLOPS_PER_MAC = 6
# Attention: two matmuls (scores, weighted sum) of one MAC per pair per channel, times TRAIN_FLOPS_PER_MAC.
ATTENTION_MATMULS = 2

# Per-device defaults: the issue's ~100-300M config at 17x256x256 on a GPU, a smoke-sized one on CPU.
DEVICE_DEFAULTS: Dict[str, dict] = {
    "cuda": dict(preset="B", video="17x256x256", batch_size=8, steps=20, warmup=5),
    "cpu": dict(preset="tiny", video="17x64x64", batch_size=2, steps=5, warmup=1),
}

COLUMNS = (
    ("device", "device_name", ""),
    ("preset", "preset", ""),
    ("params (M)", "params_m", ".1f"),
    ("video", "video", ""),
    ("tokens / sample", "tokens", "d"),
    ("batch", "batch_size", "d"),
    ("precision", "precision", ""),
    ("compile", "compile", ""),
    ("autograd", "autograd", ""),
    ("grad ckpt", "gradient_checkpointing", ""),
    ("steps/s", "steps_per_second", ".3f"),
    ("tokens/s", "tokens_per_second", ".0f"),
    ("TFLOP/s", "tflops", ".3g"),
    ("MFU", "mfu", ".1%"),
    ("peak memory (MiB)", "peak_memory_mib", ".0f"),
)


def _text_side_modules(model: NanoI2VTransformer3DModel):
    """Modules applied to the text tokens rather than the video tokens: the text projection and every
    cross-attention's key/value projection."""
    return [model.text_embedder, *(layer for block in model.blocks for layer in (block.attn2.to_k, block.attn2.to_v))]


def model_flops_per_step(model: NanoI2VTransformer3DModel, batch_size: int, patch_grid: Tuple[int, int, int],
                         text_tokens: int) -> float:  # fmt: skip
    """Training FLOPs of one step (see the module docstring); per-sample layers (timestep MLP) are negligible."""
    config = model.config
    tokens = math.prod(patch_grid)
    text_params = sum(p.numel() for module in _text_side_modules(model) for p in module.parameters())
    token_params = sum(p.numel() for p in model.parameters()) - text_params
    dense = TRAIN_FLOPS_PER_MAC * batch_size * (token_params * tokens + text_params * text_tokens)
    frames, height, width = patch_grid
    if config.attention_type == "full":
        self_pairs = tokens
    else:  # spatial attention within a frame, then temporal attention across frames
        self_pairs = height * width + frames
    width_channels = config.num_attention_heads * config.attention_head_dim
    pairs = batch_size * tokens * (self_pairs + text_tokens)
    attention = TRAIN_FLOPS_PER_MAC * ATTENTION_MATMULS * config.num_layers * width_channels * pairs
    return float(dense + attention)


class TrainingStep:
    """One optimisation step of the transformer on a fixed batch of synthetic flow-matching inputs."""

    def __init__(self, model: NanoI2VTransformer3DModel, batch_size: int, video: Tuple[int, int, int],
                 device: torch.device, precision: str):  # fmt: skip
        self.model = model
        self.device = device
        self.autocast = precision == "bf16"
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE, fused=True)
        self.inputs, self.target = self._synthetic_batch(batch_size, latent_grid(video))

    def _synthetic_batch(self, batch_size: int, grid: Tuple[int, int, int]):
        generator = torch.Generator().manual_seed(0)
        latents = torch.randn(batch_size, LATENT_CHANNELS, *grid, generator=generator)
        noise = torch.randn(latents.shape, generator=generator)
        scheduler = NanoI2VFlowMatchScheduler()
        sigmas = scheduler.sample_training_sigmas(batch_size, generator=generator)
        timesteps = sigmas * scheduler.config.num_train_timesteps
        mask = torch.ones(batch_size, TEXT_TOKENS, dtype=torch.long)
        mask[:, TEXT_TOKENS // 2 :] = 0  # captions shorter than the padded length, as in training
        inputs = {
            "hidden_states": scheduler.add_noise(latents, noise, timesteps),
            "timestep": timesteps,
            "encoder_hidden_states": torch.randn(batch_size, TEXT_TOKENS, TEXT_DIM, generator=generator),
            "encoder_attention_mask": mask,
            "condition": build_image_condition(latents[:, :, :1], grid[0]),
        }
        target = scheduler.velocity_target(latents, noise)
        return {k: v.to(self.device) for k, v in inputs.items()}, target.to(self.device)

    def __call__(self) -> torch.Tensor:
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            prediction = self.model(**self.inputs, return_dict=False)[0]
        loss = F.mse_loss(prediction.float(), self.target)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.detach()


def build_model(args, device: torch.device) -> NanoI2VTransformer3DModel:
    torch.manual_seed(0)
    model = NanoI2VTransformer3DModel.from_preset(
        args.preset,
        in_channels=LATENT_CHANNELS + num_condition_channels(LATENT_CHANNELS),
        out_channels=LATENT_CHANNELS,
        text_dim=TEXT_DIM,
    ).to(device)
    model.train()
    if args.gradient_checkpointing:
        model.enable_gradient_checkpointing()
    if args.compile:
        model.compile_repeated_blocks(fullgraph=True, **({"mode": args.compile_mode} if args.compile_mode else {}))
    return model


def write_kernel_profile(step: "TrainingStep", device: torch.device, path: Path, steps: int = 3) -> None:
    """The operators and kernels of `steps` training steps by device time (CPU time off CUDA), as a table."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as profile:
        for _ in range(steps):
            step()
        synchronize(device)
    sort_by = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(profile.key_averages().table(sort_by=sort_by, row_limit=40, max_name_column_width=80))


def run(args) -> dict:
    device = torch.device(args.device)
    video = parse_video(args.video, "dit")
    transformer_module.SAVE_ACTIVATION_MEMORY = not args.plain_autograd
    model = build_model(args, device)
    step = TrainingStep(model, args.batch_size, video, device, args.precision)
    for _ in tqdm(range(args.warmup), desc="warm-up (compiles on CUDA)", leave=False):
        step()
    synchronize(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    # A recompile during the timed steps is a bug (the blocks see the same shapes every step).
    with torch._dynamo.config.patch(error_on_recompile=args.compile):
        start = time.perf_counter()
        for _ in tqdm(range(args.steps), desc="timed steps", leave=False):
            loss = step()
        synchronize(device)
        seconds = time.perf_counter() - start
    if not torch.isfinite(loss):
        raise RuntimeError(f"The loss is not finite ({loss.item()}): the timing would not be of a working step.")
    if args.profile:
        write_kernel_profile(step, device, args.profile)

    patch_grid = tuple(n // p for n, p in zip(latent_grid(video), model.config.patch_size))
    flops = model_flops_per_step(model, args.batch_size, patch_grid, TEXT_TOKENS)
    steps_per_second = args.steps / seconds
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else rss_peak_bytes()
    return {
        "device_name": environment_info(device, args.threads)["device_name"],
        "preset": args.preset,
        "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
        "video": args.video,
        "tokens": math.prod(patch_grid),
        "batch_size": args.batch_size,
        "precision": args.precision,
        "compile": (args.compile_mode or "yes") if args.compile else "no",
        "autograd": "plain" if args.plain_autograd else "memory-saving",
        "gradient_checkpointing": "yes" if args.gradient_checkpointing else "no",
        "steps_per_second": steps_per_second,
        "tokens_per_second": steps_per_second * args.batch_size * math.prod(patch_grid),
        "flops_per_step": flops,
        "tflops": flops * steps_per_second / 1e12,
        "mfu": flops * steps_per_second / args.peak_flops if device.type == "cuda" else None,
        "peak_memory_mib": peak / MIB,
        "final_loss": loss.item(),
    }


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default=default_device())
    parser.add_argument("--preset", choices=sorted(TRANSFORMER_PRESETS), help="default: B on CUDA, tiny on CPU")
    parser.add_argument("--video", help="FxHxW pixels; default 17x256x256 on CUDA, 17x64x64 on CPU")
    parser.add_argument("--batch_size", type=int)
    parser.add_argument("--steps", type=int, help="timed steps")
    parser.add_argument("--warmup", type=int, help="untimed steps first (compilation happens here)")
    parser.add_argument("--precision", choices=("bf16", "no"), default="bf16", help="bf16 autocast or float32")
    parser.add_argument("--compile", choices=("auto", "on", "off"), default="auto", help="auto: on for CUDA")
    parser.add_argument("--compile_mode", help="torch.compile mode, e.g. max-autotune-no-cudagraphs (default: its default)")
    parser.add_argument("--plain_autograd", action="store_true",
                        help="plain autograd instead of the memory-saving autograd Functions (SAVE_ACTIVATION_MEMORY)")
    parser.add_argument("--profile", type=Path, help="write the operators and kernels of 3 more steps, by time, here")
    parser.add_argument("--gradient_checkpointing", action="store_true")
    parser.add_argument("--peak_flops", type=float, default=H100_BF16_DENSE_FLOPS, help="device peak for MFU")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads")
    parser.add_argument("--out", type=Path, help="also write the result and the environment as JSON here")
    args = parser.parse_args(argv)
    defaults = DEVICE_DEFAULTS["cuda" if args.device.startswith("cuda") else "cpu"]
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    args.compile = args.compile == "on" or (args.compile == "auto" and args.device.startswith("cuda"))
    if args.batch_size < 1 or args.steps < 1 or args.warmup < 0:
        parser.error(
            f"need batch_size >= 1, steps >= 1, warmup >= 0; got {args.batch_size}, {args.steps}, {args.warmup}"
        )
    return args


def main(argv: Optional[Sequence[str]] = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    result = run(args)
    print(f"\nTraining step of NanoI2VTransformer3DModel ({args.steps} timed steps after {args.warmup} warm-up)\n")
    print(markdown_table([result], COLUMNS))
    if result["mfu"] is None:
        print("\nMFU: not computed on CPU (no meaningful peak); TFLOP/s is the achieved model FLOP rate.")
    else:
        print(f"\nMFU against a peak of {args.peak_flops / 1e12:.0f} TFLOP/s: {result['mfu']:.1%}")
    if args.out:
        meta = environment_info(torch.device(args.device), args.threads)
        meta.update({k: v for k, v in vars(args).items() if k != "out"})
        write_json(args.out, meta, [result])
    return result


if __name__ == "__main__":
    main()
