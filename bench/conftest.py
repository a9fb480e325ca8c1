"""Benchmark harness: GPU timing with pytest-benchmark.

Each benchmark warms up outside the timed call (autotune, torch.compile), synchronises the GPU inside it, and
flushes the L2 cache before every round, waiting for the flush to finish before the timer starts, so a kernel is
never timed from cache nor with the flush. Without CUDA every benchmark
is collected and skipped with the reason, so `pytest bench --collect-only` keeps the suite importable in CI.
"""
import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # lets `kernels` import with no GPU; nothing is timed

L2_FLUSH_BYTES = 256 * 2**20  # larger than any current GPU's L2 (H100: 50 MB)


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="benchmarks need a CUDA GPU; none is available here")
    for item in items:
        item.add_marker(skip)


def optional_import(name: str):
    """A peer library (Liger-Kernel, ...) if installed, else None: its provider is skipped with the reason."""
    try:
        return __import__(name, fromlist=["_"])
    except ImportError:
        return None


def flush_l2(buffer: torch.Tensor) -> None:
    """Evict the L2 cache by writing `buffer`, and wait until the write is done: pytest-benchmark starts its timer
    when setup returns, and a memset that is only enqueued would be timed with the work."""
    buffer.zero_()
    torch.cuda.synchronize()


def time_on_gpu(benchmark, fn, flush: torch.Tensor, rounds: int = 20, warmup: int = 3, **extra_info) -> None:
    """Time fn() with pytest-benchmark: warm-up outside the timer, an L2 flush that has finished before each round,
    a synchronize inside the timed call; record peak memory and extra_info (callables of the median seconds)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    peak_bytes = torch.cuda.max_memory_allocated() - base

    def timed():
        fn()
        torch.cuda.synchronize()

    benchmark.pedantic(timed, setup=lambda: flush_l2(flush), rounds=rounds, iterations=1, warmup_rounds=0)
    median = benchmark.stats.stats.median
    benchmark.extra_info["peak_memory_mib"] = round(peak_bytes / 2**20, 1)  # above what was allocated before
    resident = base - flush.numel()  # weights, optimizer state, inputs: not the L2-flush buffer
    benchmark.extra_info["resident_memory_mib"] = round(resident / 2**20, 1)
    benchmark.extra_info["device"] = torch.cuda.get_device_name()
    for key, value in extra_info.items():
        benchmark.extra_info[key] = round(value(median), 2) if callable(value) else value


@pytest.fixture
def gpu_bench(benchmark):
    """gpu_bench(fn, **extra_info) times fn() on the GPU (see time_on_gpu) and records extra_info and peak memory."""
    flush = torch.empty(L2_FLUSH_BYTES, dtype=torch.uint8, device="cuda")
    return lambda fn, rounds=20, warmup=3, **extra_info: time_on_gpu(benchmark, fn, flush, rounds, warmup, **extra_info)
