"""The main job end to end, shortened: `hf-vit-compress demo` writes a loadable model, report.json and a plot."""

import json

import pytest
import torch
from huggingface_hub import ModelCard
from transformers import AutoModelForImageClassification

from hf_vit_compress.cli import main
from hf_vit_compress.cli.demo import DemoSettings, run_demo
from hf_vit_compress.publishing.publish import check_publishable

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


def test_demo_cli_names_its_phases_and_prints_the_architecture_table(tmp_path, capsys):
    code = main(["demo", "--output-dir", str(tmp_path), "--dense-epochs", "1", "--search-epochs", "1",
                 "--finetune-epochs", "1", "--batch-size", "128", "--no-progress"])
    assert code == 0
    captured = capsys.readouterr()
    assert "Phase 1 of 2: dense training, 1 epoch (12 steps)" in captured.err
    assert "Phase 2 of 2: OFB search (1 epoch), then fine-tuning (1 epoch): 24 steps" in captured.err
    report = json.loads((tmp_path / "report.json").read_text())
    table = "\n".join(report["architecture_table"])
    assert table.startswith("Final architecture (OFB)") and table in captured.err  # printed once, as saved
    assert captured.err.count("Final architecture") == 1
    published = json.loads((tmp_path / "model" / "compression_report.json").read_text())
    assert published["architecture_table"] == report["architecture_table"]
    assert published["search_macs_ratio"] == report["search_macs_ratio"] is not None
    # --no-progress: no bars; the Trainer prints its log dicts as they come
    assert "it/s" not in captured.err and "{'loss':" in captured.out
