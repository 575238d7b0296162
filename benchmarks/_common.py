"""Shared by the benchmarks: timing that survives a shared machine, peak memory, the header.

Wall-clock time is what users feel, but on a shared 2-core machine it swings with
whatever else runs; the CPU time a call consumes (all threads, user + system) is
far steadier, so every benchmark reports both and a ratio for each.
"""

from __future__ import annotations

import os
import platform
import resource
import time

import numpy as np


def cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def timed(fn, repeats: int = 1, pause: float = 0.5) -> tuple[float, float]:
    """Median ``(wall seconds, CPU seconds)`` per call of ``fn`` over ``repeats`` calls.
    ``pause`` lets the other framework's idle worker threads stop spinning first
    (OpenMP / Eigen pools busy-wait a while after each call)."""
    walls, cpus = [], []
    for _ in range(repeats):
        time.sleep(pause)
        c0, t0 = cpu_seconds(), time.perf_counter()
        fn()
        walls.append(time.perf_counter() - t0)
        cpus.append(cpu_seconds() - c0)
    return float(np.median(walls)), float(np.median(cpus))


def peak_rss_mb() -> float:
    """This process's peak resident memory (VmHWM; ru_maxrss would include the parent's
    peak, which Linux carries across fork + exec)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def header(title: str) -> str:
    import jax
    import torch

    return (f"# {title}, {time.strftime('%Y-%m-%d')}, {platform.processor() or platform.machine()}, "
            f"{os.cpu_count()} CPU cores, jax {jax.__version__} ({jax.devices()[0].platform}), "
            f"torch {torch.__version__} ({torch.get_num_threads()} threads)")
