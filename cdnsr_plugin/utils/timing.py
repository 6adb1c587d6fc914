"""Wall time (CUDA synchronised) and peak memory of a block of work: the tester's and the benchmark's clock."""
from __future__ import annotations

import os
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Optional

import torch


def synchronize(device: torch.device) -> None:
    """Wait for queued CUDA work, so that wall-clock times cover it; nothing on the CPU."""
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def _rss_mb() -> Optional[float]:
    try:
        with open('/proc/self/statm', encoding='ascii') as handle:
            return int(handle.read().split()[1]) * os.sysconf('SC_PAGE_SIZE') / 2**20
    except (OSError, ValueError, IndexError):
        return None


@dataclass
class Measurement:
    """Wall time and peak memory of a block; filled in by ``measure`` when the block ends."""

    seconds: float = 0.0
    peak_memory_mb: Optional[float] = None
    memory_kind: str = ''


@contextmanager
def measure(device: torch.device, interval: float = 0.005) -> Iterator[Measurement]:
    """Time a block (CUDA synchronised) and record its peak memory.

    On CUDA: ``torch.cuda.max_memory_allocated`` (tensors), reset at entry. On the CPU: the process's
    peak resident set size while the block ran (what a user's machine must have), sampled from
    ``/proc/self/statm`` every ``interval`` s by a background thread; ``None`` where /proc is missing.
    """
    result = Measurement()
    stop = threading.Event()
    peak = [_rss_mb()]

    def sample() -> None:
        while not stop.wait(interval):
            value = _rss_mb()
            if value is not None and (peak[0] is None or value > peak[0]):
                peak[0] = value

    sampler = None
    if device.type == 'cuda':
        torch.cuda.reset_peak_memory_stats(device)
        result.memory_kind = 'cuda_allocated'
    elif peak[0] is not None:
        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        result.memory_kind = 'process_rss'
    synchronize(device)
    start = time.perf_counter()
    try:
        yield result
    finally:
        synchronize(device)
        result.seconds = time.perf_counter() - start
        stop.set()
        if sampler is not None:
            sampler.join()
            final = _rss_mb()
            result.peak_memory_mb = max(v for v in (peak[0], final) if v is not None)
        elif device.type == 'cuda':
            result.peak_memory_mb = torch.cuda.max_memory_allocated(device) / 2**20
