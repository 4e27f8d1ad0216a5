"""Generate a video from an image and a prompt with a saved NanoI2V pipeline: `nanoi2v generate` with the flags
this script had before the command existed.

    python examples/generate.py --model examples/nanoi2v-shapes-64 --image first_frame.png \
        --prompt "a red circle moves left" --frames 17 --steps 20 --guidance 5 --seed 0 --out out.mp4

Its own flags: --frames (= --num_frames), --steps (--num_inference_steps), --guidance (--guidance_scale),
--heun (--solver heun), --first-block-cache, --lora-scale, --out (--output); every other flag of
`nanoi2v generate --help` works too, and the arguments are checked as there, before the model loads.
"""

import sys
from typing import List, Optional, Sequence

from nanoi2v_diffusers.cli import run_command

RENAMED = {"--frames": "--num_frames", "--steps": "--num_inference_steps", "--guidance": "--guidance_scale",
           "--first-block-cache": "--first_block_cache", "--lora-scale": "--lora_scale", "--out": "--output",
           "--n": "--num_scenes", "--batch-size": "--batch_size", "--negative-guidance": "--negative_guidance_scale",
           "--swap-motions-negative": "--swap_motions_negative", "--no-text-swap": "--no-text_swap"}  # fmt: skip


def translate(argv: Sequence[str]) -> List[str]:
    """This script's (and evaluate.py's) flags as `nanoi2v`'s."""
    tokens, translated = iter(argv), []
    for token in tokens:
        flag, equals, value = token.partition("=")
        if flag == "--heun":
            translated += ["--solver", "heun"]
        elif flag == "--objects":  # --objects MIN MAX
            translated += ["--min_objects", next(tokens, ""), "--max_objects", next(tokens, "")]
        elif flag.startswith("--"):
            translated.append(RENAMED.get(flag, flag) + equals + value)
        else:
            translated.append(token)
    return translated


def main(argv: Optional[Sequence[str]] = None):
    return run_command("generate", translate(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    main()
