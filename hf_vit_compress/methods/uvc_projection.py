"""UVC's final projection: from the search's hard architecture to one whose MACs are AT or UNDER the budget.

The official code ends wherever the primal-dual iterates stop (its DeiT-T run for a 50% budget ended at 42.7%
FLOPs); here the last step greedily removes the unit group with the least damage per MAC saved until
`architecture_macs <= target` holds exactly; with `UVCConfig.channel_multiple` > 1 (default 8) MLP widths and value
head dims of large enough dimensions are never cut below the multiple and are then rounded to multiples of it
within the budget (kernel-friendly shapes: fused sdpa kernels and bf16 tensor-core GEMMs want multiples of 8; see
`hf_vit_compress.kernels`).
"""

from __future__ import annotations

import bisect
from typing import TYPE_CHECKING

from ..architecture import LayerArchitecture
from ..flops import block_macs, stem_and_head_macs

if TYPE_CHECKING:
    from .uvc import _Groups


def _descending(unit: tuple[float, int]) -> tuple[float, int]:
    """Sort key of the kept-unit lists: score descending, ties by index descending (as `sorted(reverse=True)`)."""
    return -unit[0], -unit[1]


def _total_macs(layers: list["ProjectionLayer"], geo) -> int:
    return int(stem_and_head_macs(geo, geo.hidden_size)) + sum(layer.macs(geo) for layer in layers)


