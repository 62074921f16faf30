"""UVC's final projection: from the search's hard architecture to one whose cost is AT or UNDER the budget.

The cost is the budget's (`surgery.cost.BudgetCost`): MACs, or a latency table's milliseconds for a speed budget;
every price below comes from it, so "per MAC" reads "per unit of cost". The official code ends wherever the
primal-dual iterates stop (its DeiT-T run for a 50% budget ended at 42.7% FLOPs); here the last step greedily
removes the unit group with the least damage per MAC saved until the cost fits the target exactly; with
`UVCConfig.channel_multiple` > 1 (default 8) MLP widths, value head dims and the residual width (when searched) of
large enough dimensions are never cut below the multiple and are rounded to multiples of it (kernel-friendly shapes:
fused sdpa kernels and bf16 tensor-core GEMMs want multiples of 8; see `hf_vit_compress.surgery.kernels`). Finally
the units not kept (MLP units, value dims, whole heads; residual channels only up to the search's width) come back,
best score per MAC first, while the cost fits (in blocks of the multiple for the rounded widths, one at a time for
the others), so the result lands just under the budget rather than wherever the last removal left it (one head is
several points of the MACs of a small model).
"""

from __future__ import annotations

import bisect
from typing import TYPE_CHECKING

from ...surgery.architecture import LayerArchitecture
from ...surgery.cost import BudgetCost, as_cost

if TYPE_CHECKING:
    from .groups import UnitGroups


def _descending(unit: tuple[float, int]) -> tuple[float, int]:
    """Sort key of the kept-unit lists: score descending, ties by index descending (as `sorted(reverse=True)`)."""
    return -unit[0], -unit[1]


def _total_macs(layers: list["ProjectionLayer"], cost: BudgetCost, hidden: "ProjectionHidden | None" = None,
                width: int | None = None) -> float:
    """The whole model's price (`cost`: MACs, exact integers, or a latency table's ms); at residual width `width`
    (default: `hidden`'s, or the dense one)."""
    cost = as_cost(cost)
    width = width if width is not None else hidden.width if hidden is not None else cost.geometry.hidden_size
    return cost.stem(width) + sum(layer.macs(cost, hidden=width) for layer in layers)


class ProjectionHidden:
    """Kept residual channels during the final projection (global: the width enters every block's MACs). `kept` is
    sorted by DEscending score, `out` (channels not kept) ascending, so `pop()` gives the weakest kept channel and
    the best one not kept. `limit` is the widest the add-back may make it (`project_and_round` sets it to the
    search's width, rounded up to the step)."""

    def __init__(self, kept: list[tuple[float, int]], out: list[tuple[float, int]] | None = None):
        self.kept = sorted(kept, key=_descending)
        self.out = sorted(out or [])
        self.limit = len(self.kept) + len(self.out)

    @classmethod
    def from_sets(cls, scores, removed) -> "ProjectionHidden":
        """From the search's channel scores (D,) and least-k set (D,) bool."""
        pairs = [(score, channel) for channel, score in enumerate(scores.cpu().tolist())]
        flags = removed.cpu().tolist()
        kept = [pair for pair, out in zip(pairs, flags) if not out]
        return cls(kept, [pair for pair, out in zip(pairs, flags) if out])

    @property
    def width(self) -> int:
        return len(self.kept)

    def channels(self) -> list[int]:
        return sorted(channel for _, channel in self.kept)

    def damage(self, count: int) -> float:
        return sum(score for score, _ in self.kept[-count:])

    def gain(self, count: int) -> float:
        return sum(score for score, _ in self.out[-count:])

    def remove(self, count: int) -> None:
        for _ in range(count):
            bisect.insort(self.out, self.kept.pop())

    def add_back(self, count: int) -> None:
        for _ in range(count):
            bisect.insort(self.kept, self.out.pop(), key=_descending)


