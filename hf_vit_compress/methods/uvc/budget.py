"""UVC's budget terms: R (expected cost / dense cost) of the counts and skip gates, its gradients, and the budget
held by projection (`UVCConfig.budget_control="projection"`, a deviation from the paper).

`UVCBudget` is the part of `UVCMethod` that prices the counts: R counts the MACs of `flops.block_macs` (plus stem
and classifier head) at the kept widths, weighted by the blocks' run probabilities; `block_macs` is bilinear in the
widths and the residual width, so R and its derivatives come from six per-unit coefficients. Under a speed budget
(`CompressionConfig.target_speedup`) R prices the same widths by the latency table instead (`surgery.cost`), and its
count gradients come from autograd through the table's piecewise-multilinear interpolation; everything else below
(the dual, the projection, the offset) is the same code in the budget's unit.

The projection. The paper's primal-dual search meets the budget through the dual z of R <= B: z grows while R > B,
the counts follow, and R overshoots (on the medium CIFAR-10 benchmark at 30% MACs, to 0.08-0.09 after its warm-up in
the quality.py runs, value heads down to a few dimensions) before z decays again; the removed groups are shrunk by
the proximal step all the while. With the projection the counts take their SGD step from the group term alone, then
move along the budget's own gradient in the counts' step space, `counts + t * u` (clamped to [0, count_max]), with t
such that the continuous R (the counts without the ceil) equals B. In the fraction space (`counts_space="fraction"`)
that direction is u = -dR/ds * count_max^2: what the dual's term z * dR/ds would move, at the z that meets the
budget exactly, so each kind gives up MACs in proportion to what its units cost, and the group terms decide which
blocks give up more. One Newton step per optimizer step (R is bilinear in the counts, its gradient known in closed
form) keeps R on B, 30 when the method is built. The masks keep the ceiled counts, up to a whole head per block
fewer than the continuous ones, so the continuous R is held at B + an offset that integrates the masks' gap to B
(`OFFSET_RATE` of it per step): the masks' R settles on B without a unit flipping every step. Nothing is read back
from the device. It holds the budget but has not beaten the dual on the benchmarks (docs/methods.md).
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from ...surgery.flops import block_macs, stem_and_head_macs
from .groups import straight_through_ceil

#: columns of `UVCMethod.counts`, `count_max` and `duals`; heads and MLP units share one inf-norm clip in the counts'
#: SGD, so they are adjacent
HEADS, MLP, VDIMS = 0, 1, 2
#: budget_control="projection": the share of the masks' budget gap added to the continuous target per step
OFFSET_RATE = 0.05
#: budget_control="projection": Newton steps when the method is built (then one after every optimizer step)
INITIAL_NEWTON_STEPS = 30


def version_key(tensors) -> tuple:
    """Identifies tensors by object and in-place version, without reading them: equal keys mean nothing was
    written to them in place since (what the UVC step's caches are keyed on)."""
    return tuple((id(tensor), tensor._version) for tensor in tensors)


@torch.no_grad()
def project_counts_to_budget(counts: Sequence[torch.Tensor], count_max: Sequence[torch.Tensor],
                             directions: Sequence[torch.Tensor], gradients: Sequence[torch.Tensor],
                             ratio: torch.Tensor, target: float | torch.Tensor) -> None:
    """One Newton step of `counts` in place towards R = `target` along `directions`:
    `clamp(counts + t * u, 0, count_max)`, t = (target - R) / (dR/dcounts . u over the counts free to move).

    Args:
        counts: the removal counts (any shapes), moved together.
        count_max: their upper bounds (same shapes, or broadcastable).
        directions: u, >= 0, the direction each count moves in (same shapes; any scale).
        gradients: dR/dcounts at `counts` (<= 0, same shapes).
        ratio: R at `counts` (0-dim).
        target: the budget B as a fraction of the dense MACs.
    """
    remove = ratio > target
    slope = ratio.new_zeros(())
    for c, u, m, g in zip(counts, directions, count_max, gradients):
        free = torch.where(remove, c < m, c > 0)  # a count at its bound in the direction of travel adds no slope
        slope = slope + (g * u * free).sum()
    # nothing left to move (slope 0): a large step, which the clamp turns into the bound
    step = (target - ratio) / slope.clamp(max=-1e-12)
    for c, u, m in zip(counts, directions, count_max):
        torch.minimum((c + step * u).clamp_(min=0.0), m, out=c)


class UVCBudget:
    """R and its gradients for `UVCMethod` (a mixin).

    The contract with the class it is mixed into: the attributes annotated below, plus
    `_gate_probabilities()` (`UVCMethod`: the noise-free run probabilities of the blocks).
    """

    # -- provided by UVCMethod / CompressionMethod ------------------------------------------------------------
    config: Any  # CompressionConfig
    geometry: Any  # surgery.flops.Geometry
    target_macs: float
    dense_macs: int
    prune_hidden: bool
    counts: torch.Tensor  # (L, 3) heads / MLP units / value dims removed, continuous
    count_max: torch.Tensor  # (L, 3) their upper bounds
    hidden_count: torch.Tensor  # residual channels removed (prune_hidden)
    hidden_count_max: torch.Tensor
    theta: torch.Tensor  # (L, 2) skip / run logits
    budget_offset: torch.Tensor  # budget_control="projection": the continuous R's offset from B

    cost: Any  # surgery.cost.BudgetCost: MACs, or a latency table's milliseconds
    dense_cost: float
    target_cost_ratio: float

    @property
    def target_ratio(self) -> float:
        """B, the budget as a fraction of the dense cost (MACs, or predicted milliseconds for a speed budget)."""
        return self.target_cost_ratio

    @property
    def _priced_by_table(self) -> bool:
        """A speed budget: R is priced by the latency table (autograd gradients), not MACs' closed form."""
        return self.cost.kind != "macs"

    def _linear_macs_coefficients(self) -> tuple[tuple[int, int], tuple[int, int], tuple[int, int]]:
        """(MACs at residual width 0, MACs per residual channel) of one q/k channel, one value channel and one MLP
        unit of a block: `flops.block_macs` is linear in the three widths for a given residual width D and linear in
        D for given widths, so R and its derivatives need only these six numbers. Checked on the formula itself, so
        a change that breaks this form fails here, loudly."""
        geo = self.geometry
        units = ((1, 0, 0), (0, 1, 0), (0, 0, 1))
        at_zero = [int(block_macs(geo.tokens, 0, *unit)) for unit in units]
        per_channel = [int(block_macs(geo.tokens, 1, *unit)) - zero for unit, zero in zip(units, at_zero)]
        widths = (3 * geo.head_dim, 2 * geo.head_dim - 1, geo.intermediate_size - 5)
        for hidden in (geo.hidden_size, 7):
            expected = sum((a + b * hidden) * w for a, b, w in zip(at_zero, per_channel, widths))
            if block_macs(geo.tokens, hidden, *widths) != expected:
                raise RuntimeError("flops.block_macs is no longer bilinear in the widths and the residual width: "
                                   "UVC's budget terms need review")
        return tuple(zip(at_zero, per_channel))

    def _unit_macs(self, hidden) -> tuple:
        """MACs of one q/k channel, value channel and MLP unit of a block at residual width `hidden` (a number, or a
        tensor when the residual width is searched)."""
        if torch.is_tensor(hidden):
            return torch.addcmul(self._width_macs_table[0], self._width_macs_table[1], hidden).unbind(0)
        return tuple(at_zero + per_channel * hidden for at_zero, per_channel in self._width_macs)

    def expected_ratio(self, head_removed=None, vdim_removed=None, mlp_removed=None, run=None,
                       hidden_removed=None) -> torch.Tensor:
        """R = expected MACs / dense MACs (stem and head included) from removal counts (straight-through ceil)
        and per-block run probabilities (default: the current counts and softmax(theta / tau)[run], detached)."""
        geo = self.geometry
        head_removed = self.head_counts if head_removed is None else head_removed
        vdim_removed = self.vdim_counts if vdim_removed is None else vdim_removed
        mlp_removed = self.mlp_counts if mlp_removed is None else mlp_removed
        run = self._gate_probabilities().detach()[:, 1] if run is None else run
        heads_kept = geo.num_heads - straight_through_ceil(head_removed.float())
        vdim_kept = geo.head_dim - straight_through_ceil(vdim_removed.float())
        mlp_kept = geo.intermediate_size - straight_through_ceil(mlp_removed.float())
        hidden_kept = geo.hidden_size
        if self.prune_hidden:
            hidden_removed = self.hidden_count if hidden_removed is None else hidden_removed
            hidden_kept = geo.hidden_size - straight_through_ceil(hidden_removed.float())
        costs = self._block_costs(heads_kept, vdim_kept, mlp_kept, hidden_kept)[0]
        return self._ratio(costs, run.float(), hidden_kept)

    def _hard_run(self) -> torch.Tensor:
        """1 for blocks theta runs (theta_l[1] > theta_l[0]), else 0."""
        return (self.theta[:, 1] > self.theta[:, 0]).float()

    def search_macs_ratio(self) -> float:
        """R, the search's own expected MACs ratio (before the final projection)."""
        with torch.no_grad():
            return float(self.expected_ratio())

    def hard_ratio(self) -> float:
        """MACs ratio of the hard architecture before the final projection (ceil counts, theta decisions)."""
        with torch.no_grad():
            return float(self.expected_ratio(run=self._hard_run()))

    def _count_tensors(self) -> list[torch.Tensor]:
        """The removal counts: `counts` and, when the residual width is searched, `hidden_count`."""
        return [self.counts, self.hidden_count] if self.prune_hidden else [self.counts]

    def _counts_cached(self, name: str, compute):
        """`compute()`, reused while the counts (and the residual count) are the same tensors at the same in-place
        version: what a step's end computes from them, the next step's start needs again (no device read).
        `UVCMethod` owns `_counts_cache` and empties it when its tensors are replaced (`_apply`)."""
        key = version_key(self._count_tensors())
        entry = self._counts_cache.get(name)
        if entry is None or entry[0] != key:
            entry = self._counts_cache[name] = (key, compute())
        return entry[1]

    def _kept_widths(self, ceil: bool = True) -> tuple:
        """Per block the kept heads, value head dim and MLP width of the current counts (ceil: what the masks keep;
        `ceil=False`: the continuous relaxation), each (L,), and the kept residual width (0-dim; the dense width, a
        number, when it is not searched). The ceiled ones are reused while the counts are unchanged."""
        if ceil:
            return self._counts_cached("kept", lambda: self._compute_kept_widths(True))
        return self._compute_kept_widths(False)

    def _compute_kept_widths(self, ceil: bool) -> tuple:
        geo = self.geometry
        counts = self.counts.ceil() if ceil else self.counts
        columns = counts.unbind(1)
        hidden = geo.hidden_size
        if self.prune_hidden:
            hidden = geo.hidden_size - (self.hidden_count.ceil() if ceil else self.hidden_count)
        return (geo.num_heads - columns[HEADS], geo.head_dim - columns[VDIMS], geo.intermediate_size - columns[MLP],
                hidden)

    def _block_costs(self, heads_kept, vdim_kept, mlp_kept, hidden_kept,
                     unit_macs: tuple | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Per block `block_macs` at qk = heads * d (heads * v_dim with `shared_head_dims`), v = heads * v_dim, the
        MLP width and the residual width (tensors), and the MACs of one head of that block (per_qk * d, or
        per_qk * v_dim, + per_v * v_dim); `unit_macs`: `_unit_macs(hidden_kept)` when the caller has it. A speed
        budget prices each block by the latency table instead (and has no per-head cost: None)."""
        if self._priced_by_table:
            return self._table_block_costs(heads_kept, vdim_kept, mlp_kept, hidden_kept), None
        per_qk, per_v, per_mlp = self._unit_macs(hidden_kept) if unit_macs is None else unit_macs
        qk_dim = vdim_kept if self.config.uvc.shared_head_dims else self.geometry.head_dim
        per_head = per_v * vdim_kept + per_qk * qk_dim
        return torch.addcmul(per_mlp * mlp_kept, heads_kept, per_head), per_head

    def _table_block_costs(self, heads_kept, vdim_kept, mlp_kept, hidden_kept) -> torch.Tensor:
        """Per block the latency table's milliseconds of its attention and MLP at these (tensor) widths."""
        hidden = torch.as_tensor(hidden_kept, dtype=torch.float32, device=heads_kept.device).expand_as(heads_kept)
        qk_dim = vdim_kept if self.config.uvc.shared_head_dims else torch.full_like(vdim_kept, self.geometry.head_dim)
        return self.cost.attention(hidden, heads_kept, qk_dim, vdim_kept) + self.cost.mlp(hidden, mlp_kept)

    def _stem_cost(self, hidden_kept):
        if self._priced_by_table:
            return self.cost.stem(hidden_kept)
        return stem_and_head_macs(self.geometry, hidden_kept)

    def _ratio(self, costs: torch.Tensor, run: torch.Tensor, hidden_kept) -> torch.Tensor:
        return (self._stem_cost(hidden_kept) + (run * costs).sum()) / float(self.dense_cost)

    @torch.no_grad()
    def _project_to_budget(self, ratio_and_gradients: tuple | None = None) -> None:
        """One Newton step of the counts (and the residual count) towards the continuous R = B + `budget_offset`
        along the budget's gradient in the counts' step space (`budget.py`); `ratio_and_gradients`: R and
        dR/dcounts, dR/ds_D of `_ratio_and_gradients(ceil=False)` when the caller has them."""
        ratio, d_counts, _, d_hidden = self._ratio_and_gradients(ceil=False) if ratio_and_gradients is None \
            else ratio_and_gradients
        fraction = self.config.uvc.counts_space == "fraction"
        counts, count_max, gradients = [self.counts], [self.count_max], [d_counts]
        if self.prune_hidden:
            counts.append(self.hidden_count)
            count_max.append(self.hidden_count_max)
            gradients.append(d_hidden)
        # fraction space: u = -dR/ds * range^2 (the steepest descent of R in s / range); units space: u = -dR/ds
        directions = [-g * m.square() if fraction else -g for g, m in zip(gradients, count_max)]
        project_counts_to_budget(counts, count_max, directions, gradients, ratio,
                                 self.target_ratio + self.budget_offset)

    def _ratio_and_gradients(self, ceil: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                                torch.Tensor | None]:
        """R (noise-free gates), dR/dcounts (L, 3) (straight-through ceil: d ceil(s)/ds = 1), dR/dtheta (L, 2) and
        dR/ds_D (0-dim, None when the residual width is not searched), from R's bilinear form (see
        `_linear_macs_coefficients`); at the ceiled counts, or (`ceil=False`) at the continuous ones. A speed budget
        takes dR/dcounts and dR/ds_D by autograd through the table's interpolation (`_table_ratio_and_gradients`)."""
        if self._priced_by_table:
            return self._table_ratio_and_gradients(ceil)
        heads_kept, vdim_kept, mlp_kept, hidden_kept = self._kept_widths(ceil)
        unit_macs = self._unit_macs(hidden_kept)
        per_qk, per_v, per_mlp = unit_macs
        costs, per_head = self._block_costs(heads_kept, vdim_kept, mlp_kept, hidden_kept, unit_macs)
        run = self._gate_probabilities()[:, 1]
        dense = float(self.dense_macs)
        minus_weight = run * (-1.0 / dense)  # dR/dcost_l = run_l / dense; removing units lowers the cost
        grads = [None] * 3
        grads[HEADS] = minus_weight * per_head
        shared = self.config.uvc.shared_head_dims  # a dim then costs its q and k channels too
        grads[VDIMS] = minus_weight * ((per_v + per_qk if shared else per_v) * heads_kept)
        grads[MLP] = minus_weight * per_mlp
        d_hidden = None
        if self.prune_hidden:  # d cost_l / dD = per-channel MACs of its widths; the stem and heads are linear in D
            (_, qk_channel), (_, v_channel), (_, mlp_channel) = self._width_macs
            qk_dim = vdim_kept if shared else self.geometry.head_dim
            per_residual_channel = heads_kept * (qk_channel * qk_dim + v_channel * vdim_kept)
            per_residual_channel = per_residual_channel + mlp_channel * mlp_kept
            stem = stem_and_head_macs(self.geometry, 1)
            d_hidden = torch.add(torch.dot(minus_weight, per_residual_channel), -stem / dense)
        # d softmax(theta / tau)[run] / d theta = run (1 - run) / tau * (-1, +1)
        d_run = costs * run * (1.0 - run) * (1.0 / (dense * self.config.uvc.gumbel_tau))
        ratio = self._ratio(costs, run, hidden_kept)
        return ratio, torch.stack(grads, 1), torch.stack([-d_run, d_run], 1), d_hidden

    def _table_ratio_and_gradients(self, ceil: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                               torch.Tensor | None]:
        """`_ratio_and_gradients` priced by the latency table: the interpolation is piecewise multilinear, so the
        gradients are those of the grid cell the widths are in (straight-through ceil, as for MACs); dR/dtheta has
        the same closed form as for MACs (R is linear in each block's run probability)."""
        geo = self.geometry
        with torch.enable_grad():
            counts = self.counts.detach().float().requires_grad_(True)
            rounded = straight_through_ceil(counts) if ceil else counts
            columns = rounded.unbind(1)
            hidden, hidden_count = geo.hidden_size, None
            if self.prune_hidden:
                hidden_count = self.hidden_count.detach().float().requires_grad_(True)
                hidden = geo.hidden_size - (straight_through_ceil(hidden_count) if ceil else hidden_count)
            costs = self._table_block_costs(geo.num_heads - columns[HEADS], geo.head_dim - columns[VDIMS],
                                            geo.intermediate_size - columns[MLP], hidden)
            run = self._gate_probabilities()[:, 1].detach()
            ratio = self._ratio(costs, run, hidden)
            inputs = [counts] + ([hidden_count] if self.prune_hidden else [])
            grads = torch.autograd.grad(ratio, inputs, allow_unused=True)
        d_counts = grads[0] if grads[0] is not None else torch.zeros_like(counts)
        d_hidden = None
        if self.prune_hidden:
            d_hidden = grads[1] if grads[1] is not None else torch.zeros_like(hidden_count)
        costs = costs.detach()
        d_run = costs * run * (1.0 - run) * (1.0 / (float(self.dense_cost) * self.config.uvc.gumbel_tau))
        return ratio.detach(), d_counts, torch.stack([-d_run, d_run], 1), d_hidden
