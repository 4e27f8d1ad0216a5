"""Score a trained shapes pipeline on fresh validation scenes, next to the static baseline: `nanoi2v evaluate`
with the flags this script had before the command existed.

    python examples/evaluate.py --model examples/nanoi2v-shapes-64 --n 64 --steps 20 \
        [--guidance 5] [--seed 0] [--heun] [--shift 3] [--first-block-cache T]
        [--swap-motions-negative [--negative-guidance S]] [--objects MIN MAX] [--batch-size 8] [--out outputs/eval.json]

Prints a markdown table (model vs the "repeat the first frame" baseline, with the project's targets) and
writes every number, with the settings that produced it, to the JSON file. `nanoi2v evaluate --help` lists
every flag; they work here too.
"""

import sys
from typing import Optional, Sequence

from generate import translate  # examples/ is on sys.path when this file runs as a script

from nanoi2v_diffusers.cli import run_command


def main(argv: Optional[Sequence[str]] = None) -> dict:
    return run_command("evaluate", translate(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    main()
