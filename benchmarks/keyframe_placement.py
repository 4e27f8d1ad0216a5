"""How close each way of encoding a lone keyframe comes to the clip's own latent frame (docs/design.md, "Conditioning").

    python benchmarks/keyframe_placement.py                  # the shipped VAE, 16 validation clips, ~1 min on CPU

Under the causal 4x temporal VAE, latent frame k >= 1 holds pixel frames 4k-3 .. 4k, encoded with the clip's
earlier frames as context; a keyframe given alone has neither. For keyframe 4k of real clips, each candidate
latent is put in place of the clip's own latent frame k and the clip is decoded: the PSNR of pixel frame 4k says
how much of the keyframe that latent carries in the form the decoder reads it (the clip's own latent is the
ceiling). Candidates: the keyframe encoded alone as a one-frame video (what this package does), latent frame 1 of
a 5-frame still video of it, Wan's first-last-frame layout (the first and the key frame in a video of zeros),
and the first frame held with the keyframe's latent block filled with it.
"""

import argparse

import torch

from nanoi2v_diffusers import AutoencoderKLNanoI2V
from nanoi2v_diffusers.data.shapes import ShapesConfig, ShapesDataset
from nanoi2v_diffusers.evaluation.metrics import psnr


def candidates(vae, clips: torch.Tensor, frame: int) -> dict:
    """{name: (B, C, h, w) latent standing for pixel frame `frame` of `clips` (B, 3, F, H, W) in [-1, 1]}."""
    ratio, latent = vae.temporal_compression_ratio, frame // vae.temporal_compression_ratio
    key = clips[:, :, frame : frame + 1]
    zeros = torch.zeros_like(clips)
    zeros[:, :, 0], zeros[:, :, frame] = clips[:, :, 0], clips[:, :, frame]
    held = clips[:, :, :1].expand_as(clips).clone()
    held[:, :, frame - ratio + 1 : frame + 1] = key
    encode = lambda video: vae.encode(video).latent_dist.mean  # noqa: E731
    return {
        "one-frame video (this package)": encode(key)[:, :, 0],
        "still 5-frame video, latent 1": encode(key.expand(-1, -1, ratio + 1, -1, -1))[:, :, 1],
        "Wan: first + key in zeros": encode(zeros)[:, :, latent],
        "first held, key's block filled": encode(held)[:, :, latent],
    }


@torch.no_grad()
def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vae", default="examples/nanoi2v-shapes-64/vae")
    parser.add_argument("--num_clips", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    vae = AutoencoderKLNanoI2V.from_pretrained(args.vae).eval()
    dataset = ShapesDataset(args.num_clips, split="validation", config=ShapesConfig())
    clips = torch.stack([dataset[index]["pixel_values"] for index in range(args.num_clips)])  # (B, 3, F, H, W)
    own = vae.encode(clips).latent_dist.mean  # (B, C, T, h, w)

    def frame_psnr(latents: torch.Tensor, frame: int) -> float:
        decoded = vae.decode(latents).sample.clamp(-1, 1)
        return psnr((decoded[:, :, frame] + 1) / 2, (clips[:, :, frame] + 1) / 2).mean().item()

    ratio = vae.temporal_compression_ratio
    frames = [ratio * k for k in range(1, own.shape[2])]
    rows = {}
    for frame in frames:
        for name, latent in candidates(vae, clips, frame).items():
            pasted = own.clone()
            pasted[:, :, frame // ratio] = latent
            rows.setdefault(name, []).append(frame_psnr(pasted, frame))
        rows.setdefault("the clip's own latent (ceiling)", []).append(frame_psnr(own, frame))
    print(f"PSNR (dB) of keyframe 4k, decoded with a candidate latent in place of latent frame k "
          f"({args.num_clips} validation clips, {args.vae})\n")  # fmt: skip
    print("| candidate | " + " | ".join(f"frame {frame}" for frame in frames) + " |")
    print("|---|" + "---:|" * len(frames))
    for name, values in rows.items():
        print(f"| {name} | " + " | ".join(f"{value:.1f}" for value in values) + " |")


if __name__ == "__main__":
    main()
