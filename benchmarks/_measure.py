"""Timing and memory helpers shared by the benchmark scripts.

- Time: every candidate runs `warmup` times, then `repeats` times interleaved with the others
  (A B, B A, A B, ...), so that a background load drifting during the run hits all of them
  alike. Report the median, and for a pair the median of the per-repeat ratios.
- Memory: on CUDA, the growth of `torch.cuda.max_memory_allocated` over the allocated memory
  before the call. On CPU, the growth of the process's peak resident set size (VmHWM, reset
  through /proc/self/clear_refs just before the call) over its RSS before it. Freed memory that
  the process still holds would be reused without showing up, so CPU numbers come from a worker
  subprocess (`run_worker`) started with glibc's mmap threshold pinned (every tensor of 128 KiB
  or more is mmapped, and unmapped when freed), and `malloc_trim` gives the free heap pages back
  to the OS before every measurement. Then a measurement reads the same after earlier ones in
  the same process as in a fresh one, and counts the tensors' pages rather than allocator slack.
"""

import ctypes
import ctypes.util
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from nanoi2v_diffusers.cpu_malloc import environment_without_malloc_settings

MIB = 2**20
KIB = 2**10
# Allocations from this size up are mmapped (see the module docstring); pinning the threshold also
# turns off glibc's dynamic raising of it, which is what makes freed memory stay in the heap.
WORKER_MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": str(128 * KIB), "MALLOC_TRIM_THRESHOLD_": str(128 * KIB)}
_PROC_STATUS = Path("/proc/self/status")
_CLEAR_REFS_RESET_PEAK = "5"  # /proc/self/clear_refs: reset the peak RSS to the current RSS


# --------------------------------------------------------------------------------------------------
# Memory
# --------------------------------------------------------------------------------------------------


def _proc_status_kib(field: str) -> Optional[int]:
    if not _PROC_STATUS.exists():
        return None
    for line in _PROC_STATUS.read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return None


def rss_now_bytes() -> int:
    """Current resident set size (Linux /proc only)."""
    kib = _proc_status_kib("VmRSS")
    if kib is None:
        raise RuntimeError("VmRSS is not available: CPU memory measurement needs Linux /proc.")
    return kib * KIB


def rss_peak_bytes() -> int:
    """Peak resident set size since the last `reset_rss_peak`: VmHWM on Linux, else ru_maxrss."""
    kib = _proc_status_kib("VmHWM")
    if kib is None:
        import resource

        kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, not resettable
    return kib * KIB


def reset_rss_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text(_CLEAR_REFS_RESET_PEAK)
        return True
    except OSError:
        return False


def release_free_heap() -> None:
    """Collect garbage and return the C heap's free pages to the OS (glibc `malloc_trim`; elsewhere a no-op)."""
    gc.collect()
    libc_name = ctypes.util.find_library("c")
    if libc_name is None:
        return
    malloc_trim = getattr(ctypes.CDLL(libc_name), "malloc_trim", None)
    if malloc_trim is not None:
        malloc_trim(0)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class PeakMemory:
    """Context manager: `growth_mib` is the peak memory above the level at entry.

    >>> with PeakMemory(device) as memory:
    ...     model(x)
    >>> memory.growth_mib
    """

    def __init__(self, device: torch.device):
        self.device = torch.device(device)
        self.growth_mib = float("nan")

    def __enter__(self) -> "PeakMemory":
        synchronize(self.device)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self._before = torch.cuda.memory_allocated(self.device)
        else:
            release_free_heap()
            reset_rss_peak()
            self._before = rss_now_bytes()
        return self

    def __exit__(self, *exc) -> None:
        synchronize(self.device)
        if self.device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(self.device)
        else:
            peak = rss_peak_bytes()
        self.growth_mib = (peak - self._before) / MIB


def saved_activation_bytes(
    forward: Callable[[], object], exclude: Sequence[torch.Tensor] = (), label: Callable[[], str] = lambda: "total"
) -> Dict[str, int]:
    """Bytes of the distinct tensors autograd keeps for backward during `forward()`, each storage once and
    those of `exclude` (the parameters) not at all, grouped by `label()` at the time a storage was first saved."""
    excluded = {tensor.untyped_storage().data_ptr() for tensor in exclude}
    seen, by_label = set(), {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in excluded and storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            key = label()
            by_label[key] = by_label.get(key, 0) + storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        forward()
    return by_label


def measure_peak_mib(fn: Callable[[], object], device: torch.device) -> float:
    """Peak memory growth of one call of `fn`, in MiB; its result is dropped before returning."""
    with PeakMemory(device) as memory:
        fn()
    return memory.growth_mib


def run_worker(script: str, args: Sequence[str], timeout: Optional[float] = None, pin_malloc: bool = True) -> dict:
    """Run `python script --worker *args` in a fresh process and parse the JSON on its last stdout line.

    With `pin_malloc` the worker gets `WORKER_MALLOC_ENV` (for memory measurements); without it, glibc's own
    defaults: the environment's malloc settings and preloaded allocators are left out."""
    command = [sys.executable, script, "--worker", *map(str, args)]
    if pin_malloc:
        env = {**os.environ, **WORKER_MALLOC_ENV}
    else:
        env = environment_without_malloc_settings()
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=timeout)
    if result.returncode != 0:
        raise RuntimeError(f"Worker {' '.join(command)} failed (exit {result.returncode}):\n{result.stderr[-4000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------------------------------
# Time
# --------------------------------------------------------------------------------------------------


def time_interleaved(
    candidates: Dict[str, Callable[[], object]], repeats: int, warmup: int, device: torch.device
) -> Dict[str, List[float]]:
    """Seconds per call of each candidate: `warmup` untimed calls each, then `repeats` timed calls,
    interleaved, with the order reversed every other round."""
    device = torch.device(device)
    names = list(candidates)
    for _ in range(warmup):
        for name in names:
            candidates[name]()
    times: Dict[str, List[float]] = {name: [] for name in names}
    for round_index in range(repeats):
        for name in names if round_index % 2 == 0 else reversed(names):
            synchronize(device)
            start = time.perf_counter()
            candidates[name]()
            synchronize(device)
            times[name].append(time.perf_counter() - start)
    return times


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def paired_ratio(numerator: Sequence[float], denominator: Sequence[float]) -> float:
    """Median over repeats of numerator_i / denominator_i: each pair ran back to back, under the same load."""
    return median([a / b for a, b in zip(numerator, denominator)])


# --------------------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------------------

Column = Tuple[str, str, str]  # (header, row key, format spec such as ".2f"; "" for str())


def markdown_table(rows: Sequence[dict], columns: Sequence[Column]) -> str:
    """A GitHub markdown table; text columns are left-aligned, numbers right-aligned."""
    header = "| " + " | ".join(title for title, _, _ in columns) + " |"
    rule = "|" + "|".join("---" if not spec else "---:" for _, _, spec in columns) + "|"
    lines = [header, rule]
    for row in rows:
        cells = []
        for _, key, spec in columns:
            value = row.get(key)
            cells.append("-" if value is None else format(value, spec))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _cpu_name() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "cpu"


def environment_info(device: torch.device, threads: int) -> dict:
    """What the numbers depend on, saved beside them."""
    import diffusers

    device = torch.device(device)
    info = {
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name(),
        "threads": threads,
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "python": platform.python_version(),
    }
    if hasattr(os, "getloadavg"):
        info["load_average_at_start"] = os.getloadavg()[0]
    return info


def write_json(path: Path, meta: dict, rows: Sequence[dict]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"meta": meta, "rows": list(rows)}, indent=2))


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"
