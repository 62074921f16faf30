"""UVC's least-k sets and sums (docs/methods.md), for every block at once.

A block's least-k set of a kind (heads, value dims within each head, MLP units) is its ceil(count) lowest-scored
units (stable: ties go to the lower index); LS is their summed score and dLS/dcount the (ceil(count) + 1)-th
smallest score. `UnitGroups` holds the sets of every block with the sorted scores and ranks they come from, so the
sets at other counts follow without sorting again. Nothing here reads a value back from the device.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


# -- least-k sums ---------------------------------------------------------------------------------------------
def score_order(scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Ascending values along the last dim and each entry's ascending rank (stable: ties go to the lower index)."""
    ascending, order = torch.sort(scores, dim=-1, stable=True)
    return ascending, torch.argsort(order, dim=-1)


def _removed(ranks: torch.Tensor, ceiled: torch.Tensor) -> torch.Tensor:
    """The least-k set: the `ceiled` (= ceil(count), with a trailing dim of 1 to broadcast along the units)
    lowest-scored units."""
    return ranks < ceiled


def _next_smallest(ascending: torch.Tensor, ceiled: torch.Tensor) -> torch.Tensor:
    """The (ceil(count) + 1)-th smallest value along the last dim of `ascending` (`ceiled` = ceil(count) with a
    trailing dim of 1, clamped to [0, n]); when ceil(count) >= n there is none and the largest is taken (see
    `LeastKSum`)."""
    index = ceiled.clamp(0, ascending.shape[-1] - 1).long()
    if index.shape[:-1] != ascending.shape[:-1]:
        index = index.expand(*ascending.shape[:-1], 1)
    return ascending.gather(-1, index).squeeze(-1)