class ProjectionLayer:
    """Kept units of one block during the final projection. Unit lists are sorted by DEscending score, so `pop()`
    removes the lowest-scoring one; the sums of kept scores are maintained, so each step costs O(heads)."""

    def __init__(self, keep: bool, heads: dict[int, list[tuple[float, int]]], mlp: list[tuple[float, int]],
                 dims_out: dict[int, list[tuple[float, int]]] | None = None,
                 mlp_out: list[tuple[float, int]] | None = None):
        self.keep = keep
        self.heads = heads  # head -> kept (score, channel) value dims, descending
        self.head_sums = {head: sum(score for score, _ in dims) for head, dims in heads.items()}
        self.mlp = mlp  # kept (score, neuron), descending
        self.mlp_sum = sum(score for score, _ in mlp)
        # units not kept (masked by the search or removed here), ascending, so `pop()` returns the best of them
        self.dims_out = {head: sorted((dims_out or {}).get(head, [])) for head in heads}
        self.mlp_out = sorted(mlp_out or [])

    @classmethod
    def from_groups(cls, groups: _Groups, keep: bool) -> "ProjectionLayer":
        dim_scores = groups.dim_scores.cpu().tolist()
        heads, dims_out = {}, {}
        for head in (~groups.heads_removed).nonzero().flatten().tolist():
            dim_removed = groups.dims_removed[head].tolist()
            heads[head] = sorted(((dim_scores[head][c], c) for c, out in enumerate(dim_removed) if not out),
                                 key=_descending)
            dims_out[head] = [(dim_scores[head][c], c) for c, out in enumerate(dim_removed) if out]
        mlp_scores = groups.mlp_scores.cpu().tolist()
        mlp_removed = groups.mlp_removed.tolist()
        mlp = sorted(((mlp_scores[j], j) for j, out in enumerate(mlp_removed) if not out), key=_descending)
        mlp_out = [(mlp_scores[j], j) for j, out in enumerate(mlp_removed) if out]
        return cls(keep, heads, mlp, dims_out, mlp_out)

    @property
    def num_heads(self) -> int:
        return len(self.heads)

    @property
    def v_dim(self) -> int:
        return len(next(iter(self.heads.values()))) if self.heads else 0

    def macs(self, geo, heads=None, v_dim=None, mlp=None) -> int:
        if not self.keep:
            return 0
        heads = self.num_heads if heads is None else heads
        v_dim = self.v_dim if v_dim is None else v_dim
        mlp = len(self.mlp) if mlp is None else mlp
        return int(block_macs(geo.tokens, geo.hidden_size, heads * geo.head_dim, heads * v_dim, mlp))

    def _weakest_head(self) -> int:
        return min(self.heads, key=lambda head: (self.head_sums[head], head))

    def best_candidate(self, geo, may_remove_block: bool, floors: dict[str, int] | None = None):
        """(damage / MACs saved, kind order, kind) of the cheapest single removal this block allows, or None.

        Damage = squared column norms removed: an MLP unit, one value dim in every kept head (the lowest of
        each), the weakest head, or (if allowed) the whole block. MLP widths and value head dims stay at or above
        `floors` ("mlp", "vdim"; default 1).
        """
        if not self.keep:
            return None
        floors = floors or {}
        current = self.macs(geo)
        options = []
        if len(self.mlp) > floors.get("mlp", 1):
            options.append((self.mlp[-1][0], current - self.macs(geo, mlp=len(self.mlp) - 1), "mlp"))
        if self.v_dim > floors.get("vdim", 1):
            damage = sum(dims[-1][0] for dims in self.heads.values())
            options.append((damage, current - self.macs(geo, v_dim=self.v_dim - 1), "vdim"))
        if self.num_heads > 1:
            damage = self.head_sums[self._weakest_head()]
            options.append((damage, current - self.macs(geo, heads=self.num_heads - 1), "head"))
        if may_remove_block:
            options.append((sum(self.head_sums.values()) + self.mlp_sum, current, "block"))
        keys = [(damage / saved, _KIND_ORDER[kind], kind) for damage, saved, kind in options if saved > 0]
        return min(keys) if keys else None

    def remove(self, kind: str) -> None:
        if kind == "mlp":
            unit = self.mlp.pop()
            self.mlp_sum -= unit[0]
            bisect.insort(self.mlp_out, unit)
        elif kind == "vdim":
            for head, dims in self.heads.items():
                unit = dims.pop()
                self.head_sums[head] -= unit[0]
                bisect.insort(self.dims_out[head], unit)
        elif kind == "head":
            head = self._weakest_head()
            del self.heads[head], self.head_sums[head], self.dims_out[head]
        elif kind == "block":
            self.keep = False

    def add_back(self, kind: str, count: int) -> None:
        """Return the `count` best units of `kind` ("mlp" or "vdim": in every kept head) that are not kept."""
        for _ in range(count):
            if kind == "mlp":
                unit = self.mlp_out.pop()
                self.mlp_sum += unit[0]
                bisect.insort(self.mlp, unit, key=_descending)
            else:
                for head, dims in self.heads.items():
                    unit = self.dims_out[head].pop()
                    self.head_sums[head] += unit[0]
                    bisect.insort(dims, unit, key=_descending)

    def raise_to(self, floors: dict[str, int]) -> int:
        """Add back the best units not kept until the MLP width and the value head dim reach `floors` (as far as
        there are units to add back). Returns the number of units added."""
        if not self.keep:
            return 0
        added = 0
        missing = min(floors.get("mlp", 1) - len(self.mlp), len(self.mlp_out))
        if missing > 0:
            self.add_back("mlp", missing)
            added += missing
        if self.heads:
            missing = min([floors.get("vdim", 1) - self.v_dim] + [len(out) for out in self.dims_out.values()])
            if missing > 0:
                self.add_back("vdim", missing)
                added += missing * self.num_heads
        return added

    def growth_options(self, geo, multiple: int, kinds=("mlp", "vdim")) -> list[tuple[float, int, str]]:
        """(score added, MACs added, kind) of adding `multiple` more MLP units or value dims per head, for widths
        of `kinds` that are already multiples of it and have that many units left to add."""
        if not self.keep:
            return []
        current, options = self.macs(geo), []
        if "mlp" in kinds and len(self.mlp) % multiple == 0 and len(self.mlp_out) >= multiple:
            gain = sum(score for score, _ in self.mlp_out[-multiple:])
            options.append((gain, self.macs(geo, mlp=len(self.mlp) + multiple) - current, "mlp"))
        if ("vdim" in kinds and self.heads and self.v_dim % multiple == 0
                and all(len(out) >= multiple for out in self.dims_out.values())):
            gain = sum(score for out in self.dims_out.values() for score, _ in out[-multiple:])
            options.append((gain, self.macs(geo, v_dim=self.v_dim + multiple) - current, "vdim"))
        return options

    def round_down(self, multiple: int, kinds=("mlp", "vdim")) -> int:
        """Remove the lowest-scoring MLP units and value dims (of `kinds`) until each width is a multiple of
        `multiple` (widths under `multiple` stay). Only removes, so the MACs can only fall. Returns the number of
        units removed."""
        if not self.keep or multiple <= 1:
            return 0
        removed = 0
        while "mlp" in kinds and len(self.mlp) >= multiple and len(self.mlp) % multiple:
            self.remove("mlp")
            removed += 1
        while "vdim" in kinds and self.v_dim >= multiple and self.v_dim % multiple:
            self.remove("vdim")
            removed += self.num_heads
        return removed

    def to_layer_architecture(self, head_dim: int) -> LayerArchitecture:
        if not self.keep:
            return LayerArchitecture([], [], [], [], keep_block=False)
        heads = sorted(self.heads)
        return LayerArchitecture(
            heads=heads,
            qk_channels=[list(range(head_dim)) for _ in heads],
            v_channels=[sorted(c for _, c in self.heads[h]) for h in heads],
            mlp_neurons=sorted(j for _, j in self.mlp),
        )


