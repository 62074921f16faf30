"""Timing on a device: a call's median time, parts timed pass by pass, two models timed interleaved.

Written by hand: `torch.utils.benchmark.Timer` times one statement at a time; the latency table needs every cell
sampled once per pass over the grid (so drift reaches every cell alike) and the speed-up needs two models timed in
alternation, with CUDA events on a GPU and `time.perf_counter` on a CPU.
"""

from __future__ import annotations

import copy
import math
import statistics
import time
from collections.abc import Callable, Hashable
from typing import Any

import torch
from torch import nn

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

#: a timed sample runs the function this long at least (several calls when one is shorter): a sub-millisecond call
#: timed alone is mostly timer and scheduler noise on a CPU
MIN_SAMPLE_MS = 5.0


def time_call(function: Callable[[], Any], device: torch.device, warmup: int = 3, repeats: int = 7,
              min_sample_ms: float = MIN_SAMPLE_MS) -> float:
    """Median milliseconds of `function()` after `warmup` calls (CUDA events and synchronisation on a GPU). Each of
    the `repeats` samples times enough back-to-back calls to last `min_sample_ms` (as `timeit`'s autorange does) and
    divides by their number."""
    with torch.inference_mode():
        for _ in range(warmup):
            function()
        calls = max(1, math.ceil(min_sample_ms / max(time_calls(function, device, 1), 1e-6)))
        samples = [time_calls(function, device, calls) / calls for _ in range(repeats)]
    return statistics.median(samples)


def time_calls(function: Callable[[], Any], device: torch.device, calls: int) -> float:
    """Milliseconds of `calls` back-to-back calls of `function()`."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize(device)
        start.record()
        for _ in range(calls):
            function()
        end.record()
        torch.cuda.synchronize(device)
        return start.elapsed_time(end)
    began = time.perf_counter()
    for _ in range(calls):
        function()
    return (time.perf_counter() - began) * 1e3


def measure_speedup(compressed: nn.Module, dense: nn.Module, batch_size: int, dtype: str = "float32",
                    device: str | torch.device = "cpu", rounds: int = 7, repeats: int = 3, warmup: int = 3) -> dict:
    """Time `dense` and `compressed` interleaved (one timing of each per round, so drift in the machine's speed hits
    both alike) on copies moved to `device` / `dtype`, at `batch_size` random images of the dense model's size.

    Returns:
        `dense_ms` and `compressed_ms` (medians over the rounds of each round's median), `speedup` (median of the
        rounds' dense / compressed ratios), `rounds`.
    """
    device, torch_dtype = torch.device(device), DTYPES[dtype]
    config = dense.config
    generator = torch.Generator().manual_seed(0)
    pixels = torch.randn(batch_size, getattr(config, "num_channels", 3), *image_pair(config.image_size),
                         generator=generator).to(device, torch_dtype)
    models = [copy.deepcopy(model).to(device=device, dtype=torch_dtype).eval() for model in (dense, compressed)]
    dense_ms, compressed_ms = [], []
    for _ in range(rounds):
        for model, samples in zip(models, (dense_ms, compressed_ms)):
            samples.append(time_call(lambda model=model: model(pixel_values=pixels), device, warmup, repeats))
    ratios = [d / c for d, c in zip(dense_ms, compressed_ms)]
    return {"dense_ms": statistics.median(dense_ms), "compressed_ms": statistics.median(compressed_ms),
            "speedup": statistics.median(ratios), "rounds": rounds}


def time_in_passes(cells: dict[Hashable, tuple[nn.Module, torch.Tensor]], device: torch.device, warmup: int,
                   repeats: int, progress: bool = False, description: str = "timing") -> dict[Hashable, float]:
    """Median milliseconds of `module(inputs)` for every cell: each cell is warmed up, then sampled once per pass
    over all the cells, `repeats` passes (each sample at least `MIN_SAMPLE_MS` long), so a drift in the machine's
    speed reaches every cell alike instead of making the ones timed during it look slow."""
    bar = _progress_bar(len(cells) * (repeats + 1), progress, description)
    samples: dict[Hashable, list[float]] = {}
    with torch.inference_mode():
        calls = {}
        for index, (module, inputs) in cells.items():  # warm-up, and how many calls make one sample long enough
            for _ in range(warmup):
                module(inputs)
            once = time_calls(lambda: module(inputs), device, 1)
            calls[index] = max(1, math.ceil(MIN_SAMPLE_MS / max(once, 1e-6)))
            bar.update(1)
        for _ in range(repeats):
            for index, (module, inputs) in cells.items():
                total = time_calls(lambda: module(inputs), device, calls[index])
                samples.setdefault(index, []).append(total / calls[index])
                bar.update(1)
    bar.close()
    return {index: statistics.median(values) for index, values in samples.items()}


def image_pair(value) -> tuple[int, int]:
    """(height, width) from a config's `image_size` / `patch_size` (an int or a pair)."""
    return tuple(value) if isinstance(value, (list, tuple)) else (value, value)


def _progress_bar(total: int, enabled: bool, description: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=description, unit="cell", disable=not enabled)


__all__ = ["DTYPES", "MIN_SAMPLE_MS", "measure_speedup", "time_call", "time_calls", "time_in_passes"]