class LeastKSum(torch.autograd.Function):
    """LS(k; v) = sum of the ceil(k) smallest entries of v, with dLS/dk = the (ceil(k)+1)-th smallest entry.

    Edge: when ceil(k) >= len(v) there is no (ceil(k)+1)-th entry; dLS/dk is then the largest entry (the official
    code's convention: the marginal cost of one more group is taken as the costliest group). ceil(k) is clamped
    to [0, len(v)]. dLS/dv is the 0/1 indicator of the least-k set. Nothing is read back from the device. (The
    search computes the same quantities for every block at once in `UVCMethod`.)
    """

    @staticmethod
    def forward(ctx, k: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        flat = values.detach().reshape(-1).float()
        if flat.numel() == 0:
            total = next_value = flat.new_zeros(())
            indicator = flat
        else:
            ascending, ranks = score_order(flat)
            ceiled = k.detach().float().ceil().reshape(1)
            indicator = _removed(ranks, ceiled).to(flat.dtype)
            total = (flat * indicator).sum()
            next_value = _next_smallest(ascending, ceiled)
        ctx.save_for_backward(next_value, indicator)
        ctx.values_shape = values.shape
        return total

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        next_value, indicator = ctx.saved_tensors
        grad_k = grad_output * next_value if ctx.needs_input_grad[0] else None
        grad_values = (grad_output * indicator).view(ctx.values_shape) if ctx.needs_input_grad[1] else None
        return grad_k, grad_values


def least_k_sum(k, values: torch.Tensor) -> torch.Tensor:
    """Sum of the ceil(k) smallest entries of `values` (float32); d/dk = the (ceil(k)+1)-th smallest (see
    `LeastKSum` for the edge ceil(k) >= len(values))."""
    if not torch.is_tensor(k):
        k = torch.tensor(float(k), device=values.device)
    return LeastKSum.apply(k, values)


def straight_through_ceil(value: torch.Tensor) -> torch.Tensor:
    """ceil(value) forward, identity backward (just ceil when no gradient is asked for)."""
    if not (value.requires_grad and torch.is_grad_enabled()):
        return value.ceil()
    return value + (value.ceil() - value).detach()


@dataclass
class HiddenSets:
    """The residual channels' scores (D,), their ascending order and ranks, and the current least-k set (D,) bool
    (`UVCConfig.prune_hidden`, global: one count for the whole model; see `hidden.py`)."""

    scores: torch.Tensor
    ascending: torch.Tensor
    ranks: torch.Tensor
    removed: torch.Tensor
    rest: torch.Tensor | None = None  # the scores' part outside o_proj and fc2 (`HiddenGroup.scores`)

    @classmethod
    def of(cls, scores: torch.Tensor, ceiled: torch.Tensor, rest: torch.Tensor | None = None) -> "HiddenSets":
        """The least-k set of the ceil(s_D) = `ceiled` (1,) lowest-scored channels (stable ties)."""
        ascending, ranks = score_order(scores)
        return cls(scores, ascending, ranks, _removed(ranks, ceiled), rest)

    def at_count(self, ceiled: torch.Tensor) -> "HiddenSets":
        return HiddenSets(self.scores, self.ascending, self.ranks, _removed(self.ranks, ceiled), self.rest)

    def slope(self, ceiled: torch.Tensor) -> torch.Tensor:
        """d LS / d s_D: the (ceil(s_D) + 1)-th smallest channel score (0-dim)."""
        return _next_smallest(self.ascending, ceiled)

    def least_k_sum(self) -> torch.Tensor:
        return (self.scores * self.removed).sum()


@dataclass
class UnitGroups:
    """Current least-k sets of every block (boolean masks, leading dim = block) and the scores they come from
    (float32, detached), with each kind's ascending scores and ranks (heads, value dims within each head, MLP
    units), from which the least-k sets of other counts follow without sorting again. `layer(i)` is block i's."""

    head_scores: torch.Tensor  # (L, H)
    dim_scores: torch.Tensor  # (L, H, d)
    mlp_scores: torch.Tensor  # (L, I)
    heads_removed: torch.Tensor  # (L, H) bool
    dims_removed: torch.Tensor  # (L, H, d) bool, rows of removed heads included (all False for them)
    mlp_removed: torch.Tensor  # (L, I) bool
    ascending: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None  # heads, dims, mlp
    ranks: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
    hidden: "HiddenSets | None" = None  # the residual channels' sets (`UVCConfig.prune_hidden`), global

    def layer(self, index: int) -> "UnitGroups":
        return UnitGroups(self.head_scores[index], self.dim_scores[index], self.mlp_scores[index],
                       self.heads_removed[index], self.dims_removed[index], self.mlp_removed[index])

    def at_counts(self, ceiled: tuple[torch.Tensor, torch.Tensor, torch.Tensor], heads_only: bool = False):
        """The least-k sets of the same scores at other counts (`ceiled`: `UVCMethod._ceiled_counts()`, with the
        residual count's ceil as a 4th entry when there is one); with `heads_only`, only the heads' and the residual
        channels' (what the least-k slopes need)."""
        head_ranks, dim_ranks, mlp_ranks = self.ranks
        heads_removed = _removed(head_ranks, ceiled[0])
        hidden = self.hidden.at_count(ceiled[3]) if self.hidden is not None else None
        if heads_only:
            return UnitGroups(self.head_scores, self.dim_scores, self.mlp_scores, heads_removed, None, None,
                           self.ascending, self.ranks, hidden)
        dims_removed = _removed(dim_ranks, ceiled[1]) & ~heads_removed.unsqueeze(-1)
        return UnitGroups(self.head_scores, self.dim_scores, self.mlp_scores, heads_removed, dims_removed,
                       _removed(mlp_ranks, ceiled[2]), self.ascending, self.ranks, hidden)

    def least_k_slopes(self, ceiled: tuple) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """d LS / d count per block at the counts whose ceil is `ceiled` (`UVCMethod._ceiled_counts()`), for heads,
        value dims and MLP units: the (ceil + 1)-th smallest score (the value dims' summed over the heads these
        sets keep)."""
        sorted_heads, sorted_dims, sorted_mlp = self.ascending
        per_head = _next_smallest(sorted_dims, ceiled[1])  # (L, H)
        return (_next_smallest(sorted_heads, ceiled[0]), (per_head * ~self.heads_removed).sum(-1),
                _next_smallest(sorted_mlp, ceiled[2]))

    def least_k_sums(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """LS per block for these sets: the summed scores of the removed heads, of the removed value dims of the
        kept heads, and of the removed MLP units."""
        return ((self.head_scores * self.heads_removed).sum(-1),
                (self.dim_scores * self.dims_removed).sum((-2, -1)),
                (self.mlp_scores * self.mlp_removed).sum(-1))
