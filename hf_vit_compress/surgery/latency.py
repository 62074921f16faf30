"""A latency model measured on the user's device: how long the parts of a compressed ViT take, by width.

A compressed model is a stem (patch embedding, prefix tokens, positions) and a head (final LayerNorm, classifier),
plus per block an attention sub-block (LayerNorm, q/k/v, attention, o_proj) and an MLP sub-block (LayerNorm, fc1,
activation, fc2), each with its own widths. `build_latency_table` times this package's own modeling classes
(`modeling/modeling_compressed_vit.py`, what an exported model runs) on a grid of widths: the stem and head over
the residual width D, attention over (D, heads, q/k head dim, v head dim), the MLP over (D, MLP width), at the
user's batch size, image size, dtype, attention implementation, device and thread count. On a GPU each timing is
bracketed by CUDA events after a warm-up; on a CPU by `time.perf_counter`; a sample lasts at least `MIN_SAMPLE_MS`
(several calls of a short part), each cell is sampled once per pass over the grid, and keeps its median
(`timing.time_in_passes`).

`LatencyTable.predict_*` interpolate the grid multilinearly (piecewise-linear in each width, linear extrapolation
past the grid's ends): time is close to linear in a width between the kernel-size steps, so a few points per
axis follow it, and a grid point is predicted exactly.

Attention is two tables, because sdpa's time is not continuous across qk == v: its fastest kernel (the fused
"flash" one, on CPU and on GPU) needs the q/k and v head dims EQUAL. Measured on this CPU (fp32, batch 64, DeiT-T
tokens, 3 heads): 25 ms with both head dims 48, 75-82 ms with 48 and 40 or 56 (the unfused math path), so a table
whose cells mix both interpolates neither. `fused_attention_ms` holds equal head dims (over the q/k axis), timed as
they run; `attention_ms` holds every (q/k, v) pair with the flash kernel turned off on its diagonal cells, so every
cell times what unequal head dims run (on a GPU the memory-efficient / cuDNN kernels, whose time is smooth across
the diagonal; on CPU the math path, whose equal-dims cells are a little faster than their neighbours: a lower
bound). An export may zero-pad the narrower head dim to the wider one (`LayerArchitecture.pad_head_dims`: exact)
to run the fused kernel; `cost.LatencyTableCost` prices each block at the cheaper of the two.

A table is saved as JSON together with its `LatencyKey` (everything its timings depend on); loading it for a run
with another key is refused, naming the field.

Written by hand: torch's profiler and benchmark utilities time one call, and no well-kept library builds
interpolated per-layer latency tables for transformers models.
"""

from __future__ import annotations

import functools
import itertools
import json
import math
import os
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from ..modeling import CompressedViTConfig, CompressedViTForImageClassification
from ..modeling.modeling_compressed_vit import CompressedViTAttention, CompressedViTMLP
from .timing import (  # noqa: F401  (measure_speedup, time_call: re-exported, part of this module's API)
    DTYPES,
    MIN_SAMPLE_MS,
    image_pair,
    measure_speedup,
    time_call,
    time_in_passes,
)

TABLE_VERSION = 2  # 2: attention split into fused (equal head dims) and unfused cells


@dataclass(frozen=True)
class LatencyKey:
    """Everything a table's timings depend on; a table is used only for a run with an equal key.

    Args:
        device: the device's name (`torch.cuda.get_device_name`, or `"cpu"`).
        torch_version: `torch.__version__`.
        dtype: `"float32"`, `"bfloat16"` or `"float16"`.
        batch_size: images per forward.
        tokens: sequence length (patches + prefix tokens).
        attn_implementation: `"sdpa"` or `"eager"`.
        num_threads: `torch.get_num_threads()` (CPU timings depend on it; recorded on a GPU too).
    """

    device: str
    torch_version: str
    dtype: str
    batch_size: int
    tokens: int
    attn_implementation: str
    num_threads: int

    def mismatch(self, other: LatencyKey) -> list[str]:
        """`field: table value != run value` for every field that differs."""
        return [f"{f.name}: {getattr(self, f.name)!r} != {getattr(other, f.name)!r}" for f in fields(self)
                if getattr(self, f.name) != getattr(other, f.name)]


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else device.type


