"""Copy a trained pipeline folder into the repository as float16 safetensors (how examples/nanoi2v-shapes-64 is made).

    python examples/ship_model.py outputs/nanoi2v-shapes-64 examples/nanoi2v-shapes-64

Keeps the model card (README.md), the training config and the final sample GIFs; drops checkpoints, logs
and validation videos. float16 halves the size (the shapes model: about 24 MB); `from_pretrained` without
`torch_dtype` loads it back as float32.
"""

import argparse
import shutil
from pathlib import Path

import torch

from nanoi2v_diffusers import NanoI2VPipeline

KEPT_FILES = ("README.md", "training_config.yaml")


def ship(source: Path, target: Path) -> int:
    """Write `source` to `target` in float16; returns the size of the weights in bytes."""
    pipe = NanoI2VPipeline.from_pretrained(source)
    if target.exists():
        shutil.rmtree(target)
    pipe.to(torch.float16).save_pretrained(target)
    for name in KEPT_FILES:
        if (source / name).is_file():
            shutil.copy2(source / name, target / name)
    if (source / "samples").is_dir():
        shutil.copytree(source / "samples", target / "samples")
    return sum(path.stat().st_size for path in target.rglob("*.safetensors"))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("source", type=Path, help="pipeline folder written by training/train_dit.py")
    parser.add_argument("target", type=Path, help="where the float16 copy goes (replaced)")
    args = parser.parse_args(argv)
    size = ship(args.source, args.target)
    print(f"Wrote {args.target}: {size / 2**20:.1f} MiB of float16 weights")


if __name__ == "__main__":
    main()
