"""Bad data and bad configuration get one clear error naming what is wrong, before or at the bad row (issue 10: F7,
F8, F9, F10, F14, F15, F17). CLI runs use test_cli's tiny local model and parquet shards, in process."""

from __future__ import annotations

import io
import json
import math
import re

import datasets
import numpy as np
import pytest
import torch
from conftest import make_vit_classifier, tiny_dataset, tiny_overrides, training_args, write_parquet_shards
from PIL import Image

from hf_vit_compress.cli import main
from hf_vit_compress.cli.recipes import load_recipe
from hf_vit_compress.config import CompressionConfig
from hf_vit_compress.data import EvalImageTransform, prepare_dataset
from hf_vit_compress.training.trainer import CompressionTrainer


@pytest.fixture(scope="module", name="assets")
def _assets(tmp_path_factory):
    """test_cli's tiny local model (5 labels, 16 px) and parquet shards (20 px images)."""
    folder = tmp_path_factory.mktemp("input_assets")
    make_vit_classifier().save_pretrained(folder / "tiny_vit")
    return {"model": str(folder / "tiny_vit"), **write_parquet_shards(folder)}


def run_cli(assets, output_dir, *extra: str, train_files: list[str] | None = None) -> int:
    overrides = tiny_overrides(assets, output_dir)
    if train_files is not None:
        start = overrides.index("--data.train_files") + 1
        end = overrides.index("--data.eval_files")
        overrides[start:end] = train_files
    return main(["train", "--recipe", "deit_tiny_ofb", *overrides, *extra])


def one_error_line(capsys) -> str:
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error")]
    assert len(errors) == 1, errors
    return errors[0]


def png(size: int = 20, seed: int = 0) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def write_rows(path, images: list, labels: list[int], label_feature=None) -> str:
    features = datasets.Features({"image": datasets.Image(),
                                  "label": label_feature or datasets.ClassLabel(num_classes=5)})
    datasets.Dataset.from_dict({"image": images, "label": labels}, features=features).to_parquet(str(path))
    return str(path)


# ---------------------------------------------------------------------------------------------------------------
# F7: map-style data through a recipe that leaves remove_unused_columns at its default
# ---------------------------------------------------------------------------------------------------------------
def test_map_style_recipe_runs_with_remove_unused_columns_on(assets, tmp_path):
    """F7: `KeyError: 'image'` (the Trainer dropped the raw columns before the lazy transform could read them)."""
    code = run_cli(assets, tmp_path / "out", "--data.streaming", "false", "--training.remove_unused_columns", "true",
                   "--training.max_steps", "2")
    assert code == 0
    assert (tmp_path / "out" / "compressed_model" / "model.safetensors").is_file()


# ---------------------------------------------------------------------------------------------------------------
# F8: integer labels out of range, in a plain int column
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("streaming", ["false", "true"])
@pytest.mark.parametrize("bad", [7, -1])
def test_an_out_of_range_int_label_names_column_value_and_row(assets, tmp_path, capsys, streaming, bad):
    """F8: `IndexError: Target 12 is out of bounds` mid-training, for a `Value("int64")` label column (only
    ClassLabel columns were range-checked). The model has 5 labels."""
    labels = [0, 1, 2, bad, 4, 0, 1, 2]
    images = [png(seed=i) for i in range(8)]
    files = [write_rows(tmp_path / "train.parquet", images, labels, datasets.Value("int64"))]
    code = run_cli(assets, tmp_path / "out", "--data.streaming", streaming, "--training.max_steps", "4",
                   train_files=files)
    line = one_error_line(capsys)
    assert code == 2
    # a local parquet stream is checked file by file before training, so both name the row (and the stream its file)
    where = "row 3" if streaming == "false" else r"row 3 of \S+train\.parquet"
    assert re.search(rf"Label {bad} in column 'label' at {where} is outside the valid range \[0, 5\)",
                                   line), line