def latency_key(dense_config, batch_size: int, dtype: str = "float32", device: str | torch.device = "cpu",
                attn_implementation: str = "sdpa") -> LatencyKey:
    """The key of timings of models shaped like `dense_config` (a ViT/DeiT or compressed config) run so."""
    if dtype not in DTYPES:
        raise ValueError(f"latency dtype={dtype!r} is invalid: allowed {sorted(DTYPES)}")
    if attn_implementation not in ("sdpa", "eager"):
        raise ValueError(f"latency attn_implementation={attn_implementation!r} is invalid: allowed 'sdpa', 'eager'")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"latency batch_size={batch_size!r} is invalid: allowed an integer >= 1")
    device = torch.device(device)
    return LatencyKey(device_name(device), torch.__version__, dtype, batch_size, _tokens(dense_config),
                      attn_implementation, torch.get_num_threads())


def _tokens(config) -> int:
    image, patch = image_pair(config.image_size), image_pair(config.patch_size)
    prefix = 2 if getattr(config, "use_distillation_token", False) or config.model_type == "deit" else 1
    return (image[0] // patch[0]) * (image[1] // patch[1]) + prefix


# -- the grid ------------------------------------------------------------------------------------------------------
@dataclass
class LatencyGrid:
    """The widths a table is measured at (each axis ascending, positive).

    Args:
        hidden: residual widths D.
        heads: numbers of heads.
        qk_head_dims: query/key head dims.
        v_head_dims: value head dims.
        mlp: MLP widths.
    """

    hidden: list[int]
    heads: list[int]
    qk_head_dims: list[int]
    v_head_dims: list[int]
    mlp: list[int]

    @classmethod
    def for_model(cls, dense_config, points: int = 3) -> LatencyGrid:
        """`points` widths per axis from a quarter of the dense width (at least 1) to all of it (heads: 1 to H);
        the MLP axis gets one point more, since its width is pruned furthest."""
        heads = dense_config.num_attention_heads
        head_dim = dense_config.hidden_size // heads

        def axis(full: int, count: int, low: int | None = None) -> list[int]:
            low = max(1, low if low is not None else full // 4)
            return sorted({round(low + (full - low) * i / max(1, count - 1)) for i in range(count)})

        return cls(hidden=axis(dense_config.hidden_size, points), heads=axis(heads, points, 1),
                   qk_head_dims=axis(head_dim, points), v_head_dims=axis(head_dim, points),
                   mlp=axis(dense_config.intermediate_size, points + 1, dense_config.intermediate_size // 8))

    def validate(self) -> None:
        for f in fields(self):
            values = getattr(self, f.name)
            ok = (isinstance(values, list) and values and all(isinstance(v, int) and v >= 1 for v in values)
                  and values == sorted(set(values)))
            if not ok:
                raise ValueError(f"LatencyGrid.{f.name}={values!r} is invalid: allowed a non-empty ascending list of "
                                 "distinct integers >= 1")


# -- the table -----------------------------------------------------------------------------------------------------
@dataclass
class LatencyTable:
    """Measured milliseconds per forward by width, and the key they were measured under.

    Args:
        key: what the timings depend on.
        grid: the widths measured.
        stem_ms: per residual width (grid.hidden): patch embedding + final LayerNorm + classifier head(s).
        attention_ms: nested lists indexed [hidden][heads][qk_head_dims][v_head_dims], the unfused kernel (what
            unequal head dims run; see the module docstring).
        fused_attention_ms: nested lists indexed [hidden][heads][qk_head_dims]: equal q/k and v head dims, as
            they run (sdpa's fused kernel where the device has one).
        mlp_ms: nested lists indexed [hidden][mlp].
        meta: how it was measured (repeats, warm-up, seconds taken, date).
    """

    key: LatencyKey
    grid: LatencyGrid
    stem_ms: list[float]
    attention_ms: list
    fused_attention_ms: list
    mlp_ms: list
    meta: dict

    # -- predictions --------------------------------------------------------------------------------------------
    def predict_stem(self, hidden: int) -> float:
        return _interpolate([self.grid.hidden], self.stem_ms, [hidden])

    def predict_attention(self, hidden: int, heads: int, qk_head_dim: int, v_head_dim: int) -> float:
        """An attention sub-block with these widths, as it runs: equal head dims by the fused cells, else the
        unfused ones."""
        if heads == 0:  # every head pruned: only o_proj's bias is added
            return 0.0
        if qk_head_dim == v_head_dim:
            return self.predict_fused_attention(hidden, heads, qk_head_dim)
        return self.predict_unfused_attention(hidden, heads, qk_head_dim, v_head_dim)

    def predict_fused_attention(self, hidden: int, heads: int, head_dim: int) -> float:
        """Equal q/k and v head dims `head_dim` (what a zero-padded export of wider head dims runs, too)."""
        axes = [self.grid.hidden, self.grid.heads, self.grid.qk_head_dims]
        return _interpolate(axes, self.fused_attention_ms, [hidden, heads, head_dim])

    def predict_unfused_attention(self, hidden: int, heads: int, qk_head_dim: int, v_head_dim: int) -> float:
        axes = [self.grid.hidden, self.grid.heads, self.grid.qk_head_dims, self.grid.v_head_dims]
        return _interpolate(axes, self.attention_ms, [hidden, heads, qk_head_dim, v_head_dim])

    def predict_mlp(self, hidden: int, mlp: int) -> float:
        if mlp == 0:
            return 0.0
        return _interpolate([self.grid.hidden, self.grid.mlp], self.mlp_ms, [hidden, mlp])

    def predict_layers(self, hidden: int, layers: Iterable[dict]) -> float:
        """Milliseconds of a model of residual width `hidden` with these blocks (`CompressedViTConfig.layers`
        entries: `num_heads`, `qk_head_dim`, `v_head_dim`, `intermediate_size`), stem and head included."""
        total = self.predict_stem(hidden)
        for layer in layers:
            total += self.predict_attention(hidden, layer["num_heads"], layer["qk_head_dim"], layer["v_head_dim"])
            total += self.predict_mlp(hidden, layer["intermediate_size"])
        return total

    def predict_config(self, config) -> float:
        """Milliseconds of the model of `config`: a `CompressedViTConfig`, or a dense ViT/DeiT config."""
        if isinstance(config, CompressedViTConfig):
            return self.predict_layers(config.hidden_size, config.layers)
        head_dim = config.hidden_size // config.num_attention_heads
        dense = {"num_heads": config.num_attention_heads, "qk_head_dim": head_dim, "v_head_dim": head_dim,
                 "intermediate_size": config.intermediate_size}
        return self.predict_layers(config.hidden_size, [dense] * config.num_hidden_layers)

    def predict_config_of(self, geometry) -> float:
        """Milliseconds of the dense model of a `flops.Geometry` (its widths, every block)."""
        dense = {"num_heads": geometry.num_heads, "qk_head_dim": geometry.head_dim, "v_head_dim": geometry.head_dim,
                 "intermediate_size": geometry.intermediate_size}
        return self.predict_layers(geometry.hidden_size, [dense] * geometry.num_layers)

    def block_calibration(self) -> tuple[float, float]:
        """(scale, ms per block) such that a block's time inside a whole model is scale * (its parts' time) + ms per
        block, fitted to the two whole models timed with the table (every block at the grid's narrowest and at its
        widest corner: `meta["whole_models"]`); (1.0, 0.0) for a table without them. Parts timed one at a time miss
        what a whole model pays between them (dispatch, caches): on this CPU at batch 1 a narrow DeiT-T ran ~20%
        slower than the sum of its parts. The scale is clipped to [0.5, 2] and the offset to >= 0."""
        models = self.meta.get("whole_models")
        if not models:
            return 1.0, 0.0
        count = models["num_layers"]
        stems = {"narrow": self.predict_stem(self.grid.hidden[0]), "dense": self.predict_stem(self.grid.hidden[-1])}
        parts = {corner: (models[corner]["parts_ms"] - stems[corner]) / count for corner in stems}
        whole = {corner: (models[corner]["measured_ms"] - stems[corner]) / count for corner in stems}
        scale = 1.0
        if parts["dense"] > parts["narrow"]:
            scale = (whole["dense"] - whole["narrow"]) / (parts["dense"] - parts["narrow"])
        scale = min(max(scale, 0.5), 2.0)
        return scale, max(0.0, whole["narrow"] - scale * parts["narrow"])

    # -- files ----------------------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {"version": TABLE_VERSION, "key": asdict(self.key), "grid": asdict(self.grid),
                "stem_ms": self.stem_ms, "attention_ms": self.attention_ms,
                "fused_attention_ms": self.fused_attention_ms, "mlp_ms": self.mlp_ms, "meta": self.meta}

    def save(self, path: str | os.PathLike) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_name(f".{path.name}.tmp")
        temporary.write_text(json.dumps(self.to_dict(), indent=1) + "\n")
        os.replace(temporary, path)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike, expected_key: LatencyKey | None = None) -> LatencyTable:
        """Read a saved table; with `expected_key`, refuse one measured under another key (naming the fields)."""
        path = Path(path)
        try:
            values = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as error:
            raise ValueError(f"latency table {path}: cannot be read ({type(error).__name__}: {error})") from None
        if not isinstance(values, dict) or values.get("version") != TABLE_VERSION:
            raise ValueError(f"latency table {path}: not a version-{TABLE_VERSION} latency table (version "
                             f"{values.get('version') if isinstance(values, dict) else None!r}): build it again")
        try:
            table = cls(LatencyKey(**values["key"]), LatencyGrid(**values["grid"]), values["stem_ms"],
                        values["attention_ms"], values["fused_attention_ms"], values["mlp_ms"],
                        values.get("meta", {}))
        except (KeyError, TypeError) as error:
            raise ValueError(f"latency table {path}: malformed ({type(error).__name__}: {error})") from None
        table.grid.validate()
        if expected_key is not None and table.key != expected_key:
            raise ValueError(f"latency table {path} was measured under another setting ("
                             + "; ".join(table.key.mismatch(expected_key)) + "): build one for this run")
        return table


def _interpolate(axes: Sequence[Sequence[int]], values, point: Sequence[float]) -> float:
    """Multilinear interpolation of `values` (nested lists over `axes`) at `point`; linear extrapolation past an
    axis' ends, and a single-point axis is constant."""
    brackets = []  # per axis: ((index, weight), ...)
    for axis, x in zip(axes, point):
        if len(axis) == 1:
            brackets.append(((0, 1.0),))
            continue
        upper = min(max(1, next((i for i, v in enumerate(axis) if v >= x), len(axis) - 1)), len(axis) - 1)
        low, high = axis[upper - 1], axis[upper]
        t = (x - low) / (high - low)
        brackets.append(((upper - 1, 1.0 - t), (upper, t)))
    total = 0.0
    for corner in itertools.product(*brackets):
        weight = math.prod(w for _, w in corner)
        if weight:
            cell = values
            for index, _ in corner:
                cell = cell[index]
            total += weight * cell
    return max(0.0, total)


class LatencyCost:
    """A table's predictions as differentiable torch functions of the widths, for a search that holds expected
    latency at a budget (the widths may be expectations over candidates, or soft counts): the same multilinear
    interpolation as `LatencyTable.predict_*`, on tensors of any shape, gradients with respect to the widths
    included, with no host synchronisation (indices from `torch.searchsorted` on the device).

    Args:
        table: the measured table.
        device: where the widths will live.
    """

    def __init__(self, table: LatencyTable, device: str | torch.device = "cpu"):
        g = table.grid
        as_tensor = functools.partial(torch.tensor, dtype=torch.float32, device=device)
        self.hidden_axis, self.heads_axis = as_tensor(g.hidden), as_tensor(g.heads)
        self.qk_axis, self.v_axis, self.mlp_axis = as_tensor(g.qk_head_dims), as_tensor(g.v_head_dims), as_tensor(g.mlp)
        self.stem_values = as_tensor(table.stem_ms)
        self.attention_values = as_tensor(table.attention_ms)
        self.fused_attention_values = as_tensor(table.fused_attention_ms)
        self.mlp_values = as_tensor(table.mlp_ms)

    def stem(self, hidden: torch.Tensor) -> torch.Tensor:
        return _interpolate_tensor([self.hidden_axis], self.stem_values, [hidden])

    def attention(self, hidden: torch.Tensor, heads: torch.Tensor, qk_head_dim: torch.Tensor,
                  v_head_dim: torch.Tensor) -> torch.Tensor:
        """`LatencyTable.predict_attention`: the fused cells where the head dims are equal, else the unfused."""
        fused = self.fused_attention(hidden, heads, qk_head_dim)
        unfused = self.unfused_attention(hidden, heads, qk_head_dim, v_head_dim)
        return torch.where(torch.as_tensor(qk_head_dim) == torch.as_tensor(v_head_dim), fused, unfused)

    def fused_attention(self, hidden: torch.Tensor, heads: torch.Tensor, head_dim: torch.Tensor) -> torch.Tensor:
        axes = [self.hidden_axis, self.heads_axis, self.qk_axis]
        value = _interpolate_tensor(axes, self.fused_attention_values, [hidden, heads, head_dim])
        return torch.where(torch.as_tensor(heads) > 0, value, torch.zeros_like(value))

    def unfused_attention(self, hidden: torch.Tensor, heads: torch.Tensor, qk_head_dim: torch.Tensor,
                          v_head_dim: torch.Tensor) -> torch.Tensor:
        axes = [self.hidden_axis, self.heads_axis, self.qk_axis, self.v_axis]
        value = _interpolate_tensor(axes, self.attention_values, [hidden, heads, qk_head_dim, v_head_dim])
        return torch.where(torch.as_tensor(heads) > 0, value, torch.zeros_like(value))

    def mlp(self, hidden: torch.Tensor, mlp: torch.Tensor) -> torch.Tensor:
        value = _interpolate_tensor([self.hidden_axis, self.mlp_axis], self.mlp_values, [hidden, mlp])
        return torch.where(mlp > 0, value, torch.zeros_like(value))


def _interpolate_tensor(axes: Sequence[torch.Tensor], values: torch.Tensor, point: Sequence[torch.Tensor]):
    """`_interpolate` on tensors: the points broadcast together; differentiable in the point."""
    point = torch.broadcast_tensors(*[torch.as_tensor(x, dtype=values.dtype, device=values.device) for x in point])
    lows, weights = [], []
    for axis, x in zip(axes, point):
        if axis.numel() == 1:
            lows.append(torch.zeros_like(x, dtype=torch.long))
            weights.append(None)
            continue
        upper = torch.searchsorted(axis, x.detach().contiguous()).clamp(1, axis.numel() - 1)
        low, high = axis[upper - 1], axis[upper]
        lows.append(upper - 1)
        weights.append((x - low) / (high - low))
    total = torch.zeros_like(point[0])
    for corner in itertools.product((0, 1), repeat=len(axes)):
        if any(offset and weight is None for offset, weight in zip(corner, weights)):
            continue
        weight = torch.ones_like(point[0])
        index = []
        for offset, low, t in zip(corner, lows, weights):
            index.append(low + offset)
            if t is not None:
                weight = weight * (t if offset else 1 - t)
        total = total + weight * values[tuple(index)]
    return total.clamp(min=0.0)


# -- measuring -----------------------------------------------------------------------------------------------------
def _part_config(dense_config, hidden: int, layers: list[dict], attn_implementation: str) -> CompressedViTConfig:
    config = CompressedViTConfig(
        hidden_size=hidden, layers=layers, image_size=dense_config.image_size, patch_size=dense_config.patch_size,
        num_channels=getattr(dense_config, "num_channels", 3), hidden_act=getattr(dense_config, "hidden_act", "gelu"),
        qkv_bias=getattr(dense_config, "qkv_bias", True), num_labels=dense_config.num_labels,
        use_distillation_token=dense_config.model_type == "deit",
        distillation_head=dense_config.model_type == "deit" and getattr(dense_config, "distillation_head", False),
    )
    config._attn_implementation = attn_implementation
    return config


def _layer(heads: int, qk: int, v: int, mlp: int, scaling: float) -> dict:
    return {"num_heads": heads, "qk_head_dim": qk, "v_head_dim": v, "intermediate_size": mlp, "scaling": scaling}


def build_latency_table(dense_config, batch_size: int, dtype: str = "float32", device: str | torch.device = "cpu",
                        attn_implementation: str = "sdpa", grid: LatencyGrid | None = None, warmup: int = 3,
                        repeats: int = 7, progress: bool = True) -> LatencyTable:
    """Time the parts of models shaped like `dense_config` on this device and build their table.

    Every cell is timed once per pass over the whole grid, `repeats` passes, and keeps its median: a drift in the
    machine's speed while the table is built (another process, clocks) then reaches every cell alike instead of
    making the cells timed during it look slow, which would skew the ratios the budget is made of.

    Args:
        dense_config: the dense ViT/DeiT config (`model.config`): image and patch size, labels, the dense widths.
        batch_size: images per forward.
        dtype: `"float32"`, `"bfloat16"` or `"float16"`.
        device: where to time (`"cpu"`, `"cuda"`, `"cuda:1"`).
        attn_implementation: `"sdpa"` or `"eager"`, as the exported model will run.
        grid: the widths to measure (default `LatencyGrid.for_model(dense_config)`).
        warmup, repeats: calls of each cell before timing, and passes over the grid (one timed sample per cell each,
            at least `MIN_SAMPLE_MS` long; the median is kept).
        progress: show a progress bar.
    """
    key = latency_key(dense_config, batch_size, dtype, device, attn_implementation)
    grid = grid or LatencyGrid.for_model(dense_config)
    grid.validate()
    device, torch_dtype = torch.device(device), DTYPES[dtype]
    began = time.perf_counter()
    cells = _table_cells(dense_config, grid, key.tokens, batch_size, attn_implementation, device, torch_dtype)
    median = time_in_passes(cells, device, warmup, repeats, progress, description="latency table")
    hidden_range = range(len(grid.hidden))
    stem = [median[("stem", i)] for i in hidden_range]
    attention = [[[[median[("attention", i, j, k, m)] for m in range(len(grid.v_head_dims))]
                   for k in range(len(grid.qk_head_dims))] for j in range(len(grid.heads))] for i in hidden_range]
    fused = [[[median[("fused", i, j, k)] for k in range(len(grid.qk_head_dims))] for j in range(len(grid.heads))]
             for i in hidden_range]
    mlp = [[median[("mlp", i, j)] for j in range(len(grid.mlp))] for i in hidden_range]
    table = LatencyTable(key, grid, stem, attention, fused, mlp, {})
    meta = {"warmup": warmup, "repeats": repeats, "statistic": "median over passes of the grid",
            "whole_models": {"num_layers": dense_config.num_hidden_layers,
                             **{corner: {"measured_ms": median[("model", corner)],
                                         "parts_ms": table.predict_layers(*_corner_model(dense_config, grid, corner))}
                                for corner in ("narrow", "dense")}},
            "min_sample_ms": MIN_SAMPLE_MS, "seconds": round(time.perf_counter() - began, 1),
            "interpolation": "multilinear", "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    return LatencyTable(key, grid, stem, attention, fused, mlp, meta)


def _corner_model(dense_config, grid: LatencyGrid, corner: str) -> tuple[int, list[dict]]:
    """(residual width, layers) of a whole model with every block at the grid's narrowest or widest corner."""
    pick = (lambda axis: axis[0]) if corner == "narrow" else (lambda axis: axis[-1])
    layer = {"num_heads": pick(grid.heads), "qk_head_dim": pick(grid.qk_head_dims),
             "v_head_dim": pick(grid.v_head_dims), "intermediate_size": pick(grid.mlp)}
    return pick(grid.hidden), [layer] * dense_config.num_hidden_layers


def _table_cells(dense_config, grid: LatencyGrid, tokens: int, batch_size: int, attn_implementation: str,
                 device: torch.device, dtype: torch.dtype) -> dict[tuple, tuple[nn.Module, torch.Tensor]]:
    """Every cell of the table as (module, its input) on `device` / `dtype`, keyed ("stem", i), ("attention", i, j,
    k, m) and ("mlp", i, j) by grid indices."""
    scaling = (dense_config.hidden_size // dense_config.num_attention_heads) ** -0.5
    generator = torch.Generator().manual_seed(0)
    cells: dict[tuple, tuple[nn.Module, torch.Tensor]] = {}

    def ready(module: nn.Module) -> nn.Module:
        return module.to(device=device, dtype=dtype).eval()

    for i, hidden in enumerate(grid.hidden):
        states = torch.randn(batch_size, tokens, hidden, generator=generator).to(device, dtype)
        config = _part_config(dense_config, hidden, [], attn_implementation)
        pixels = torch.randn(batch_size, config.num_channels, *image_pair(config.image_size), generator=generator)
        cells[("stem", i)] = (ready(CompressedViTForImageClassification(config)), pixels.to(device, dtype))
        for j, heads in enumerate(grid.heads):
            for k, qk in enumerate(grid.qk_head_dims):
                cells[("fused", i, j, k)] = (ready(_AttentionPart(config, _layer(heads, qk, qk, 1, scaling))), states)
                for m, v in enumerate(grid.v_head_dims):
                    part = _AttentionPart(config, _layer(heads, qk, v, 1, scaling))
                    # the unfused cells: on the diagonal, time what unequal head dims beside it would run
                    cells[("attention", i, j, k, m)] = (ready(_WithoutFlash(part) if qk == v else part), states)
        for j, width in enumerate(grid.mlp):
            cells[("mlp", i, j)] = (ready(_MLPPart(config, _layer(1, 1, 1, width, scaling))), states)
    # two whole models (every block at the narrowest / widest grid corner): what the parts timed alone miss
    # (dispatch between blocks, caches), from which `LatencyTable.block_calibration` corrects a block's price
    for corner in ("narrow", "dense"):
        hidden, layers = _corner_model(dense_config, grid, corner)
        config = _part_config(dense_config, hidden, [{**layer, "scaling": scaling} for layer in layers],
                              attn_implementation)
        pixels = torch.randn(batch_size, config.num_channels, *image_pair(config.image_size), generator=generator)
        cells[("model", corner)] = (ready(CompressedViTForImageClassification(config)), pixels.to(device, dtype))
    return cells


class _AttentionPart(nn.Module):
    """LayerNorm + attention of one block, as `CompressedViTLayer` runs them (the residual add included)."""

    def __init__(self, config: CompressedViTConfig, layer: dict):
        super().__init__()
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.attention = CompressedViTAttention(config, layer)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return hidden_states + self.attention(self.norm(hidden_states))


class _WithoutFlash(nn.Module):
    """A part run with sdpa's flash kernel (the one that needs equal head dims) turned off."""

    BACKENDS = (SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.MATH)

    def __init__(self, part: nn.Module):
        super().__init__()
        self.part = part

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        with sdpa_kernel(list(self.BACKENDS)):
            return self.part(hidden_states)


class _MLPPart(nn.Module):
    """LayerNorm + MLP of one block, as `CompressedViTLayer` runs them (the residual add included)."""

    def __init__(self, config: CompressedViTConfig, layer: dict):
        super().__init__()
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = CompressedViTMLP(config, layer)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return hidden_states + self.mlp(self.norm(hidden_states))


__all__ = ["LatencyCost", "LatencyGrid", "LatencyKey", "LatencyTable", "build_latency_table", "latency_key",
           "measure_speedup", "time_call"]
