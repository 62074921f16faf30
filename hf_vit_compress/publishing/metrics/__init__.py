"""Image-classification metrics through the `evaluate` library, offline by default.

`compute_metrics` (for `Trainer(compute_metrics=...)`) reports top-1 `accuracy` and `top5_accuracy` (the latter only
where there are more than 5 classes) with the `top_k_accuracy` metric module shipped in this folder, which
`evaluate.load` reads from a local path: no Hub access. `ImageClassificationMetrics` adds further `evaluate`
metrics by name or path (a Hub name such as `"f1"` needs the Hub; a local module folder does not); they receive the
predicted class (arg-max) and the label. `evaluate` is imported only when a metric is loaded.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

#: folder of the shipped evaluate module (`evaluate.load(TOP_K_ACCURACY)` loads it offline)
TOP_K_ACCURACY = str(Path(__file__).resolve().parent / "top_k_accuracy")
#: top-k accuracies reported by default (each only where k < number of classes: top-k of k classes is always 1)
DEFAULT_TOP_K = (1, 5)

__all__ = [
    "DEFAULT_TOP_K",
    "TOP_K_ACCURACY",
    "ImageClassificationMetrics",
    "compute_metrics",
    "evaluate_classifier",
    "load_metric",
]


def load_metric(name_or_path: str, **kwargs):
    """`evaluate.load(name_or_path)`, kept in memory (no cache files), with an error that says what is allowed.

    Args:
        name_or_path: a local evaluate module (folder holding `<folder name>.py`, or the `.py` file), or a metric
            name on the Hub (`"f1"`, `"precision"`: needs the Hub).
        **kwargs: passed to `evaluate.load` (e.g. `config_name`).
    """
    try:
        import evaluate
    except ImportError as error:  # the GPU image of this project, for one, has no evaluate
        raise ImportError("computing metrics needs the `evaluate` package: pip install evaluate") from error
    try:
        return evaluate.load(str(name_or_path), keep_in_memory=True, **kwargs)
    except (FileNotFoundError, ConnectionError) as error:
        raise ValueError(
            f"metric {str(name_or_path)!r} could not be loaded ({type(error).__name__}: {error}); allowed: a local "
            "evaluate module (a folder holding <folder name>.py, or the .py file), or a metric name on the Hugging "
            "Face Hub when the Hub is reachable"
        ) from error


def _first(predictions):
    # DeiT with teacher (and models returning hidden states) give a tuple: the logits come first.
    return predictions[0] if isinstance(predictions, (tuple, list)) else predictions


def ranked_classes(predictions, max_k: int) -> np.ndarray:
    """`(N, n)` class indices by decreasing score, n = min(max_k, classes - 1) (at least 1).

    `predictions` are logits `(N, classes)` (floats), or classes already ranked (integers, e.g. what
    `ImageClassificationMetrics.preprocess_logits_for_metrics` kept), returned as they are.
    """
    predictions = np.asarray(_first(predictions))
    if predictions.ndim != 2:
        raise ValueError(f"predictions must be (examples, classes) logits or ranked classes, got {predictions.shape}")
    if np.issubdtype(predictions.dtype, np.integer):
        return predictions
    keep = max(1, min(max_k, predictions.shape[1] - 1))
    scores = predictions.astype(np.float32)
    top = np.argpartition(-scores, keep - 1, axis=1)[:, :keep]  # the best `keep`, unordered: O(classes)
    order = np.argsort(-np.take_along_axis(scores, top, axis=1), axis=1, kind="stable")
    return np.take_along_axis(top, order, axis=1)


class ImageClassificationMetrics:
    """`compute_metrics` for `transformers.Trainer`: top-k accuracies and any further `evaluate` metrics.

    Example:

    ```python
    >>> metrics = ImageClassificationMetrics(metrics=["path/to/my_f1"],
    ...                                      metric_kwargs={"path/to/my_f1": {"average": "macro"}})
    >>> trainer = CompressionTrainer(..., compute_metrics=metrics,
    ...                              preprocess_logits_for_metrics=metrics.preprocess_logits_for_metrics)
    ```

    Args:
        top_k: the k of each top-k accuracy (`accuracy` for k = 1, `top{k}_accuracy` otherwise), each reported only
            where k < the number of classes.
        metrics: further metrics: names or paths for `load_metric`, or loaded `evaluate.EvaluationModule`s. Each
            gets `predictions` = the arg-max class and `references` = the labels; its keys join the result (a key
            already there is prefixed with the metric's name).
        metric_kwargs: extra `compute()` arguments per entry of `metrics` (keyed by the name/path given, or by the
            module's `name`), e.g. `{"f1": {"average": "macro"}}`.
    """

    def __init__(
        self,
        top_k: Sequence[int] = DEFAULT_TOP_K,
        metrics: Iterable[Any] = (),
        metric_kwargs: Mapping[str, Mapping[str, Any]] | None = None,
    ):
        top_k = tuple(top_k)
        if not top_k or any(isinstance(k, bool) or not isinstance(k, int) or k < 1 for k in top_k):
            raise ValueError(f"ImageClassificationMetrics.top_k={top_k!r} is invalid: allowed ints >= 1 (e.g. (1, 5))")
        self.top_k = tuple(sorted(set(top_k)))
        self.metrics = list(metrics)
        self.metric_kwargs = {str(key): dict(value) for key, value in (metric_kwargs or {}).items()}
        self._top_k_module = None
        self._modules: list[tuple[str, Any]] | None = None

    def _loaded(self) -> list[tuple[str, Any]]:
        if self._modules is None:  # loaded on first use: building the object needs neither evaluate nor files
            self._modules = [
                (entry, load_metric(entry)) if isinstance(entry, (str, Path)) else (entry.name, entry)
                for entry in self.metrics
            ]
            self._top_k_module = load_metric(TOP_K_ACCURACY)
        return self._modules

    def preprocess_logits_for_metrics(self, logits, labels) -> torch.Tensor:
        """For `Trainer(preprocess_logits_for_metrics=...)`: keep the top classes' indices instead of all logits
        (`(N, k)` integers, not `(N, classes)` floats, gathered and stored during evaluation)."""
        logits = _first(logits)
        keep = max(1, min(max(self.top_k), logits.shape[-1] - 1))
        return logits.topk(keep, dim=-1).indices

    def compute(self, predictions, references) -> dict[str, float]:
        """Metrics of `predictions` (logits or ranked classes, see `ranked_classes`) against integer labels."""
        modules = self._loaded()
        ranked = ranked_classes(predictions, max(self.top_k))
        references = np.asarray(references).reshape(-1)
        results: dict[str, float] = {}
        for k in self.top_k:
            if k <= ranked.shape[1]:
                results.update(self._top_k_module.compute(predictions=ranked[:, :k], references=references, k=k))
        for key, module in modules:
            kwargs = self.metric_kwargs.get(str(key), self.metric_kwargs.get(module.name, {}))
            values = module.compute(predictions=ranked[:, 0], references=references, **kwargs)
            for name, value in (values or {}).items():
                results[f"{module.name}_{name}" if name in results else name] = _plain(value)
        return results

    def __call__(self, eval_prediction) -> dict[str, float]:
        return self.compute(eval_prediction.predictions, eval_prediction.label_ids)


def _plain(value):
    return value.item() if isinstance(value, np.generic) else value


_DEFAULT = ImageClassificationMetrics()


def compute_metrics(eval_prediction) -> dict[str, float]:
    """Top-1 `accuracy` and `top5_accuracy` (where there are more than 5 classes) of a `transformers.EvalPrediction`,
    through the `evaluate` library and the shipped offline `top_k_accuracy` module.

    Example: `Trainer(..., compute_metrics=hf_vit_compress.compute_metrics)` gives `eval_accuracy` and
    `eval_top5_accuracy`. For more metrics or other k, use `ImageClassificationMetrics`.
    """
    return _DEFAULT(eval_prediction)


@torch.no_grad()
def evaluate_classifier(
    model: torch.nn.Module,
    dataset,
    metrics: ImageClassificationMetrics | None = None,
    batch_size: int = 256,
    collate_fn=None,
) -> dict[str, float]:
    """Metrics of an image classifier on a prepared dataset of `{"pixel_values", "labels"}` (leaves it in eval mode).

    Args:
        model: any model whose output has `.logits`.
        dataset: map-style or iterable dataset of prepared examples (`hf_vit_compress.data.loading.prepare_dataset`).
        metrics: what to compute; default `ImageClassificationMetrics()` (top-1, top-5 where > 5 classes).
        batch_size: examples per forward.
        collate_fn: defaults to `hf_vit_compress.data.loading.collate_images`.
    """
    if collate_fn is None:
        from ...data.loading import collate_images as collate_fn
    metrics = metrics or ImageClassificationMetrics()
    model.eval()
    device = next(model.parameters()).device
    ranked, labels = [], []
    for batch in torch.utils.data.DataLoader(dataset, batch_size=batch_size, collate_fn=collate_fn):
        logits = model(pixel_values=batch["pixel_values"].to(device)).logits
        ranked.append(metrics.preprocess_logits_for_metrics(logits, None).cpu())
        labels.append(batch["labels"])
    return metrics.compute(torch.cat(ranked).numpy(), torch.cat(labels).numpy())
