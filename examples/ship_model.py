"""Copy a trained pipeline folder into the repository as float16 safetensors (how examples/nanoi2v-shapes-64 is made).

    python examples/ship_model.py outputs/nanoi2v-shapes-64-stage8 examples/nanoi2v-shapes-64
    python examples/ship_model.py TRAINED_PIPELINE TARGET --vae outputs/vae-shapes-64-decoder  # swap in a decoder

Keeps the model card (README.md), the training config and the final sample GIFs; drops checkpoints, logs
and validation videos. float16 halves the size (the shapes model: about 24 MB); `from_pretrained` without
`dtype` loads it back as float32. `--vae` ships another VAE in place of the pipeline's: one whose
decoder was fine-tuned afterwards (training/train_vae.py with `train_decoder_only`); its encoder and latent
statistics must be the pipeline's, since the transformer was trained on those latents.
"""

import argparse
import shutil
from pathlib import Path
from typing import Optional

import torch

from nanoi2v_diffusers import AutoencoderKLNanoI2V, NanoI2VPipeline
from nanoi2v_diffusers.data.latent_cache import vae_encoder_fingerprint

KEPT_FILES = ("README.md", "training_config.yaml")


def load_matching_vae(path: Path, pipe: NanoI2VPipeline) -> AutoencoderKLNanoI2V:
    """The VAE at `path`, if it makes the same latents as the pipeline's VAE (same encoder and statistics)."""
    vae = AutoencoderKLNanoI2V.from_pretrained(path, dtype=pipe.vae.dtype)
    for key in ("latents_mean", "latents_std"):
        if vae.config[key] != pipe.vae.config[key]:
            raise ValueError(
                f"{path} has other {key} than the pipeline's VAE: the transformer would see other latents."
            )
    if vae_encoder_fingerprint(vae) != vae_encoder_fingerprint(pipe.vae):
        raise ValueError(
            f"{path} has another encoder than the pipeline's VAE: only a decoder fine-tune "
            "(train_vae.py with train_decoder_only) can replace it."
        )
    return vae


VAE_NOTE = "The VAE in this folder is "


def note_vae_in_card(card: Path, vae: Path) -> None:
    """End the model card with one line naming the shipped VAE (replacing the line of an earlier swap)."""
    kept = [line for line in card.read_text(encoding="utf-8").rstrip("\n").split("\n") if not line.startswith(VAE_NOTE)]
    while kept and not kept[-1].strip():
        kept.pop()
    note = (f"{VAE_NOTE}`{vae.as_posix()}`, a fine-tune of the training config's `pretrained_vae` with the same "
            "encoder (so the same latents) and a retrained decoder.")
    card.write_text("\n".join([*kept, "", note]) + "\n", encoding="utf-8")


def ship(source: Path, target: Path, vae: Optional[Path] = None) -> int:
    """Write `source` (with the VAE at `vae`, if given) to `target` in float16; returns the weights' size in bytes."""
    # Loaded straight into float16: casting with `.to()` makes diffusers warn about fp32-kept modules.
    pipe = NanoI2VPipeline.from_pretrained(source, dtype=torch.float16)
    if vae is not None:
        pipe.vae = load_matching_vae(vae, pipe)
    if target.exists():
        shutil.rmtree(target)
    pipe.save_pretrained(target)
    for name in KEPT_FILES:
        if (source / name).is_file():
            shutil.copy2(source / name, target / name)
    card = target / "README.md"
    if vae is not None and card.is_file():  # the card's training config names the VAE the DiT was trained with
        note_vae_in_card(card, vae)
    if (source / "samples").is_dir():
        shutil.copytree(source / "samples", target / "samples")
    return sum(path.stat().st_size for path in target.rglob("*.safetensors"))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("source", type=Path, help="pipeline folder written by training/train_dit.py")
    parser.add_argument("target", type=Path, help="where the float16 copy goes (replaced)")
    parser.add_argument("--vae", type=Path, help="a decoder fine-tune of the pipeline's VAE to ship instead")
    args = parser.parse_args(argv)
    size = ship(args.source, args.target, args.vae)
    print(f"Wrote {args.target}: {size / 2**20:.1f} MiB of float16 weights")


if __name__ == "__main__":
    main()