# ---------------------------------------------------------------------------------------------------------------
# F9: OFB with an image size that is not a multiple of the patch
# ---------------------------------------------------------------------------------------------------------------
def test_ofb_with_image_30_and_patch_8_trains(tmp_path):
    """F9: accepted at construction, then a tensor-size RuntimeError in pmim.py at step 1. Supported now: PMIM
    reconstructs the 24 x 24 pixels the 3 x 3 patches cover (the patch embedding never sees the rest)."""
    model = make_vit_classifier(seed=0, image_size=30, patch_size=8)
    generator = torch.Generator().manual_seed(0)
    data = [{"pixel_values": torch.randn(3, 30, 30, generator=generator), "labels": i % 5} for i in range(16)]
    config = CompressionConfig(method="ofb", target_flops=0.5, search_fraction=0.5)
    trainer = CompressionTrainer(model=model, args=training_args(tmp_path, max_steps=4, logging_steps=1),
                                 compression_config=config, train_dataset=data)
    trainer.train()
    pmim = [entry["pmim_loss"] for entry in trainer.state.log_history if "pmim_loss" in entry]
    assert pmim and all(math.isfinite(value) for value in pmim)
    small = trainer.export_compressed_model()
    assert small(pixel_values=data[0]["pixel_values"][None]).logits.shape == (1, 5)


# ---------------------------------------------------------------------------------------------------------------
# F10: corrupt and truncated images
# ---------------------------------------------------------------------------------------------------------------
@pytest.fixture(name="corrupt_files")
def _corrupt_files(tmp_path):
    """16 rows; row 2 is a PNG cut in half, row 5 is not an image at all."""
    images = [{"bytes": png(seed=i), "path": f"image-{i}.png"} for i in range(16)]
    images[2]["bytes"] = images[2]["bytes"][: len(images[2]["bytes"]) // 2]
    images[5] = {"bytes": b"this is not an image", "path": "image-5.png"}
    return [write_rows(tmp_path / "train.parquet", images, [i % 5 for i in range(16)])]


def test_an_undecodable_image_names_its_row_and_file(assets, tmp_path, capsys, corrupt_files):
    """F10: `UnidentifiedImageError` / `image file is truncated` mid-epoch, no row or file named."""
    code = run_cli(assets, tmp_path / "out", "--data.streaming", "false", "--training.max_steps", "4",
                   train_files=corrupt_files)
    line = one_error_line(capsys)
    assert code == 2
    assert re.search(r"at row (2|5) \(file 'image-(2|5)\.png'\) cannot be read", line), line
    assert "skip_undecodable_images" in line


def test_undecodable_images_can_be_skipped_and_are_counted(assets, tmp_path, corrupt_files):
    """F10's opt-in: skip them, count them in the report (rows, not reads: 4 steps of batch 4 read the 16 rows)."""
    code = run_cli(assets, tmp_path / "out", "--data.streaming", "false", "--training.max_steps", "4",
                   "--data.skip_undecodable_images", "true", train_files=corrupt_files)
    assert code == 0
    report = json.loads((tmp_path / "out" / "compression_report.json").read_text())
    assert report["skipped_images"]["train"] == 2 and report["skipped_images"]["eval"] == 0


def test_undecodable_images_in_a_stream_are_named_or_skipped(tmp_path, corrupt_files):
    stream = datasets.load_dataset("parquet", data_files=corrupt_files, split="train", streaming=True)
    transform = EvalImageTransform(8, crop_pct=1.0)
    with pytest.raises(ValueError, match=r"at example 2 of the stream \(file 'image-2\.png'\) cannot be read"):
        list(prepare_dataset(stream, transform))
    prepared = prepare_dataset(stream, transform, skip_undecodable_images=True)
    assert [example["labels"] for example in prepared] == [i % 5 for i in range(16) if i not in (2, 5)]
    assert prepared.augmentation.skipped == 2


# ---------------------------------------------------------------------------------------------------------------
# F14: configuration values that were accepted but wrong
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "values, field, allowed",
    [
        ({"target_gmacs": math.inf}, "target_gmacs", "a finite number"),
        ({"target_gmacs": "1"}, "target_gmacs", "a finite number"),
        ({"distillation_alpha": "0.1"}, "distillation_alpha", "a finite number"),
        ({"search_fraction": math.nan}, "search_fraction", "a finite number"),
        ({"ofb": {"embed_step": 1.5}}, "ofb.embed_step", "an integer"),
        ({"ofb": {"channel_multiple": 2.5}}, "ofb.channel_multiple", "an integer"),
        ({"ofb": {"pmim_window": 2.5}}, "ofb.pmim_window", "an integer"),
        ({"uvc": {"channel_multiple": 2.5}}, "uvc.channel_multiple", "an integer"),
        ({"ofb": {"pmim": "yes"}}, "ofb.pmim", "true or false"),
    ],
)
def test_wrong_types_and_non_finite_numbers_name_the_field(values, field, allowed):
    with pytest.raises(ValueError, match=rf"CompressionConfig\.{field}=.* is invalid: allowed .*{allowed}"):
        CompressionConfig(**values)


