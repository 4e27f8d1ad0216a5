"""The latent + text-embedding cache: every clip encoded once, stored as a `datasets` dataset.

Training a DiT on the fly encodes each clip with the VAE and each caption with the text encoder at
every step, although both are frozen. The cache does that work once (`training/precompute_latents.py`)
and the training script then reads, per clip:

- `posterior_mean`, `posterior_std` `(C, T, h, w)`: the VAE posterior (not normalised). Training
  draws a fresh latent `mean + std * noise` from it at every step (`sample_latents`), exactly as on
  the fly, and the image-conditioning latent is the posterior mean of latent frame 0: the VAE is
  causal, so the first frame alone encodes to the first latent frame and no second encode is needed;
- `keyframe_mean` `(C, T, h, w)`: the posterior mean of each latent frame's last pixel frame encoded
  alone, as a keyframe is at sampling (frame 0: the clip's own, see `nanoi2v_diffusers.conditioning`),
  so every conditioning task trains from one cache;
- `prompt_embeds` `(L, D)` and `prompt_attention_mask` `(L,)`: the caption's text-encoder states,
  padded to `max_sequence_length` (padding masked, see `nanoi2v_diffusers.text_encoders.encode_text`);
- `caption`: the text, for logs.

Columns are `Array4D` / `Array2D` features, written with `save_to_disk` in shards and read with
`load_from_disk(...).with_format("torch")`; `load_latent_cache(path, rank, world_size)` gives each
process its own part with `split_dataset_by_node`. A `nanoi2v_cache.json` beside the shards records
what produced the cache (shapes, a fingerprint of the VAE weights, the text encoder), so a cache
made with another VAE or text encoder is refused instead of silently training on wrong latents.
"""

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple, Union

import datasets
import torch
from datasets.distributed import split_dataset_by_node

from nanoi2v_diffusers.text_encoders import encode_text

CACHE_INFO_FILE = "nanoi2v_cache.json"
# 2: the VAE is identified by its encoder only (`vae_encoder_fingerprint`). 3: keyframe latents.
CACHE_FORMAT_VERSION = 3
FLOAT_COLUMNS = ("posterior_mean", "posterior_std", "keyframe_mean", "prompt_embeds")
TENSOR_COLUMNS = (*FLOAT_COLUMNS, "prompt_attention_mask")
CAPTION_COLUMN = "caption"
# Float columns may be stored in half precision to halve the cache (Arrow has no bfloat16).
CACHE_DTYPES = ("float32", "float16")
# Folders under this name prefix are caches being written; they are never loaded.
_PARTIAL_PREFIX = ".partial-"

PathLike = Union[str, os.PathLike]


@dataclass(frozen=True)
class LatentCacheInfo:
    """What a cache holds and what produced it (saved as `nanoi2v_cache.json`)."""

    latent_shape: Tuple[int, int, int, int]  # (C, T, h, w) of one clip's posterior
    text_shape: Tuple[int, int]  # (max_sequence_length, text_dim)
    num_clips: int
    vae_encoder_fingerprint: str  # `vae_encoder_fingerprint` of the VAE that encoded the clips
    text_encoder_fingerprint: str  # and of the text encoder
    text_clause_separator: Optional[str] = None  # captions encoded clause by clause (`encode_clips`) when set
    dtype: str = "float32"
    source: str = ""  # a description of the data (dataset name, folder, resolution, frames)
    format_version: int = CACHE_FORMAT_VERSION

    def save(self, folder: PathLike) -> Path:
        path = Path(folder) / CACHE_INFO_FILE
        path.write_text(json.dumps(dataclasses.asdict(self), indent=2) + "\n", encoding="utf-8")
        return path

    @classmethod
    def load(cls, folder: PathLike) -> "LatentCacheInfo":
        path = Path(folder) / CACHE_INFO_FILE
        if not path.is_file():
            raise ValueError(
                f"{folder} is not a latent cache: {CACHE_INFO_FILE} is missing. Write one with "
                "training/precompute_latents.py."
            )
        values = json.loads(path.read_text(encoding="utf-8"))
        if values.get("format_version", 1) != CACHE_FORMAT_VERSION:
            raise ValueError(
                f"{path} has cache format {values.get('format_version', 1)}, this version reads format "
                f"{CACHE_FORMAT_VERSION}; re-run training/precompute_latents.py."
            )
        known = {field.name for field in dataclasses.fields(cls)}
        missing = sorted(known - set(values) - {"text_clause_separator", "dtype", "source", "format_version"})
        if missing:
            raise ValueError(f"{path} lacks the key(s) {missing}.")
        values = {key: value for key, value in values.items() if key in known}
        values["latent_shape"], values["text_shape"] = tuple(values["latent_shape"]), tuple(values["text_shape"])
        return cls(**values)

    def check_matches(self, *, latent_shape: Tuple[int, ...], text_shape: Tuple[int, int], vae_encoder_fingerprint: str,
                      text_encoder_fingerprint: str, text_clause_separator: Optional[str] = None) -> None:  # fmt: skip
        """Raise ValueError naming the first setting where the cache and the training run disagree."""
        expected = {
            "latent_shape": tuple(latent_shape),
            "text_shape": tuple(text_shape),
            "vae_encoder_fingerprint": vae_encoder_fingerprint,
            "text_encoder_fingerprint": text_encoder_fingerprint,
            "text_clause_separator": text_clause_separator,
        }
        for key, value in expected.items():
            if getattr(self, key) != value:
                raise ValueError(
                    f"The latent cache was made with {key}={getattr(self, key)!r} but this run has {value!r}; "
                    "re-run training/precompute_latents.py with this run's config."
                )


