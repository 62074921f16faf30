"""Metrics through the `evaluate` library, offline: the shipped top-k module, `compute_metrics`, further metrics
named by a local path, and their use by the trainer's evaluation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import make_vit_classifier
from transformers import EvalPrediction, TrainingArguments

from hf_vit_compress import CompressionConfig, CompressionTrainer
from hf_vit_compress.publishing.metrics import (
    TOP_K_ACCURACY,
    ImageClassificationMetrics,
    compute_metrics,
    evaluate_classifier,
    load_metric,
)

ERROR_RATE = '''
import datasets
import evaluate


class ErrorRate(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(description="share of wrong predictions", citation="", inputs_description="",
                                   features=datasets.Features({"predictions": datasets.Value("int64"),
                                                               "references": datasets.Value("int64")}))

    def _compute(self, predictions, references, scale=1.0):
        wrong = sum(int(p != r) for p, r in zip(predictions, references))
        return {"error_rate": scale * wrong / len(references), "accuracy": 1 - wrong / len(references)}
'''


@pytest.fixture(autouse=True)
def offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture
def error_rate_path(tmp_path) -> str:
    folder = tmp_path / "error_rate"
    folder.mkdir()
    (folder / "error_rate.py").write_text(ERROR_RATE)
    return str(folder)


def logits_and_labels(examples: int = 200, classes: int = 10, seed: int = 0):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, examples)
    logits = rng.normal(size=(examples, classes)).astype(np.float32)
    logits[np.arange(examples), labels] += rng.normal(1.0, 1.0, examples).astype(np.float32)  # some signal
    return logits, labels


def top_k(logits, labels, k):
    return float(np.mean([label in np.argsort(-row)[:k] for row, label in zip(logits, labels)]))


def test_shipped_top_k_module_loads_offline_and_counts_hits():
    metric = load_metric(TOP_K_ACCURACY)
    assert metric.compute(predictions=[[2, 0], [1, 2], [0, 1]], references=[0, 2, 1], k=2) == {"top2_accuracy": 1.0}
    assert metric.compute(predictions=[[2, 0], [1, 2], [0, 1]], references=[0, 2, 1], k=1) == {"accuracy": 0.0}
    with pytest.raises(ValueError, match="at least k=3"):
        metric.compute(predictions=[[2, 0]], references=[0], k=3)


def test_compute_metrics_gives_top1_and_top5_of_the_logits():
    logits, labels = logits_and_labels()
    result = compute_metrics(EvalPrediction(predictions=logits, label_ids=labels))
    assert result == pytest.approx({"accuracy": top_k(logits, labels, 1), "top5_accuracy": top_k(logits, labels, 5)})
    assert 0 < result["accuracy"] < result["top5_accuracy"] < 1
    # DeiT with teacher returns a tuple whose first entry is the logits.
    assert compute_metrics(EvalPrediction(predictions=(logits, logits * 0), label_ids=labels)) == result


def test_top5_only_with_more_than_5_classes():
    logits, labels = logits_and_labels(classes=5)
    assert set(compute_metrics(EvalPrediction(predictions=logits, label_ids=labels))) == {"accuracy"}


def test_ranked_classes_from_preprocessing_give_the_same_result():
    logits, labels = logits_and_labels(classes=12)
    metrics = ImageClassificationMetrics(top_k=(1, 3, 5))
    ranked = metrics.preprocess_logits_for_metrics(torch.from_numpy(logits), None)
    assert ranked.shape == (len(labels), 5) and not ranked.is_floating_point()
    from_logits = metrics.compute(logits, labels)
    assert metrics.compute(ranked.numpy(), labels) == from_logits
    assert from_logits == pytest.approx({"accuracy": top_k(logits, labels, 1),
                                         "top3_accuracy": top_k(logits, labels, 3),
                                         "top5_accuracy": top_k(logits, labels, 5)})


def test_a_named_metric_from_a_local_path_joins_the_results(error_rate_path):
    logits, labels = logits_and_labels()
    metrics = ImageClassificationMetrics(metrics=[error_rate_path], metric_kwargs={error_rate_path: {"scale": 2.0}})
    result = metrics.compute(logits, labels)
    accuracy = top_k(logits, labels, 1)
    assert result["error_rate"] == pytest.approx(2.0 * (1 - accuracy))
    assert result["accuracy"] == pytest.approx(accuracy)  # ours
    assert result["error_rate_accuracy"] == pytest.approx(accuracy)  # the module's own, prefixed: no overwrite


def test_bad_metric_and_bad_top_k_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match=r"metric '.*no_such_metric' could not be loaded.*allowed: a local"):
        ImageClassificationMetrics(metrics=[str(tmp_path / "no_such_metric")]).compute(*logits_and_labels())
    with pytest.raises(ValueError, match="top_k"):
        ImageClassificationMetrics(top_k=(0, 5))


def test_trainer_evaluation_reports_the_named_metric(error_rate_path, tmp_path):
    generator = torch.Generator().manual_seed(0)
    data = [{"pixel_values": torch.randn(3, 16, 16, generator=generator), "labels": i % 10} for i in range(24)]
    metrics = ImageClassificationMetrics(metrics=[error_rate_path])
    args = TrainingArguments(str(tmp_path), report_to=[], use_cpu=True, per_device_eval_batch_size=8,
                             disable_tqdm=True, remove_unused_columns=False)
    model = make_vit_classifier(num_labels=10)
    expected = evaluate_classifier(make_vit_classifier(num_labels=10), data, metrics)
    trainer = CompressionTrainer(model=model, args=args, compression_config=CompressionConfig(target_flops=0.5),
                                 eval_dataset=data, compute_metrics=metrics,
                                 preprocess_logits_for_metrics=metrics.preprocess_logits_for_metrics)
    result = trainer.evaluate_dense()
    assert {key: result[f"dense_{key}"] for key in expected} == pytest.approx(expected)
    assert set(expected) == {"accuracy", "top5_accuracy", "error_rate", "error_rate_accuracy"}
