"""The one training loop: everything a run does that does not depend on the model it trains.

`Trainer` owns the accelerate set-up, mixed precision, gradient accumulation and clipping, the skip of
non-finite steps (and the stop after a streak of them, checkpoint first), EMA, the data order (a
function of seed and position, so a resumed run reads exactly the clips an uninterrupted one would),
atomic checkpoints and their rotation, the validation cadence, logging and teardown. It also keeps runs
apart: a fresh run refuses a folder that holds another run, a lock file keeps a second process out, and
a resume whose settings differ from its checkpoint's stops and lists them. `train_vae.py` and
`train_dit.py` subclass it with what is their model's: `build_model`, `training_data`, `compute_loss`,
`validate` and `save_outputs`.

Settings are a dataclass that extends `TrainingConfig` (flags named as in diffusers' training scripts), read
by `nanoi2v_diffusers.settings.parse_config` from a YAML file and the command line.
"""

import contextlib
import dataclasses
import gc
import json
import logging
import math
import os
import shutil
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Type, TypeVar, Union

import numpy as np
import torch
import yaml
from accelerate import Accelerator
from accelerate.utils import DistributedType, ProjectConfiguration, broadcast_object_list, gather_object, set_seed
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from nanoi2v_diffusers.cpu_malloc import keep_freed_cpu_memory
from nanoi2v_diffusers.data import ShapesConfig, ShapesDataset, VideoFolderDataset
from nanoi2v_diffusers.data.sampling import EpochDataset, ResumableSampler, step_generator
from nanoi2v_diffusers.safe_loading import check_checkpoint_pickles
from nanoi2v_diffusers.settings import parse_config
from nanoi2v_diffusers.size_rules import check_frame_count, check_multiple

try:
    import fcntl
except ImportError:  # Windows: no advisory locks, so no protection against a second process
    fcntl = None

logger = logging.getLogger(__name__)

CHECKPOINT_PREFIX = "checkpoint-"
# A checkpoint being written: never listed, renamed to checkpoint-<step> once complete.
PARTIAL_CHECKPOINT_PREFIX = ".partial-checkpoint-"
# A checkpoint being deleted (rotation, replacement): renamed first, so it is never half-deleted under its name.
STALE_CHECKPOINT_PREFIX = ".stale-"
TRAIN_LOG = "train_log.jsonl"  # one JSON record per logged step, then a summary
CONFIG_FILE = "training_config.yaml"  # the settings of the weights beside it (in output_dir and in each checkpoint)
SUMMARY_FILE = "training_summary.json"  # written last: the run is complete
STATE_FILE = "trainer_state.json"  # in each checkpoint: data position and running totals
LOCK_FILE = ".train.lock"
DATASETS = ("shapes", "video_folder")
MIXED_PRECISION_MODES = ("no", "fp16", "bf16")
SHAPES_EPOCH_LENGTH = 100_000  # shapes clips are generated on the fly, so an "epoch" is only a length
FINAL_LOSS_WINDOW = 100  # the summary averages the last steps' losses: one step's is too noisy to compare runs by
MEAN_LOSS_KEY = f"mean_loss_last_{FINAL_LOSS_WINDOW}_steps"

ConfigT = TypeVar("ConfigT", bound="TrainingConfig")


