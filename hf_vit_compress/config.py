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
#: dtypes a latency table can be measured in (`surgery.latency.DTYPES`)
LATENCY_DTYPES = ("float32", "bfloat16", "float16")
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
class LatencyBudgetConfig(Validated):
    """How a speed budget (`CompressionConfig.target_speedup` / `target_latency_ms`) is timed: the settings the
    latency table is measured under, which must be the ones the compressed model will run with.

    Args:
        batch_size: images per forward the speed is wanted at.
        dtype: `"float32"`, `"bfloat16"` or `"float16"`.
        device: where the model will run and the table is timed (`"cpu"`, `"cuda"`, `"cuda:1"`).
        attn_implementation: `"sdpa"` or `"eager"`, as the exported model will run.
        table: path of a latency table (`hf-vit-compress profile-latency`). Loaded when it exists (refused, naming
            the field, when it was measured under other settings); otherwise built on this device when the method
            is built and saved there. None: built and kept in memory only.
        grid_points: widths per axis of a table built on the fly (`LatencyGrid.for_model`).
        repeats: passes over the grid of a table built on the fly (one timed sample per cell each; the median is
            kept), and rounds of the measurement at the end (`measure_after`).
        measure_after: time the exported and the dense model, interleaved, at the end of a run and record the
            measured speed-up beside the predicted one (`compression_report.json`, the model card).
    """

    batch_size: int = 1
    dtype: str = "float32"
    device: str = "cpu"
    attn_implementation: str = "sdpa"
    table: str | None = None
    grid_points: int = 3
    repeats: int = 7
    measure_after: bool = True

    def validate(self) -> None:
        check_types(self, "latency.")
        for name in ("batch_size", "grid_points", "repeats"):
            value = getattr(self, name)
            check(isinstance(value, int) and not isinstance(value, bool) and value >= (2 if name == "grid_points"
                                                                                      else 1),
                  f"latency.{name}", value, "an integer >= 2" if name == "grid_points" else "an integer >= 1")
        check(self.dtype in LATENCY_DTYPES, "latency.dtype", self.dtype, f"one of {list(LATENCY_DTYPES)}")
        check(self.attn_implementation in ("sdpa", "eager"), "latency.attn_implementation",
              self.attn_implementation, "'sdpa' or 'eager'")
        check(isinstance(self.device, str) and self.device.split(":")[0] in ("cpu", "cuda", "mps"), "latency.device",
              self.device, "'cpu', 'cuda', 'cuda:N' or 'mps'")
        check(isinstance(self.measure_after, bool), "latency.measure_after", self.measure_after, "true or false")


@dataclass
class CompressionConfig(Validated):
    """What to compress to, and with which method.

    Args:
        method: `"ofb"` or `"uvc"`.
        target_flops: the budget as a fraction of the dense model's MACs, 0 < x < 1. Ignored when
            `target_gmacs` is set.
        target_gmacs: the budget as absolute GMACs per image (optional, explicit alternative).
        target_speedup: a speed budget instead of MACs: the compressed model must run this many times faster than
            the dense one (> 1) on the device, dtype and batch size of `latency`, priced by a latency table measured
            there. Overrides `target_flops` / `target_gmacs`; None (default): the budget is in MACs.
        target_latency_ms: a speed budget as milliseconds per forward of `latency.batch_size` images (alternative
            to `target_speedup`; at most one of the two).
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
        latency: how a speed budget is timed (`LatencyBudgetConfig`); unused by a MACs budget.
    """

    method: str = "ofb"
    target_flops: float = 0.5
    target_gmacs: float | None = None
    target_speedup: float | None = None
    target_latency_ms: float | None = None
    search_fraction: float = 0.2
    distillation_alpha: float = 0.1
    distillation_temperature: float = 1.0
    finetune: str = "full"
    ofb: OFBConfig = field(default_factory=OFBConfig)
    uvc: UVCConfig = field(default_factory=UVCConfig)
    lora: LoRARecoveryConfig = field(default_factory=LoRARecoveryConfig)
    latency: LatencyBudgetConfig = field(default_factory=LatencyBudgetConfig)

    def validate(self) -> None:
        """Check every field (types, finite numbers, ranges) and the nested `ofb` / `uvc` / `lora` settings; runs
        when the config is built, on every assignment to a field, and when a method is built from it."""
        for name, cls in (("ofb", OFBConfig), ("uvc", UVCConfig), ("lora", LoRARecoveryConfig),
                          ("latency", LatencyBudgetConfig)):
            if isinstance(getattr(self, name), dict):
                object.__setattr__(self, name, from_dict(cls, getattr(self, name), name))
        check_types(self, "")
        check(self.method in registered_methods(), "method", self.method, f"one of {list(registered_methods())}")
        check(0 < self.target_flops < 1, "target_flops", self.target_flops,
               "a fraction of the dense MACs strictly between 0 and 1")
        check(self.target_gmacs is None or self.target_gmacs > 0, "target_gmacs", self.target_gmacs,
               "None or a finite number > 0")
        check(self.target_speedup is None or self.target_speedup > 1, "target_speedup", self.target_speedup,
              "None or a number > 1 (times faster than the dense model)")
        check(self.target_latency_ms is None or self.target_latency_ms > 0, "target_latency_ms",
              self.target_latency_ms, "None or a number of milliseconds > 0")
        check(self.target_speedup is None or self.target_latency_ms is None, "target_latency_ms",
              self.target_latency_ms, "None when target_speedup is set (one speed budget at a time)")
        check(0 < self.search_fraction <= 1, "search_fraction", self.search_fraction, "(0, 1]")
        check(0 <= self.distillation_alpha <= 1, "distillation_alpha", self.distillation_alpha, "[0, 1]")
        check(self.distillation_temperature > 0, "distillation_temperature", self.distillation_temperature, "> 0")
        check(self.finetune in FINETUNE_MODES, "finetune", self.finetune, f"one of {list(FINETUNE_MODES)}")
        self.ofb.validate()
        self.uvc.validate()
        self.lora.validate()
        self.latency.validate()

    def target_macs(self, dense_macs: int) -> float:
        """The budget in MACs for a model of `dense_macs` MACs."""
        if self.target_gmacs is not None:
            return self.target_gmacs * 1e9
        return self.target_flops * dense_macs

    def target_ratio(self, dense_macs: int) -> float:
        return self.target_macs(dense_macs) / dense_macs

    @property
    def budget_unit(self) -> str:
        """`"latency"` when the budget is a speed (`target_speedup` / `target_latency_ms`), else `"macs"`."""
        return "latency" if self.target_speedup is not None or self.target_latency_ms is not None else "macs"

    def target_cost(self, dense_cost: float, dense_macs: int) -> float:
        """The budget in the unit of `budget_unit`: milliseconds for a speed budget (`dense_cost` is the dense
        model's predicted milliseconds), else MACs (`dense_cost` = `dense_macs`)."""
        if self.target_latency_ms is not None:
            return float(self.target_latency_ms)
        if self.target_speedup is not None:
            return dense_cost / self.target_speedup
        return self.target_macs(dense_macs)

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


__all__ = ["FINETUNE_MODES", "LATENCY_DTYPES", "LORA_TARGETS", "CompressionConfig", "LatencyBudgetConfig",
           "LoRARecoveryConfig", "OFBConfig", "UVCConfig"]
