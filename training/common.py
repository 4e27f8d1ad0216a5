"""Pieces every training script shares: config, Accelerator, checkpoints, data, sample videos.

A script declares its settings as a dataclass that extends `TrainingConfig`; `parse_config` then
gives it `--config file.yaml` (any field) plus one command-line flag per field, named as the
field (diffusers' names: `--output_dir`, `--max_train_steps`, `--learning_rate`, ...). Precedence:
field defaults < the YAML file's `base` file, if any < YAML file < command-line flags.
"""

import argparse
import dataclasses
import difflib
import json
import logging
import os
import shutil
import types
import typing
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Type, TypeVar, Union

import numpy as np
import torch
import yaml
from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration
from torch.utils.data import DataLoader, Dataset, Sampler, Subset

from nanoi2v_diffusers.cpu_malloc import keep_freed_cpu_memory
from nanoi2v_diffusers.data import ShapesConfig, ShapesDataset, VideoFolderDataset, collate_videos, write_video
from nanoi2v_diffusers.safe_loading import check_checkpoint_pickles

logger = logging.getLogger(__name__)

CHECKPOINT_PREFIX = "checkpoint-"
# A checkpoint being written: never listed, renamed to checkpoint-<step> once complete.
PARTIAL_CHECKPOINT_PREFIX = ".partial-checkpoint-"
# A checkpoint being deleted (rotation, replacement): renamed first, so it is never half-deleted under its name.
STALE_CHECKPOINT_PREFIX = ".stale-"
DATASETS = ("shapes", "video_folder")
MIXED_PRECISION_MODES = ("no", "fp16", "bf16")
# Shapes clips are generated on the fly, so an "epoch" is only a length for the sampler.
SHAPES_EPOCH_LENGTH = 100_000

ConfigT = TypeVar("ConfigT", bound="TrainingConfig")


@dataclass
class TrainingConfig:
    """Settings shared by all training scripts (flag names as in diffusers' training examples)."""

    output_dir: str = "outputs/run"
    seed: int = 0
    max_train_steps: int = 1000
    train_batch_size: int = 2
    learning_rate: float = 1e-4
    lr_scheduler: str = "constant_with_warmup"  # any name of diffusers.optimization.get_scheduler
    lr_warmup_steps: int = 0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    max_nonfinite_steps: int = 5  # optimizer steps in a row with NaN/inf gradients (each skipped) before the run stops
    mixed_precision: str = "no"  # "no", "fp16" or "bf16"
    gradient_accumulation_steps: int = 1
    gradient_checkpointing: bool = False
    checkpointing_steps: int = 500
    checkpoints_total_limit: Optional[int] = None
    resume_from_checkpoint: Optional[str] = None  # a checkpoint folder, or "latest"
    validation_steps: int = 250
    logging_steps: int = 10
    report_to: str = "tensorboard"  # "tensorboard", "wandb", "all" or "none"
    dataloader_num_workers: int = 0
    # Data: the built-in shapes clips, or a folder of videos (see nanoi2v_diffusers.data.VideoFolderDataset).
    dataset: str = "shapes"
    train_data_dir: Optional[str] = None
    validation_data_dir: Optional[str] = None  # video_folder only; defaults to train_data_dir
    max_bad_fraction: float = 0.5  # video_folder only: unreadable videos are skipped; past this fraction the run stops
    # shapes only: objects per clip (the generator draws 1 to 3). With a latent cache they set the validation
    # clips and what precompute_latents.py caches; training reads whatever the cache holds.
    shapes_min_objects: int = ShapesConfig.min_objects
    shapes_max_objects: int = ShapesConfig.max_objects
    resolution: int = 64
    num_frames: int = 17
    validation_num_frames: Optional[int] = None  # defaults to num_frames
    num_validation_samples: int = 8

    def __post_init__(self) -> None:
        if self.mixed_precision not in MIXED_PRECISION_MODES:
            raise ValueError(f"mixed_precision must be one of {MIXED_PRECISION_MODES}; got {self.mixed_precision!r}.")
        if self.dataset not in DATASETS:
            raise ValueError(f"dataset must be one of {DATASETS}; got {self.dataset!r}.")
        if self.dataset == "video_folder" and not self.train_data_dir:
            raise ValueError("dataset='video_folder' needs train_data_dir (a folder of videos).")
        for name in ("max_train_steps", "train_batch_size", "gradient_accumulation_steps", "checkpointing_steps",
                     "validation_steps", "logging_steps", "max_nonfinite_steps"):  # fmt: skip
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1; got {getattr(self, name)}.")
        if self.dataset == "shapes":
            self.shapes_config()  # raises ValueError naming a bad object count
        if not 0.0 <= self.max_bad_fraction <= 1.0:
            raise ValueError(f"max_bad_fraction must be in [0, 1]; got {self.max_bad_fraction}.")
        if self.checkpoints_total_limit is not None and self.checkpoints_total_limit < 1:
            raise ValueError(f"checkpoints_total_limit must be >= 1 or None; got {self.checkpoints_total_limit}.")

    @property
    def eval_num_frames(self) -> int:
        return self.validation_num_frames or self.num_frames

    def shapes_config(self, num_frames: Optional[int] = None) -> ShapesConfig:
        """The shapes generator's settings for this config's clips (`num_frames` frames, default the training's)."""
        return ShapesConfig(canvas_size=self.resolution, num_frames=num_frames or self.num_frames,
                            min_objects=self.shapes_min_objects, max_objects=self.shapes_max_objects)  # fmt: skip

    def to_dict(self) -> Dict[str, Any]:
        """Plain YAML-safe values (tuples as lists)."""
        values = dataclasses.asdict(self)
        return {name: list(value) if isinstance(value, tuple) else value for name, value in values.items()}


