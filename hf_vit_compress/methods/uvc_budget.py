"""UVC's budget held by projection (`UVCConfig.budget_control="projection"`, a deviation from the paper).

The paper's primal-dual search meets the budget through the dual z of R <= B: z grows while R > B, the counts
follow, and R overshoots (on the medium CIFAR-10 benchmark at 30% MACs, to 0.09-0.12 early in the search, every
value head down to one dimension) before z decays again; the removed groups are shrunk by the proximal step all
the while. With the projection the counts take their SGD step from the group term alone, then move along the
budget's own gradient in the counts' step space, `counts + t * u` (clamped to [0, count_max]), with t such that
the continuous R (the counts without the ceil) equals B. In the fraction space (`counts_space="fraction"`) that
direction is u = -dR/ds * count_max^2: what the dual's term z * dR/ds would move, at the z that meets the budget
exactly, so each kind gives up MACs in proportion to what its units cost, and the group terms decide which blocks
give up more. One forward-difference Newton step per optimizer step keeps R on B (R is bilinear in the counts), many
at the first step. Nothing is read back from the device.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

#: relative size of the probe step of the forward difference (a fraction of every count's range)
PROBE = 0.01


@torch.no_grad()
def project_counts_to_budget(counts: Sequence[torch.Tensor], count_max: Sequence[torch.Tensor],
                             directions: Sequence[torch.Tensor],
                             ratio_of: Callable[[Sequence[torch.Tensor]], torch.Tensor], target: float | torch.Tensor,
                             iterations: int = 1) -> None:
    """Moves `counts` in place to `clamp(counts + t * u, 0, count_max)` with R = `ratio_of(counts)` = `target`.

    Args:
        counts: the removal counts (any shapes), moved together.
        count_max: their upper bounds (same shapes, or broadcastable).
        directions: u, >= 0, the direction each count moves in (same shapes); scaled here so that the largest
            u / count_max is 1 (the probe then moves no count by more than `PROBE` of its range).
        ratio_of: R of a tuple of counts (continuous in them, non-increasing along `count_max`), a 0-dim tensor.
        target: the budget B as a fraction of the dense MACs.
        iterations: Newton steps, each with a forward-difference slope probed towards the target.
    """
    largest = torch.stack([(u / m.clamp(min=1.0)).amax() for u, m in zip(directions, count_max)]).amax()
    directions = [u / largest.clamp(min=1e-30) for u in directions]
    for _ in range(iterations):
        ratio = ratio_of(counts)
        residual = ratio - target
        # probe towards the target (a count at a bound in that direction then adds no slope), branch-free
        probe = torch.where(residual > 0, PROBE, -PROBE)
        moved = [torch.minimum((c + probe * u).clamp(min=0.0), m) for c, u, m in zip(counts, directions, count_max)]
        slope = (ratio_of(moved) - ratio) / probe  # dR/dt <= 0
        # nothing left to move (slope 0): a large step, which the clamp turns into the bound
        step = -residual / slope.clamp(max=-1e-6)
        for c, u, m in zip(counts, directions, count_max):
            torch.minimum((c + step * u).clamp_(min=0.0), m, out=c)
