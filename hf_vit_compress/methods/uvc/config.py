"""`UVCConfig`: the settings of the UVC search (`CompressionConfig.uvc`)."""

from __future__ import annotations

from dataclasses import dataclass

from ...validation import Validated, check, check_types


@dataclass
class UVCConfig(Validated):
    """UVC settings (docs/methods.md). Defaults are the paper's / official code's, except `counts_space`,
    `channel_multiple`, `prune_hidden` and `shared_head_dims`.

    Args:
        gumbel_tau: temperature of the Gumbel-softmax block gates.
        skip_warmup_fraction: share of the search during which block gates are fixed at (0.5, 0.5) and theta is
            frozen (paper: 5 of 30 epochs).
        theta_init: initial skip-gate logits (skip, run).
        counts_space: where the counts take their SGD step. `"fraction"` (default, a deviation from the official
            code): on s / range, so a head count (range H - 1) and an MLP count (range 4D - 1) move at comparable
            relative speed; `counts_lr` is then the largest step as a fraction of a count's range. `"units"` (spec):
            on the counts themselves, heads and MLP inf-norm clipped jointly. One head weighs (3D + N) / (2H) times
            the MACs of one MLP unit (112 on DeiT-S), so MLP counts then move ~3e-5 times as fast relative to their
            range as head counts (DeiT-S) and the budget is met by heads alone.
        counts_lr: SGD learning rate of the continuous removal counts s, r (see `counts_space` for its unit).
        channel_multiple: kernel-friendly widths (default 8): for a dimension of at least 8 * channel_multiple
            units (DeiT's MLP and 64-channel heads), the final projection never cuts the MLP width or the value
            head dim below this and then rounds both to multiples of it within the budget (cut down, then add
            back the best blocks of units that fit). Multiples of 8 are what the fused sdpa kernels
            (memory-efficient, cuDNN) and bf16 tensor-core GEMMs need (`surgery.kernels`); UVC's value head
            dim differs from its q/k head dim, which flash attention does not take. 1 keeps the spec's unit
            granularity (as fast on CPU; on a GPU such widths force sdpa's math fallback).
        prune_hidden: also search the residual (embedding) width D, beyond the paper's space: one global count of
            removed residual channels, ranked by the squared norm of every weight that uses the channel, with its
            own least-k group, dual, term in R and proximal shrink; exported as the kept hidden channels (the
            LayerNorms then normalise the kept channels only). On by default: it scored higher at 30% MACs on the
            CIFAR-10 benchmark (docs/methods.md); False restores the paper's search space and (with
            `shared_head_dims=False`) a cheaper search step (benchmarks/results/dispatch.md).
        shared_head_dims: the head-dim count removes each dim from the queries and keys as well as from the values
            (beyond the paper's space, which prunes value dims only and keeps every q/k dim of a kept head): a dim's
            group is then its o_proj column and its q_proj and k_proj rows, scored, shrunk and priced together, and
            the exported q/k and value head dims are equal (which flash attention needs). On by default: it scored
            higher than value dims only on the CIFAR-10 benchmark (docs/methods.md); False restores the paper's
            space.
        theta_lr, theta_momentum: SGD settings of the skip-gate logits.
        theta_budget_weight: weight of z * dR/dtheta in theta's gradient.
        dual_lr: ascent step of the group duals y and p.
        budget_control: how the counts meet the budget. `"dual"` (the paper's): through the budget dual z's term
            in their gradient. `"projection"` (a deviation): the counts step on the group terms alone, then one
            Newton step moves them along the budget's gradient back onto R = B after every step (plus an offset
            that brings the masks' ceiled counts onto B; `methods/uvc/budget.py`), so R does not overshoot; z still
            prices the blocks' skip gates.
        budget_dual_update: how the budget dual z ascends. `"log"` (default, a deviation from the spec): in log
            space, z <- z * exp(eta * (R - B)) with eta = `budget_dual_log_lr`, so z reaches whatever scale the
            group terms it balances have and tracks their growth without a standing offset. `"additive"` (spec):
            z <- max(0, z + budget_dual_lr * (R - B)).
        budget_dual_lr: ascent step of the budget dual z with `budget_dual_update="additive"`.
        budget_dual_log_lr: eta of `budget_dual_update="log"`; None (default) = min(1, 200 / the number of search
            steps). The group duals z balances grow about linearly in time; log-space ascent then lags behind B by
            about 1 / (eta t) at search step t: with eta = 200 / steps, a point of the MACs from mid-search on,
            whatever the schedule length.
        dual_init: initial value of every dual (> 0 for the budget dual with `budget_dual_update="log"`).
        budget_gap_clip: (R - B) is clipped to +-this in the counts' gradient.
        prox: apply the proximal shrink W_g <- W_g / (1 + 2 * lr * dual) to the least-k groups.
    """

    gumbel_tau: float = 0.5
    skip_warmup_fraction: float = 5 / 30
    theta_init: tuple[float, float] = (-1.0, 1.0)
    counts_space: str = "fraction"
    counts_lr: float = 0.02
    channel_multiple: int = 8
    theta_lr: float = 0.1
    theta_momentum: float = 0.9
    theta_budget_weight: float = 5e-4
    prune_hidden: bool = True
    shared_head_dims: bool = True
    dual_lr: float = 1e-4
    budget_control: str = "dual"
    budget_dual_update: str = "log"
    budget_dual_lr: float = 1.0
    budget_dual_log_lr: float | None = None
    dual_init: float = 1e-3
    budget_gap_clip: float = 0.5
    prox: bool = True

    def validate(self) -> None:
        check_types(self, "uvc.")
        for name in ("gumbel_tau", "counts_lr", "theta_lr", "budget_gap_clip"):
            check(getattr(self, name) > 0, f"uvc.{name}", getattr(self, name), "> 0")
        for name in ("dual_lr", "budget_dual_lr", "dual_init", "theta_budget_weight"):
            check(getattr(self, name) >= 0, f"uvc.{name}", getattr(self, name), ">= 0")
        check(self.channel_multiple >= 1, "uvc.channel_multiple", self.channel_multiple, "an integer >= 1")
        check(self.counts_space in ("fraction", "units"), "uvc.counts_space", self.counts_space,
               "'fraction' or 'units'")
        check(0 <= self.theta_momentum < 1, "uvc.theta_momentum", self.theta_momentum, "[0, 1)")
        check(self.budget_control in ("dual", "projection"), "uvc.budget_control", self.budget_control,
               "'dual' or 'projection'")
        check(self.budget_dual_update in ("log", "additive"), "uvc.budget_dual_update", self.budget_dual_update,
               "'log' or 'additive'")
        check(self.budget_dual_log_lr is None or self.budget_dual_log_lr > 0, "uvc.budget_dual_log_lr",
               self.budget_dual_log_lr, "None or > 0")
        check(self.budget_dual_update != "log" or self.dual_init > 0, "uvc.dual_init", self.dual_init,
               "> 0 with budget_dual_update='log' (z is scaled multiplicatively from it)")
        check(0 <= self.skip_warmup_fraction <= 1, "uvc.skip_warmup_fraction", self.skip_warmup_fraction, "[0, 1]")
