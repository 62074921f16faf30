"""UVC's budget held by projection (`UVCConfig.budget_control="projection"`, a deviation from the paper).

The paper's primal-dual search meets the budget through the dual z of R <= B: z grows while R > B, the counts
follow, and R overshoots (on the medium CIFAR-10 benchmark at 30% MACs, to 0.09-0.12 early in the search, every
value head down to one dimension) before z decays again; the removed groups are shrunk by the proximal step all
the while. With the projection the counts take their SGD step from the group term alone, then move along the
budget's own gradient in the counts' step space, `counts + t * u` (clamped to [0, count_max]), with t such that
the continuous R (the counts without the ceil) equals B. In the fraction space (`counts_space="fraction"`) that
direction is u = -dR/ds * count_max^2: what the dual's term z * dR/ds would move, at the z that meets the budget
exactly, so each kind gives up MACs in proportion to what its units cost, and the group terms decide which blocks
give up more. One Newton step per optimizer step (R is bilinear in the counts, its gradient known in closed form)
keeps R on B, many at the first step. Nothing is read back from the device.
"""

from __future__ import annotations

from typing import Sequence

import torch


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
