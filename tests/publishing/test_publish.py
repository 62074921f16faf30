"""Publishing: `CompressionTrainer.push_to_hub()` uploads the COMPRESSED model with its image processor, sidecars
and model card (the Hub client is intercepted: no network), those exact files load in a fresh process without
hf_vit_compress and run in `pipeline()` with the in-memory model's logits, the card's numbers are the run's, and
saving / pushing a saved folder write the same files.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import transformers
from conftest import make_vit_classifier
from fake_hub import FakeHub
from huggingface_hub import ModelCard
from PIL import Image
from safetensors import safe_open
from transformers import TrainingArguments

from hf_vit_compress import CompressionConfig, CompressionTrainer
from hf_vit_compress.publishing.card import BASE_TAGS, build_model_card
from hf_vit_compress.publishing.metrics import compute_metrics, evaluate_classifier
from hf_vit_compress.publishing.publish import (
    base_model_license,
    compression_report,
    is_hub_dataset_id,
    is_hub_model_id,
    metric_values,
    push_compressed_folder,
)
from hf_vit_compress.surgery.flops import count_macs, count_params

REPO_ID = "me/tiny-vit-ofb"
NUM_CLASSES = 10  # > 5, so top-5 accuracy is reported too
PUBLISHED = {"config.json", "model.safetensors", "configuration_compressed_vit.py", "modeling_compressed_vit.py",
             "preprocessor_config.json", "architecture.json", "compression_config.json", "compression_report.json",
             "README.md"}
LOADER = Path(__file__).resolve().parents[1] / "scripts" / "load_published.py"
ViTImageProcessor = getattr(transformers, "ViTImageProcessorPil", None) or transformers.ViTImageProcessor


def examples(size: int, seed: int) -> list[dict]:
    generator = torch.Generator().manual_seed(seed)
    return [{"pixel_values": torch.randn(3, 16, 16, generator=generator), "labels": i % NUM_CLASSES}
            for i in range(size)]


def processor():
    return ViTImageProcessor(size={"height": 16, "width": 16}, image_mean=[0.5] * 3, image_std=[0.5] * 3)


def make_trainer(output_dir: Path, **overrides) -> CompressionTrainer:
    values = dict(output_dir=str(output_dir), max_steps=12, per_device_train_batch_size=8,
                  per_device_eval_batch_size=16, learning_rate=1e-3, report_to=[], use_cpu=True,
                  remove_unused_columns=False, dataloader_num_workers=0, disable_tqdm=True, seed=0,
                  save_strategy="no")
    values.update(overrides)
    return CompressionTrainer(
        model=make_vit_classifier(seed=0, num_labels=NUM_CLASSES), args=TrainingArguments(**values),
        compression_config=CompressionConfig(method="ofb", target_flops=0.5, search_fraction=0.5),
        train_dataset=examples(48, seed=0), eval_dataset=examples(30, seed=1), compute_metrics=compute_metrics,
        processing_class=processor(),
    )


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny OFB run with push_to_hub=True and checkpoints every 6 steps; dense evaluation, training, final
    evaluation, then `trainer.push_to_hub()`. Everything the Hub client would have received is in `hub`."""
    root = tmp_path_factory.mktemp("publish")
    with pytest.MonkeyPatch.context() as patch:
        hub = FakeHub.install(patch, root / "hub")
        trainer = make_trainer(root / "out", push_to_hub=True, hub_model_id=REPO_ID, hub_token="hf_test_token",
                               save_strategy="steps", save_steps=6)
        repos_at_init = list(hub.repos)
        dense_metrics = trainer.evaluate_dense()
        trainer.train()
        uploads_during_training = len(hub.uploads)
        compressed_metrics = trainer.evaluate()
        commit = trainer.push_to_hub()
    return SimpleNamespace(root=root, hub=hub, trainer=trainer, commit=commit, repos_at_init=repos_at_init,
                           uploads_during_training=uploads_during_training, dense_metrics=dense_metrics,
                           compressed_metrics=compressed_metrics, compressed=trainer.export_compressed_model())


def uploaded(run) -> dict[str, Path]:
    return run.hub.files(0)