# --------------------------------------------------------------------------------------------------
# Config parsing
# --------------------------------------------------------------------------------------------------


def _unwrap_optional(hint: Any) -> Any:
    """`Optional[X]` -> `X`; other hints unchanged."""
    if typing.get_origin(hint) in (Union, types.UnionType):
        args = [arg for arg in typing.get_args(hint) if arg is not type(None)]
        if len(args) == 1:
            return args[0]
    return hint


def _parse_bool(text: str) -> bool:
    lowered = str(text).lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"not a boolean: {text!r}")


def _coerce(name: str, value: Any, hint: Any) -> Any:
    """Convert a YAML or command-line value to the field's type (PyYAML reads `1e-4` as a string)."""
    optional = _unwrap_optional(hint) is not hint
    base = _unwrap_optional(hint)
    if value is None or (optional and isinstance(value, str) and value.lower() in ("none", "null")):
        if not optional:
            raise ValueError(f"{name} may not be None.")
        return None
    try:
        if typing.get_origin(base) is tuple:
            item_type = typing.get_args(base)[0]
            return tuple(_coerce(name, item, item_type) for item in value)
        if base is bool:
            return value if isinstance(value, bool) else _parse_bool(value)
        if base in (int, float, str):
            return base(value)
    except (TypeError, ValueError) as error:
        raise ValueError(f"Bad value for {name}: {value!r} ({error}).") from None
    return value


def _add_field_flag(parser: argparse.ArgumentParser, name: str, hint: Any, help_text: str) -> None:
    base = _unwrap_optional(hint)
    # SUPPRESS: only flags actually given end up in the namespace, so they override the YAML file.
    common = dict(default=argparse.SUPPRESS, help=help_text)
    if base is bool:
        parser.add_argument(f"--{name}", action=argparse.BooleanOptionalAction, **common)
    elif typing.get_origin(base) is tuple:
        item_type = typing.get_args(base)[0]
        parser.add_argument(f"--{name}", nargs="+", type=lambda text: _coerce(name, text, item_type), **common)
    else:
        parser.add_argument(f"--{name}", type=lambda text: _coerce(name, text, hint), **common)


