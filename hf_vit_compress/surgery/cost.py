"""What a search's budget is counted in: MACs (the default), or milliseconds on the user's device by a latency table.

Both methods price their widths through one `BudgetCost`: the residual width's part (patch embedding, classifier
head(s)) and, per block, its attention (residual width, heads, q/k and value head dims) and MLP (residual width, MLP
width). `MACsCost` is `flops.block_macs` split that way (exact integers for integer widths, so a MACs run is priced
as before); `LatencyTableCost` is a `LatencyTable`'s multilinear interpolation. Every function takes Python numbers
(exact prices of a concrete shape) or tensors (a search's expected or soft widths, differentiable, no host read).
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import torch

from .architecture import Architecture
from .flops import Geometry, block_macs, geometry, stem_and_head_macs
from .latency import LatencyCost, LatencyTable, build_latency_table, latency_key


class BudgetCost:
    """The price of a model's parts in the budget's unit.

    Args:
        geometry: the dense model's `Geometry` (tokens, dense widths).
    """

    #: `"macs"` or `"latency"` (`CompressionConfig.budget_unit`)
    kind: str = "macs"
    #: the unit of the prices, for messages and reports
    unit: str = "MACs"

    def __init__(self, geometry: Geometry):
        self.geometry = geometry

    def stem(self, hidden):
        """Patch embedding + classifier head(s) at residual width `hidden`."""
        raise NotImplementedError

    def attention(self, hidden, heads, qk_head_dim, v_head_dim):
        """One block's attention sub-block."""
        raise NotImplementedError

    def mlp(self, hidden, width):
        """One block's MLP sub-block."""
        raise NotImplementedError

    def block(self, hidden, heads, qk_head_dim, v_head_dim, mlp_width):
        return self.attention(hidden, heads, qk_head_dim, v_head_dim) + self.mlp(hidden, mlp_width)

    def layers(self, hidden: int, layers) -> float:
        """A model of residual width `hidden` with these blocks (`CompressedViTConfig.layers` entries)."""
        return self.stem(hidden) + sum(
            self.block(hidden, layer["num_heads"], layer["qk_head_dim"], layer["v_head_dim"],
                       layer["intermediate_size"]) for layer in layers)

    def architecture(self, architecture: Architecture) -> float:
        """What `export_compressed_model(model, architecture)` would cost."""
        layers = [{"num_heads": layer.num_heads, "qk_head_dim": layer.exported_head_dims[0],
                   "v_head_dim": layer.exported_head_dims[1], "intermediate_size": layer.intermediate_size}
                  for layer in architecture.kept_layers]
        return self.layers(len(architecture.hidden_channels), layers)

    def dense(self) -> float:
        """The dense model's cost."""
        geo = self.geometry
        layer = {"num_heads": geo.num_heads, "qk_head_dim": geo.head_dim, "v_head_dim": geo.head_dim,
                 "intermediate_size": geo.intermediate_size}
        return self.layers(geo.hidden_size, [layer] * geo.num_layers)

    def describe(self) -> dict:
        """What the prices are (for reports)."""
        return {"unit": self.unit}

    def within(self, cost: float, target: float) -> bool:
        """Whether `cost` fits `target` (MACs: exactly `<=`)."""
        return cost <= target

    def pads_head_dims(self, hidden: int, heads: int, qk_head_dim: int, v_head_dim: int) -> bool:
        """Whether a block with these head dims is exported zero-padded to equal ones (a fused attention kernel
        needs them equal). Never under MACs, which padding only adds to."""
        return False

    def with_padding(self, architecture: Architecture) -> Architecture:
        """`architecture` with `pad_head_dims` set on every kept block this cost prices padded (the architecture a
        method hands the exporter, so that the export runs what was priced)."""
        hidden = len(architecture.hidden_channels)
        pads = [layer.keep_block and self.pads_head_dims(hidden, layer.num_heads, layer.qk_head_dim,
                                                         layer.v_head_dim) for layer in architecture.layers]
        if pads == [layer.pad_head_dims for layer in architecture.layers]:
            return architecture
        layers = [dataclasses.replace(layer, pad_head_dims=pad) for layer, pad in zip(architecture.layers, pads)]
        return dataclasses.replace(architecture, layers=layers)