# ---------------------------------------------------------------------------------------------------------------
# trainer.push_to_hub()
# ---------------------------------------------------------------------------------------------------------------
def test_push_to_hub_uploads_exactly_the_compressed_model_files(run):
    assert run.repos_at_init == [{"repo_id": REPO_ID, "token": "hf_test_token", "private": None, "exist_ok": True}]
    assert run.uploads_during_training == 0  # the checkpoints (gated dense model) were not pushed
    upload = run.hub.uploads[0]
    assert upload["repo_id"] == REPO_ID and upload["commit_message"] == "End of training"
    assert upload["token"] == "hf_test_token" and upload.get("path_in_repo") is None  # the repo's root
    staged = Path(upload["folder_path"])
    assert not staged.exists()  # a temporary folder, removed after the upload
    assert Path(run.trainer.args.output_dir) not in staged.parents
    files = uploaded(run)
    assert set(files) == PUBLISHED  # no checkpoints, no training_args.bin, no subfolder

    config = json.loads(files["config.json"].read_text())
    assert config["model_type"] == "compressed_vit"
    assert config["auto_map"]["AutoModelForImageClassification"].startswith("modeling_compressed_vit.")
    tensors = [path for path in run.hub.uploads[0]["files"].rglob("*.safetensors")]
    with safe_open(str(tensors[0]), framework="pt") as weights:
        keys = set(weights.keys())
    assert len(tensors) == 1 and not any(key.startswith("compression.") for key in keys)
    assert keys == set(run.compressed.state_dict())

    assert json.loads(files["architecture.json"].read_text()) == run.trainer.method.export_architecture().to_dict()
    assert json.loads(files["compression_config.json"].read_text()) == json.loads(
        run.trainer.compression_config.to_json_string())
    assert json.loads(files["preprocessor_config.json"].read_text()) == json.loads(processor().to_json_string())


