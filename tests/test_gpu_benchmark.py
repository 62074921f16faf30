"""The GPU benchmark's code paths on CPU (benchmarks/gpu_speed.py, the device handling of benchmarks/_common.py), so
the one run on a lent GPU does not fail on something a CPU could have shown."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import _common  # noqa: E402
import gpu_speed  # noqa: E402


def test_example_image_follows_the_model_device_and_dtype():
    model = _common.dense_vit(dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64),
                              image_size=16, patch_size=8, num_labels=3)
    assert _common.example_image(model).device.type == "cpu"
    model.to(device="meta", dtype=torch.bfloat16)  # stands in for a GPU: inputs must follow the weights
    image = _common.example_image(model)
    assert image.device.type == "meta" and image.dtype == torch.bfloat16 and image.shape == (1, 3, 16, 16)


def test_predicted_backends_from_benchmark_shapes():
    shapes = {"hidden_size": 128, "layers": [{"heads": 2, "qk": 128, "v": 16, "mlp": 256},
                                             {"heads": 0, "qk": 0, "v": 0, "mlp": 256},
                                             {"heads": 1, "qk": 64, "v": 64, "mlp": 256}]}
    assert gpu_speed.attention_shapes(shapes) == [(2, 64, 8), (1, 64, 64)]
    assert gpu_speed.predicted_backends(shapes, torch.bfloat16) == {"backends": ["efficient", "cudnn", "math"],
                                                                     "math_only_blocks": []}
    shapes["layers"][0]["v"] = 6
    assert gpu_speed.predicted_backends(shapes, torch.bfloat16)["math_only_blocks"] == [0]


def test_eager_quick_run_writes_results_with_the_sdpa_backend_used(tmp_path):
    results = gpu_speed.main(["--device", "cpu", "--quick", "--modes", "eager", "--no-tp", "--methods", "ofb,uvc",
                              "--batch-sizes", "2", "--repeats", "1", "--output-dir", str(tmp_path), "--name", "q"])
    assert results["errors"] == []
    (cell,) = results["cells"]
    assert [row["variant"] for row in cell["rows"]] == ["dense", "ofb@0.5", "uvc@0.5"]
    for row in cell["rows"]:
        assert row["sdpa"]["ran"]  # an aten sdpa op name per attention call, e.g. "flash-cpux2" or "mathx1"
        assert sum(row["sdpa"]["counts"].values()) >= 1
    variants = results["variants"]["quick"]
    assert variants["ofb@0.5"]["predicted_sdpa"]["backends"][0] == "flash"  # OFB keeps q/k and v head dims equal
    assert variants["uvc@0.5"]["predicted_sdpa"]["math_only_blocks"] == []
    saved = json.loads((tmp_path / "q.json").read_text())
    assert saved["cells"][0]["rows"][0]["variant"] == "dense"
    assert "| quick | 2 | eager | ofb@0.5 |" in (tmp_path / "q.md").read_text()


def test_quality_merge_takes_baselines_across_search_settings_only():
    import quality_report

    def results(fraction, budget="0.5,0.3"):
        settings = {"mode": "medium", "steps": 1500, "search_fraction": fraction, "budgets": budget,
                    "eval_split": "test", "search_settings": "library"}
        runs = {f"{method}|0.5|0": {"method": method} for method in ("ofb", "uvc", "tp-taylor", "uniform")}
        invocations = [{"command": "python benchmarks/quality.py --medium --methods ofb,uvc"},
                       {"command": "python benchmarks/quality.py --medium --methods tp-taylor,uniform"}]
        return {"settings": settings, "runs": runs, "invocations": invocations, "dense": None}

    ours = results(0.2)
    ours["runs"], ours["invocations"] = {}, []
    quality_report.merge_results(ours, results(0.5), "old.json")
    assert sorted(ours["runs"]) == ["tp-taylor|0.5|0", "uniform|0.5|0"]  # the searches' runs stay out
    assert [p["command"].split()[-1] for p in ours["invocations"]] == ["tp-taylor,uniform"]  # and their commands
    quality_report.merge_results(ours, results(0.2), "same.json")
    assert len(ours["runs"]) == 4
    try:
        quality_report.merge_results(ours, results(0.2, budget="0.7"), "other.json")
    except SystemExit as error:
        assert "other settings" in str(error)
    else:
        raise AssertionError("settings beyond the search's must agree")
