"""Wall time and peak memory of a phase: CUDA allocator peak on GPU, peak RSS above baseline on CPU.

On CUDA the peak is taken per device the model lives on (a model spread by a device map uses
several): `PhaseStats.per_device` maps "cuda:i" to its peak above its baseline, `peak_bytes` is their sum.

On CPU the peak is the larger of a sampled RSS and the kernel's high-water mark (reset at the start
of the phase through /proc/self/clear_refs where Linux allows it), after returning freed heap pages
to the OS so the baseline is the memory really in use.
"""

from __future__ import annotations

import ctypes
import gc
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import psutil
import torch


@dataclass
class PhaseStats:
    seconds: float = 0.0
    peak_bytes: int = 0  # on CUDA: the sum over `per_device`
    mem_kind: str = "cpu_rss_sampled"
    per_device: dict[str, int] = field(default_factory=dict)  # CUDA only: "cuda:i" -> peak bytes above baseline


def _release_freed_memory() -> None:
    """Return freed heap pages to the OS so a phase's RSS baseline is not inflated by an earlier phase.

    Without this, memory freed by a previous run in the same process (a sweep) is reused without
    raising the RSS, and later phases read as using almost nothing.
    """
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: the sampled peak is then a lower bound
        pass


def _reset_hiwater() -> bool:
    """Reset the kernel's peak-RSS counter (VmHWM) for this process; False where unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _hiwater() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def cuda_devices(devices: torch.device | Sequence[torch.device]) -> list[torch.device]:
    """The distinct CUDA devices among `devices` (a bare "cuda" is the current one), in index order."""
    seq = [devices] if isinstance(devices, torch.device) else list(devices)
    found = {torch.device("cuda", d.index if d.index is not None else torch.cuda.current_device())
             for d in seq if d.type == "cuda"}
    return sorted(found, key=lambda d: d.index)


@contextmanager
def measure(devices: torch.device | Sequence[torch.device], interval_s: float = 0.005) -> Iterator[PhaseStats]:
    """Time the block and record its peak memory above the level at entry (per CUDA device, or the process RSS)."""
    stats = PhaseStats()
    gpus = cuda_devices(devices)
    if gpus:  # only the devices given (the model's): touching the others would create a CUDA context on each
        stats.mem_kind = "cuda_max_allocated"
        for d in gpus:
            _sync(d)
        base = {d: torch.cuda.memory_allocated(d) for d in gpus}
        for d in gpus:
            torch.cuda.reset_peak_memory_stats(d)
        t0 = time.perf_counter()
        try:
            yield stats
        finally:
            for d in gpus:
                _sync(d)
            stats.seconds = time.perf_counter() - t0
            stats.per_device = {str(d): int(torch.cuda.max_memory_allocated(d) - base[d]) for d in gpus}
            stats.peak_bytes = sum(stats.per_device.values())
        return
    _release_freed_memory()
    proc = psutil.Process()
    exact = _reset_hiwater()
    base = proc.memory_info().rss
    peak = [base]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], proc.memory_info().rss)
            stop.wait(interval_s)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    t0 = time.perf_counter()
    try:
        yield stats
    finally:
        stats.seconds = time.perf_counter() - t0
        stop.set()
        th.join()
        peak[0] = max(peak[0], proc.memory_info().rss)
        if exact:  # the kernel's high-water mark also sees peaks shorter than the sampling interval
            peak[0] = max(peak[0], _hiwater())
        stats.peak_bytes = int(peak[0] - base)


def per_device_fields(prepare: PhaseStats, edit: PhaseStats) -> dict[str, Any]:
    """The row's per-device peaks on CUDA (`peak_mem_per_device`); nothing on CPU, whose rows stay as they were."""
    if not (prepare.per_device or edit.per_device):
        return {}
    return {"peak_mem_per_device": {"prepare": dict(prepare.per_device), "edit": dict(edit.per_device)}}