def test_uploaded_files_load_without_the_package_and_pipeline_gives_the_same_logits(run, tmp_path):
    generator = np.random.default_rng(3)
    image_path = tmp_path / "image.png"
    Image.fromarray(generator.integers(0, 256, (24, 20, 3), dtype=np.uint8)).save(image_path)
    image = Image.open(image_path).convert("RGB")
    with torch.no_grad():
        expected = run.compressed(**processor()(image, return_tensors="pt")).logits[0]

    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    env.update(HF_HOME=str(tmp_path / "hf_home"), HF_HUB_OFFLINE="1")
    result = subprocess.run([sys.executable, str(LOADER), str(run.hub.uploads[0]["files"]), str(image_path)],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    loaded = json.loads(result.stdout.strip().splitlines()[-1])

    assert loaded["import_blocked"] is True
    assert loaded["model_class"].startswith("transformers_modules.")  # the uploaded modeling file, not ours
    assert loaded["model_class"].endswith(".CompressedViTForImageClassification")
    torch.testing.assert_close(torch.tensor(loaded["logits"]), expected, atol=1e-5, rtol=0)
    by_label = {entry["label"]: entry["score"] for entry in loaded["pipeline"]}
    labels = [loaded["id2label"][str(index)] for index in range(NUM_CLASSES)]
    torch.testing.assert_close(torch.tensor([by_label[label] for label in labels]), expected, atol=1e-5, rtol=0)
    assert loaded["pipeline"][0]["label"] == run.compressed.config.id2label[int(expected.argmax())]


def test_card_parses_and_its_numbers_are_the_runs(run):
    files = uploaded(run)
    card = ModelCard.load(files["README.md"])
    report = json.loads(files["compression_report.json"].read_text())
    data = card.data

    assert data.library_name == "transformers" and data.pipeline_tag == "image-classification"
    assert {*BASE_TAGS, "ofb"} <= set(data.tags)
    assert data.base_model is None and data.license is None  # built from a config: no Hub id, no license known
    # The report's figures, each checked against an independent measurement of this run.
    dense = make_vit_classifier(seed=0, num_labels=NUM_CLASSES)
    assert report["dense_macs"] == count_macs(dense) and report["dense_params"] == count_params(dense)
    assert report["compressed_macs"] == count_macs(run.compressed)
    assert report["compressed_params"] == count_params(run.compressed)
    assert report["compressed_macs"] <= 0.5 * report["dense_macs"]
    assert report["dense_metrics"] == metric_values(run.dense_metrics, "dense")
    assert report["compressed_metrics"] == metric_values(run.compressed_metrics, "eval")
    assert set(report["compressed_metrics"]) == {"accuracy", "top5_accuracy"}
    eval_set = run.trainer.eval_dataset
    assert report["dense_metrics"] == pytest.approx(evaluate_classifier(dense, eval_set))
    assert report["compressed_metrics"] == pytest.approx(evaluate_classifier(run.compressed, eval_set))
    assert report["dense_accuracy"] == report["dense_metrics"]["accuracy"]
    assert report["compressed_top5_accuracy"] == report["compressed_metrics"]["top5_accuracy"]
    # ... and the card says exactly those.
    for key in ("method", "target_flops", "dense_macs", "compressed_macs", "dense_params", "compressed_params",
                "dense_metrics", "compressed_metrics"):
        assert data.compression[key] == report[key], key
    assert data.metrics == ["accuracy", "top5_accuracy"]
    text = card.text
    for index, layer in enumerate(report["architecture"]["layers"]):
        row = (f"| {index} | removed |" if not layer["keep_block"] else
               f"| {index} | {layer['num_heads']} | {layer['qk_head_dim']} | {layer['v_head_dim']} | "
               f"{layer['intermediate_size']} |")
        assert row in text
    assert f"| top-1 accuracy | {100 * report['dense_accuracy']:.2f}% | {100 * report['compressed_accuracy']:.2f}% |" \
        in text
    assert f'from_pretrained("{REPO_ID}", trust_remote_code=True)' in text
    assert f'pipeline("image-classification", model="{REPO_ID}", trust_remote_code=True)' in text
    assert json.dumps(report["compression_config"], indent=2, sort_keys=True) in text
    # no benchmark ran and the budget is in MACs: no speed section
    assert "### measured speed" not in text.lower() and "speed budget" not in text.lower()
    assert "speed_budget" not in report


def test_save_model_writes_the_same_files_and_pushes_them_with_push_to_hub(run, tmp_path, monkeypatch):
    hub = FakeHub.install(monkeypatch, tmp_path / "hub")
    run.trainer.save_model(str(tmp_path / "saved"))
    saved = {path.name: path for path in (tmp_path / "saved").iterdir()
             if not path.name.startswith(".")}  # .hf_vit_compress/: the save's manifest (saving.py)
    files = uploaded(run)
    assert set(saved) == PUBLISHED
    for name in PUBLISHED - {"README.md"}:  # the card differs only in the repo id it names
        assert saved[name].read_bytes() == files[name].read_bytes(), name
    assert ModelCard.load(saved["README.md"]).data.compression == ModelCard.load(files["README.md"]).data.compression
    # args.push_to_hub: a user's save_model also pushes (Trainer's behaviour), the same files.
    assert [upload["commit_message"] for upload in hub.uploads] == ["Model save"]
    assert {name: path.read_bytes() for name, path in hub.files().items()} == {
        name: path.read_bytes() for name, path in files.items()}


def test_push_a_saved_folder_rebuilds_the_card_for_the_repo_and_keeps_the_users(run, tmp_path, monkeypatch):
    hub = FakeHub.install(monkeypatch, tmp_path / "hub")
    folder = tmp_path / "deit-ofb"
    run.trainer.save_model(str(folder))
    card_before = (folder / "README.md").read_text()

    push_compressed_folder(folder, "me/pushed", private=True)
    assert hub.repos == [{"repo_id": "me/pushed", "token": None, "private": True, "exist_ok": True}]
    files = hub.files()
    assert set(files) == PUBLISHED
    assert 'from_pretrained("me/pushed", trust_remote_code=True)' in files["README.md"].read_text()
    assert (folder / "README.md").read_text() == card_before  # the staged copy's card was replaced, not the user's
    assert files["model.safetensors"].read_bytes() == (folder / "model.safetensors").read_bytes()

    push_compressed_folder(folder, "me/pushed", keep_card=True, revision="v1", commit_message="as saved")
    assert hub.files()["README.md"].read_text() == card_before
    assert hub.branches == [{"repo_id": "me/pushed", "branch": "v1", "token": None}]
    assert hub.uploads[-1]["revision"] == "v1" and hub.uploads[-1]["commit_message"] == "as saved"


def test_pushing_a_gated_checkpoint_or_an_incomplete_folder_is_refused(run, tmp_path, monkeypatch):
    hub = FakeHub.install(monkeypatch, tmp_path / "hub")
    checkpoint = Path(run.trainer.args.output_dir) / "checkpoint-6"
    with pytest.raises(ValueError, match="model_type 'vit'.*compression.\\* tensors"):
        push_compressed_folder(checkpoint, "me/wrong")
    folder = tmp_path / "no-processor"
    run.trainer.save_model(str(folder))  # pushes once (args.push_to_hub)
    (folder / "preprocessor_config.json").unlink()
    with pytest.raises(ValueError, match=r"missing \['preprocessor_config.json'\]"):
        push_compressed_folder(folder, "me/wrong")
    assert [upload["repo_id"] for upload in hub.uploads] == [REPO_ID] and hub.repos == []


def test_push_to_hub_is_non_blocking_and_honours_revision_and_commit_message(run, monkeypatch, tmp_path):
    hub = FakeHub.install(monkeypatch, tmp_path / "hub")
    future = run.trainer.push_to_hub(commit_message="second", blocking=False, revision="v2", token="other")
    assert future.result().commit_message == "second"
    upload = hub.uploads[-1]
    assert upload["run_as_future"] and upload["revision"] == "v2" and upload["token"] == "other"
    assert hub.branches == [{"repo_id": REPO_ID, "branch": "v2", "token": "other"}]
    assert not Path(upload["folder_path"]).exists()
    assert set(hub.files()) == PUBLISHED


def test_push_to_hub_before_the_search_has_finished_is_refused(tmp_path, monkeypatch):
    hub = FakeHub.install(monkeypatch, tmp_path / "hub")
    trainer = make_trainer(tmp_path / "out")
    with pytest.raises(ValueError, match="after train"):
        trainer.push_to_hub()
    assert hub.uploads == [] and not trainer.method.search_finished


def test_evaluate_dense_measures_the_source_model_and_restores_the_gates(tmp_path):
    trainer = make_trainer(tmp_path / "out")
    metrics = trainer.evaluate_dense()
    expected = evaluate_classifier(make_vit_classifier(seed=0, num_labels=NUM_CLASSES), examples(30, seed=1))
    assert metric_values(metrics, "dense") == pytest.approx(expected)
    assert trainer.gate_handle.enabled
    assert trainer.evaluations[-1]["kind"] == "dense"


# ---------------------------------------------------------------------------------------------------------------
# The card on its own
# ---------------------------------------------------------------------------------------------------------------
def test_card_of_a_hub_base_model_names_it_its_license_datasets_and_model_index(run):
    report = json.loads(uploaded(run)["compression_report.json"].read_text())
    report.update(base_model="google/vit-base-patch16-224", license="apache-2.0", datasets=["ILSVRC/imagenet-1k"],
                  eval_dataset={"name": "ILSVRC/imagenet-1k", "type": "ILSVRC/imagenet-1k", "split": "validation"},
                  speed={"device": "test CPU", "dense images/s": 10.0, "compressed images/s": 17.5})
    card = ModelCard(str(build_model_card(report, repo_id="me/vit-b-ofb")))
    data = card.data
    assert data.base_model == "google/vit-base-patch16-224" and data.license == "apache-2.0"
    assert data.datasets == ["ILSVRC/imagenet-1k"]
    results = {result.metric_type: result for result in data.eval_results}
    assert {key: result.metric_value for key, result in results.items()} == report["compressed_metrics"]
    assert results["accuracy"].dataset_type == "ILSVRC/imagenet-1k"
    assert results["accuracy"].dataset_split == "validation"
    assert "[google/vit-base-patch16-224](https://huggingface.co/google/vit-base-patch16-224)" in card.text
    assert "| compressed images/s | 17.5 |" in card.text


def test_card_without_measurements_claims_none(run):
    report = json.loads(uploaded(run)["compression_report.json"].read_text())
    for key in ("dense_metrics", "compressed_metrics", "dense_accuracy", "compressed_accuracy",
                "dense_top5_accuracy", "compressed_top5_accuracy", "eval_dataset"):
        report.pop(key, None)
    card = build_model_card(report, repo_id="me/x")
    assert "accuracy" not in str(card) and "### measured speed" not in str(card).lower()
    assert "speed budget" not in str(card).lower()
    assert card.data.eval_results is None and card.data.metrics is None
    with pytest.raises(ValueError, match="compressed_macs"):
        build_model_card({key: value for key, value in report.items() if key != "compressed_macs"})


def test_base_model_is_a_hub_id_never_a_local_path(tmp_path, monkeypatch):
    local = tmp_path / "my-vit"
    make_vit_classifier().save_pretrained(local)
    assert not is_hub_model_id(str(local)) and not is_hub_model_id("./my-vit") and not is_hub_model_id("")
    assert is_hub_model_id("google/vit-base-patch16-224")
    assert is_hub_dataset_id("ILSVRC/imagenet-1k") and is_hub_dataset_id("cifar10")
    assert not is_hub_dataset_id("parquet") and not is_hub_dataset_id(str(tmp_path))

    trainer = make_trainer(tmp_path / "out", max_steps=2)
    trainer.model.config._name_or_path = str(local)
    trainer.train()
    report = compression_report(trainer)
    assert report["model"] == str(local) and report["base_model"] is None
    assert "base_model" not in str(build_model_card(report)).split("---")[1]


def test_license_is_read_from_the_base_models_card(monkeypatch):
    class Info:
        card_data = SimpleNamespace(license="mit")

    calls = []
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr("huggingface_hub.HfApi.model_info", lambda api, repo_id, token=None: calls.append(repo_id)
                        or Info())
    assert base_model_license("owner/model") == "mit" and calls == ["owner/model"]
    assert base_model_license("./local") is None and calls == ["owner/model"]  # never asked for a local path

    def unreachable(api, repo_id, token=None):
        raise ConnectionError("no network")

    monkeypatch.setattr("huggingface_hub.HfApi.model_info", unreachable)
    assert base_model_license("owner/model") is None
