"""A speed budget's facts for the report and the card: the speed-up the latency table predicts for the final
architecture, and the one measured on the device at the end of the run (`CompressionConfig.latency.measure_after`).

The table prices parts timed one at a time; the whole model also pays what no part sees (Python dispatch between
blocks, cache effects), so the prediction is checked by timing the exported model against the dense one with the
same settings, interleaved. A measured speed-up under `MEASURED_WARNING` of the target is logged as a warning.
"""

from __future__ import annotations

from typing import Any

from torch import nn
from transformers import AutoModelForImageClassification
from transformers.utils import logging

from ..surgery.architecture import Architecture
from ..surgery.latency import measure_speedup

logger = logging.get_logger(__name__)

#: a measured speed-up under this share of the target is warned about
MEASURED_WARNING = 0.9


def predicted_speed(method, architecture: Architecture, search_ratio: float | None = None) -> dict[str, Any]:
    """What the latency table says about `architecture` under `method`'s speed budget (`method.cost` a
    `LatencyTableCost`): the settings it was measured under, the target, the dense and the final predicted ms."""
    predicted = float(method.architecture_cost(architecture))
    dense = float(method.dense_cost)
    facts = {**method.cost.describe(), "target_speedup": dense / float(method.target_cost),
             "target_ms": float(method.target_cost), "dense_predicted_ms": dense, "predicted_ms": predicted,
             "predicted_speedup": dense / predicted if predicted > 0 else None}
    if search_ratio is not None:  # the search's own expected latency / dense, before the final projection
        facts["search_latency_ratio"] = float(search_ratio)
    return facts


def dense_model_like(dense_config, attn_implementation: str) -> nn.Module:
    """A model of the dense architecture with fresh weights (timing needs only its shapes), run with
    `attn_implementation`: what the user runs before compression."""
    return AutoModelForImageClassification.from_config(dense_config, attn_implementation=attn_implementation)


def measure_speed(compressed: nn.Module, dense_config, latency, target_speedup: float) -> dict[str, Any]:
    """Time the exported model against the dense one (`surgery.latency.measure_speedup`) with the speed budget's
    settings (`latency`: a `LatencyBudgetConfig`), and warn when the measured speed-up misses the target by more
    than `1 - MEASURED_WARNING`."""
    compressed.config._attn_implementation = latency.attn_implementation
    measured = measure_speedup(compressed, dense_model_like(dense_config, latency.attn_implementation),
                               latency.batch_size, latency.dtype, latency.device, rounds=latency.repeats)
    facts = {"dense_measured_ms": measured["dense_ms"], "measured_ms": measured["compressed_ms"],
             "measured_speedup": measured["speedup"], "measured_rounds": measured["rounds"]}
    if measured["speedup"] < MEASURED_WARNING * target_speedup:
        logger.warning(
            f"Speed budget: the compressed model measured {measured['speedup']:.2f}x faster than the dense one on "
            f"{latency.device} ({latency.dtype}, batch {latency.batch_size}), under {MEASURED_WARNING:.0%} of the "
            f"target {target_speedup:.2f}x (the latency table predicted it). Time the parts again "
            "(`hf-vit-compress profile-latency`) on an idle machine, with more repeats or a denser grid.")
    return facts


__all__ = ["MEASURED_WARNING", "dense_model_like", "measure_speed", "predicted_speed"]