def test_assigning_an_invalid_value_after_construction_is_an_error_and_changes_nothing():
    config = CompressionConfig(target_flops=0.4)
    with pytest.raises(ValueError, match=r"CompressionConfig\.target_flops=5\.0 is invalid"):
        config.target_flops = 5.0
    with pytest.raises(ValueError, match=r"CompressionConfig\.ofb\.arch_lr=-1\.0 is invalid"):
        config.ofb.arch_lr = -1.0
    assert config.target_flops == 0.4 and config.ofb.arch_lr is None  # the default (a rule on the search length)
    config.target_flops = 0.3  # a valid value is taken
    assert config.target_flops == 0.3


def test_changing_the_config_after_the_trainer_was_built_is_an_error(tmp_path):
    config = CompressionConfig(target_flops=0.5)
    trainer = CompressionTrainer(model=make_vit_classifier(seed=0), compression_config=config,
                                 args=training_args(tmp_path, max_steps=2), train_dataset=tiny_dataset(8))
    config.target_flops = 0.3  # valid, but the method has already taken its budget from 0.5
    with pytest.raises(ValueError, match=r"\['target_flops'\] were changed after CompressionTrainer was built"):
        trainer.train()


def test_a_budget_at_or_above_the_dense_macs_is_an_error(tmp_path):
    from hf_vit_compress.surgery.flops import dense_macs

    model = make_vit_classifier(seed=0)
    above = dense_macs(model) * 2 / 1e9
    for method in ("ofb", "uvc"):
        with pytest.raises(ValueError, match=r"target_gmacs=.* is invalid: allowed a budget below the dense model's"):
            CompressionTrainer(model=make_vit_classifier(seed=0), args=training_args(tmp_path),
                               compression_config=CompressionConfig(method=method, target_gmacs=above))


# ---------------------------------------------------------------------------------------------------------------
# F15: a key given twice in a recipe
# ---------------------------------------------------------------------------------------------------------------
def test_a_duplicate_recipe_key_is_an_error_naming_it(tmp_path, capsys):
    recipe = tmp_path / "twice.yaml"
    recipe.write_text("model: {model_name_or_path: x}\ndata: {dataset_name: y}\ncompression:\n  method: ofb\n"
                      "  target_flops: 0.4\n  method: uvc\n")
    with pytest.raises(ValueError, match=r"duplicate key 'method' at line 6 \(first given at line 4\)"):
        load_recipe(recipe)
    assert main(["train", "--recipe", str(recipe)]) == 2
    assert "duplicate key 'method'" in one_error_line(capsys)


def test_yaml_merge_keys_are_not_duplicates(tmp_path):
    recipe = tmp_path / "merge.yaml"
    recipe.write_text("model: {model_name_or_path: x}\ndata: {dataset_name: y}\ncompression:\n"
                      "  ofb: &shared {arch_lr: 0.01}\n  uvc: {<<: {counts_lr: 0.5}, dual_lr: 0.001}\n")
    assert load_recipe(recipe)["compression"]["uvc"] == {"counts_lr": 0.5, "dual_lr": 0.001}


# ---------------------------------------------------------------------------------------------------------------
# F17: a model path that does not exist
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("path", ["./does/not/exist", "/nowhere/tiny_vit"])
def test_a_missing_local_model_folder_is_one_line(assets, tmp_path, capsys, path):
    """F17: a traceback ending in `HFValidationError` (transformers took the path for a Hub id)."""
    code = run_cli(assets, tmp_path / "out", "--model.model_name_or_path", path, "--training.max_steps", "1")
    line = one_error_line(capsys)
    assert code == 2
    assert f"model.model_name_or_path='{path}' cannot be loaded: no such local folder" in line
