"""The main job end to end, shortened: `hf-vit-compress demo` writes a loadable model, report.json and a plot."""

import json

import pytest
import torch
from huggingface_hub import ModelCard
from transformers import AutoModelForImageClassification

from hf_vit_compress.cli import main
from hf_vit_compress.demo import DemoSettings, run_demo
from hf_vit_compress.publish import check_publishable

REPORT_KEYS = {
    "dense_accuracy", "compressed_accuracy", "dense_macs", "compressed_macs", "dense_params", "compressed_params",
    "target_flops", "method", "architecture",
}


@pytest.mark.parametrize("method, plot", [("ofb", "bimask_evolution.png"), ("uvc", "search_evolution.png")])
def test_demo_writes_model_report_and_plot(tmp_path, method, plot):
    settings = DemoSettings(method=method, target_flops=0.5, output_dir=str(tmp_path), dense_epochs=1,
                            search_epochs=1, finetune_epochs=1, batch_size=128, progress=False)
    report = run_demo(settings)

    assert REPORT_KEYS <= set(report)
    assert json.loads((tmp_path / "report.json").read_text())["compressed_macs"] == report["compressed_macs"]
    assert report["compressed_macs"] <= 0.5 * report["dense_macs"]
    assert report["compressed_params"] < report["dense_params"]
    assert 0.0 <= report["compressed_accuracy"] <= 1.0
    assert len(report["architecture"]["layers"]) == 4
    assert (tmp_path / plot).stat().st_size > 10_000  # a real rendered figure, not an empty file
    model = AutoModelForImageClassification.from_pretrained(tmp_path / "model", trust_remote_code=True)
    assert model.config.model_type == "compressed_vit"
    logits = model(pixel_values=torch.zeros(1, 3, 16, 16)).logits
    assert logits.shape == (1, 10)
    # Published like any compressed model: image processor, sidecars and a card with the demo's measurements.
    check_publishable(tmp_path / "model")
    card = ModelCard.load(tmp_path / "model" / "README.md")
    assert card.data.compression["compressed_metrics"] == {"accuracy": report["compressed_accuracy"],
                                                           "top5_accuracy": report["compressed_top5_accuracy"]}
    assert card.data.compression["dense_metrics"]["accuracy"] == report["dense_accuracy"]
    assert report["dense_accuracy"] <= report["dense_top5_accuracy"]


def test_demo_cli_rejects_bad_budget_with_a_clear_error(tmp_path, capsys):
    code = main(["demo", "--target-flops", "1.5", "--output-dir", str(tmp_path), "--no-progress"])
    assert code == 2
    assert "target_flops" in capsys.readouterr().err
    assert not (tmp_path / "report.json").exists()
