"""glibc malloc settings for CPU training and sampling loops (Linux)."""

import ctypes
import os
import sys
from typing import Dict

# glibc's mallopt parameters (malloc.h) and its largest allowed mmap threshold on 64-bit systems.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_GLIBC_MAX_MMAP_THRESHOLD = 32 * 2**20
_NEVER_TRIM = 2**31 - 1  # mallopt takes an int


def _chooses_malloc(name: str, value: str) -> bool:
    """Whether an environment variable sets glibc's malloc (`MALLOC_*`, `glibc.malloc` tunables) or preloads another."""
    if not value:
        return False
    return name.startswith("MALLOC_") or name == "LD_PRELOAD" or (name == "GLIBC_TUNABLES" and "glibc.malloc." in value)


def environment_without_malloc_settings() -> Dict[str, str]:
    """`os.environ` without the variables that choose malloc settings: a child process started with it gets
    glibc's defaults."""
    return {name: value for name, value in os.environ.items() if not _chooses_malloc(name, value)}


def keep_freed_cpu_memory() -> bool:
    """Make glibc's malloc keep freed memory for the next training step instead of returning it to the OS.

    By default glibc maps large blocks (from 128 KiB, raised as blocks are freed) straight from the OS and
    trims its heap when the top of it is free, so every training step faults in its activations and
    gradients page by page again. Kept, the built-in model's training steps on 2 CPU cores run 1.16x (VAE)
    and 1.10x (DiT) as fast at the same peak memory (`benchmarks/bench_cpu_malloc.py`). Process-wide, so the
    library never calls it; the training scripts do, on CPU, and so may your own CPU loops. Does nothing, and
    returns False, off Linux, without glibc, or when the environment chooses an allocator or malloc settings
    (`MALLOC_*_` variables, `glibc.malloc` tunables, `LD_PRELOAD`).
    """
    user_settings = any(_chooses_malloc(name, value) for name, value in os.environ.items())
    if not sys.platform.startswith("linux") or user_settings:
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # musl and other C libraries
        return False
    # mallopt returns 1 on success, 0 on an unsupported value.
    return bool(mallopt(_M_MMAP_THRESHOLD, _GLIBC_MAX_MMAP_THRESHOLD) and mallopt(_M_TRIM_THRESHOLD, _NEVER_TRIM))