def read_yaml_config(path: Union[str, os.PathLike], config_cls: Type[ConfigT]) -> Dict[str, Any]:
    """Field values from a YAML mapping; unknown keys raise (typos would otherwise be silently ignored).

    A `base: other.yaml` key (a path relative to this file) reads that file first and lets this one
    override it, so that a run that continues another states only what it changes.
    """
    return _read_yaml_chain(Path(path), config_cls, seen=())


def _read_yaml_chain(path: Path, config_cls: Type[ConfigT], seen: Sequence[Path]) -> Dict[str, Any]:
    if path.resolve() in seen:
        chain = " -> ".join(str(p) for p in (*seen, path.resolve()))
        raise ValueError(f"{path}: `base` files form a cycle: {chain}")
    with open(path, encoding="utf-8") as handle:
        values = yaml.safe_load(handle) or {}
    if not isinstance(values, dict):
        raise ValueError(f"{path}: expected a mapping of field names to values.")
    base = values.pop("base", None)
    hints = typing.get_type_hints(config_cls)
    for key in values:
        if key not in hints:
            close = difflib.get_close_matches(key, list(hints), n=1)
            suggestion = f" Did you mean {close[0]!r}?" if close else ""
            raise ValueError(f"{path}: unknown setting {key!r} for {config_cls.__name__}.{suggestion}")
    inherited = _read_yaml_chain(path.parent / base, config_cls, (*seen, path.resolve())) if base else {}
    return {**inherited, **{key: _coerce(key, value, hints[key]) for key, value in values.items()}}


def parse_config(config_cls: Type[ConfigT], argv: Optional[Sequence[str]] = None) -> ConfigT:
    """Build `config_cls` from its defaults, then `--config file.yaml`, then one flag per field."""
    parser = argparse.ArgumentParser(description=(config_cls.__doc__ or "").strip())
    parser.add_argument("--config", help="YAML file setting any of the fields below.")
    hints = typing.get_type_hints(config_cls)
    for field in fields(config_cls):
        default = field.default if field.default is not dataclasses.MISSING else None
        _add_field_flag(parser, field.name, hints[field.name], help_text=f"default: {default}")
    args = vars(parser.parse_args(argv))
    config_path = args.pop("config", None)
    values = read_yaml_config(config_path, config_cls) if config_path else {}
    values.update({name: tuple(value) if isinstance(value, list) else value for name, value in args.items()})
    return config_cls(**values)


def save_config(config: TrainingConfig, output_dir: Union[str, os.PathLike]) -> Path:
    """Write the resolved settings next to the run, so that it can be reproduced."""
    path = Path(output_dir) / "training_config.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config.to_dict(), sort_keys=False), encoding="utf-8")
    return path


# --------------------------------------------------------------------------------------------------
# Accelerator and checkpoints
# --------------------------------------------------------------------------------------------------


def build_accelerator(config: TrainingConfig) -> Accelerator:
    project = ProjectConfiguration(project_dir=config.output_dir, logging_dir=os.path.join(config.output_dir, "logs"))
    # Without cpu=True on a machine with no accelerator, each process of a multi-process CPU launch
    # believes it is alone (no gloo process group, no gradient all-reduce).
    has_accelerator = torch.cuda.is_available() or torch.backends.mps.is_available()
    if not has_accelerator:
        keep_freed_cpu_memory()
    return Accelerator(
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        mixed_precision=config.mixed_precision,
        log_with=None if config.report_to == "none" else config.report_to,
        project_config=project,
        cpu=not has_accelerator,
    )


