"""Datasets of real videos: a video folder and a Hugging Face `datasets` dataset, decoded with PyAV.

Both return the item layout of `ShapesDataset` (`pixel_values` `(C, T, H, W)` in [-1, 1] and
`caption`) and share one fault-tolerant loader: a file that raises `VideoDecodeError` is skipped
(the next index is used, deterministically), remembered, counted and logged once, and the run
stops with a clear `RuntimeError` only once bad files pass `max_bad_fraction`.
"""

import csv
import io
import json
import logging
import os
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from .video_io import (
    VIDEO_SUFFIXES,
    VideoDecodeError,
    VideoSource,
    _check_sampling_args,
    load_video,
    read_video_frames,
)

logger = logging.getLogger(__name__)

METADATA_FILES = ("metadata.jsonl", "metadata.csv")
FILE_NAME_COLUMN = "file_name"
CAPTION_SUFFIX = ".txt"
# Files a `load_from_disk` folder holds (a Dataset and a DatasetDict respectively).
_SAVED_DATASET_MARKERS = ("state.json", "dataset_dict.json")

_UNTRIED, _GOOD, _BAD = 0, 1, 2


class _FaultTolerantVideoDataset(Dataset):
    """Decoding, sampling, flipping and bad-file bookkeeping shared by the real-video datasets.

    Subclasses give `__len__`, `_entry_name(index)`, `_video_source(index)` and `_caption(index)`.
    The bookkeeping is per process: each DataLoader worker counts the bad files it meets; call
    `scan()` first to find all of them up front.
    """

    # Below this many distinct files tried, the bad fraction is measured against the whole
    # dataset instead, so that a bad file among the very first ones does not abort a run.
    min_files_for_bad_fraction = 20

    def __init__(self, num_frames, height, width, stride, fps, random_flip, max_bad_fraction, seed):
        if num_frames is None:
            raise ValueError("num_frames must be set: items of one batch need the same length.")
        _check_sampling_args(num_frames, stride, fps, 0)
        if height < 1 or width < 1:
            raise ValueError(f"height and width must be >= 1, got {height} x {width}.")
        if not 0.0 <= max_bad_fraction <= 1.0:
            raise ValueError(f"max_bad_fraction must be in [0, 1], got {max_bad_fraction}.")
        self.num_frames, self.height, self.width = num_frames, height, width
        self.stride, self.fps = stride, fps
        self.random_flip = random_flip
        self.max_bad_fraction = max_bad_fraction
        self.seed = seed
        self.epoch = 0
        self._status: Optional[np.ndarray] = None  # per entry: untried / good / bad
        self._bad_reasons: Dict[int, str] = {}

    # --- bookkeeping

    @property
    def num_bad_files(self) -> int:
        return len(self._bad_reasons)

    @property
    def bad_files(self) -> List[str]:
        """Names of the files found unreadable so far, in dataset order."""
        return [self._entry_name(index) for index in sorted(self._bad_reasons)]

    def set_epoch(self, epoch: int) -> None:
        """Re-draw the random flips: they depend on (seed, epoch, index) only, so runs and resumes repeat."""
        self.epoch = epoch

    def _statuses(self) -> np.ndarray:
        if self._status is None:
            self._status = np.full(len(self), _UNTRIED, dtype=np.int8)
        return self._status

    def _mark_bad(self, index: int, error: VideoDecodeError) -> None:
        self._statuses()[index] = _BAD
        self._bad_reasons[index] = str(error)
        logger.warning("Skipping unreadable video (%d so far): %s", self.num_bad_files, error)

    def _check_bad_fraction(self) -> None:
        status = self._statuses()
        tried = int(np.count_nonzero(status != _UNTRIED))
        bad = self.num_bad_files
        measured_over = tried if tried >= self.min_files_for_bad_fraction else len(self)
        if bad / measured_over > self.max_bad_fraction:
            raise RuntimeError(
                f"{bad} of {tried} video files tried ({len(self)} in the dataset) could not be decoded, "
                f"more than max_bad_fraction={self.max_bad_fraction} of {measured_over}; last: "
                f"{self._bad_reasons[max(self._bad_reasons)]}. Each skipped file was logged above; replace or remove "
                "them, or raise max_bad_fraction."
            )

    # --- items

    def __getitem__(self, index: int) -> dict:
        size = len(self)
        if not -size <= index < size:
            raise IndexError(f"index {index} out of range for a dataset of {size} videos.")
        known_bad = set(self._bad_reasons)
        used, pixel_values = self._first_readable(index % size)
        if self.random_flip and self._flips(used):
            pixel_values = pixel_values.flip(-1)  # horizontal only: time is never augmented
        # The files found bad while loading this item travel with it: a DataLoader worker's counts stay in the worker.
        skipped = [self._entry_name(bad) for bad in sorted(set(self._bad_reasons) - known_bad)]
        return {"pixel_values": pixel_values, "caption": self._caption(used), "file_name": self._entry_name(used),
                "skipped_files": skipped}  # fmt: skip

    def _first_readable(self, index: int) -> Tuple[int, torch.Tensor]:
        """Decode entry `index`, or the next readable one after it (wrapping around)."""
        status = self._statuses()
        for offset in range(len(self)):
            candidate = (index + offset) % len(self)
            if status[candidate] == _BAD:
                continue
            try:
                pixel_values = load_video(
                    self._video_source(candidate),
                    num_frames=self.num_frames,
                    height=self.height,
                    width=self.width,
                    stride=self.stride,
                    fps=self.fps,
                )
            except VideoDecodeError as error:
                self._mark_bad(candidate, error)
                self._check_bad_fraction()
                continue
            status[candidate] = _GOOD
            return candidate, pixel_values
        first_error = next(iter(self._bad_reasons.values()))
        raise RuntimeError(f"None of the {len(self)} videos could be decoded; first error: {first_error}")

    def _flips(self, index: int) -> bool:
        return bool(np.random.default_rng([self.seed, self.epoch, index]).random() < 0.5)

    def scan(self) -> List[str]:
        """Decode every file once (without resizing) and return the names of the unreadable ones.

        Bad files found here are skipped later without another try; nothing is raised.
        """
        status = self._statuses()
        for index in tqdm(range(len(self)), desc="Scanning videos", unit="video"):
            if status[index] != _UNTRIED:
                continue
            try:
                read_video_frames(
                    self._video_source(index), num_frames=self.num_frames, stride=self.stride, fps=self.fps
                )
                status[index] = _GOOD
            except VideoDecodeError as error:
                self._mark_bad(index, error)
        return self.bad_files

    # --- what subclasses provide

    def _entry_name(self, index: int) -> str:
        raise NotImplementedError

    def _video_source(self, index: int) -> VideoSource:
        raise NotImplementedError

    def _caption(self, index: int) -> str:
        raise NotImplementedError