class ProjectionLayer:
    """Kept units of one block during the final projection. Unit lists are sorted by DEscending score, so `pop()`
    removes the lowest-scoring one; the sums of kept scores are maintained, so each step costs O(heads)."""

    def __init__(self, keep: bool, heads: dict[int, list[tuple[float, int]]], mlp: list[tuple[float, int]],
                 dims_out: dict[int, list[tuple[float, int]]] | None = None,
                 mlp_out: list[tuple[float, int]] | None = None,
                 heads_out: dict[int, list[tuple[float, int]]] | None = None):
        self.keep = keep
        self.heads = heads  # head -> kept (score, channel) value dims, descending
        self.head_sums = {head: sum(score for score, _ in dims) for head, dims in heads.items()}
        self.mlp = mlp  # kept (score, neuron), descending
        self.mlp_sum = sum(score for score, _ in mlp)
        # units not kept (masked by the search or removed here), ascending, so `pop()` returns the best of them
        self.dims_out = {head: sorted((dims_out or {}).get(head, [])) for head in heads}
        self.mlp_out = sorted(mlp_out or [])
        # heads not kept -> all their (score, channel) value dims, descending (what a head added back chooses from)
        self.heads_out = {head: sorted(dims, key=_descending) for head, dims in (heads_out or {}).items()}
        self.hidden: ProjectionHidden | None = None  # the residual channels, when they are searched (shared)
        self.shared_head_dims = False  # the value dims kept are also the q/k dims kept (`UVCConfig`)

    @classmethod
    def from_groups(cls, groups: UnitGroups, keep: bool) -> "ProjectionLayer":
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
        heads_out = {head: [(score, c) for c, score in enumerate(dim_scores[head])]
                     for head in groups.heads_removed.nonzero().flatten().tolist()}
        return cls(keep, heads, mlp, dims_out, mlp_out, heads_out)

    @property
    def num_heads(self) -> int:
        return len(self.heads)

    @property
    def v_dim(self) -> int:
        return len(next(iter(self.heads.values()))) if self.heads else 0

    def macs(self, cost, heads=None, v_dim=None, mlp=None, hidden=None) -> int:
        cost = as_cost(cost)
        if not self.keep:
            return 0
        heads = self.num_heads if heads is None else heads
        v_dim = self.v_dim if v_dim is None else v_dim
        mlp = len(self.mlp) if mlp is None else mlp
        if hidden is None:
            hidden = self.hidden.width if self.hidden is not None else cost.geometry.hidden_size
        qk_dim = v_dim if self.shared_head_dims else cost.geometry.head_dim
        return cost.block(hidden, heads, qk_dim, v_dim, mlp)

    def _weakest_head(self) -> int:
        return min(self.heads, key=lambda head: (self.head_sums[head], head))

    def best_candidate(self, cost, may_remove_block: bool, floors: dict[str, int] | None = None):
        """(damage / MACs saved, kind order, kind) of the cheapest single removal this block allows, or None.

        Damage = squared column norms removed: an MLP unit, one value dim in every kept head (the lowest of
        each), the weakest head, or (if allowed) the whole block. MLP widths and value head dims stay at or above
        `floors` ("mlp", "vdim"; default 1).
        """
        cost = as_cost(cost)
        if not self.keep:
            return None
        floors = floors or {}
        current = self.macs(cost)
        options = []
        if len(self.mlp) > floors.get("mlp", 1):
            options.append((self.mlp[-1][0], current - self.macs(cost, mlp=len(self.mlp) - 1), "mlp"))
        if self.v_dim > floors.get("vdim", 1):
            damage = sum(dims[-1][0] for dims in self.heads.values())
            options.append((damage, current - self.macs(cost, v_dim=self.v_dim - 1), "vdim"))
        if self.num_heads > 1:
            damage = self.head_sums[self._weakest_head()]
            options.append((damage, current - self.macs(cost, heads=self.num_heads - 1), "head"))
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
            self.heads_out[head] = sorted(self.heads[head] + self.dims_out[head], key=_descending)
            del self.heads[head], self.head_sums[head], self.dims_out[head]
        elif kind == "block":
            self.keep = False

    def _best_head_out(self) -> tuple[float, int] | None:
        """(score, head) of the removed head whose best `v_dim` value dims score highest, or None."""
        if not self.heads_out or not self.heads:
            return None
        v_dim = self.v_dim
        return max((sum(score for score, _ in dims[:v_dim]), head) for head, dims in self.heads_out.items())

    def add_back(self, kind: str, count: int) -> None:
        """Return the `count` best units of `kind` that are not kept: MLP units ("mlp"), value dims in every kept
        head ("vdim"), or removed heads ("head", each with its best `v_dim` value dims)."""
        if kind == "head":
            for _ in range(count):
                _, head = self._best_head_out()
                dims, v_dim = self.heads_out.pop(head), self.v_dim
                self.heads[head] = dims[:v_dim]
                self.head_sums[head] = sum(score for score, _ in dims[:v_dim])
                self.dims_out[head] = sorted(dims[v_dim:])
            return
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

    def growth_options(self, cost, steps: dict[str, int]) -> list[tuple[float, int, str, int]]:
        """(score added, MACs added, kind, units per step) of adding `steps[kind]` more MLP units ("mlp") or value
        dims per head ("vdim"), for kinds in `steps` whose width is already a multiple of the step and that have
        that many units left to add, and of adding back the best removed head (at the block's value head dim)."""
        cost = as_cost(cost)
        if not self.keep:
            return []
        current, options = self.macs(cost), []
        step = steps.get("mlp")
        if step and len(self.mlp) % step == 0 and len(self.mlp_out) >= step:
            gain = sum(score for score, _ in self.mlp_out[-step:])
            options.append((gain, self.macs(cost, mlp=len(self.mlp) + step) - current, "mlp", step))
        step = steps.get("vdim")
        if (step and self.heads and self.v_dim % step == 0
                and all(len(out) >= step for out in self.dims_out.values())):
            gain = sum(score for out in self.dims_out.values() for score, _ in out[-step:])
            options.append((gain, self.macs(cost, v_dim=self.v_dim + step) - current, "vdim", step))
        best_head = self._best_head_out()
        if best_head is not None:
            options.append((best_head[0], self.macs(cost, heads=self.num_heads + 1) - current, "head", 1))
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
        v_channels = [sorted(c for _, c in self.heads[h]) for h in heads]
        return LayerArchitecture(
            heads=heads,
            qk_channels=query_key_channels(v_channels, head_dim, self.shared_head_dims),
            v_channels=v_channels,
            mlp_neurons=sorted(j for _, j in self.mlp),
        )


