"""`CompressionRecord`: what a finished compression run hands to publishing.

The trainer fills one (`CompressionTrainer.compression_record()`); the report, the card and the sidecars read only
this, never the trainer's attributes, so publishing does not depend on training and a run driven by other code
(a custom loop, the demo) can publish by filling one itself.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from ..config import CompressionConfig
from ..surgery.architecture import Architecture


@dataclass
class CompressionRecord:
    """The measured facts of one compression run.

    Args:
        dense_config: the dense model's config (`model_type`, shapes, `_name_or_path`).
        compression_config: the run's `CompressionConfig`.
        architecture: the final architecture (what the export keeps).
        dense_macs: MACs per image of the dense model.
        dense_params: parameters of the dense model (without the method's and any adapters').
        compressed_macs: MACs per image of the final architecture, counted without exporting it.
        compressed_params: parameters of the final architecture, counted without exporting it.
        steps: optimizer steps taken.
        training_args: the run's `TrainingArguments` (the report keeps what reproduces the run).
        export: builds the compressed model (called when the caller gives none).
        search_macs_ratio: the search's own MACs ratio when it ended, before the final projection (None: unknown).
        evaluations: `{"kind": "dense" | "compressed", "step", "prefix", "metrics"}` per evaluation, in order.
        eval_dataset_size: examples in the evaluation set, when it has a length.
        speed_budget: a speed budget's facts (`training.speed_budget`: the table's settings, target, predicted and
            measured speed-up); None for a MACs budget.
        card_info: model-card facts only the caller knows (`publish.CARD_INFO_KEYS`); the report caches the base
            model's license in it.
    """

    dense_config: Any
    compression_config: CompressionConfig
    architecture: Architecture
    dense_macs: int
    dense_params: int
    compressed_macs: int
    compressed_params: int
    steps: int
    training_args: Any
    export: Callable[[], nn.Module]
    search_macs_ratio: float | None = None
    evaluations: list[dict] = field(default_factory=list)
    eval_dataset_size: int | None = None
    card_info: dict = field(default_factory=dict)
    speed_budget: dict | None = None


def as_record(run: Any) -> CompressionRecord:
    """`run` itself if it is a `CompressionRecord`, else `run.compression_record()` (a `CompressionTrainer`)."""
    if isinstance(run, CompressionRecord):
        return run
    if callable(getattr(run, "compression_record", None)):
        return run.compression_record()
    raise TypeError(f"expected a CompressionRecord or a CompressionTrainer, got {type(run).__name__}")


__all__ = ["CompressionRecord", "as_record"]