class MACsCost(BudgetCost):
    """Multiply-accumulates (`flops.block_macs`): exact integers for integer widths."""

    kind, unit = "macs", "MACs"

    def stem(self, hidden):
        return stem_and_head_macs(self.geometry, hidden)

    def attention(self, hidden, heads, qk_head_dim, v_head_dim):
        return block_macs(self.geometry.tokens, hidden, heads * qk_head_dim, heads * v_head_dim, 0)

    def mlp(self, hidden, width):
        return block_macs(self.geometry.tokens, hidden, 0, 0, width)


class LatencyTableCost(BudgetCost):
    """Milliseconds per forward by a `LatencyTable` measured on the device.

    The search prices with the table made monotone (a running maximum along every width axis): a wider part is never
    priced cheaper than a narrower one, which timing noise between two close grid points (or a faster kernel for an
    aligned width) could otherwise suggest, so every removal saves time (or nothing) and the budget's gradients never
    reward growing. A compressed model is so priced at or above the raw table's prediction; the dense model, a
    measured grid corner, is priced as measured (`dense`), so a predicted speed-up errs on the low side. Every
    block's parts are then calibrated to what a whole model pays (`LatencyTable.block_calibration`: a scale and a
    per-block offset fitted to two whole models timed with the table).

    Args:
        table: the measured table.
        geometry: the dense model's `Geometry`.
    """

    kind, unit = "latency", "ms"

    def __init__(self, table: LatencyTable, geometry: Geometry):
        super().__init__(geometry)
        self.table = table
        self.priced = monotone_table(table)
        self._tensor_costs: dict[torch.device, LatencyCost] = {}
        # a block's price inside a whole model: scale * its parts + a per-block offset, half on each sub-block
        self.scale, block_ms = table.block_calibration()
        self.half_block_ms = block_ms / 2

    def _on(self, *values) -> LatencyCost | None:
        """The tensor pricing on the device of the first tensor among `values`, or None for plain numbers."""
        tensor = next((value for value in values if torch.is_tensor(value)), None)
        if tensor is None:
            return None
        if tensor.device not in self._tensor_costs:
            self._tensor_costs[tensor.device] = LatencyCost(self.priced, tensor.device)
        return self._tensor_costs[tensor.device]

    def stem(self, hidden):
        tensor_cost = self._on(hidden)
        return self.priced.predict_stem(hidden) if tensor_cost is None else tensor_cost.stem(hidden)

    def _calibrated(self, parts, units):
        """A sub-block's price inside a whole model: scale * its parts' time + half the per-block offset while it
        keeps any unit (`units` > 0); numbers or tensors alike."""
        return self.scale * parts + self.half_block_ms * (units > 0)

    def attention(self, hidden, heads, qk_head_dim, v_head_dim):
        """Equal head dims at the fused kernel's price; unequal ones at the cheaper of the unfused kernel and the
        fused one on both head dims zero-padded to the wider (what the export then runs: `pads_head_dims`)."""
        tensor_cost = self._on(hidden, heads, qk_head_dim, v_head_dim)
        if tensor_cost is None:
            fused = self.priced.predict_fused_attention(hidden, heads, max(qk_head_dim, v_head_dim))
            price = fused if qk_head_dim == v_head_dim else min(
                fused, self.priced.predict_unfused_attention(hidden, heads, qk_head_dim, v_head_dim))
            return self._calibrated(price if heads else 0.0, heads)
        fused = tensor_cost.fused_attention(hidden, heads, torch.maximum(torch.as_tensor(qk_head_dim),
                                                                         torch.as_tensor(v_head_dim)))
        unfused = tensor_cost.unfused_attention(hidden, heads, qk_head_dim, v_head_dim)
        equal = torch.as_tensor(qk_head_dim) == torch.as_tensor(v_head_dim)
        return self._calibrated(torch.where(equal, fused, torch.minimum(fused, unfused)), heads)

    def pads_head_dims(self, hidden: int, heads: int, qk_head_dim: int, v_head_dim: int) -> bool:
        """Whether a block with these (unequal) head dims runs faster zero-padded to equal ones, by the table."""
        if not heads or qk_head_dim == v_head_dim:
            return False
        return (self.priced.predict_fused_attention(hidden, heads, max(qk_head_dim, v_head_dim))
                < self.priced.predict_unfused_attention(hidden, heads, qk_head_dim, v_head_dim))

    def mlp(self, hidden, width):
        tensor_cost = self._on(hidden, width)
        price = self.priced.predict_mlp if tensor_cost is None else tensor_cost.mlp
        return self._calibrated(price(hidden, width), width)

    def dense(self) -> float:
        """The dense model by the table as measured (not made monotone; its blocks calibrated like every block):
        its widths are the grid's top corner, a measured point, and raising it to a narrower cell's time would
        overstate every speed-up."""
        geo = self.geometry
        stem = self.table.predict_stem(geo.hidden_size)
        blocks = self.table.predict_config_of(geo) - stem
        return stem + self.scale * blocks + 2 * self.half_block_ms * geo.num_layers

    def describe(self) -> dict:
        key = self.table.key
        return {"unit": self.unit, "device": key.device, "dtype": key.dtype, "batch_size": key.batch_size,
                "attn_implementation": key.attn_implementation, "num_threads": key.num_threads,
                "torch_version": key.torch_version, "table_seconds": self.table.meta.get("seconds")}

    def within(self, cost: float, target: float) -> bool:
        """`cost <= target`, allowing float rounding (a total summed in another order)."""
        return cost <= target or math.isclose(cost, target, rel_tol=1e-9)