def query_key_channels(v_channels: list[list[int]], head_dim: int, shared_head_dims: bool) -> list[list[int]]:
    """The kept q/k channels of each kept head: its kept value channels with `UVCConfig.shared_head_dims`, else all
    `head_dim` of them (the paper prunes value dims only)."""
    return v_channels if shared_head_dims else [list(range(head_dim)) for _ in v_channels]


_KIND_ORDER = {"mlp": 0, "vdim": 1, "head": 2, "block": 3, "hidden": 4}


def unit_floors(geo, multiple: int) -> dict[str, int]:
    """The narrowest MLP width ("mlp"), value head dim ("vdim") and residual width ("hidden", when searched) the
    projection may leave: `multiple` for a dimension of at least 8 * multiple units (the rule of OFB's candidate
    widths), else 1. Exactly those kinds are rounded to multiples of `multiple` afterwards."""
    def floor(size: int) -> int:
        return multiple if multiple > 1 and size >= 8 * multiple else 1

    return {"mlp": floor(geo.intermediate_size), "vdim": floor(geo.head_dim), "hidden": floor(geo.hidden_size)}


def project_and_round(layers: list[ProjectionLayer], cost, target: float, multiple: int,
                      hidden: ProjectionHidden | None = None) -> tuple[int, int]:
    """The whole final projection: raise MLP widths, value head dims (and the residual width, with `hidden`) to
    their floors (`unit_floors`) and cut the rounded ones down to multiples of `multiple`, remove unit groups until
    the MACs fit the target (`project_to_budget`), then add back the best units that fit (`round_to_multiple`: in
    blocks of `multiple` for the rounded kinds, singly for the others). Returns (removals, net units removed by the
    floors, the rounding and the add-back)."""
    cost = as_cost(cost)
    floors = unit_floors(cost.geometry, multiple)
    rounded = tuple(kind for kind in ("mlp", "vdim") if floors[kind] > 1)
    single = tuple(kind for kind in ("mlp", "vdim") if floors[kind] == 1)
    raised = sum(layer.raise_to(floors) for layer in layers)
    hidden_step = 1
    if hidden is not None:
        for layer in layers:
            layer.hidden = hidden
        missing = min(floors["hidden"] - hidden.width, len(hidden.out))
        if missing > 0:
            hidden.add_back(missing)
            raised += missing
        hidden_step = floors["hidden"]
        # The add-back never widens the residual stream past the search's width (rounded up to the step): a
        # channel's score is the norm of a whole model-wide group, not on the scale of a head's or an MLP unit's,
        # so comparing gains per MAC across them would just undo the search's choice.
        hidden.limit = min(hidden.width + len(hidden.out), -(-hidden.width // hidden_step) * hidden_step)
        cut = hidden.width % hidden_step if hidden.width >= hidden_step else 0
        hidden.remove(cut)
        raised -= cut
    removed = project_to_budget(layers, cost, target, floors, hidden, hidden_step)
    rounding = round_to_multiple(layers, cost, target, multiple, rounded, hidden, hidden_step, single)
    return removed, rounding - raised


def _hidden_candidate(layers, cost, hidden: ProjectionHidden | None, step: int, floor: int, total: int):
    """(damage / MACs saved, kind order, "hidden") of removing `step` residual channels, or None."""
    cost = as_cost(cost)
    if hidden is None or hidden.width - step < max(floor, 1):
        return None
    saved = total - _total_macs(layers, cost, width=hidden.width - step)
    return (hidden.damage(step) / saved, _KIND_ORDER["hidden"], "hidden") if saved > 0 else None


def project_to_budget(layers: list[ProjectionLayer], cost, target: float,
                      floors: dict[str, int] | None = None, hidden: ProjectionHidden | None = None,
                      hidden_step: int = 1) -> int:
    """Greedily remove the unit group with the least damage per MAC saved until the MACs fit the target.

    Running blocks keep at least one head and `floors` MLP units and value dims (default 1); a whole block may go
    while more than one block runs; the last block goes only when nothing else is left to remove. With `hidden`,
    `hidden_step` residual channels at a time may go too, down to `floors["hidden"]`. Returns the number of
    removals.
    """
    cost = as_cost(cost)
    floors = floors or {}
    total = _total_macs(layers, cost, hidden)
    removals = 0
    kept = sum(layer.keep for layer in layers)
    best = [layer.best_candidate(cost, kept > 1, floors) for layer in layers]
    while not cost.within(total, target):
        choices = [(key, index) for index, key in enumerate(best) if key is not None]
        residual = _hidden_candidate(layers, cost, hidden, hidden_step, floors.get("hidden", 1), total)
        if residual is not None:
            choices.append((residual, -1))
        if choices:
            (_, _, kind), index = min(choices)
        else:
            index = next((i for i, layer in enumerate(layers) if layer.keep), None)
            if index is None:
                raise ValueError(
                    f"the budget {target:.6g} {cost.unit} is below the cost of the patch embedding and classifier "
                    f"head alone ({total:.6g}); raise CompressionConfig.target_flops / target_gmacs, or relax "
                    "target_speedup / target_latency_ms"
                )
            kind = "block"
        removals += 1
        if kind == "hidden":  # every block's MACs and candidates change
            hidden.remove(hidden_step)
            total = _total_macs(layers, cost, hidden)
            best = [layer.best_candidate(cost, kept > 1, floors) for layer in layers]
            continue
        before = layers[index].macs(cost)
        layers[index].remove(kind)
        total += layers[index].macs(cost) - before
        if kind == "block":  # whether blocks may go changed for every layer
            kept -= 1
            best = [layer.best_candidate(cost, kept > 1, floors) for layer in layers]
        else:
            best[index] = layers[index].best_candidate(cost, kept > 1, floors)
    return removals


def round_to_multiple(layers: list[ProjectionLayer], cost: BudgetCost, target: float, multiple: int,
                      kinds=("mlp", "vdim"), hidden: ProjectionHidden | None = None, hidden_step: int = 1,
                      single=()) -> int:
    """Make every MLP width and value head dim (of `kinds`) a multiple of `multiple` within the budget: cut each down
    (lowest scores first), then greedily add back units, best score per price first (`cost`: MACs or ms), while the
    total stays at or under `target` (the budget in `cost`'s unit): `multiple` at a time for `kinds`, one at a
    time for the kinds in `single`, and `hidden_step` residual channels at a time with `hidden`. Widths under
    `multiple` stay as they are. Returns the net number of units removed."""
    cost = as_cost(cost)
    if multiple <= 1:
        single, kinds = tuple(dict.fromkeys((*single, *kinds))), ()
    removed = sum(layer.round_down(multiple, kinds) for layer in layers)
    steps = {**{kind: 1 for kind in single}, **{kind: multiple for kind in kinds}}
    total = _total_macs(layers, cost, hidden)

    def fits(price) -> bool:
        return 0 < price and cost.within(total + price, target)

    while True:
        options = [(gain / price, index, kind, price, step) for index, layer in enumerate(layers)
                   for gain, price, kind, step in layer.growth_options(cost, steps) if fits(price)]
        if (hidden is not None and hidden.width + hidden_step <= hidden.limit and len(hidden.out) >= hidden_step
                and hidden.width % hidden_step == 0):
            price = _total_macs(layers, cost, width=hidden.width + hidden_step) - total
            if fits(price):
                options.append((hidden.gain(hidden_step) / price, -1, "hidden", price, hidden_step))
        if not options:
            return removed
        _, index, kind, _, step = max(options)
        if kind == "hidden":
            hidden.add_back(step)
            removed -= step
        else:
            layers[index].add_back(kind, step)
            removed -= step * {"mlp": 1, "vdim": layers[index].num_heads, "head": layers[index].v_dim}[kind]
        total = _total_macs(layers, cost, hidden)