# ----------------------------------------------------------------------------- video folder


class VideoFolderDataset(_FaultTolerantVideoDataset):
    """Videos in a folder, with captions from one of two layouts:

    - `metadata.jsonl` or `metadata.csv` with `file_name` and `text` columns (the layout of
      `datasets`' videofolder); `file_name` is relative to `root` and may not leave it;
    - no metadata file: every video (mp4, webm, mkv, gif, mov) under `root`, each captioned by a
      same-named `.txt` file next to it (video-diffusion-pytorch); a missing `.txt` gives "".

    Items: `{"pixel_values": (C, T, H, W) float32 in [-1, 1], "caption": str, "file_name": str}`.
    `random_flip` flips horizontally with probability 1/2 (see `set_epoch`).
    """

    def __init__(
        self,
        root: Union[str, os.PathLike],
        num_frames: int,
        height: int,
        width: int,
        stride: int = 1,
        fps: Optional[float] = None,
        random_flip: bool = False,
        max_bad_fraction: float = 0.5,
        seed: int = 0,
        caption_column: str = "text",
    ):
        super().__init__(num_frames, height, width, stride, fps, random_flip, max_bad_fraction, seed)
        self.root = Path(root)
        if not self.root.is_dir():
            raise ValueError(f"Video folder {str(self.root)!r} does not exist or is not a folder.")
        self.entries: List[Tuple[str, str]] = _folder_entries(self.root, caption_column)

    def __len__(self) -> int:
        return len(self.entries)

    def _entry_name(self, index: int) -> str:
        return self.entries[index][0]

    def _video_source(self, index: int) -> VideoSource:
        return self.root / self.entries[index][0]

    def _caption(self, index: int) -> str:
        return self.entries[index][1]


