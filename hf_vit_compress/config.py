"""`CompressionConfig`: what to compress to and how, validated when built and on every assignment, saved as JSON."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .methods.ofb.config import OFBConfig
from .methods.registry import registered_methods
from .methods.uvc.config import UVCConfig
from .validation import Validated, check, check_types, from_dict

FINETUNE_MODES = ("full", "lora")
#: the Linear layers of a block that LoRA recovery can adapt (BlockParts' names, the same in the compressed model)
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "fc1", "fc2")


@dataclass
class LoRARecoveryConfig(Validated):
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
        check_types(self, "lora.")
        check(isinstance(self.rank, int) and not isinstance(self.rank, bool) and self.rank >= 1, "lora.rank",
               self.rank, "an integer >= 1")
        check(isinstance(self.alpha, (int, float)) and self.alpha > 0, "lora.alpha", self.alpha, "a number > 0")
        check(isinstance(self.dropout, (int, float)) and 0 <= self.dropout < 1, "lora.dropout", self.dropout,
               "[0, 1)")
        targets = self.target_modules
        ok = (isinstance(targets, (list, tuple)) and len(targets) > 0 and len(set(targets)) == len(targets)
              and all(name in LORA_TARGETS for name in targets))
        check(ok, "lora.target_modules", targets, f"a non-empty list without repeats from {list(LORA_TARGETS)}")
        check(isinstance(self.train_heads, bool), "lora.train_heads", self.train_heads, "true or false")
        check(self.learning_rate is None or self.learning_rate > 0, "lora.learning_rate", self.learning_rate,
               "None or > 0")


@dataclass
class CompressionConfig(Validated):
    """What to compress to, and with which method.

    Args:
        method: `"ofb"` or `"uvc"`.
        target_flops: the budget as a fraction of the dense model's MACs, 0 < x < 1. Ignored when
            `target_gmacs` is set.
        target_gmacs: the budget as absolute GMACs per image (optional, explicit alternative).
        search_fraction: share of the training steps spent searching; the rest fine-tunes the fixed architecture
            (1.0 = search only). Default 0.2, the papers' proportion (OFB searches 100 of 400 epochs, UVC 30 of
            150-180).
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
                object.__setattr__(self, name, from_dict(cls, getattr(self, name), name))
        check_types(self, "")
        check(self.method in registered_methods(), "method", self.method, f"one of {list(registered_methods())}")
        check(0 < self.target_flops < 1, "target_flops", self.target_flops,
               "a fraction of the dense MACs strictly between 0 and 1")
        check(self.target_gmacs is None or self.target_gmacs > 0, "target_gmacs", self.target_gmacs,
               "None or a finite number > 0")
        check(0 < self.search_fraction <= 1, "search_fraction", self.search_fraction, "(0, 1]")
        check(0 <= self.distillation_alpha <= 1, "distillation_alpha", self.distillation_alpha, "[0, 1]")
        check(self.distillation_temperature > 0, "distillation_temperature", self.distillation_temperature, "> 0")
        check(self.finetune in FINETUNE_MODES, "finetune", self.finetune, f"one of {list(FINETUNE_MODES)}")
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
        return from_dict(cls, values, "")

    @classmethod
    def load(cls, path: str | Path) -> "CompressionConfig":
        return cls.from_dict(json.loads(Path(path).read_text()))


__all__ = ["FINETUNE_MODES", "LORA_TARGETS", "CompressionConfig", "LoRARecoveryConfig", "OFBConfig", "UVCConfig"]