@dataclass
class TrainingConfig:
    """Settings shared by all training scripts (flag names as in diffusers' training examples)."""

    output_dir: str = "outputs/run"
    overwrite_output_dir: bool = False  # clear another run's checkpoints, log and weights in output_dir first
    resume_from_checkpoint: Optional[str] = None  # a checkpoint folder, or "latest"
    allow_changed_settings: bool = False  # resume although settings that change training differ (they take effect)
    seed: int = 0
    max_train_steps: int = 1000
    train_batch_size: int = 2
    learning_rate: float = 1e-4
    lr_scheduler: str = "constant_with_warmup"  # any name of diffusers.optimization.get_scheduler
    lr_warmup_steps: int = 0
    lr_num_cycles: int = 1  # cosine_with_restarts: hard restarts over the run
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    max_nonfinite_steps: int = 5  # optimizer steps in a row with NaN/inf gradients (each skipped) before the run stops
    mixed_precision: str = "no"  # "no", "fp16" or "bf16"
    gradient_accumulation_steps: int = 1
    gradient_checkpointing: bool = False
    use_ema: bool = False
    ema_decay: float = 0.9999
    ema_power: float = 0.75  # EMA warm-up: decay = 1 - (1 + step) ** -power, capped at ema_decay
    checkpointing_steps: int = 500
    checkpoints_total_limit: Optional[int] = None
    validation_steps: int = 250
    logging_steps: int = 10
    report_to: str = "tensorboard"  # "tensorboard", "wandb", "all" or "none"
    dataloader_num_workers: int = 0
    # Data: the built-in shapes clips, or a folder of videos (see nanoi2v_diffusers.data.VideoFolderDataset).
    dataset: str = "shapes"
    train_data_dir: Optional[str] = None
    validation_data_dir: Optional[str] = None  # video_folder only; defaults to train_data_dir
    max_bad_fraction: float = 0.5  # video_folder only: unreadable videos are skipped; past this fraction the run stops
    # shapes only: objects per clip. With a latent cache they set the validation clips and what is cached.
    shapes_min_objects: int = ShapesConfig.min_objects
    shapes_max_objects: int = ShapesConfig.max_objects
    resolution: int = 64
    num_frames: int = 17
    validation_num_frames: Optional[int] = None  # defaults to num_frames
    num_validation_samples: int = 8

    # Settings that change what is trained, and so must match a checkpoint's on resume, are all fields but these.
    RESUME_FREE = ("output_dir", "overwrite_output_dir", "resume_from_checkpoint", "allow_changed_settings",
                   "checkpointing_steps", "checkpoints_total_limit", "validation_steps", "logging_steps", "report_to",
                   "dataloader_num_workers", "validation_data_dir", "max_bad_fraction", "validation_num_frames",
                   "num_validation_samples", "gradient_checkpointing")  # fmt: skip

    def __post_init__(self) -> None:
        _check_choice("mixed_precision", self.mixed_precision, MIXED_PRECISION_MODES)
        _check_choice("dataset", self.dataset, DATASETS)
        if self.dataset == "video_folder" and not self.train_data_dir:
            raise ValueError("dataset='video_folder' needs train_data_dir (a folder of videos).")
        for name in ("max_train_steps", "train_batch_size", "gradient_accumulation_steps", "checkpointing_steps",
                     "validation_steps", "logging_steps", "max_nonfinite_steps", "lr_num_cycles"):  # fmt: skip
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1; got {getattr(self, name)}.")
        if self.dataset == "shapes":
            self.shapes_config()  # raises ValueError naming a bad object count
        if not 0.0 <= self.max_bad_fraction <= 1.0:
            raise ValueError(f"max_bad_fraction must be in [0, 1]; got {self.max_bad_fraction}.")
        if self.checkpoints_total_limit is not None and self.checkpoints_total_limit < 1:
            raise ValueError(f"checkpoints_total_limit must be >= 1 or None; got {self.checkpoints_total_limit}.")
        check_multiple("resolution", self.resolution, 8, "the VAE's spatial factor")
        for name in ("num_frames", "validation_num_frames"):
            if getattr(self, name) is not None:
                check_frame_count(name, getattr(self, name), 4)
        if self.lr_warmup_steps >= self.max_train_steps:
            logger.warning("lr_warmup_steps=%d >= max_train_steps=%d: the learning rate never leaves its warm-up.",
                           self.lr_warmup_steps, self.max_train_steps)  # fmt: skip
        if self.dataset == "video_folder" and not self.validation_data_dir:
            logger.warning("No validation_data_dir: validation uses the first clips of train_data_dir, which the "
                           "model trains on.")  # fmt: skip
        if self.overwrite_output_dir and self.resume_from_checkpoint:
            raise ValueError(
                "overwrite_output_dir and resume_from_checkpoint exclude each other: clear the run or resume it."
            )

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

    def changed_settings(self, old: Dict[str, Any]) -> Dict[str, Tuple[Any, Any]]:
        """{key: (old, new)} for the settings that change training and differ from `old` (a saved `to_dict`)."""
        new = self.to_dict()
        return {key: (old[key], value) for key, value in new.items()
                if key not in self.RESUME_FREE and key in old and old[key] != value}  # fmt: skip


