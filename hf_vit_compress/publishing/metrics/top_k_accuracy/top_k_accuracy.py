"""Top-k accuracy as an `evaluate` metric module, loadable offline with `evaluate.load(<path of this folder>)`.

Shipped inside hf_vit_compress because `evaluate.load("accuracy")` fetches its script from the Hub, which offline
machines (and this package's tests) cannot reach; and because the Hub's accuracy metric has no top-k. Imports only
`datasets`, `evaluate` and `numpy`, like any metric script.
"""

import datasets
import evaluate
import numpy as np

_DESCRIPTION = """
Top-k accuracy: the share of examples whose reference label is among the k classes the model ranked highest.
k = 1 is the usual (top-1) accuracy.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `list` of `int`): per example, class indices ranked by decreasing score (at least k of
        them; e.g. `numpy.argsort(-logits, axis=-1)[:, :5]`).
    references (`list` of `int`): the true class of each example.
    k (`int`, defaults to 1): how many of the ranked classes count as a hit.
Returns:
    `accuracy` (k = 1) or `top{k}_accuracy` (k > 1): a float in [0, 1].
Examples:
    >>> metric = evaluate.load("hf_vit_compress/metrics/top_k_accuracy")
    >>> metric.compute(predictions=[[2, 0], [1, 2]], references=[0, 1], k=2)
    {'top2_accuracy': 1.0}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class TopKAccuracy(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Sequence(datasets.Value("int64")), "references": datasets.Value("int64")}
            ),
        )

    def _compute(self, predictions, references, k=1):
        if not isinstance(k, (int, np.integer)) or isinstance(k, bool) or k < 1:
            raise ValueError(f"top_k_accuracy: k={k!r} is invalid: allowed an int >= 1")
        ranked = np.asarray(predictions, dtype=np.int64)
        labels = np.asarray(references, dtype=np.int64)
        if ranked.ndim != 2 or ranked.shape[1] < k:
            raise ValueError(
                f"top_k_accuracy: predictions must rank at least k={k} classes per example, got shape {ranked.shape}"
            )
        if len(labels) == 0:
            raise ValueError("top_k_accuracy: no examples to score")
        hits = (ranked[:, :k] == labels[:, None]).any(axis=1)
        return {"accuracy" if k == 1 else f"top{k}_accuracy": float(hits.mean())}
