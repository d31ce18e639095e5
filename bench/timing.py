"""Timing helpers: CUDA events (or perf_counter on the CPU) after warm-up,
medians and spread; rotating input buffers larger than L2 so every call
reads from DRAM; the measured device-to-device copy bandwidth."""
from __future__ import annotations

import os
import statistics
import time
from typing import Callable, List

import torch


def median_and_spread(samples_us: List[float]) -> dict:
    q = statistics.quantiles(samples_us, n=4) if len(samples_us) >= 4 else [min(samples_us), 0, max(samples_us)]
    return {"median_us": statistics.median(samples_us), "p25_us": q[0], "p75_us": q[2],
            "min_us": min(samples_us), "n": len(samples_us)}


def time_fn(fn: Callable[[int], object], device: str, iters: int, warmup: int = 3) -> dict:
    """Time fn(i) for i in range(iters) (i picks the rotating buffer)."""
    for i in range(warmup):
        fn(i)
    samples = []
    if device == "cuda":
        torch.cuda.synchronize()
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
        for i in range(iters):
            starts[i].record()
            fn(i)
            ends[i].record()
        torch.cuda.synchronize()
        samples = [s.elapsed_time(e) * 1e3 for s, e in zip(starts, ends)]
    else:
        for i in range(iters):
            t0 = time.perf_counter()
            fn(i)
            samples.append((time.perf_counter() - t0) * 1e6)
    return median_and_spread(samples)


def cuda_graph(fn: Callable[[int], object], warmup: int = 3) -> Callable[[int], object]:
    """fn(0) captured once as a CUDA graph (warmed up on a side stream, as
    torch's CUDA-graph notes ask); the returned fn(i) replays it, so timing
    it shows the GPU's time without the host's launch cost. fn must be
    capturable: no host synchronisation (its allocations come from the
    graph's pool)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup):
            fn(0)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn(0)
    return lambda i: graph.replay()


def median_ms(fn: Callable[[], object], device: torch.device, reps: int, warmup: int,
              clock: Callable[[], float] = time.perf_counter) -> float:
    """Median ms of fn() timed one call at a time by `clock` (wall time, or
    time.process_time on a contended CPU), synchronised on CUDA: the shims'
    cost benchmarks, whose calls mix host work and kernels."""
    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        sync()
        t0 = clock()
        fn()
        sync()
        times.append(clock() - t0)
    return statistics.median(times) * 1e3


def copy_bandwidth_gbs(device: str, nbytes: int = 1 << 30) -> float:
    """Measured device-to-device copy bandwidth: (read + write) bytes / time."""
    if device != "cuda":
        nbytes = 1 << 27
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    stats = time_fn(lambda i: dst.copy_(src), device, iters=10 if device == "cuda" else 5)
    return 2 * nbytes / (stats["median_us"] * 1e-6) / 1e9


def rotation_count(bytes_per_input: int, device: str) -> int:
    """Copies of the inputs to cycle through so the working set exceeds L2
    (4x the largest L2 in use, 50 MB on an H100)."""
    if device != "cuda" or bytes_per_input == 0:
        return 1
    l2 = torch.cuda.get_device_properties(0).L2_cache_size
    return max(1, min(64, -(-4 * l2 // bytes_per_input)))


def with_env(name: str, value: str, fn):
    """fn() with environment variable `name` set to `value` (a switch the
    CUDA ops read at each call), restored afterwards."""
    old = os.environ.get(name)
    os.environ[name] = value
    try:
        return fn()
    finally:
        if old is None:
            del os.environ[name]
        else:
            os.environ[name] = old