def as_cost(cost_or_geometry: BudgetCost | Geometry) -> BudgetCost:
    """A `BudgetCost` as is; a `Geometry` as its `MACsCost` (what the MACs-only callers pass)."""
    return cost_or_geometry if isinstance(cost_or_geometry, BudgetCost) else MACsCost(cost_or_geometry)


def monotone_table(table: LatencyTable) -> LatencyTable:
    """`table` with every cell raised to the largest value at or below it on every width axis."""
    def running_max(values) -> list:
        tensor = torch.tensor(values, dtype=torch.float64)
        for dim in range(tensor.dim()):
            tensor = tensor.cummax(dim).values
        return tensor.tolist()

    return LatencyTable(table.key, table.grid, running_max(table.stem_ms), running_max(table.attention_ms),
                        running_max(table.fused_attention_ms), running_max(table.mlp_ms),
                        {**table.meta, "monotone": True})


def load_or_build_table(dense_config, latency_config, progress: bool = True) -> LatencyTable:
    """The latency table a speed budget prices with (`CompressionConfig.latency`): `latency.table` when that file
    exists (refused when measured under other settings, naming the field), else built on this device now and saved
    there (kept in memory only when `latency.table` is None)."""
    key = latency_key(dense_config, latency_config.batch_size, latency_config.dtype, latency_config.device,
                      latency_config.attn_implementation)
    path = Path(latency_config.table) if latency_config.table else None
    if path is not None and path.exists():
        return LatencyTable.load(path, expected_key=key)
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    if distributed and torch.distributed.get_world_size() > 1:
        raise ValueError(
            f"CompressionConfig.latency.table={latency_config.table!r} is invalid: allowed an existing table in a "
            "multi-process run (every process timing one at once would time their contention): build it first with "
            "`hf-vit-compress profile-latency`")
    from .latency import LatencyGrid

    table = build_latency_table(dense_config, latency_config.batch_size, latency_config.dtype, latency_config.device,
                                latency_config.attn_implementation,
                                grid=LatencyGrid.for_model(dense_config, latency_config.grid_points),
                                repeats=latency_config.repeats, progress=progress)
    if path is not None:
        table.save(path)
    return table


def budget_cost(model, config, table: LatencyTable | None = None) -> BudgetCost:
    """The `BudgetCost` of `config`'s budget for `model` (the dense ViT/DeiT): MACs, or a latency table's
    milliseconds for a speed budget (`table`, else `load_or_build_table`)."""
    geo = geometry(model)
    if config.budget_unit == "macs":
        return MACsCost(geo)
    table = table if table is not None else load_or_build_table(model.config, config.latency)
    return LatencyTableCost(table, geo)


__all__ = ["BudgetCost", "LatencyTableCost", "MACsCost", "as_cost", "budget_cost", "load_or_build_table",
           "monotone_table"]
