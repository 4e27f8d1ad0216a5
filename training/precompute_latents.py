"""Encode every training clip once (VAE posterior + text embeddings) into a `datasets` latent cache.

    python training/precompute_latents.py --config training/configs/shapes_64.yaml --cache_dir outputs/latents \
        --max_train_samples 4000
    accelerate launch training/train_dit.py --config training/configs/shapes_64.yaml --cache_dir outputs/latents \
        --max_train_samples 4000

It reads the same config as training/train_dit.py, so the cache matches the run that uses it: the
data (`dataset`, `train_data_dir`, `resolution`, `num_frames`, and `max_train_samples`, the number
of clips, which the endless shapes dataset needs), `pretrained_vae`, `text_encoder` and
`max_sequence_length`; it writes `cache_dir` in `cache_num_shards` shards (or shards of about
500 MB) with float columns in `cache_dtype`. See `nanoi2v_diffusers.data.latent_cache` for the
layout. Random horizontal flips of a video folder are drawn once here and so fixed in the cache.
"""

from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Union

import torch
from torch.utils.data import DataLoader, Subset
from tqdm.auto import tqdm

from nanoi2v_diffusers.data import collate_videos
from nanoi2v_diffusers.data.latent_cache import (
    LatentCacheInfo,
    encode_clips,
    model_fingerprint,
    vae_encoder_fingerprint,
    write_latent_cache,
)
from nanoi2v_diffusers.settings import parse_config
from nanoi2v_diffusers.text_encoders import load_text_encoder
from nanoi2v_diffusers.training.train_dit import DiTTrainingConfig, latent_shape, load_vae
from nanoi2v_diffusers.training.trainer import build_dataset


def cache_source_clips(config: DiTTrainingConfig) -> Subset:
    """The training clips to encode, in dataset order: all of a video folder, the first `max_train_samples`."""
    dataset = build_dataset(config, split="train")
    if config.dataset == "shapes" and config.max_train_samples is None:
        raise ValueError("The shapes dataset is endless: set max_train_samples to the number of clips to cache.")
    count = len(dataset) if config.max_train_samples is None else min(config.max_train_samples, len(dataset))
    return Subset(dataset, range(count))


def encoded_batches(
    loader: DataLoader, vae, text_encoder, tokenizer, max_sequence_length: int, progress: Optional[tqdm] = None,
    clause_separator: Optional[str] = None,
) -> Iterator[Dict[str, Union[torch.Tensor, List[str]]]]:
    """`encode_clips` of every batch of `loader`, with its captions."""
    for batch in loader:
        captions = batch["captions"]
        encoded = encode_clips(vae, text_encoder, tokenizer, batch["pixel_values"], captions, max_sequence_length,
                               clause_separator)  # fmt: skip
        if progress is not None:
            progress.update(len(captions))
        yield {**encoded, "caption": captions}


def precompute(config: DiTTrainingConfig, device: Optional[Union[str, torch.device]] = None) -> Path:
    """Write the latent cache of `config` to `config.cache_dir`; returns its path."""
    if not config.cache_dir:
        raise ValueError("Set cache_dir: the folder the latent cache is written to.")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    vae = load_vae(config)
    text_encoder, tokenizer = load_text_encoder(config.text_encoder)
    info = LatentCacheInfo(
        latent_shape=latent_shape(vae, config),
        text_shape=(config.max_sequence_length, text_encoder.config.hidden_size),
        num_clips=0,  # set when written
        vae_encoder_fingerprint=vae_encoder_fingerprint(vae),
        text_encoder_fingerprint=model_fingerprint(text_encoder),
        text_clause_separator=config.text_clause_separator,
        dtype=config.cache_dtype,
        source=describe_source(config),
    )
    vae.to(device)
    text_encoder.to(device)
    clips = cache_source_clips(config)
    loader = DataLoader(clips, batch_size=config.train_batch_size, shuffle=False,
                        num_workers=config.dataloader_num_workers, collate_fn=collate_videos)  # fmt: skip
    with tqdm(total=len(clips), desc="Encoding clips", unit="clip") as progress:
        batches = encoded_batches(loader, vae, text_encoder, tokenizer, config.max_sequence_length, progress,
                                  config.text_clause_separator)  # fmt: skip
        return write_latent_cache(batches, config.cache_dir, info, num_shards=config.cache_num_shards)


def describe_source(config: DiTTrainingConfig) -> str:
    """The clips a cache of `config` holds, in words (its info file's `source`)."""
    size = f"{config.resolution}x{config.resolution}, {config.num_frames} frames"
    if config.dataset == "shapes":  # the clips' seeds are fixed by the split, not by config.seed
        objects = f"{config.shapes_min_objects}-{config.shapes_max_objects} objects"
        return f"shapes train clips 0-{config.max_train_samples - 1}, {size}, {objects}"
    return f"video_folder {config.train_data_dir}, {size}, flips drawn with seed {config.seed}"


def main(argv: Optional[Sequence[str]] = None) -> Path:
    config = parse_config(DiTTrainingConfig, argv)
    path = precompute(config)
    print(f"Wrote the latent cache of {LatentCacheInfo.load(path).num_clips} clips to {path}")
    return path


if __name__ == "__main__":
    main()