def _check_choice(name: str, value: Any, choices: Sequence) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}; got {value!r}.")


def save_config(config: TrainingConfig, folder: Union[str, os.PathLike]) -> Path:
    """Write the settings that made the weights in `folder` (atomically)."""
    return write_atomically(Path(folder) / CONFIG_FILE, yaml.safe_dump(config.to_dict(), sort_keys=False))


def write_atomically(path: Path, text: str) -> Path:
    """Write `text` to `path` through a temporary file and a rename: a kill never leaves half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial")
    partial.write_text(text, encoding="utf-8")
    os.replace(partial, path)
    return path


# --------------------------------------------------------------------------------------------------
# Accelerator, checkpoints, run folders
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
    found = [path for path in output_dir.iterdir() if path.is_dir() and _is_checkpoint_name(path.name)]
    return sorted(found, key=checkpoint_step)


def _is_checkpoint_name(name: str) -> bool:
    return name.startswith(CHECKPOINT_PREFIX) and name[len(CHECKPOINT_PREFIX) :].isdigit()


def checkpoint_step(path: Union[str, os.PathLike]) -> int:
    """The training step a `checkpoint-<step>` folder was saved at."""
    name = Path(path).name
    if not _is_checkpoint_name(name):
        raise ValueError(f"Not a checkpoint folder name (expected {CHECKPOINT_PREFIX}<step>): {name!r}.")
    return int(name[len(CHECKPOINT_PREFIX) :])


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
        raise ValueError(
            f"resume_from_checkpoint={resume_from_checkpoint!r} is neither 'latest' nor a checkpoint folder."
        )
    return path


def load_checkpoint(accelerator: Accelerator, checkpoint: Union[str, os.PathLike]) -> None:
    """`accelerator.load_state`, after proving the files it unpickles unsafely hold only tensors and numbers."""
    check_checkpoint_pickles(checkpoint)
    accelerator.load_state(str(checkpoint))


def save_checkpoint(accelerator: Accelerator, output_dir: Union[str, os.PathLike], step: int,
                    total_limit: Optional[int], extra_files: Optional[Dict[str, str]] = None) -> Path:  # fmt: skip
    """`accelerator.save_state` to `output_dir/checkpoint-<step>`, atomically, then rotate old checkpoints.

    The state (and `extra_files`, {name: text}, written by the main process) goes to a hidden
    `.partial-checkpoint-<step>` folder, renamed only once every process has finished writing, so a crash
    mid-write never leaves a `checkpoint-<step>` that `resolve_checkpoint(..., "latest")` would pick. Then
    the oldest checkpoints are deleted so that at most `total_limit` remain. Call on every process.
    """
    output_dir = Path(output_dir)
    final = output_dir / f"{CHECKPOINT_PREFIX}{step}"
    partial = output_dir / f"{PARTIAL_CHECKPOINT_PREFIX}{step}"
    if accelerator.is_main_process:  # left over from a crash
        for leftover in [partial, *output_dir.glob(f"{STALE_CHECKPOINT_PREFIX}{CHECKPOINT_PREFIX}*")]:
            shutil.rmtree(leftover, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(partial))
    if accelerator.is_main_process:
        for name, text in (extra_files or {}).items():
            (partial / name).write_text(text, encoding="utf-8")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        _replace_folder(partial, final)
        _rotate_checkpoints(output_dir, total_limit)
    accelerator.wait_for_everyone()
    return final


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


class NonFiniteLossError(RuntimeError):
    """Too many optimizer steps in a row had non-finite gradients."""


class RunFolderError(RuntimeError):
    """The output folder holds another run, is in use, or its checkpoint was made with other settings."""


class RunLock:
    """An advisory lock on `output_dir` held by a run's main process, released when it ends or dies.

    The lock file names its holder (host, pid, start time); the operating system drops the lock of a
    killed process, so a lock file left by a dead run is recognised as stale and taken over.
    """

    def __init__(self, output_dir: Path) -> None:
        self.path = output_dir / LOCK_FILE
        self.handle = None

    def acquire(self) -> Optional[str]:
        """Take the lock; returns None, or a message naming the process that holds it."""
        if fcntl is None:
            return None
        self.path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(self.path, "a+", encoding="utf-8")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.seek(0)
            holder = handle.read().strip() or "an unknown process"
            handle.close()
            return (f"output_dir {self.path.parent} is in use by another training run ({holder}); wait for it to "
                    "end or choose another output_dir.")  # fmt: skip
        handle.seek(0)
        if handle.read().strip():
            logger.info("Taking over the stale lock of a run that ended without releasing it: %s", self.path)
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        handle.flush()
        self.handle = handle
        return None

    def release(self) -> None:
        if self.handle is not None:
            self.handle.seek(0)
            self.handle.truncate()
            fcntl.flock(self.handle, fcntl.LOCK_UN)
            self.handle.close()
            self.handle = None


def prepare_output_dir(config: TrainingConfig, run_files: Sequence[str]) -> Optional[Path]:
    """Check the output folder for a run of `config` (main process); returns the checkpoint to resume from.

    A fresh run refuses a folder holding another run's files (`run_files`, checkpoints) unless
    `overwrite_output_dir`, which deletes them first. A resume refuses a checkpoint whose settings that
    change training differ from `config`'s, unless `allow_changed_settings`.
    """
    output_dir = Path(config.output_dir)
    checkpoint = resolve_checkpoint(output_dir, config.resume_from_checkpoint)
    if checkpoint is not None:
        check_resume_settings(config, checkpoint)
        return checkpoint
    found = [path for path in (output_dir / name for name in run_files) if path.exists()] + list_checkpoints(output_dir)
    if not found or config.resume_from_checkpoint:  # "latest" with no checkpoint yet: the same run starts again
        return None
    if not config.overwrite_output_dir:
        names = sorted(path.name for path in found)
        names = ", ".join(names[:4] + ([f"... {len(names)} in all"] if len(names) > 4 else []))
        raise RunFolderError(
            f"output_dir {output_dir} holds another run ({names}): resume it with --resume_from_checkpoint latest, "
            "clear it with --overwrite_output_dir, or choose another output_dir."
        )
    for path in found:
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    logger.info("overwrite_output_dir: removed %d files and folders of the earlier run in %s.", len(found), output_dir)
    return None


def check_resume_settings(config: TrainingConfig, checkpoint: Path) -> Dict[str, Tuple[Any, Any]]:
    """The settings that changed since `checkpoint` was saved; raises unless `config.allow_changed_settings`."""
    saved = checkpoint / CONFIG_FILE
    if not saved.is_file():
        logger.warning("%s records no settings (saved by an older version); they cannot be compared.", checkpoint)
        return {}
    changed = config.changed_settings(yaml.safe_load(saved.read_text(encoding="utf-8")) or {})
    if changed and not config.allow_changed_settings:
        listed = "; ".join(f"{key}: {old!r} -> {new!r}" for key, (old, new) in changed.items())
        raise RunFolderError(
            f"{checkpoint} was trained with other settings than this run's ({listed}). Resume with the checkpoint's "
            "settings, or pass --allow_changed_settings to continue with the new ones (they then take effect)."
        )
    return changed


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


def validation_items(config: TrainingConfig) -> List[dict]:
    """The first `num_validation_samples` validation items (fixed across the run)."""
    dataset = build_dataset(config, split="validation")
    return [dataset[index] for index in range(min(config.num_validation_samples, len(dataset)))]


# --------------------------------------------------------------------------------------------------
# Logs and sample videos
# --------------------------------------------------------------------------------------------------


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
        write_atomically(path, "".join(kept))
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


# --------------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------------


@dataclass
class RunState:
    """What a checkpoint must carry besides the weights, so that a resumed run's records cover the whole run."""

    step: int = 0
    samples_seen: int = 0  # this process's samples drawn so far: where its data stream resumes
    train_seconds: float = 0.0
    recent_losses: List[float] = dataclasses.field(default_factory=list)
    bad_files: List[str] = dataclasses.field(default_factory=list)  # unreadable videos skipped, over all processes


