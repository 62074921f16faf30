"""The CLI's publishing path: `train` evaluates the dense and the compressed model (top-1 in
compression_report.json), saves the compressed model with the source's image processor and a card whose numbers
are the report's, pushes it with `--training.push_to_hub`; `push DIR REPO_ID` publishes a saved folder. The Hub
client is intercepted (no network)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import transformers
from conftest import make_vit_classifier, tiny_overrides, write_parquet_shards
from fake_hub import FakeHub
from huggingface_hub import ModelCard
from PIL import Image
from test_metrics import ERROR_RATE
from test_publish import PUBLISHED

from hf_vit_compress.cli import main
from hf_vit_compress.data import image_processor_for_transform, transforms_from_image_processor

ViTImageProcessor = getattr(transformers, "ViTImageProcessorPil", None) or transformers.ViTImageProcessor


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    folder = tmp_path_factory.mktemp("publish_cli_assets")
    make_vit_classifier().save_pretrained(folder / "with_processor")
    ViTImageProcessor(size={"height": 16, "width": 16}, image_mean=[0.3] * 3, image_std=[0.2] * 3).save_pretrained(
        folder / "with_processor")
    make_vit_classifier().save_pretrained(folder / "bare")
    (folder / "error_rate").mkdir()
    (folder / "error_rate" / "error_rate.py").write_text(ERROR_RATE)
    return {"folder": folder, **write_parquet_shards(folder)}


def train(assets, output_dir, model: str, *extra) -> int:
    overrides = tiny_overrides({**assets, "model": str(assets["folder"] / model)}, output_dir)
    return main(["train", "--recipe", "deit_tiny_ofb", *overrides, "--training.max_steps", "2", *extra])


def test_train_reports_dense_and_compressed_accuracy_and_pushes_the_compressed_model(
        assets, tmp_path, monkeypatch, capsys):
    hub = FakeHub.install(monkeypatch, tmp_path / "hub")
    output_dir = tmp_path / "out"
    code = train(assets, output_dir, "with_processor", "--training.push_to_hub", "--training.hub_model_id",
                 "me/cli-run", "--training.hub_token", "hf_cli", "--data.eval_metrics", str(assets["folder"] /
                                                                                         "error_rate"))
    assert code == 0, capsys.readouterr().err
    report = json.loads((output_dir / "compression_report.json").read_text())
    # Dense (before compression) and compressed top-1, measured on the 4 validation images.
    for which in ("dense", "compressed"):
        assert report[f"{which}_accuracy"] in (0.0, 0.25, 0.5, 0.75, 1.0)
        assert report[f"{which}_metrics"]["error_rate"] == pytest.approx(1 - report[f"{which}_accuracy"])
    assert report["compressed_accuracy"] == report["metrics"]["eval_accuracy"]
    assert report["eval_dataset"] == {"name": "local parquet files", "split": "validation"}  # a stream: no count

    # One upload, at the end: the compressed model's files, and they are what was saved.
    assert [upload["repo_id"] for upload in hub.uploads] == ["me/cli-run"]
    assert hub.repos[0]["repo_id"] == "me/cli-run" and hub.uploads[0]["token"] == "hf_cli"
    files = hub.files()
    saved = output_dir / "compressed_model"
    assert set(files) == PUBLISHED == {path.name for path in saved.iterdir() if not path.name.startswith(".")}
    assert json.loads(files["config.json"].read_text())["model_type"] == "compressed_vit"
    source = json.loads((assets["folder"] / "with_processor" / "preprocessor_config.json").read_text())
    assert json.loads(files["preprocessor_config.json"].read_text()) == source  # the source model's processor

    # The card's numbers are the report's; the recipe is on it.
    card = ModelCard.load(files["README.md"])
    for key in ("dense_macs", "compressed_macs", "dense_params", "compressed_params", "dense_metrics",
                "compressed_metrics"):
        assert card.data.compression[key] == report[key], key
    assert card.data.base_model is None and card.data.datasets is None  # a local folder and local files
    assert "model_name_or_path: " + str(assets["folder"] / "with_processor") in card.text
    assert 'from_pretrained("me/cli-run", trust_remote_code=True)' in card.text
    saved_report = json.loads((saved / "compression_report.json").read_text())
    assert {key: saved_report[key] for key in saved_report} == {key: report[key] for key in saved_report}


def test_train_without_a_source_processor_publishes_one_matching_the_eval_transform(assets, tmp_path):
    assert train(assets, tmp_path / "out", "bare") == 0
    saved = json.loads((tmp_path / "out" / "compressed_model" / "preprocessor_config.json").read_text())
    _, eval_transform = transforms_from_image_processor(None, 16)  # what the CLI evaluated with: 16 px, ImageNet
    assert saved == json.loads(image_processor_for_transform(eval_transform).to_json_string())
    assert saved["image_processor_type"] == "DeiTImageProcessor" and saved["crop_size"]["height"] == 16


def test_push_command_publishes_a_saved_folder_and_refuses_the_output_dir(assets, tmp_path, monkeypatch, capsys):
    assert train(assets, tmp_path / "out", "with_processor") == 0
    hub = FakeHub.install(monkeypatch, tmp_path / "hub")
    assert main(["push", str(tmp_path / "out" / "compressed_model"), "me/pushed", "--private"]) == 0
    assert "pushed" in capsys.readouterr().out
    assert hub.repos == [{"repo_id": "me/pushed", "token": None, "private": True, "exist_ok": True}]
    assert set(hub.files()) == PUBLISHED

    assert main(["push", str(tmp_path / "out"), "me/pushed"]) == 2
    error = capsys.readouterr().err
    assert "cannot be published (did you mean" in error and "compressed_model" in error
    assert len(hub.uploads) == 1


@pytest.mark.parametrize("crop_pct, processor_type", [(1.0, "ViTImageProcessor"), (0.875, "DeiTImageProcessor")])
def test_image_processor_for_transform_preprocesses_like_the_transform(crop_pct, processor_type):
    _, eval_transform = transforms_from_image_processor(None, 16, mean=0.4, std=0.3, crop_pct=crop_pct)
    processor = image_processor_for_transform(eval_transform)
    assert json.loads(processor.to_json_string())["image_processor_type"] == processor_type
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 40, 3), dtype=np.uint8))
    pixels = processor(image, return_tensors="pt")["pixel_values"][0]
    np.testing.assert_allclose(np.asarray(pixels), eval_transform(image).numpy(), atol=1e-6, rtol=0)