def list_checkpoints(output_dir: Union[str, os.PathLike]) -> List[Path]:
    """`checkpoint-<step>` folders of a run, oldest first."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    found = [path for path in output_dir.iterdir()
             if path.is_dir() and path.name.startswith(CHECKPOINT_PREFIX) and path.name[len(CHECKPOINT_PREFIX):].isdigit()]  # fmt: skip
    return sorted(found, key=checkpoint_step)


def checkpoint_step(path: Union[str, os.PathLike]) -> int:
    """The training step a `checkpoint-<step>` folder was saved at."""
    name = Path(path).name
    if not name.startswith(CHECKPOINT_PREFIX) or not name[len(CHECKPOINT_PREFIX):].isdigit():
        raise ValueError(f"Not a checkpoint folder name (expected {CHECKPOINT_PREFIX}<step>): {name!r}.")
    return int(name[len(CHECKPOINT_PREFIX):])


def resolve_checkpoint(output_dir: Union[str, os.PathLike], resume_from_checkpoint: Optional[str]) -> Optional[Path]:
    """The folder to resume from: None (fresh start), "latest" (newest in output_dir, or None if none), or a path."""
    if not resume_from_checkpoint:
        return None
    if resume_from_checkpoint == "latest":
        checkpoints = list_checkpoints(output_dir)
        return checkpoints[-1] if checkpoints else None
    path = Path(resume_from_checkpoint)
    if not path.is_dir():
        path = Path(output_dir) / resume_from_checkpoint
    if not path.is_dir():
        raise ValueError(f"resume_from_checkpoint={resume_from_checkpoint!r} is neither 'latest' nor a checkpoint folder.")
    return path


def load_checkpoint(accelerator: Accelerator, checkpoint: Union[str, os.PathLike]) -> None:
    """`accelerator.load_state`, after proving the files it unpickles unsafely hold only tensors and numbers."""
    check_checkpoint_pickles(checkpoint)
    accelerator.load_state(str(checkpoint))


def save_checkpoint(accelerator: Accelerator, output_dir: Union[str, os.PathLike], step: int,
                    total_limit: Optional[int]) -> Path:  # fmt: skip
    """`accelerator.save_state` to `output_dir/checkpoint-<step>`, atomically, then rotate old checkpoints.

    The state is written to a hidden `.partial-checkpoint-<step>` folder and renamed only once every
    process has finished writing, so a crash mid-write never leaves a `checkpoint-<step>` that
    `resolve_checkpoint(..., "latest")` would pick. Then the oldest checkpoints are deleted so that at
    most `total_limit` remain. Call on every process (sharded states need all of them).
    """
    output_dir = Path(output_dir)
    final = output_dir / f"{CHECKPOINT_PREFIX}{step}"
    partial = output_dir / f"{PARTIAL_CHECKPOINT_PREFIX}{step}"
    if accelerator.is_main_process:  # left over from a crash
        for leftover in [partial, *output_dir.glob(f"{STALE_CHECKPOINT_PREFIX}{CHECKPOINT_PREFIX}*")]:
            shutil.rmtree(leftover, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(partial))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        _replace_folder(partial, final)
        _rotate_checkpoints(output_dir, total_limit)
    accelerator.wait_for_everyone()
    return final


class NonFiniteLossError(RuntimeError):
    """Too many optimizer steps in a row had non-finite gradients."""


def stop_on_nonfinite_streak(accelerator: Accelerator, config: TrainingConfig, step: int, streak: int) -> None:
    """After `config.max_nonfinite_steps` skipped (non-finite) steps in a row, save a checkpoint and raise
    `NonFiniteLossError`: the run stops with its state on disk instead of burning compute on NaNs."""
    if streak < config.max_nonfinite_steps:
        return
    path = save_checkpoint(accelerator, config.output_dir, step, config.checkpoints_total_limit)
    raise NonFiniteLossError(
        f"{streak} steps in a row had non-finite gradients (max_nonfinite_steps={config.max_nonfinite_steps}); "
        f"stopped at step {step} after saving {path}. Lower the learning rate or check the data, then resume "
        "with --resume_from_checkpoint latest."
    )


def _replace_folder(source: Path, target: Path) -> None:
    """Rename `source` to `target`, replacing an existing `target` (e.g. a step saved twice)."""
    if target.exists():
        _delete_folder(target)
    os.replace(source, target)


def _delete_folder(folder: Path) -> None:
    """Rename, then delete: a crash mid-delete leaves a hidden `.stale-*` folder, never a half-deleted checkpoint."""
    stale = folder.with_name(f"{STALE_CHECKPOINT_PREFIX}{folder.name}")
    shutil.rmtree(stale, ignore_errors=True)
    os.replace(folder, stale)
    shutil.rmtree(stale)


def _rotate_checkpoints(output_dir: Path, total_limit: Optional[int]) -> None:
    if total_limit is None:
        return
    existing = list_checkpoints(output_dir)
    for stale in existing[: max(0, len(existing) - total_limit)]:
        logger.info("Removing old checkpoint %s", stale)
        _delete_folder(stale)


# --------------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------------


def build_dataset(config: TrainingConfig, split: str = "train") -> Dataset:
    """The training or validation clips the config asks for: shapes (default) or a folder of videos."""
    num_frames = config.num_frames if split == "train" else config.eval_num_frames
    if config.dataset == "shapes":
        length = SHAPES_EPOCH_LENGTH if split == "train" else config.num_validation_samples
        return ShapesDataset(length, split=split, config=config.shapes_config(num_frames))
    root = config.train_data_dir if split == "train" else (config.validation_data_dir or config.train_data_dir)
    return VideoFolderDataset(root, num_frames=num_frames, height=config.resolution, width=config.resolution,
                              random_flip=split == "train", seed=config.seed,
                              max_bad_fraction=config.max_bad_fraction)  # fmt: skip


def build_dataloader(dataset: Dataset, config: TrainingConfig, shuffle: bool, batch_size: Optional[int] = None) -> DataLoader:
    generator = torch.Generator().manual_seed(config.seed)
    return DataLoader(
        dataset, batch_size=batch_size or config.train_batch_size, shuffle=shuffle, drop_last=shuffle,
        num_workers=config.dataloader_num_workers, collate_fn=collate_videos, generator=generator,
    )  # fmt: skip


def validation_batch(config: TrainingConfig) -> torch.Tensor:
    """The first `num_validation_samples` validation clips, `(N, C, T, H, W)` in [-1, 1] (fixed across the run)."""
    dataset = build_dataset(config, split="validation")
    count = min(config.num_validation_samples, len(dataset))
    return torch.stack([dataset[index]["pixel_values"] for index in range(count)])


class ResumableSampler(Sampler[int]):
    """Endless dataset indices whose order is a function of (seed, position) only.

    Epoch `e` is a permutation of `range(num_samples)` drawn from `(seed, e)` (or the identity when
    `shuffle=False`); iteration starts at position `start` of that endless stream. A run resumed at
    step k with `start = k * samples_per_step` therefore reads exactly the clips an uninterrupted
    run would have read, with no need to replay or store the data loader's state.
    """

    def __init__(self, num_samples: int, seed: int = 0, start: int = 0, shuffle: bool = True) -> None:
        if num_samples < 1:
            raise ValueError(f"ResumableSampler needs a non-empty dataset; got num_samples={num_samples}.")
        if start < 0:
            raise ValueError(f"start must be >= 0; got {start}.")
        self.num_samples, self.seed, self.start, self.shuffle = num_samples, seed, start, shuffle

    def epoch_order(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(self.num_samples)
        return np.random.default_rng([self.seed, epoch]).permutation(self.num_samples)

    def __iter__(self) -> Iterator[int]:
        epoch, offset = divmod(self.start, self.num_samples)
        while True:
            yield from (int(index) for index in self.epoch_order(epoch)[offset:])
            epoch, offset = epoch + 1, 0


def shard_dataset(dataset: Dataset, rank: int, world_size: int) -> Dataset:
    """This process's contiguous part of a map-style dataset, split as `datasets.distributed.split_dataset_by_node`
    splits a `datasets.Dataset` (the first `len % world_size` parts get one extra item)."""
    if world_size == 1:
        return dataset
    size = len(dataset)
    if size < world_size:
        raise ValueError(f"Cannot split a dataset of {size} items over {world_size} processes.")
    part, extra = divmod(size, world_size)
    start = part * rank + min(rank, extra)
    return Subset(dataset, range(start, start + part + (1 if rank < extra else 0)))


def build_resumable_dataloader(dataset: Dataset, config: TrainingConfig, start_step: int, seed: int,
                               collate_fn: Optional[Callable] = None) -> DataLoader:  # fmt: skip
    """An endless DataLoader that starts at optimizer step `start_step` (see `ResumableSampler`)."""
    samples_per_step = config.train_batch_size * config.gradient_accumulation_steps
    sampler = ResumableSampler(len(dataset), seed=seed, start=start_step * samples_per_step)
    return DataLoader(dataset, batch_size=config.train_batch_size, sampler=sampler,
                      num_workers=config.dataloader_num_workers, collate_fn=collate_fn)  # fmt: skip


def infinite_batches(dataloader: DataLoader) -> Iterator[dict]:
    """Batches forever, telling the sampler (and any random augmentation) which epoch it is in."""
    epoch = 0
    while True:
        for target in (dataloader, getattr(dataloader, "dataset", None)):
            if hasattr(target, "set_epoch"):
                target.set_epoch(epoch)
        yield from dataloader
        epoch += 1


# --------------------------------------------------------------------------------------------------
# Logging and samples
# --------------------------------------------------------------------------------------------------


TRAIN_LOG = "train_log.jsonl"  # in output_dir: one JSON record per logged step, then a summary


def drop_records_after_step(path: Union[str, os.PathLike], step: int) -> int:
    """Remove the records of steps after `step` from a JSONL log (atomically); return how many were removed.

    On resume, the steps after the checkpoint are trained again; without this, a run that died after its
    last checkpoint would log those steps twice (a plot of the log would double back on itself).
    """
    path = Path(path)
    if not path.is_file():
        return 0
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    kept = [line for line in lines if _record_step(line) <= step]
    if len(kept) < len(lines):
        partial = path.with_name(f".{path.name}.partial")
        partial.write_text("".join(kept), encoding="utf-8")
        os.replace(partial, path)
    return len(lines) - len(kept)


def _record_step(line: str) -> float:
    """The step of one JSONL record; infinite for a line that is not a whole record (torn by a kill mid-write)."""
    try:
        return json.loads(line)["step"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return float("inf")


def append_jsonl(path: Union[str, os.PathLike], record: Dict[str, Any]) -> None:
    """One JSON record per line: a log that survives crashes and is trivial to read back."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as handle:
        handle.write(json.dumps(record) + "\n")


