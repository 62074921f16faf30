"""`CompressionConfig`: what to compress to and how, validated when built and on every assignment, saved as JSON."""

from __future__ import annotations

import json
import math
import types
import typing
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from pathlib import Path

METHODS = ("ofb", "uvc")
#: how OFB holds its budget (OFBConfig.budget_control)
BUDGET_CONTROLS = ("dual", "paper")
FINETUNE_MODES = ("full", "lora")
#: the Linear layers of a block that LoRA recovery can adapt (BlockParts' names, the same in the compressed model)
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "fc1", "fc2")
_MISSING = object()


def _check(condition: bool, name: str, value, allowed: str) -> None:
    if not condition:
        raise ValueError(f"CompressionConfig.{name}={value!r} is invalid: allowed {allowed}")


def _check_ratios(name: str, values, low: float, high: float) -> None:
    ok = values is not None and len(values) > 0 and all(low < float(v) <= high for v in values)
    _check(ok, name, values, f"a non-empty list of numbers in ({low}, {high}]")


def _conform(value, hint) -> tuple[bool, object]:
    """(whether `value` has the annotated type `hint`, the value converted: ints to float for float fields, an
    integral float to int for int fields, lists to tuples for tuple fields). Numbers must be finite."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None:
            return type(None) in args, value
        for option in args:
            if option is not type(None):
                ok, converted = _conform(value, option)
                if ok:
                    return True, converted
        return False, value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)) or (origin is tuple and len(value) != len(args)):
            return False, value
        items = [_conform(item, args[index] if origin is tuple else args[0]) for index, item in enumerate(value)]
        if not all(ok for ok, _ in items):
            return False, value
        converted = [item for _, item in items]
        return True, tuple(converted) if origin is tuple else converted
    is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is float:
        return is_number and math.isfinite(value), float(value) if is_number else value
    if hint is int:
        if isinstance(value, float) and value.is_integer():
            return True, int(value)
        return isinstance(value, int) and not isinstance(value, bool), value
    if hint in (bool, str):
        return isinstance(value, hint), value
    if is_dataclass(hint):
        return isinstance(value, hint), value
    return True, value


def _describe(hint) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join("None" if option is type(None) else _describe(option) for option in args)
    if origin is list:
        return f"a list of {_describe(args[0])}s"
    if origin is tuple:
        return f"{len(args)} values ({', '.join(_describe(arg) for arg in args)})"
    names = {float: "a finite number", int: "an integer", bool: "true or false", str: "a string"}
    return names.get(hint, getattr(hint, "__name__", str(hint)))


def _check_types(config, prefix: str) -> None:
    """Every field of `config` holds its annotated type (so that the range checks never meet a string)."""
    hints = typing.get_type_hints(type(config))
    for config_field in fields(config):
        value = getattr(config, config_field.name)
        ok, converted = _conform(value, hints[config_field.name])
        _check(ok, f"{prefix}{config_field.name}", value, _describe(hints[config_field.name]))
        if converted is not value:
            object.__setattr__(config, config_field.name, converted)


class _Validated:
    """Dataclass mixin: validated when built (`__post_init__`) and again on every later assignment to a field; an
    invalid assignment raises the field-naming `ValueError` and leaves the old value in place."""

    def __post_init__(self):
        self.validate()
        object.__setattr__(self, "_built", True)

    def __setattr__(self, name: str, value) -> None:
        if name.startswith("_") or not self.__dict__.get("_built"):
            object.__setattr__(self, name, value)
            return
        old = self.__dict__.get(name, _MISSING)
        object.__setattr__(self, name, value)
        try:
            self.validate()
        except ValueError:
            if old is _MISSING:
                object.__delattr__(self, name)
            else:
                object.__setattr__(self, name, old)
            raise

    def validate(self) -> None:
        raise NotImplementedError


@dataclass
class OFBConfig(_Validated):
    """OFB settings (spec/ofb.md). Fractions of the search refer to the search phase's steps.

    Args:
        prune_heads: search the number of heads (the paper's space: candidates `head_choices`). False (default, a
            deviation): every candidate keeps all H heads and the search narrows them (`head_dim_ratios`), as
            one-shot pruners do; on the medium CIFAR-10 benchmark (test split, 3-seed medians) 53.85% / 52.20% top-1
            at 50% / 30% MACs against 52.15 / 51.85 with head counts searched (benchmarks/results/quality_medium.md,
            quality_medium_ofb_head_counts.md). Explicit `head_choices` are used either way.
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
        flops_loss_weight: weight of the FLOPs loss ((E[MACs] - target) / dense)^2 (the paper's 5; `"paper"` only).
        norm_coefficient_attention, norm_coefficient_other: c of the norm term c * sum(S) (attention; MLP+embed).
        sigma_eps: clamp of sigma into (eps, 1 - eps) that keeps cot(pi * sigma) finite.
        arch_lr, arch_betas, arch_weight_decay: AdamW settings of the architecture logits alpha. `arch_lr=None`
            (default): `arch_travel / search steps` under `budget_control="dual"` (Adam moves a logit about lr per
            step, so that is how far a logit can travel in the whole search, whatever its length), the paper's
            1e-3 under `"paper"`.
        arch_travel: the rule's logit travel over the search (used when `arch_lr` is None and the budget control
            is `"dual"`).
        score_lr: learning rate of the importance logits (None = the weights' learning rate); weight decay 0.
        decoder_lr: learning rate of the PMIM decoder and mask token.
        elimination_threshold: a candidate with p <= threshold / K_active is switched off.
        elimination_rounds: `budget_control="dual"`: elimination rounds, evenly spread over the search after
            warm-up (none before warm-up ends).
        eliminations_per_epoch: `budget_control="paper"`: elimination rounds per epoch, from the first step (paper:
            about 3).
        score_init_std: std of the truncated-normal init of the importance logits s (S = sigmoid(s)).
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
    flops_loss_weight: float = 5.0
    norm_coefficient_attention: float = 4e-4
    norm_coefficient_other: float = 1e-4
    sigma_eps: float = 1e-3
    arch_lr: float | None = None
    arch_travel: float = 3.0
    arch_betas: tuple[float, float] = (0.5, 0.999)
    arch_weight_decay: float = 1e-3
    score_lr: float | None = None
    decoder_lr: float = 1e-3
    elimination_threshold: float = 0.2
    elimination_rounds: int = 100
    eliminations_per_epoch: float = 3.0
    score_init_std: float = 0.2

    def validate(self) -> None:
        _check_types(self, "ofb.")
        if self.head_choices is not None:
            ok = len(self.head_choices) > 0 and all(isinstance(h, int) and h >= 1 for h in self.head_choices)
            _check(ok, "ofb.head_choices", self.head_choices, "None or a non-empty list of ints >= 1")
        _check_ratios("ofb.head_dim_ratios", self.head_dim_ratios, 0.0, 1.0)
        _check_ratios("ofb.mlp_ratios", self.mlp_ratios, 0.0, 1.0)
        _check(0 < self.embed_min_ratio <= 1, "ofb.embed_min_ratio", self.embed_min_ratio, "(0, 1]")
        _check(self.embed_step is None or self.embed_step >= 1, "ofb.embed_step", self.embed_step, "None or >= 1")
        _check(self.channel_multiple >= 1, "ofb.channel_multiple", self.channel_multiple, ">= 1")
        _check(0 <= self.warmup_fraction <= 1, "ofb.warmup_fraction", self.warmup_fraction, "[0, 1]")
        for name in ("lambda_start", "lambda_end"):
            _check(0 <= getattr(self, name) <= 1, f"ofb.{name}", getattr(self, name), "[0, 1]")
        for name in ("pmim_keep_start", "pmim_keep_end"):
            _check(0 < getattr(self, name) <= 1, f"ofb.{name}", getattr(self, name), "(0, 1]")
        _check(self.pmim_window >= 1, "ofb.pmim_window", self.pmim_window, ">= 1")
        _check(0 < self.sigma_eps < 0.5, "ofb.sigma_eps", self.sigma_eps, "(0, 0.5)")
        for name in ("module_loss_weight", "flops_loss_weight", "norm_coefficient_attention",
                     "norm_coefficient_other", "arch_weight_decay", "score_init_std"):
            _check(getattr(self, name) >= 0, f"ofb.{name}", getattr(self, name), ">= 0")
        _check(self.budget_control in BUDGET_CONTROLS, "ofb.budget_control", self.budget_control,
               " or ".join(map(repr, BUDGET_CONTROLS)))
        for name in ("arch_travel", "decoder_lr", "eliminations_per_epoch"):
            _check(getattr(self, name) > 0, f"ofb.{name}", getattr(self, name), "> 0")
        _check(self.arch_lr is None or self.arch_lr > 0, "ofb.arch_lr", self.arch_lr, "None or > 0")
        _check(self.elimination_rounds >= 1, "ofb.elimination_rounds", self.elimination_rounds, ">= 1")
        _check(self.score_lr is None or self.score_lr > 0, "ofb.score_lr", self.score_lr, "None or > 0")
        _check(0 < self.elimination_threshold < 1, "ofb.elimination_threshold", self.elimination_threshold, "(0, 1)")
        _check(all(0 <= b < 1 for b in self.arch_betas), "ofb.arch_betas", self.arch_betas, "two numbers in [0, 1)")


@dataclass
class UVCConfig(_Validated):
    """UVC settings (spec/uvc.md). Defaults are the paper's / official code's, except `counts_space`,
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
            (memory-efficient, cuDNN) and bf16 tensor-core GEMMs need (`hf_vit_compress.kernels`); UVC's value head
            dim differs from its q/k head dim, which flash attention does not take. 1 keeps the spec's unit
            granularity (on CPU it was as fast, benchmarks/results/speed_uvc_rounding.md; on a GPU such widths
            forced sdpa's math fallback).
        prune_hidden: also search the residual (embedding) width D, beyond the paper's space: one global count of
            removed residual channels, ranked by the squared norm of every weight that uses the channel, with its
            own least-k group, dual, term in R and proximal shrink; exported as the kept hidden channels (the
            LayerNorms then normalise the kept channels only). On by default: on the medium CIFAR-10 benchmark it
            scored 50.80% top-1 at 30% MACs against 49.05% without (51.80 / 52.25 at 50%; test split, 3 seeds,
            searching half the steps) and 52.60 against 50.40 (53.85 / 54.00 at 50%; validation split, seed 0,
            searching a fifth), though the search kept the full residual width there; False restores the paper's
            search space and (with `shared_head_dims=False`) a cheaper search step (1.35x a plain step's operators
            instead of 1.50x on DeiT-S, benchmarks/results/dispatch.md).
        shared_head_dims: the head-dim count removes each dim from the queries and keys as well as from the values
            (beyond the paper's space, which prunes value dims only and keeps every q/k dim of a kept head): a dim's
            group is then its o_proj column and its q_proj and k_proj rows, scored, shrunk and priced together, and
            the exported q/k and value head dims are equal (which flash attention needs). On by default: on the
            medium CIFAR-10 benchmark (test split, 3-seed medians) it scored 54.20% / 53.85% top-1 at 50% / 30%
            MACs against 52.80 / 50.55 with value dims only, level with / above Torch-Pruning's best (54.20 /
            52.65; benchmarks/results/quality_medium.md, quality_medium_uvc_value_dims.md); False restores the
            paper's space.
        theta_lr, theta_momentum: SGD settings of the skip-gate logits.
        theta_budget_weight: weight of z * dR/dtheta in theta's gradient.
        dual_lr: ascent step of the group duals y and p.
        budget_control: how the counts meet the budget. `"dual"` (the paper's): through the budget dual z's term
            in their gradient. `"projection"` (a deviation): the counts step on the group terms alone, then one
            Newton step moves them along the budget's gradient back onto R = B after every step (plus an offset
            that brings the masks' ceiled counts onto B; `methods/uvc_budget.py`), so R does not overshoot; z still
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
        _check_types(self, "uvc.")
        for name in ("gumbel_tau", "counts_lr", "theta_lr", "budget_gap_clip"):
            _check(getattr(self, name) > 0, f"uvc.{name}", getattr(self, name), "> 0")
        for name in ("dual_lr", "budget_dual_lr", "dual_init", "theta_budget_weight"):
            _check(getattr(self, name) >= 0, f"uvc.{name}", getattr(self, name), ">= 0")
        _check(self.channel_multiple >= 1, "uvc.channel_multiple", self.channel_multiple, "an integer >= 1")
        _check(self.counts_space in ("fraction", "units"), "uvc.counts_space", self.counts_space,
               "'fraction' or 'units'")
        _check(0 <= self.theta_momentum < 1, "uvc.theta_momentum", self.theta_momentum, "[0, 1)")
        _check(self.budget_control in ("dual", "projection"), "uvc.budget_control", self.budget_control,
               "'dual' or 'projection'")
        _check(self.budget_dual_update in ("log", "additive"), "uvc.budget_dual_update", self.budget_dual_update,
               "'log' or 'additive'")
        _check(self.budget_dual_log_lr is None or self.budget_dual_log_lr > 0, "uvc.budget_dual_log_lr",
               self.budget_dual_log_lr, "None or > 0")
        _check(self.budget_dual_update != "log" or self.dual_init > 0, "uvc.dual_init", self.dual_init,
               "> 0 with budget_dual_update='log' (z is scaled multiplicatively from it)")
        _check(0 <= self.skip_warmup_fraction <= 1, "uvc.skip_warmup_fraction", self.skip_warmup_fraction, "[0, 1]")


@dataclass
class LoRARecoveryConfig(_Validated):
    """LoRA settings of the fine-tuning phase when `CompressionConfig.finetune="lora"` (see `peft_support.py`).

    After the search the weights of the backbone are frozen and every block's `target_modules` get LoRA adapters
    (peft's `LoraConfig`); export merges them into the sliced weights, so the saved model is a plain compressed model.

    Args:
        rank: LoRA rank r.
        alpha: LoRA alpha; the update B @ A is scaled by alpha / rank.
        dropout: dropout on the adapters' input (peft's `lora_dropout`).
        target_modules: the Linear layers of every block that get an adapter, a subset of
            `("q_proj", "k_proj", "v_proj", "o_proj", "fc1", "fc2")`.
        train_heads: also train the classifier head(s) in full (`classifier`, or DeiT's `cls_classifier` and
            `distillation_classifier`: small); False freezes them with the backbone.
        learning_rate: peak learning rate of the adapters (same schedule as the weights'); None = the
            `TrainingArguments.learning_rate`.
    """

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: list(LORA_TARGETS))
    train_heads: bool = True
    learning_rate: float | None = None

    def validate(self) -> None:
        _check_types(self, "lora.")
        _check(isinstance(self.rank, int) and not isinstance(self.rank, bool) and self.rank >= 1, "lora.rank",
               self.rank, "an integer >= 1")
        _check(isinstance(self.alpha, (int, float)) and self.alpha > 0, "lora.alpha", self.alpha, "a number > 0")
        _check(isinstance(self.dropout, (int, float)) and 0 <= self.dropout < 1, "lora.dropout", self.dropout,
               "[0, 1)")
        targets = self.target_modules
        ok = (isinstance(targets, (list, tuple)) and len(targets) > 0 and len(set(targets)) == len(targets)
              and all(name in LORA_TARGETS for name in targets))
        _check(ok, "lora.target_modules", targets, f"a non-empty list without repeats from {list(LORA_TARGETS)}")
        _check(isinstance(self.train_heads, bool), "lora.train_heads", self.train_heads, "true or false")
        _check(self.learning_rate is None or self.learning_rate > 0, "lora.learning_rate", self.learning_rate,
               "None or > 0")


@dataclass
class CompressionConfig(_Validated):
    """What to compress to, and with which method.

    Args:
        method: `"ofb"` or `"uvc"`.
        target_flops: the budget as a fraction of the dense model's MACs, 0 < x < 1. Ignored when
            `target_gmacs` is set.
        target_gmacs: the budget as absolute GMACs per image (optional, explicit alternative).
        search_fraction: share of the training steps spent searching; the rest fine-tunes the fixed architecture
            (1.0 = search only). Default 0.2, the papers' proportion (OFB searches 100 of 400 epochs, UVC 30 of
            150-180); on the medium CIFAR-10 benchmark it was a small net gain over 0.5, not at every budget
            (benchmarks/results/quality_medium.md vs quality_medium_search50.md).
        distillation_alpha: weight a of the teacher's soft KL in (1 - a) * CE + a * T^2 * KL, when a teacher is
            used (always for UVC: by default a frozen copy of the dense model; for OFB only if `teacher=` is given).
        distillation_temperature: temperature T of the teacher's and student's softened softmaxes.
        finetune: how the steps after the search fine-tune the fixed architecture: `"full"` (every weight) or
            `"lora"` (LoRA adapters on the frozen weights, settings in `lora`; needs the `peft` extra), merged into
            the exported model.
        ofb: OFB settings (`OFBConfig`).
        uvc: UVC settings (`UVCConfig`).
        lora: LoRA settings (`LoRARecoveryConfig`), used when `finetune="lora"`.
    """

    method: str = "ofb"
    target_flops: float = 0.5
    target_gmacs: float | None = None
    search_fraction: float = 0.2
    distillation_alpha: float = 0.1
    distillation_temperature: float = 1.0
    finetune: str = "full"
    ofb: OFBConfig = field(default_factory=OFBConfig)
    uvc: UVCConfig = field(default_factory=UVCConfig)
    lora: LoRARecoveryConfig = field(default_factory=LoRARecoveryConfig)

    def validate(self) -> None:
        """Check every field (types, finite numbers, ranges) and the nested `ofb` / `uvc` / `lora` settings; runs
        when the config is built, on every assignment to a field, and when a method is built from it."""
        for name, cls in (("ofb", OFBConfig), ("uvc", UVCConfig), ("lora", LoRARecoveryConfig)):
            if isinstance(getattr(self, name), dict):
                object.__setattr__(self, name, _from_dict(cls, getattr(self, name), name))
        _check_types(self, "")
        _check(self.method in METHODS, "method", self.method, f"one of {list(METHODS)}")
        _check(0 < self.target_flops < 1, "target_flops", self.target_flops,
               "a fraction of the dense MACs strictly between 0 and 1")
        _check(self.target_gmacs is None or self.target_gmacs > 0, "target_gmacs", self.target_gmacs,
               "None or a finite number > 0")
        _check(0 < self.search_fraction <= 1, "search_fraction", self.search_fraction, "(0, 1]")
        _check(0 <= self.distillation_alpha <= 1, "distillation_alpha", self.distillation_alpha, "[0, 1]")
        _check(self.distillation_temperature > 0, "distillation_temperature", self.distillation_temperature, "> 0")
        _check(self.finetune in FINETUNE_MODES, "finetune", self.finetune, f"one of {list(FINETUNE_MODES)}")
        self.ofb.validate()
        self.uvc.validate()
        self.lora.validate()

    def target_macs(self, dense_macs: int) -> float:
        """The budget in MACs for a model of `dense_macs` MACs."""
        if self.target_gmacs is not None:
            return self.target_gmacs * 1e9
        return self.target_flops * dense_macs

    def target_ratio(self, dense_macs: int) -> float:
        return self.target_macs(dense_macs) / dense_macs

    # -- JSON --------------------------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return asdict(self)

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_json_string() + "\n")

    @classmethod
    def from_dict(cls, values: dict) -> "CompressionConfig":
        return _from_dict(cls, values, "")

    @classmethod
    def load(cls, path: str | Path) -> "CompressionConfig":
        return cls.from_dict(json.loads(Path(path).read_text()))


def _from_dict(cls, values: dict, prefix: str):
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        where = f"CompressionConfig.{prefix}" if prefix else "CompressionConfig"
        raise ValueError(f"{where}: unknown field(s) {unknown}; allowed: {sorted(known)}")
    return cls(**values)
