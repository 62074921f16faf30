"""UVC's final projection: from the search's hard architecture to one whose MACs are AT or UNDER the budget.

The official code ends wherever the primal-dual iterates stop (its DeiT-T run for a 50% budget ended at 42.7%
FLOPs); here the last step greedily removes the unit group with the least damage per MAC saved until
`architecture_macs <= target` holds exactly, then cuts MLP widths and value head dims down to multiples of
`UVCConfig.channel_multiple` (hardware-friendly shapes; benchmarks/results/speed_uvc_rounding.md).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..architecture import LayerArchitecture
from ..flops import block_macs, stem_and_head_macs

if TYPE_CHECKING:
    from .uvc import _Groups


class ProjectionLayer:
    """Kept units of one block during the final projection. Unit lists are sorted by DEscending score, so `pop()`
    removes the lowest-scoring one; the sums of kept scores are maintained, so each step costs O(heads)."""

    def __init__(self, keep: bool, heads: dict[int, list[tuple[float, int]]], mlp: list[tuple[float, int]]):
        self.keep = keep
        self.heads = heads  # head -> kept (score, channel) value dims, descending
        self.head_sums = {head: sum(score for score, _ in dims) for head, dims in heads.items()}
        self.mlp = mlp  # kept (score, neuron), descending
        self.mlp_sum = sum(score for score, _ in mlp)

    @classmethod
    def from_groups(cls, groups: _Groups, keep: bool) -> "ProjectionLayer":
        dim_scores = groups.dim_scores.cpu().tolist()
        heads = {}
        for head in (~groups.heads_removed).nonzero().flatten().tolist():
            kept = (~groups.dims_removed[head]).nonzero().flatten().tolist()
            heads[head] = sorted(((dim_scores[head][c], c) for c in kept), reverse=True)
        mlp_scores = groups.mlp_scores.cpu().tolist()
        mlp = sorted(((mlp_scores[j], j) for j in (~groups.mlp_removed).nonzero().flatten().tolist()), reverse=True)
        return cls(keep, heads, mlp)

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

    def best_candidate(self, geo, may_remove_block: bool):
        """(damage / MACs saved, kind order, kind) of the cheapest single removal this block allows, or None.

        Damage = squared column norms removed: an MLP unit, one value dim in every kept head (the lowest of
        each), the weakest head, or (if allowed) the whole block.
        """
        if not self.keep:
            return None
        current = self.macs(geo)
        options = []
        if len(self.mlp) > 1:
            options.append((self.mlp[-1][0], current - self.macs(geo, mlp=len(self.mlp) - 1), "mlp"))
        if self.v_dim > 1:
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
            self.mlp_sum -= self.mlp.pop()[0]
        elif kind == "vdim":
            for head, dims in self.heads.items():
                self.head_sums[head] -= dims.pop()[0]
        elif kind == "head":
            head = self._weakest_head()
            del self.heads[head], self.head_sums[head]
        elif kind == "block":
            self.keep = False

    def round_down(self, multiple: int) -> int:
        """Remove the lowest-scoring MLP units and value dims until each width is a multiple of `multiple` (widths
        under `multiple` stay). Only removes, so the MACs can only fall. Returns the number of units removed."""
        if not self.keep or multiple <= 1:
            return 0
        removed = 0
        while len(self.mlp) >= multiple and len(self.mlp) % multiple:
            self.remove("mlp")
            removed += 1
        while self.v_dim >= multiple and self.v_dim % multiple:
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


def project_to_budget(layers: list[ProjectionLayer], geo, target_macs: float) -> int:
    """Greedily remove the unit group with the least damage per MAC saved until the MACs fit the target.

    Running blocks keep at least one unit of each kind; a whole block may go while more than one block runs; the
    last block goes only when nothing else is left to remove. Returns the number of removals.
    """
    total = int(stem_and_head_macs(geo, geo.hidden_size)) + sum(layer.macs(geo) for layer in layers)
    removals = 0
    kept = sum(layer.keep for layer in layers)
    best = [layer.best_candidate(geo, kept > 1) for layer in layers]
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
            best = [layer.best_candidate(geo, kept > 1) for layer in layers]
        else:
            best[index] = layers[index].best_candidate(geo, kept > 1)
    return removals