def _folder_entries(root: Path, caption_column: str) -> List[Tuple[str, str]]:
    """(relative file name, caption) for every video of the folder, in a fixed order."""
    found = [name for name in METADATA_FILES if (root / name).is_file()]
    if len(found) > 1:
        raise ValueError(f"{root} holds both {found[0]} and {found[1]}; keep one metadata file.")
    if found:
        metadata = root / found[0]
        rows = _read_jsonl(metadata) if metadata.suffix == ".jsonl" else _read_csv(metadata)
        entries = [_metadata_entry(row, where, caption_column) for where, row in rows]
    else:
        entries = _captioned_videos(root)
    if not entries:
        raise ValueError(
            f"No videos found in {root} (looked for {', '.join(VIDEO_SUFFIXES)} or {' / '.join(METADATA_FILES)})."
        )
    return entries


def _read_jsonl(path: Path) -> List[Tuple[str, dict]]:
    rows = []
    for line_number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}, line {line_number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{where}: not valid JSON ({err}).") from err
        if not isinstance(row, dict):
            raise ValueError(f"{where}: expected a JSON object, got {type(row).__name__}.")
        rows.append((where, row))
    return rows


def _read_csv(path: Path) -> List[Tuple[str, dict]]:
    with open(path, newline="", encoding="utf-8") as handle:
        # Line 1 is the header, so data rows start at line 2.
        return [(f"{path}, line {number}", row) for number, row in enumerate(csv.DictReader(handle), start=2)]


def _metadata_entry(row: dict, where: str, caption_column: str) -> Tuple[str, str]:
    for column in (FILE_NAME_COLUMN, caption_column):
        if column not in row:
            raise ValueError(f"{where}: missing the {column!r} column (has {sorted(row)}).")
    caption = row[caption_column]
    return _safe_relative_path(row[FILE_NAME_COLUMN], where), "" if caption is None else str(caption)


def _safe_relative_path(file_name, where: str) -> str:
    """`file_name` as a normalised relative POSIX path; absolute paths and `..` escapes raise."""
    if not isinstance(file_name, str) or not file_name.strip():
        raise ValueError(f"{where}: file_name must be a non-empty relative path, got {file_name!r}.")
    posix = file_name.replace("\\", "/")
    if PurePosixPath(posix).is_absolute() or PureWindowsPath(file_name).drive:
        raise ValueError(
            f"{where}: file_name {file_name!r} is an absolute path; it must be relative to the dataset folder."
        )
    normalised = os.path.normpath(posix).replace(os.sep, "/")
    if normalised == ".." or normalised.startswith("../"):
        raise ValueError(f"{where}: file_name {file_name!r} points outside the dataset folder.")
    return normalised


def _captioned_videos(root: Path) -> List[Tuple[str, str]]:
    entries = []
    missing_captions = 0
    for video in sorted(
        p for p in root.rglob("*") if p.suffix.lower() in VIDEO_SUFFIXES and not p.name.startswith(".")
    ):
        caption_file = video.with_suffix(CAPTION_SUFFIX)
        if caption_file.is_file():
            caption = caption_file.read_text(encoding="utf-8").strip()
        else:
            caption, missing_captions = "", missing_captions + 1
        entries.append((video.relative_to(root).as_posix(), caption))
    if missing_captions:
        logger.warning(
            "%d of %d videos in %s have no %s caption file; their caption is empty.",
            missing_captions,
            len(entries),
            root,
            CAPTION_SUFFIX,
        )
    return entries


# ----------------------------------------------------------------------------- Hugging Face datasets


class HFVideoDataset(_FaultTolerantVideoDataset):
    """A Hugging Face `datasets` dataset with a video column and a caption column.

    `dataset` is a `datasets.Dataset` / `DatasetDict`, a `save_to_disk` folder, a local data
    folder (e.g. a videofolder layout, read with `load_dataset`) or a Hub id (also `load_dataset`).
    The video column holds file paths (relative ones are taken from the local dataset folder) or
    `{"path", "bytes"}` dicts; a `Video` feature is cast to `Video(decode=False)` and decoded with
    PyAV (torchcodec, which `datasets` decodes with, is not needed). Items as `VideoFolderDataset`.
    """

    def __init__(
        self,
        dataset,
        num_frames: int,
        height: int,
        width: int,
        video_column: str = "video",
        caption_column: str = "text",
        split: str = "train",
        stride: int = 1,
        fps: Optional[float] = None,
        random_flip: bool = False,
        max_bad_fraction: float = 0.5,
        seed: int = 0,
        cache_dir: Optional[str] = None,
    ):
        super().__init__(num_frames, height, width, stride, fps, random_flip, max_bad_fraction, seed)
        self.base_dir = Path(dataset) if isinstance(dataset, (str, os.PathLike)) and Path(dataset).is_dir() else None
        table = _load_hf_dataset(dataset, split, cache_dir)
        missing = [column for column in (video_column, caption_column) if column not in table.column_names]
        if missing:
            raise ValueError(f"Dataset has no column(s) {missing}; its columns are {table.column_names}.")
        self.video_column, self.caption_column = video_column, caption_column
        self.table = _undecoded(table.select_columns([video_column, caption_column]), video_column)
        self._last_row: Tuple[int, Optional[dict]] = (-1, None)  # an item reads its row up to 3 times

    def __len__(self) -> int:
        return len(self.table)

    def _row(self, index: int) -> dict:
        if self._last_row[0] != index:
            self._last_row = (index, self.table[int(index)])
        return self._last_row[1]

    def _entry_name(self, index: int) -> str:
        return _row_name(index, self._row(index)[self.video_column])

    def _video_source(self, index: int) -> VideoSource:
        value = self._row(index)[self.video_column]
        name = _row_name(index, value)
        if isinstance(value, dict):
            if value.get("bytes"):
                return _named_bytes(value["bytes"], name)
            value = value.get("path")
        if isinstance(value, (bytes, bytearray)):
            return _named_bytes(value, name)
        if not isinstance(value, str) or not value:
            raise VideoDecodeError(f"{name}: no video path or bytes in column {self.video_column!r}")
        path = Path(value)
        return self.base_dir / path if self.base_dir is not None and not path.is_absolute() else path

    def _caption(self, index: int) -> str:
        caption = self._row(index)[self.caption_column]
        return "" if caption is None else str(caption)


def _load_hf_dataset(dataset, split: str, cache_dir: Optional[str]):
    import datasets

    if isinstance(dataset, (str, os.PathLike)):
        local = Path(dataset)
        if local.is_dir() and any((local / marker).is_file() for marker in _SAVED_DATASET_MARKERS):
            dataset = datasets.load_from_disk(str(local))
        else:
            dataset = datasets.load_dataset(str(dataset), split=split, cache_dir=cache_dir)
    if isinstance(dataset, datasets.DatasetDict):
        if split not in dataset:
            raise ValueError(f"Dataset has no split {split!r}; its splits are {list(dataset)}.")
        dataset = dataset[split]
    if not isinstance(dataset, datasets.Dataset):
        raise ValueError(
            f"Expected a datasets.Dataset, a DatasetDict, a local path or a Hub id; got {type(dataset).__name__}."
        )
    return dataset


def _undecoded(table, video_column: str):
    """Cast a `Video` column to `Video(decode=False)`: rows then hold {"path", "bytes"} dicts."""
    import datasets

    if isinstance(table.features[video_column], datasets.Video):
        table = table.cast_column(video_column, datasets.Video(decode=False))
    return table


def _row_name(index: int, value) -> str:
    """Row label for messages: `row 3`, or `row 3 (clip.mp4)` when the row names its file."""
    path = value.get("path") if isinstance(value, dict) else value if isinstance(value, str) else None
    return f"row {index}" + (f" ({path})" if path else "")


def _named_bytes(data: bytes, name: str) -> io.BytesIO:
    buffer = io.BytesIO(data)
    buffer.name = name  # read errors then name the dataset row, not "<file object>"
    return buffer


# ----------------------------------------------------------------------------- batching


def collate_videos(batch: Sequence[dict]) -> dict:
    """Stack items into `{"pixel_values": (B, C, T, H, W), "captions": list[str]}` for a DataLoader (plus
    `skipped_files`, the unreadable files met while loading them, for items that report them)."""
    if not batch:
        raise ValueError("Cannot collate an empty batch.")
    shapes = sorted({tuple(item["pixel_values"].shape) for item in batch})
    if len(shapes) > 1:
        raise ValueError(f"Videos in a batch must share one (C, T, H, W) shape, got {shapes}.")
    return {
        "pixel_values": torch.stack([item["pixel_values"] for item in batch]),
        "captions": [item["caption"] for item in batch],
        "skipped_files": [name for item in batch for name in item.get("skipped_files", ())],
    }


__all__ = ["HFVideoDataset", "VideoFolderDataset", "collate_videos"]