def model_fingerprint(model: torch.nn.Module) -> str:
    """sha256 over a model's parameters and buffers (names, shapes and float32 values)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def vae_encoder_fingerprint(vae: torch.nn.Module) -> str:
    """`model_fingerprint` of a VAE's encoder, the only part that made the cached posteriors: a cache stays
    valid for a VAE whose decoder was fine-tuned (`train_vae.py` with `train_decoder_only`)."""
    return model_fingerprint(vae.encoder)


@torch.no_grad()
def encode_keyframes(vae, pixel_values: torch.Tensor, posterior_mean: torch.Tensor) -> torch.Tensor:
    """`(B, C, T, h, w)`: for each latent frame of the clips `pixel_values` `(B, 3, F, H, W)`, the posterior mean of
    its last pixel frame encoded alone (frames r, 2r, ... as one-frame videos); frame 0 is `posterior_mean`'s."""
    ratio = vae.temporal_compression_ratio
    frames = pixel_values[:, :, ratio::ratio]  # (B, 3, T - 1, H, W): the last pixel frame of latent frames 1..T-1
    batch, channels, count = frames.shape[:3]
    if count == 0:
        return posterior_mean[:, :, :1]
    singles = frames.transpose(1, 2).reshape(batch * count, channels, 1, *frames.shape[3:])  # (B * (T-1), 3, 1, H, W)
    means = vae.encode(singles.to(vae.device, vae.dtype)).latent_dist.mean  # (B * (T-1), C, 1, h, w)
    means = means.reshape(batch, count, *means.shape[1:]).squeeze(3).transpose(1, 2)  # (B, C, T - 1, h, w)
    return torch.cat([posterior_mean[:, :, :1], means.to(posterior_mean.dtype)], dim=2)


@torch.no_grad()
def encode_clips(vae, text_encoder, tokenizer, pixel_values: torch.Tensor, captions: Sequence[str],
                 max_sequence_length: int, clause_separator: Optional[str] = None,
                 keyframes: bool = True) -> Dict[str, torch.Tensor]:  # fmt: skip
    """Encode a batch once: the VAE posterior of the videos, the keyframe latents (`encode_keyframes`; left out
    with `keyframes=False`) and the padded text states of the captions (clause by clause with a
    `clause_separator`, see `nanoi2v_diffusers.text_encoders.encode_clauses`).

    Used both by the precompute script and by on-the-fly training, so the two see the same values.
    Returns `posterior_mean`, `posterior_std`, `keyframe_mean` `(B, C, T, h, w)`, `prompt_embeds` `(B, L, D)`
    and `prompt_attention_mask` `(B, L)`, with `L = max_sequence_length`.
    """
    pixel_values = pixel_values.to(vae.device, vae.dtype)
    posterior = vae.encode(pixel_values).latent_dist
    embeds, mask = encode_text(text_encoder, tokenizer, list(captions), max_sequence_length,
                               device=text_encoder.device, pad_to_max_length=True,
                               clause_separator=clause_separator)  # fmt: skip
    encoded = {"posterior_mean": posterior.mean, "posterior_std": posterior.std,
               "prompt_embeds": embeds, "prompt_attention_mask": mask}  # fmt: skip
    if keyframes:
        encoded["keyframe_mean"] = encode_keyframes(vae, pixel_values, posterior.mean)
    return encoded


def sample_latents(posterior_mean: torch.Tensor, posterior_std: torch.Tensor,
                   generator: Optional[torch.Generator] = None) -> torch.Tensor:  # fmt: skip
    """A draw `mean + std * noise` from a diagonal Gaussian posterior; the noise comes from `generator`
    (on the CPU, so a draw does not depend on the device) and is moved to the posterior's device."""
    noise = torch.randn(posterior_mean.shape, generator=generator, dtype=torch.float32)
    return posterior_mean + posterior_std * noise.to(posterior_mean.device, posterior_mean.dtype)


def cache_features(latent_shape: Tuple[int, int, int, int], text_shape: Tuple[int, int],
                   dtype: str = "float32") -> datasets.Features:  # fmt: skip
    """The `datasets` schema of a cache row."""
    if dtype not in CACHE_DTYPES:
        raise ValueError(f"Cache dtype must be one of {CACHE_DTYPES}; got {dtype!r}.")
    return datasets.Features({
        "posterior_mean": datasets.Array4D(shape=tuple(latent_shape), dtype=dtype),
        "posterior_std": datasets.Array4D(shape=tuple(latent_shape), dtype=dtype),
        "keyframe_mean": datasets.Array4D(shape=tuple(latent_shape), dtype=dtype),
        "prompt_embeds": datasets.Array2D(shape=tuple(text_shape), dtype=dtype),
        "prompt_attention_mask": datasets.List(datasets.Value("int8"), length=text_shape[0]),
        CAPTION_COLUMN: datasets.Value("string"),
    })  # fmt: skip


