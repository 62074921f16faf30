"""benchmarks/quality.py and benchmarks/lora_recovery.py end to end in their --quick modes, on random images written
as CIFAR-10-shaped parquet shards (the real shards are not part of the repository), so the benchmark scripts that
share quality.py's helpers keep running when those helpers move."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import lora_recovery  # noqa: E402
import quality  # noqa: E402


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    from datasets import ClassLabel, Dataset, Features, Image

    folder = tmp_path_factory.mktemp("cifar-like")
    rng = np.random.default_rng(0)
    features = Features({"image": Image(), "label": ClassLabel(num_classes=10)})
    for split, count in (("train", 800), ("test", 256)):
        images = list(rng.integers(0, 256, size=(count, 32, 32, 3), dtype=np.uint8))
        labels = rng.integers(0, 10, size=count).tolist()
        Dataset.from_dict({"image": images, "label": labels}, features=features).to_parquet(
            str(folder / f"{split}-00000.parquet"))
    return folder


def test_quality_quick_runs_every_kind_of_method_and_writes_its_report(shards, tmp_path):
    results = quality.main(["--quick", "--methods", "ofb,uvc,uniform", "--budgets", "0.5", "--seeds", "0",
                            "--data-dir", str(shards), "--cache-dir", str(tmp_path / "cache"),
                            "--output-dir", str(tmp_path), "--name", "q"])
    assert set(results["runs"]) == {"ofb|0.5|0", "uvc|0.5|0", "uniform|0.5|0"}
    for run in results["runs"].values():
        assert run["macs_ratio"] <= 0.5 + 1e-9 and 0.0 <= run["accuracy"] <= 1.0
    assert results["runs"]["ofb|0.5|0"]["search_trace"]["step"][0] == 0
    saved = json.loads((tmp_path / "q.json").read_text())
    assert saved["runs"].keys() == results["runs"].keys()
    assert "| ofb |" in (tmp_path / "q.md").read_text()


def test_quality_set_overrides_reach_the_method_config(shards, tmp_path):
    results = quality.main(["--quick", "--methods", "ofb", "--budgets", "0.5", "--seeds", "0", "--data-dir",
                            str(shards), "--cache-dir", str(tmp_path / "cache"), "--output-dir", str(tmp_path),
                            "--name", "q", "--set", "ofb.score_init_mean=1.5"])
    run = results["runs"]["ofb|0.5|0"]
    assert run["method_config"]["ofb"]["score_init_mean"] == 1.5
    assert run["search_settings"]["overrides"] == {"ofb.score_init_mean": 1.5}


def test_quality_refuses_a_set_override_outside_the_method_sections(shards, tmp_path):
    with pytest.raises(SystemExit, match="ofb.FIELD=VALUE"):
        quality.main(["--quick", "--methods", "ofb", "--budgets", "0.5", "--seeds", "0", "--data-dir", str(shards),
                      "--cache-dir", str(tmp_path / "cache"), "--output-dir", str(tmp_path), "--set", "lr=1"])


def test_lora_recovery_quick_accuracy_part_runs_on_quality_helpers(shards, tmp_path):
    results = lora_recovery.main(["--quick", "--methods", "ofb", "--variants", "full,lora", "--data-dir",
                                  str(shards), "--cache-dir", str(tmp_path / "cache"), "--output-dir", str(tmp_path)])
    full, lora = results["runs"]
    assert (full["variant"], lora["variant"]) == ("full", "lora")
    assert full["accuracy_before_finetune"] == lora["accuracy_before_finetune"]  # the same search
    assert lora["trainable_in_finetuning"] < full["trainable_in_finetuning"]
    assert (tmp_path / "lora_recovery_quick.md").exists()
