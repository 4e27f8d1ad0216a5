"""Data order that depends on (seed, position) only, so that a training run resumed anywhere reads exactly the
clips an uninterrupted run would have read, in every process and every DataLoader worker."""

from typing import Any, Iterator, List, Tuple

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler, Subset


class ResumableSampler(Sampler[int]):
    """Endless dataset indices whose order is a function of (seed, position) only.

    Epoch `e` is a permutation of `range(num_samples)` drawn from `(seed, e)` (or the identity when
    `shuffle=False`); iteration starts at position `start` of that endless stream. A run resumed after
    k samples with `start = k` therefore reads exactly the clips an uninterrupted run would have read,
    with no need to replay or store the data loader's state.
    """

    def __init__(self, num_samples: int, seed: int = 0, start: int = 0, shuffle: bool = True,
                 with_epoch: bool = False) -> None:  # fmt: skip
        if num_samples < 1:
            raise ValueError(f"ResumableSampler needs a non-empty dataset; got num_samples={num_samples}.")
        if start < 0:
            raise ValueError(f"start must be >= 0; got {start}.")
        self.num_samples, self.seed, self.start, self.shuffle = num_samples, seed, start, shuffle
        self.with_epoch = with_epoch  # yield (epoch, index), for `EpochDataset`

    def epoch_order(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(self.num_samples)
        return np.random.default_rng([self.seed, epoch]).permutation(self.num_samples)

    def __iter__(self) -> Iterator[int]:
        epoch, offset = divmod(self.start, self.num_samples)
        while True:
            for index in self.epoch_order(epoch)[offset:]:
                yield (epoch, int(index)) if self.with_epoch else int(index)
            epoch, offset = epoch + 1, 0


class EpochDataset(Dataset):
    """Items by `(epoch, index)`: tells a dataset with random augmentation (`set_epoch`) the epoch of each item
    in the process that loads it, a DataLoader worker included."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset
        inner = dataset
        while isinstance(inner, Subset):
            inner = inner.dataset
        self.augmented = hasattr(inner, "set_epoch")
        self.inner = inner

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: Tuple[int, int]) -> Any:
        epoch, index = key
        if self.augmented:
            self.inner.set_epoch(epoch)
        return self.dataset[index]

    def __getitems__(self, keys: List[Tuple[int, int]]) -> List[Any]:
        if self.augmented or not hasattr(self.dataset, "__getitems__"):
            return [self[key] for key in keys]
        return self.dataset.__getitems__([index for _, index in keys])  # datasets.Dataset: the rows at once


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


def step_generator(seed: int, rank: int, micro_step: int) -> torch.Generator:
    """The CPU generator of one micro-step of one process: all of its random draws depend on these three only."""
    state = np.random.SeedSequence([seed, rank, micro_step]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


__all__ = ["EpochDataset", "ResumableSampler", "shard_dataset", "step_generator"]
