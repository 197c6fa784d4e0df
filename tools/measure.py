"""Time and peak memory of a callable, on CPU or CUDA, for the benchmarks in tools/.

CPU: the rise of the process's peak resident set (Linux ``VmHWM``, reset before each repeat
through ``/proc/self/clear_refs``) above the resident set at the start. CUDA: the rise of
``torch.cuda.max_memory_allocated`` above the memory allocated at the start, with the device
synchronised around the timed call.
"""

import ctypes
import ctypes.util
import gc
import os
import statistics
import time

import torch

# glibc: serve large blocks with mmap at a fixed threshold and trim before measuring, so that
# the resident set follows what is allocated and freed (instead of staying at an old peak)
try:
    _LIBC = ctypes.CDLL(ctypes.util.find_library("c"))
    _LIBC.mallopt(-3, 64 * 1024)  # M_MMAP_THRESHOLD
except (OSError, AttributeError, TypeError):
    _LIBC = None

__all__ = ["measure", "memory_supported"]


def _status_kb(key):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{key} not in /proc/self/status")


def memory_supported(device: str) -> bool:
    """Whether peak memory can be measured for ``device`` on this machine."""
    if device.startswith("cuda"):
        return torch.cuda.is_available()
    return os.path.exists("/proc/self/clear_refs")


def measure(fn, repeats: int, device: str = "cpu", warmup: bool = True):
    """Returns (median seconds, peak MiB above the start, or None if not measurable) of fn()."""
    cuda = device.startswith("cuda")
    if warmup:
        fn()
    times, peaks = [], []
    for _ in range(repeats):
        gc.collect()
        if cuda:
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            start = torch.cuda.memory_allocated(device)
        elif memory_supported(device):
            if _LIBC is not None:
                _LIBC.malloc_trim(0)
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # reset VmHWM to the current resident set
            start = _status_kb("VmRSS") * 1024
        t0 = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
        if cuda:
            peaks.append((torch.cuda.max_memory_allocated(device) - start) / 2**20)
        elif memory_supported(device):
            peaks.append((_status_kb("VmHWM") * 1024 - start) / 2**20)
    return statistics.median(times), (max(peaks) if peaks else None)
