"""`OFBConfig`: the settings of the OFB search (`CompressionConfig.ofb`)."""

from __future__ import annotations

from dataclasses import dataclass, field

from ...validation import Validated, check, check_ratios, check_types

#: how OFB holds its budget (OFBConfig.budget_control)
BUDGET_CONTROLS = ("dual", "paper")
#: the direction in which the dual budget control moves the architecture logits (OFBConfig.budget_direction)
BUDGET_DIRECTIONS = ("width", "cost")
#: how OFB starts its importance logits (OFBConfig.score_init)
SCORE_INITS = ("random", "weights")


@dataclass
class OFBConfig(Validated):
    """OFB settings (docs/methods.md). Fractions of the search refer to the search phase's steps.

    Args:
        prune_heads: search the number of heads (the paper's space: candidates `head_choices`). False (default, a
            deviation): every candidate keeps all H heads and the search narrows them (`head_dim_ratios`), as
            one-shot pruners do: it scored higher on the CIFAR-10 benchmark (docs/methods.md). Explicit
            `head_choices` are used either way.
        head_choices: candidate numbers of heads; None = H alone without `prune_heads`, else every even count up to
            H (plus H itself), or 1..H when H <= 4 (DeiT-T's 3 heads, tiny test models).
        head_dim_ratios: candidate per-head q/k/v widths as fractions of head_dim.
        mlp_ratios: candidate MLP widths as fractions of intermediate_size.
        embed_min_ratio: narrowest candidate residual width as a fraction of hidden_size (widest is 1.0).
        embed_step: channels between embedding candidates; None = min(hidden_size // 32, 12), at least 1.
        channel_multiple: round candidate widths to a multiple of this when the dimension is at least
            8 * channel_multiple (hardware-friendly shapes); 1 disables rounding.
        warmup_fraction: share of the search over which lambda and the PMIM ratio ramp (paper: 20 of 100 epochs).
        lambda_start, lambda_end: bi-mask mixing weight of the importance score S at the start / end of warm-up.
        pmim: use progressive masked image modelling during the search.
        pmim_keep_start, pmim_keep_end: fraction of patch tokens kept unmasked at the start / end of warm-up.
        pmim_window: local-normalisation window at 224 px (scaled with the image size, kept odd).
        module_loss_weight: weight of the summed per-module one-hot losses (0.5).
        budget_control: how the search holds the budget. `"dual"` (default, a deviation from the paper): after
            every optimizer step the architecture logits are projected onto E[MACs] = target (every module's alpha
            shifted by t * width / widest width, t by Newton steps on the device), so the other terms decide how
            the budget is shared but never move it, and no FLOPs loss is used; candidates are eliminated only after
            warm-up, in `elimination_rounds` rounds spread over the rest of the search. `"paper"`: the paper's
            fixed-weight FLOPs loss and `eliminations_per_epoch` rounds from the first step.
        budget_direction: `budget_control="dual"`: how the projection shifts each module's logits. `"width"`
            (default): by t * width / widest width, alike for every module. `"cost"`: by t * each candidate's
            marginal price at the current probabilities (the least change of the distribution that meets the
            budget), so the embedding width, which every block's price depends on, pays in proportion.
        flops_loss_weight: weight of the FLOPs loss ((E[MACs] - target) / dense)^2 (the paper's 5; `"paper"` only).
        norm_coefficient_attention, norm_coefficient_other: c of the norm term c * sum(S) (attention; MLP+embed).
        sigma_eps: clamp of sigma into (eps, 1 - eps) that keeps cot(pi * sigma) finite.
        arch_lr, arch_betas, arch_weight_decay: AdamW settings of the architecture logits alpha. `arch_lr=None`
            (default): `arch_travel / search steps` under `budget_control="dual"` (Adam moves a logit about lr per
            step, so that is how far a logit can travel in the whole search, whatever its length), the paper's
            1e-3 under `"paper"`.
        arch_travel: the rule's logit travel over the search (used when `arch_lr` is None and the budget control
            is `"dual"`). 1.0 (was 3.0): a shorter travel keeps the modules nearer the budget's even start, which
            scored higher from a converged model (docs/methods.md).
        score_lr: learning rate of the importance logits (None = the weights' learning rate); weight decay 0.
        decoder_lr: learning rate of the PMIM decoder and mask token.
        elimination_threshold: a candidate with p <= threshold / K_active is switched off.
        elimination_rounds: `budget_control="dual"`: elimination rounds, evenly spread over the search after
            warm-up (none before warm-up ends).
        eliminations_per_epoch: `budget_control="paper"`: elimination rounds per epoch, from the first step (paper:
            about 3).
        score_init_std: std of the truncated-normal init of the importance logits s (S = sigmoid(s)).
        score_init: `"weights"` (default, a deviation): s in the order of a magnitude score of each unit in the
            dense weights, evenly spaced over the random init's range (+-2 std), so a search from a trained model
            refines an informed order instead of a random one (a short search barely reorders s).
            `"random"`: the paper's truncated-normal draw above.
        score_init_mean: centre of the importance logits at the start (either init): 0 (the paper) starts every
            unit's S near 0.5, so the search begins from a model whose masked outputs are about half the dense
            ones; a positive centre (S = sigmoid(centre)) starts it closer to the dense model's function.
    """

    prune_heads: bool = False
    head_choices: list[int] | None = None
    head_dim_ratios: list[float] = field(default_factory=lambda: [2 / 8, 3 / 8, 4 / 8, 5 / 8, 6 / 8, 7 / 8, 1.0])
    mlp_ratios: list[float] = field(default_factory=lambda: [2 / 8, 3 / 8, 4 / 8, 5 / 8, 6 / 8, 7 / 8, 1.0])
    embed_min_ratio: float = 0.5
    embed_step: int | None = None
    channel_multiple: int = 8
    warmup_fraction: float = 0.2
    lambda_start: float = 0.99
    lambda_end: float = 0.1
    pmim: bool = True
    pmim_keep_start: float = 0.95
    pmim_keep_end: float = 0.75
    pmim_window: int = 47
    module_loss_weight: float = 0.5
    budget_control: str = "dual"
    budget_direction: str = "width"
    flops_loss_weight: float = 5.0
    norm_coefficient_attention: float = 4e-4
    norm_coefficient_other: float = 1e-4
    sigma_eps: float = 1e-3
    arch_lr: float | None = None
    arch_travel: float = 1.0
    arch_betas: tuple[float, float] = (0.5, 0.999)
    arch_weight_decay: float = 1e-3
    score_lr: float | None = None
    decoder_lr: float = 1e-3
    elimination_threshold: float = 0.2
    elimination_rounds: int = 100
    eliminations_per_epoch: float = 3.0
    score_init_std: float = 0.2
    score_init: str = "weights"
    score_init_mean: float = 0.0

    def validate(self) -> None:
        check_types(self, "ofb.")
        if self.head_choices is not None:
            ok = len(self.head_choices) > 0 and all(isinstance(h, int) and h >= 1 for h in self.head_choices)
            check(ok, "ofb.head_choices", self.head_choices, "None or a non-empty list of ints >= 1")
        check_ratios("ofb.head_dim_ratios", self.head_dim_ratios, 0.0, 1.0)
        check_ratios("ofb.mlp_ratios", self.mlp_ratios, 0.0, 1.0)
        check(0 < self.embed_min_ratio <= 1, "ofb.embed_min_ratio", self.embed_min_ratio, "(0, 1]")
        check(self.embed_step is None or self.embed_step >= 1, "ofb.embed_step", self.embed_step, "None or >= 1")
        check(self.channel_multiple >= 1, "ofb.channel_multiple", self.channel_multiple, ">= 1")
        check(0 <= self.warmup_fraction <= 1, "ofb.warmup_fraction", self.warmup_fraction, "[0, 1]")
        for name in ("lambda_start", "lambda_end"):
            check(0 <= getattr(self, name) <= 1, f"ofb.{name}", getattr(self, name), "[0, 1]")
        for name in ("pmim_keep_start", "pmim_keep_end"):
            check(0 < getattr(self, name) <= 1, f"ofb.{name}", getattr(self, name), "(0, 1]")
        check(self.pmim_window >= 1, "ofb.pmim_window", self.pmim_window, ">= 1")
        check(0 < self.sigma_eps < 0.5, "ofb.sigma_eps", self.sigma_eps, "(0, 0.5)")
        for name in ("module_loss_weight", "flops_loss_weight", "norm_coefficient_attention",
                     "norm_coefficient_other", "arch_weight_decay", "score_init_std"):
            check(getattr(self, name) >= 0, f"ofb.{name}", getattr(self, name), ">= 0")
        check(self.score_init in SCORE_INITS, "ofb.score_init", self.score_init, " or ".join(map(repr, SCORE_INITS)))
        check(self.budget_direction in BUDGET_DIRECTIONS, "ofb.budget_direction", self.budget_direction,
              " or ".join(map(repr, BUDGET_DIRECTIONS)))
        check(self.budget_control in BUDGET_CONTROLS, "ofb.budget_control", self.budget_control,
               " or ".join(map(repr, BUDGET_CONTROLS)))
        for name in ("arch_travel", "decoder_lr", "eliminations_per_epoch"):
            check(getattr(self, name) > 0, f"ofb.{name}", getattr(self, name), "> 0")
        check(self.arch_lr is None or self.arch_lr > 0, "ofb.arch_lr", self.arch_lr, "None or > 0")
        check(self.elimination_rounds >= 1, "ofb.elimination_rounds", self.elimination_rounds, ">= 1")
        check(self.score_lr is None or self.score_lr > 0, "ofb.score_lr", self.score_lr, "None or > 0")
        check(0 < self.elimination_threshold < 1, "ofb.elimination_threshold", self.elimination_threshold, "(0, 1)")
        check(all(0 <= b < 1 for b in self.arch_betas), "ofb.arch_betas", self.arch_betas, "two numbers in [0, 1)")