def write_side_by_side(path: Union[str, os.PathLike], videos: Sequence[torch.Tensor], fps: float = 8) -> Path:
    """Write videos `(C, T, H, W)` in [-1, 1] next to each other (e.g. original | reconstruction)."""
    frames = min(video.shape[1] for video in videos)
    row = torch.cat([video[:, :frames].detach().float().cpu() for video in videos], dim=-1)  # (C, T, H, sum W)
    return write_video(path, row, fps=fps)


def resume_if_requested(accelerator: Accelerator, config: TrainingConfig) -> int:
    """Load the checkpoint `config.resume_from_checkpoint` names ("latest" or a folder); return its step (0 if none)."""
    checkpoint = resolve_checkpoint(config.output_dir, config.resume_from_checkpoint)
    if checkpoint is None:
        if config.resume_from_checkpoint:
            accelerator.print("No checkpoint found; starting a new run.")
        return 0
    accelerator.print(f"Resuming from {checkpoint}")
    load_checkpoint(accelerator, checkpoint)
    step = checkpoint_step(checkpoint)
    if accelerator.is_main_process:  # the only process that writes the log
        dropped = drop_records_after_step(Path(config.output_dir) / TRAIN_LOG, step)
        if dropped:
            accelerator.print(f"Dropped {dropped} records after step {step} from {TRAIN_LOG}; those steps run again.")
    return step