def _rows(batches: Iterable[Dict[str, Union[torch.Tensor, List[str]]]], dtype: str):
    """Split encoded batches (as `encode_clips` returns, plus `caption`) into one dict per clip."""
    for batch in batches:
        arrays = {name: batch[name].detach().float().cpu().numpy().astype(dtype) for name in FLOAT_COLUMNS}
        arrays["prompt_attention_mask"] = batch["prompt_attention_mask"].detach().cpu().to(torch.int8).numpy()
        for index, caption in enumerate(batch[CAPTION_COLUMN]):
            yield {**{name: values[index] for name, values in arrays.items()}, CAPTION_COLUMN: caption}


def _table_from_batches(batches, features: datasets.Features, arrow_dir: str, dtype: str) -> datasets.Dataset:
    try:
        # A fresh fingerprint: the generator closes over models, which `datasets` would otherwise hash.
        return datasets.Dataset.from_generator(
            _rows, features=features, cache_dir=arrow_dir, gen_kwargs={"batches": batches, "dtype": dtype},
            fingerprint=uuid.uuid4().hex,
        )  # fmt: skip
    except datasets.exceptions.DatasetGenerationError as error:
        if error.__cause__ is not None:  # the encoder's own error, not the wrapper
            raise error.__cause__
        raise


def write_latent_cache(batches: Iterable[Dict[str, Union[torch.Tensor, List[str]]]], output_dir: PathLike,
                       info: LatentCacheInfo, num_shards: Optional[int] = None,
                       max_shard_size: Union[str, int] = "500MB") -> Path:  # fmt: skip
    """Stream encoded batches into a sharded `save_to_disk` folder at `output_dir`, with its info file.

    `batches` yields dicts with the `encode_clips` tensors plus `caption` (a list of str). The cache is
    built in a temporary sibling folder and renamed into place at the end, so an interrupted run
    never leaves a half-written cache at `output_dir`. `info.num_clips` is set to the rows written.
    """
    output_dir = Path(output_dir)
    if output_dir.exists():
        raise ValueError(f"{output_dir} already exists; remove it or choose another cache_dir.")
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    features = cache_features(info.latent_shape, info.text_shape, info.dtype)
    partial = output_dir.with_name(f"{_PARTIAL_PREFIX}{output_dir.name}")
    shutil.rmtree(partial, ignore_errors=True)
    with tempfile.TemporaryDirectory(dir=output_dir.parent, prefix=".arrow-") as arrow_dir:
        table = _table_from_batches(batches, features, arrow_dir, info.dtype)
        table.save_to_disk(str(partial), num_shards=num_shards, max_shard_size=None if num_shards else max_shard_size)
        dataclasses.replace(info, num_clips=len(table)).save(partial)
        del table
    os.replace(partial, output_dir)
    return output_dir


def load_latent_cache(path: PathLike, rank: int = 0, world_size: int = 1) -> Tuple[datasets.Dataset, LatentCacheInfo]:
    """The cache at `path` as torch tensors, this process's part of it, and its info.

    With `world_size > 1` each rank gets a disjoint contiguous part (`split_dataset_by_node`).
    """
    path = Path(path)
    if not path.is_dir():
        raise ValueError(f"Latent cache {str(path)!r} does not exist; write it with training/precompute_latents.py.")
    info = LatentCacheInfo.load(path)
    table = datasets.load_from_disk(str(path))
    if world_size > 1:
        if len(table) < world_size:
            raise ValueError(f"The latent cache holds {len(table)} clips, fewer than the {world_size} processes.")
        table = split_dataset_by_node(table, rank=rank, world_size=world_size)
    return table.with_format("torch"), info


def collate_cache_rows(rows: Sequence[dict]) -> Dict[str, Union[torch.Tensor, List[str]]]:
    """Stack cache rows into a batch: float columns as float32, the mask as long, captions as a list."""
    batch = {name: torch.stack([row[name] for row in rows]) for name in TENSOR_COLUMNS}
    for name in FLOAT_COLUMNS:
        batch[name] = batch[name].float()
    batch["prompt_attention_mask"] = batch["prompt_attention_mask"].long()
    batch[CAPTION_COLUMN] = [row[CAPTION_COLUMN] for row in rows]
    return batch


__all__ = [
    "CACHE_INFO_FILE",
    "LatentCacheInfo",
    "cache_features",
    "collate_cache_rows",
    "encode_clips",
    "encode_keyframes",
    "load_latent_cache",
    "model_fingerprint",
    "sample_latents",
    "vae_encoder_fingerprint",
    "write_latent_cache",
]