_KIND_ORDER = {"mlp": 0, "vdim": 1, "head": 2, "block": 3}


def unit_floors(geo, multiple: int) -> dict[str, int]:
    """The narrowest MLP width ("mlp") and value head dim ("vdim") the projection may leave: `multiple` for a
    dimension of at least 8 * multiple units (the rule of OFB's candidate widths), else 1. Exactly those kinds are
    rounded to multiples of `multiple` afterwards."""
    def floor(size: int) -> int:
        return multiple if multiple > 1 and size >= 8 * multiple else 1

    return {"mlp": floor(geo.intermediate_size), "vdim": floor(geo.head_dim)}


def project_and_round(layers: list[ProjectionLayer], geo, target_macs: float, multiple: int) -> tuple[int, int]:
    """The whole final projection: raise MLP widths and value head dims to their floors (`unit_floors`), remove
    unit groups until the MACs fit the target (`project_to_budget`), then round the widths of the rounded kinds to
    multiples of `multiple` within the budget (`round_to_multiple`). Returns (removals, net units removed by the
    floors and the rounding)."""
    floors = unit_floors(geo, multiple)
    raised = sum(layer.raise_to(floors) for layer in layers)
    removed = project_to_budget(layers, geo, target_macs, floors)
    kinds = tuple(kind for kind, floor in floors.items() if floor > 1)
    return removed, round_to_multiple(layers, geo, target_macs, multiple, kinds) - raised


def project_to_budget(layers: list[ProjectionLayer], geo, target_macs: float,
                      floors: dict[str, int] | None = None) -> int:
    """Greedily remove the unit group with the least damage per MAC saved until the MACs fit the target.

    Running blocks keep at least one head and `floors` MLP units and value dims (default 1); a whole block may go
    while more than one block runs; the last block goes only when nothing else is left to remove. Returns the
    number of removals.
    """
    total = _total_macs(layers, geo)
    removals = 0
    kept = sum(layer.keep for layer in layers)
    best = [layer.best_candidate(geo, kept > 1, floors) for layer in layers]
    while total > target_macs:
        choices = [(key, index) for index, key in enumerate(best) if key is not None]
        if choices:
            (_, _, kind), index = min(choices)
        else:
            index = next((i for i, layer in enumerate(layers) if layer.keep), None)
            if index is None:
                raise ValueError(
                    f"target_macs={target_macs:.0f} is below the MACs of the patch embedding and classifier head "
                    f"alone ({total}); raise CompressionConfig.target_flops / target_gmacs"
                )
            kind = "block"
        before = layers[index].macs(geo)
        layers[index].remove(kind)
        total += layers[index].macs(geo) - before
        removals += 1
        if kind == "block":  # whether blocks may go changed for every layer
            kept -= 1
            best = [layer.best_candidate(geo, kept > 1, floors) for layer in layers]
        else:
            best[index] = layers[index].best_candidate(geo, kept > 1, floors)
    return removals


def round_to_multiple(layers: list[ProjectionLayer], geo, target_macs: float, multiple: int,
                      kinds=("mlp", "vdim")) -> int:
    """Make every MLP width and value head dim (of `kinds`) a multiple of `multiple` within the budget: cut each down
    (lowest scores first), then greedily add back `multiple` units at a time, best score per MAC first, while the
    MACs stay at or under `target_macs`. Widths under `multiple` stay as they are. Returns the net number of units
    removed."""
    if multiple <= 1 or not kinds:
        return 0
    removed = sum(layer.round_down(multiple, kinds) for layer in layers)
    total = _total_macs(layers, geo)
    while True:
        options = [(gain / cost, index, kind, cost) for index, layer in enumerate(layers)
                   for gain, cost, kind in layer.growth_options(geo, multiple, kinds)
                   if 0 < cost <= target_macs - total]
        if not options:
            return removed
        _, index, kind, cost = max(options)
        layers[index].add_back(kind, multiple)
        total += cost
        removed -= multiple * (1 if kind == "mlp" else layers[index].num_heads)