class Trainer:
    """One training run. Subclasses build the model and define its loss; this class runs the rest."""

    config_class: Type[TrainingConfig] = TrainingConfig
    name = "train"
    # What a run writes into output_dir besides its checkpoints: a fresh run refuses a folder that holds any of it.
    run_files: Tuple[str, ...] = (TRAIN_LOG, CONFIG_FILE, SUMMARY_FILE, "logs")

    def __init__(self, config: TrainingConfig) -> None:
        self.config = config
        self.output_dir = Path(config.output_dir)
        self.accelerator = accelerator = build_accelerator(config)
        self.lock = RunLock(self.output_dir)
        checkpoint = self._claim_output_dir()
        try:
            set_seed(config.seed)  # the same initial weights on every process
            self.model = self.build_model()
            self.trainable_parameters = self._prepare_optimization()
            self.state = RunState()
            if checkpoint is not None:
                self._resume(checkpoint)
            self.batches = self._training_batches()
            self.nonfinite_streak = 0
            self.last_validation_step, self.last_metrics = -1, {}
            if accelerator.is_main_process:
                tracker_config = {key: value if isinstance(value, (int, float, str, bool)) else str(value)
                                  for key, value in config.to_dict().items()}  # fmt: skip
                accelerator.init_trackers(self.name, config=tracker_config)
        except BaseException:
            self.lock.release()
            raise

    @classmethod
    def main(cls, argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
        """The script's entry point: parse the settings, train, always tear down."""
        trainer = cls(parse_config(cls.config_class, argv))
        try:
            return trainer.train()
        finally:
            trainer.close()

    # ------------------------------------------------------------------------------------- for subclasses

    def build_model(self) -> torch.nn.Module:
        """The module to train (before `accelerator.prepare`)."""
        raise NotImplementedError

    def training_data(self) -> Tuple[Dataset, Callable]:
        """(this process's map-style training dataset, its collate function)."""
        raise NotImplementedError

    def compute_loss(self, batch: Dict[str, Any], generator: torch.Generator) -> Tuple[torch.Tensor, Dict[str, float]]:
        """(loss, extra scalars to log) of one micro-batch; every random draw comes from `generator`."""
        raise NotImplementedError

    def after_update(self) -> Dict[str, float]:
        """Anything to do after each optimizer update (e.g. a discriminator step); returns scalars to log."""
        return {}

    def validate(self) -> Dict[str, float]:
        """Validation on every process (with the EMA weights swapped in); returns metrics to log."""
        return {}

    def save_outputs(self, summary: Dict[str, Any]) -> None:
        """Write the trained weights (and a model card) into output_dir; main process, EMA weights swapped in."""
        raise NotImplementedError

    def prepare_batch(self, batch: Dict[str, Any]) -> Dict[str, Any]:
        """A batch from the data loader, ready for `compute_loss` (e.g. encoded); runs in the main process."""
        return batch

    # ------------------------------------------------------------------------------------- set-up

    def _claim_output_dir(self) -> Optional[Path]:
        """Lock output_dir and check it (main process), then share the outcome with every process."""
        accelerator, outcome = self.accelerator, [None, None]  # [checkpoint, error]
        if accelerator.is_main_process:
            try:
                error = self.lock.acquire()
                if error:
                    raise RunFolderError(error)
                outcome[0] = prepare_output_dir(self.config, self.run_files)
            except (RunFolderError, ValueError) as error:
                self.lock.release()
                outcome[1] = f"{type(error).__name__}: {error}"
        if accelerator.num_processes > 1:
            broadcast_object_list(outcome)
        if outcome[1] is not None:
            kind, message = outcome[1].split(": ", 1)
            raise (ValueError if kind == "ValueError" else RunFolderError)(message)
        return outcome[0]

    def _prepare_optimization(self) -> List[torch.nn.Parameter]:
        config, accelerator = self.config, self.accelerator
        parameters = [p for p in self.model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(
            parameters,
            lr=config.learning_rate,
            betas=(config.adam_beta1, config.adam_beta2),
            weight_decay=config.adam_weight_decay,
            fused=accelerator.device.type == "cuda" and not _is_fsdp(accelerator),
        )
        # The prepared scheduler steps once per process per optimizer step, hence the factors.
        scheduler = get_scheduler(config.lr_scheduler, optimizer, num_cycles=config.lr_num_cycles,
                                  num_warmup_steps=config.lr_warmup_steps * accelerator.num_processes,
                                  num_training_steps=config.max_train_steps * accelerator.num_processes)  # fmt: skip
        self.model, self.optimizer, self.lr_scheduler = accelerator.prepare(self.model, optimizer, scheduler)
        # All parameters, or a LoRA adapter's alone; after `prepare`, which may replace them (FSDP).
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.ema = None
        if config.use_ema:
            self.ema = EMAModel(trainable, decay=config.ema_decay, use_ema_warmup=True, power=config.ema_power,
                                foreach=True)  # fmt: skip
            accelerator.register_for_checkpointing(self.ema)
        return trainable

    def _resume(self, checkpoint: Path) -> None:
        accelerator, config = self.accelerator, self.config
        accelerator.print(f"Resuming from {checkpoint}")
        load_checkpoint(accelerator, checkpoint)
        if self.ema is not None:  # accelerate loads custom states on the CPU
            self.ema.to(accelerator.device)
        state_file = checkpoint / STATE_FILE
        if state_file.is_file():
            self.state = RunState(**json.loads(state_file.read_text(encoding="utf-8")))
        else:  # an older checkpoint: its step is in its name, its data position follows from the batch size
            step = checkpoint_step(checkpoint)
            self.state = RunState(
                step=step, samples_seen=step * config.train_batch_size * config.gradient_accumulation_steps
            )
        # The optimizer and scheduler states bring back the checkpoint's hyper-parameters: the run's own take
        # over (they are the same unless allow_changed_settings let changes through).
        scheduler = self.lr_scheduler.scheduler
        scheduler.base_lrs = [config.learning_rate] * len(scheduler.base_lrs)
        for group, factor in zip(self.optimizer.param_groups, scheduler.lr_lambdas):
            group.update(
                lr=config.learning_rate * factor(scheduler.last_epoch),
                initial_lr=config.learning_rate,
                weight_decay=config.adam_weight_decay,
                betas=(config.adam_beta1, config.adam_beta2),
            )
        scheduler._last_lr = [group["lr"] for group in self.optimizer.param_groups]
        changed = check_resume_settings(config, checkpoint)
        if accelerator.is_main_process:  # the only process that writes the log
            dropped = drop_records_after_step(self.output_dir / TRAIN_LOG, self.state.step)
            if dropped:
                accelerator.print(f"Dropped {dropped} records after step {self.state.step}; those steps run again.")
            append_jsonl(
                self.output_dir / TRAIN_LOG,
                {
                    "step": self.state.step,
                    "resumed_from": checkpoint.name,
                    "changed_settings": {k: list(v) for k, v in changed.items()},
                },
            )

    def _training_batches(self) -> Iterator[Dict[str, Any]]:
        """Batches of this process's data from `state.samples_seen` on, forever."""
        config = self.config
        dataset, collate = self.training_data()
        sampler = ResumableSampler(len(dataset), seed=config.seed, start=self.state.samples_seen, with_epoch=True)
        loader = DataLoader(EpochDataset(dataset), batch_size=config.train_batch_size, sampler=sampler,
                            num_workers=config.dataloader_num_workers, collate_fn=collate,
                            persistent_workers=config.dataloader_num_workers > 0)  # fmt: skip
        return (self.prepare_batch(batch) for batch in loader)

    # ------------------------------------------------------------------------------------- steps

    def _train_step(self) -> Dict[str, Any]:
        """One optimizer step (all its micro-batches); returns the step's log record."""
        accelerator, config, state = self.accelerator, self.config, self.state
        losses, logs, grad_norm = [], {}, None
        for index in range(config.gradient_accumulation_steps):
            batch = next(self.batches)
            state.samples_seen += config.train_batch_size
            state.bad_files.extend(batch.get("skipped_files", ()))
            generator = step_generator(config.seed, accelerator.process_index,
                                       state.step * config.gradient_accumulation_steps + index)  # fmt: skip
            with accelerator.accumulate(self.model):
                loss, logs = self.compute_loss(batch, generator)
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    grad_norm = accelerator.clip_grad_norm_(self.trainable_parameters, config.max_grad_norm)
                    grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm  # FSDP2
            losses.append(loss.detach())
        finite = bool(torch.isfinite(grad_norm))
        # Under fp16 the grad scaler skips non-finite steps itself, and must see them to lower its scale.
        if finite or accelerator.scaler is not None:
            self.optimizer.step()
        self.lr_scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        updated = finite and not accelerator.optimizer_step_was_skipped
        loss = accelerator.reduce(torch.stack(losses).mean(), reduction="mean").item()
        record = {"loss": loss if math.isfinite(loss) else None, "lr": self.lr_scheduler.get_last_lr()[0], **logs}
        if updated:
            if self.ema is not None:
                self.ema.step(self.trainable_parameters)
            self.nonfinite_streak = 0
            record.update(grad_norm=float(grad_norm), **self.after_update())
            state.recent_losses = (state.recent_losses + [loss])[-FINAL_LOSS_WINDOW:]
        state.step += 1
        if not updated:
            self.nonfinite_streak += 1
            record["skipped"] = True
            if accelerator.is_main_process:
                logger.warning("Step %d: non-finite loss or gradients; update skipped (%d in a row).", state.step,
                               self.nonfinite_streak)  # fmt: skip
        return record

    def train(self) -> Dict[str, Any]:
        config, accelerator, state = self.config, self.accelerator, self.state
        progress = tqdm(total=config.max_train_steps, initial=state.step, desc=self.name,
                        disable=not accelerator.is_local_main_process)  # fmt: skip
        self.model.train()
        first_step, session_seconds = state.step, 0.0
        while state.step < config.max_train_steps:
            start = time.perf_counter()
            record = self._train_step()
            seconds = time.perf_counter() - start
            session_seconds, state.train_seconds = session_seconds + seconds, state.train_seconds + seconds
            if record.get("skipped") or state.step % config.logging_steps == 0 or state.step == 1:
                self._log(record)
            progress.update(1)
            progress.set_postfix(loss=_format_loss(record["loss"]),
                                 steps_per_s=f"{(state.step - first_step) / session_seconds:.2f}")  # fmt: skip
            if self.nonfinite_streak >= config.max_nonfinite_steps:
                path = self.save_checkpoint()
                raise NonFiniteLossError(
                    f"{self.nonfinite_streak} steps in a row had non-finite gradients (max_nonfinite_steps="
                    f"{config.max_nonfinite_steps}); stopped at step {state.step} after saving {path}. Lower the "
                    "learning rate or check the data, then resume with --resume_from_checkpoint latest."
                )  # fmt: skip
            if state.step % config.checkpointing_steps == 0:
                self.save_checkpoint()
            if state.step % config.validation_steps == 0 or state.step == config.max_train_steps:
                self._validate(progress)
        progress.close()
        return self._finish()

    def _log(self, record: Dict[str, Any]) -> None:
        if not self.accelerator.is_main_process:
            return
        append_jsonl(self.output_dir / TRAIN_LOG, {"step": self.state.step, **record,
                                                   "seconds": round(self.state.train_seconds, 3)})  # fmt: skip
        scalars = {key: value for key, value in record.items() if isinstance(value, (int, float))}
        self.accelerator.log(scalars, step=self.state.step)

    def _validate(self, progress: Optional[tqdm] = None) -> None:
        with self.ema_weights():
            metrics = self.validate()
        self.last_validation_step = self.state.step
        if metrics:
            self._log(metrics)
            if progress is not None:
                progress.write(f"step {self.state.step}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
        self.last_metrics = metrics

    @contextlib.contextmanager
    def ema_weights(self):
        """The EMA weights in the model for the duration (call on every process)."""
        if self.ema is None:
            yield
            return
        self.ema.store(self.trainable_parameters)
        self.ema.copy_to(self.trainable_parameters)
        try:
            yield
        finally:
            self.ema.restore(self.trainable_parameters)

    def _all_bad_files(self) -> List[str]:
        """The unreadable files every process skipped so far (each named once)."""
        names = self.state.bad_files
        if self.accelerator.num_processes > 1:
            names = [name for part in gather_object([sorted(set(names))]) for name in part]
        return sorted(set(names))

    def save_checkpoint(self) -> Path:
        """A checkpoint of the weights, optimizer, EMA, random states, data position and settings (every process)."""
        state = dataclasses.replace(self.state, bad_files=self._all_bad_files())
        extra = {
            STATE_FILE: json.dumps(dataclasses.asdict(state)),
            CONFIG_FILE: yaml.safe_dump(self.config.to_dict(), sort_keys=False),
        }
        return save_checkpoint(self.accelerator, self.output_dir, self.state.step, self.config.checkpoints_total_limit,
                               extra_files=extra)  # fmt: skip

    def _finish(self) -> Dict[str, Any]:
        accelerator, state = self.accelerator, self.state
        if self.last_validation_step != state.step:  # e.g. resumed at max_train_steps
            self._validate()
        bad_files = self._all_bad_files()
        summary = {"steps": state.step, "final_loss": state.recent_losses[-1] if state.recent_losses else None,
                   MEAN_LOSS_KEY: float(np.mean(state.recent_losses)) if state.recent_losses else None,
                   "train_seconds": round(state.train_seconds, 1),
                   "steps_per_second": round(state.step / max(state.train_seconds, 1e-9), 3),
                   **self.last_metrics}  # fmt: skip
        if self.config.dataset == "video_folder":
            summary["num_bad_video_files"] = len(bad_files)
            if bad_files and accelerator.is_main_process:
                logger.warning("Skipped %d unreadable video(s): %s", len(bad_files), ", ".join(bad_files))
        with self.ema_weights():
            self.export_outputs(summary)
        accelerator.wait_for_everyone()
        return summary

    def export_outputs(self, summary: Dict[str, Any]) -> None:
        """Replace the folder's records, then write weights, settings and summary, in that order (EMA weights in)."""
        if not self.accelerator.is_main_process:
            return
        for name in (SUMMARY_FILE, CONFIG_FILE):  # never a record beside weights it does not describe
            (self.output_dir / name).unlink(missing_ok=True)
        self.save_outputs(summary)
        save_config(self.config, self.output_dir)
        write_atomically(self.output_dir / SUMMARY_FILE, json.dumps(summary, indent=1))
        append_jsonl(self.output_dir / TRAIN_LOG, {"step": self.state.step, "summary": summary})
        self.accelerator.print(f"Saved {self.output_dir}: {summary}")

    def close(self) -> None:
        """Release the folder, the trackers and the (DDP) model; dropping the model before the process group goes
        avoids a sporadic gloo abort at exit."""
        self.lock.release()
        accelerator = self.accelerator
        for name in ("model", "optimizer", "lr_scheduler", "ema", "batches"):
            self.__dict__.pop(name, None)
        accelerator.free_memory()
        gc.collect()
        accelerator.end_training()


def _is_fsdp(accelerator: Accelerator) -> bool:
    return accelerator.distributed_type == DistributedType.FSDP


def _format_loss(loss: Optional[float]) -> str:
    return "nan" if loss is None else f"{loss:.4f}"
