"""Generate a video from an image and a prompt with a saved NanoI2V pipeline.

    python examples/generate.py --model examples/nanoi2v-shapes-64 --image first_frame.png \
        --prompt "a red circle moves left" --frames 17 --steps 20 --guidance 5 --seed 0 --out out.mp4

The output format follows the suffix of --out (.mp4 or .gif). Without --image the pipeline does
text-to-video. A pipeline folder saved without a text encoder gets the built-in all-MiniLM-L6-v2.
`--lora DIR` adds LoRA weights trained for the pipeline (training/train_dit.py with `lora_rank`).
"""

import argparse
from pathlib import Path
from typing import Optional

import torch
from diffusers.hooks import FirstBlockCacheConfig
from PIL import Image

from nanoi2v_diffusers import NanoI2VPipeline
from nanoi2v_diffusers.data import write_video
from nanoi2v_diffusers.text_encoders import load_minilm

FPS = 8
LORA_ADAPTER_NAME = "lora"


def load_pipeline(
    model: str,
    heun: bool = False,
    shift: Optional[float] = None,
    first_block_cache: Optional[float] = None,
    lora: Optional[str] = None,
    lora_scale: float = 1.0,
) -> NanoI2VPipeline:
    """Load a pipeline folder or Hub id; fill in the built-in text encoder when it was saved without one.

    `heun` and `shift` replace the saved scheduler's solver and timestep shift; the rest of its config stays.
    `first_block_cache` turns on diffusers' First Block Cache with that threshold: a step whose first block
    changed its output by less than this (relative) reuses the other blocks' residual from the step before.
    `lora` (a folder or Hub id with `pytorch_lora_weights.safetensors`, as training/train_dit.py writes with
    `lora_rank`) is loaded as the adapter "lora", weighted by `lora_scale`.
    """
    pipe = NanoI2VPipeline.from_pretrained(model)
    if pipe.text_encoder is None:
        text_encoder, tokenizer = load_minilm()
        pipe.register_modules(text_encoder=text_encoder, tokenizer=tokenizer)
    overrides = {"solver": "heun"} if heun else {}
    if shift is not None:
        overrides["shift"] = shift
    if overrides:
        pipe.scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config, **overrides)
    if lora is not None:
        pipe.load_lora_weights(lora, adapter_name=LORA_ADAPTER_NAME)
        pipe.set_adapters([LORA_ADAPTER_NAME], adapter_weights=[lora_scale])
    if first_block_cache is not None:
        pipe.transformer.enable_cache(FirstBlockCacheConfig(threshold=first_block_cache))
    return pipe


def add_loading_arguments(parser: argparse.ArgumentParser) -> None:
    """The command-line flags of `load_pipeline`'s options (shared with evaluate.py); see `loading_options`."""
    parser.add_argument("--heun", action="store_true", help="second-order Heun sampler instead of Euler")
    parser.add_argument("--shift", type=float, default=None, help="timestep shift (default: the saved scheduler's)")
    parser.add_argument("--first-block-cache", type=float, default=None, metavar="THRESHOLD",
                        help="diffusers' First Block Cache: skip the later blocks at steps where the first changed less")
    parser.add_argument("--lora", default=None, metavar="DIR",
                        help="LoRA weights (folder or Hub id with pytorch_lora_weights.safetensors) to load")
    parser.add_argument("--lora-scale", type=float, default=1.0, help="the LoRA adapter's weight")


def loading_options(args: argparse.Namespace) -> dict:
    """`load_pipeline`'s keyword arguments from the flags of `add_loading_arguments`."""
    return dict(heun=args.heun, shift=args.shift, first_block_cache=args.first_block_cache, lora=args.lora,
                lora_scale=args.lora_scale)  # fmt: skip


def video_to_uint8(video) -> "np.ndarray":  # noqa: F821
    """`(F, H, W, 3)` floats in [0, 1] -> uint8."""
    return (video * 255).round().clip(0, 255).astype("uint8")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="pipeline folder or Hub id")
    parser.add_argument("--image", default=None, help="first frame (PNG/JPEG); none for text-to-video")
    parser.add_argument("--prompt", default="", help="the motion to generate")
    parser.add_argument("--negative_prompt", default=None)
    parser.add_argument("--frames", type=int, default=17, help="1 + 4k frames")
    parser.add_argument("--height", type=int, default=None, help="default: the image's height, else 64")
    parser.add_argument("--width", type=int, default=None, help="default: the image's width, else 64")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--guidance", type=float, default=5.0, help="text guidance scale (1 = off)")
    add_loading_arguments(parser)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--fps", type=int, default=FPS)
    parser.add_argument("--out", default="outputs/generated.mp4", help=".mp4 or .gif")
    return parser.parse_args(argv)


def main(argv=None) -> Path:
    args = parse_args(argv)
    pipe = load_pipeline(args.model, **loading_options(args))
    image = Image.open(args.image).convert("RGB") if args.image else None
    video = pipe(
        image=image,
        prompt=args.prompt,
        negative_prompt=args.negative_prompt,
        height=args.height,
        width=args.width,
        num_frames=args.frames,
        num_inference_steps=args.steps,
        guidance_scale=args.guidance,
        generator=torch.Generator().manual_seed(args.seed),
    ).frames[0]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_video(out, video_to_uint8(video), fps=args.fps)
    print(f"wrote {out} ({video.shape[0]} frames, {video.shape[2]}x{video.shape[1]})")
    return out


if __name__ == "__main__":
    main()
