"""Silent wrong data (issue: security of what is published and saved, item 4).

High-bit-depth images are scaled from their real range instead of clipped white by PIL; a run with no training data
fails with one line naming the files and writes no model; a bad label in a local parquet stream names its file.
"""

from __future__ import annotations

import io
from pathlib import Path

import datasets
import numpy as np
import pytest
from conftest import make_vit_classifier, tiny_overrides, training_args, write_parquet_shards
from PIL import Image

from hf_vit_compress.cli import main
from hf_vit_compress.config import CompressionConfig
from hf_vit_compress.data.prepared import prepare_dataset
from hf_vit_compress.data.transforms import EvalImageTransform, to_rgb_image
from hf_vit_compress.training.trainer import CompressionTrainer, NoTrainingSteps

FEATURES = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(num_classes=5)})


# ---------------------------------------------------------------------------------------------------------------------
# High-bit-depth images
# ---------------------------------------------------------------------------------------------------------------------
def _ramp(maximum: int, dtype) -> np.ndarray:
    return np.linspace(0, maximum, 32 * 32).reshape(32, 32).astype(dtype)


def _png_round_trip(image: Image.Image) -> Image.Image:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return Image.open(io.BytesIO(buffer.getvalue()))


def test_a_16_bit_png_keeps_its_tones_instead_of_turning_white():
    pixels = _ramp(65535, np.uint16)
    image = _png_round_trip(Image.fromarray(pixels))
    assert image.mode == "I;16"
    assert (np.asarray(image.convert("RGB")) == 255).mean() > 0.99  # what PIL alone does: the 99.5% white
    rgb = np.asarray(to_rgb_image(image)).astype(np.float64)
    assert rgb.shape == (32, 32, 3)
    np.testing.assert_allclose(rgb[..., 0], pixels / 257.0, atol=0.5 + 1e-9)
    assert (rgb == 255).mean() < 0.01


def test_a_big_endian_16_bit_image_is_scaled_the_same():
    pixels = _ramp(65535, np.uint16)
    image = Image.frombytes("I;16B", (32, 32), pixels.astype(">u2").tobytes())  # as a big-endian TIFF decodes
    np.testing.assert_allclose(np.asarray(to_rgb_image(image))[..., 1], pixels / 257.0, atol=0.5 + 1e-9)


def test_a_float_tiff_in_0_1_is_grey_not_black_and_white():
    pixels = _ramp(1, np.float32) * 0.98 + 0.01
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="TIFF")
    image = Image.open(io.BytesIO(buffer.getvalue()))
    assert image.mode == "F"
    assert set(np.unique(np.asarray(image.convert("RGB")))) <= {0, 1}  # PIL alone: values in [0, 1] -> 0 or 1
    rgb = np.asarray(to_rgb_image(image)).astype(np.float64)
    np.testing.assert_allclose(rgb[..., 2], pixels * 255.0, atol=0.5 + 1e-5)


def test_32_bit_integer_images_read_8_or_16_bit_values():
    eight = _ramp(255, np.int32)
    np.testing.assert_array_equal(np.asarray(to_rgb_image(Image.fromarray(eight)))[..., 0], eight)
    sixteen = _ramp(65535, np.int32)
    np.testing.assert_allclose(np.asarray(to_rgb_image(Image.fromarray(sixteen)))[..., 0], sixteen / 257.0,
                               atol=0.5 + 1e-9)


@pytest.mark.parametrize(
    "pixels, mode",
    [(_ramp(1, np.float32) * 300.0, "'F'"), (_ramp(1, np.float32) - 0.5, "'F'"), (_ramp(70000, np.int32), "'I'")],
)
def test_values_outside_the_modes_range_are_refused_naming_mode_and_range(pixels, mode):
    with pytest.raises(ValueError, match=rf"mode {mode} has values in \[.*\]; this mode is read from \["):
        to_rgb_image(Image.fromarray(pixels))


def test_a_16_bit_image_in_a_dataset_reaches_the_model_with_its_tones():
    """Through `prepare_dataset`, as training reads it: the normalised pixels are a ramp, not a white square."""
    pixels = _ramp(65535, np.uint16)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    dataset = datasets.Dataset.from_dict({"image": [{"bytes": buffer.getvalue(), "path": None}], "label": [1]},
                                         features=FEATURES)
    prepared = prepare_dataset(dataset, EvalImageTransform(32, crop_pct=1.0, mean=0.0, std=1.0))
    values = prepared[0]["pixel_values"][0].numpy()
    assert values.min() < 0.05 and values.max() > 0.95 and 0.4 < values.mean() < 0.6


# ---------------------------------------------------------------------------------------------------------------------
# Runs without training data
# ---------------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("security_data")
    make_vit_classifier().save_pretrained(folder / "tiny_vit")
    (folder / "data").mkdir()
    files = write_parquet_shards(folder / "data")
    empty = folder / "data" / "empty.parquet"
    datasets.Dataset.from_dict({"image": [], "label": []}, features=FEATURES).to_parquet(str(empty))
    return {"model": str(folder / "tiny_vit"), **files, "empty": str(empty)}


def _train_on(data, train_files: list[str], output_dir: Path, *extra: str) -> int:
    overrides = tiny_overrides(data, output_dir)
    start = overrides.index("--data.train_files") + 1
    overrides[start:start + len(data["train"])] = train_files
    return main(["train", "--recipe", "deit_small_ofb", *overrides, *extra])


def _one_error_line(capsys) -> str:
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error")]
    assert len(errors) == 1, errors
    return errors[0]


@pytest.mark.parametrize("streaming", ["true", "false"])
def test_an_empty_training_file_fails_naming_it_and_writes_no_model(data, tmp_path, capsys, streaming):
    output_dir = tmp_path / "out"
    code = _train_on(data, [data["empty"]], output_dir, "--data.streaming", streaming, "--training.max_steps", "3")
    assert code == 2
    line = _one_error_line(capsys)
    assert "has no examples" in line and data["empty"] in line
    assert not (output_dir / "compressed_model").exists()
    assert not (output_dir / "compression_report.json").exists()


def test_an_empty_evaluation_file_names_it(data, tmp_path, capsys):
    overrides = tiny_overrides(data, tmp_path / "out")
    start = overrides.index("--data.eval_files") + 1
    overrides[start] = data["empty"]
    assert main(["train", "--recipe", "deit_small_ofb", *overrides, "--data.streaming", "false",
                 "--training.max_steps", "1"]) == 2
    line = _one_error_line(capsys)
    assert "split 'validation' has no examples" in line and data["empty"] in line


def test_a_stream_that_yields_no_batch_fails_naming_its_files(data, tmp_path, capsys):
    """Every image undecodable and skipped: the stream's size is known (16 rows) but it yields nothing."""
    folder = tmp_path / "corrupt"
    folder.mkdir()
    corrupt = datasets.Dataset.from_dict(
        {"image": [{"bytes": b"not an image", "path": None}] * 8, "label": [0] * 8}, features=FEATURES)
    path = str(folder / "corrupt.parquet")
    corrupt.to_parquet(path)
    output_dir = tmp_path / "out"
    code = _train_on(data, [path], output_dir, "--training.max_steps", "3", "--data.skip_undecodable_images", "true")
    assert code == 2
    line = _one_error_line(capsys)
    assert "training ran 0 steps" in line and path in line
    assert not (output_dir / "compressed_model").exists()


def test_the_trainer_refuses_a_run_of_0_steps(tmp_path):
    trainer = CompressionTrainer(model=make_vit_classifier(), args=training_args(tmp_path, max_steps=3),
                                 compression_config=CompressionConfig(method="ofb", target_flops=0.6),
                                 train_dataset=datasets.IterableDataset.from_generator(lambda: iter(())))
    with pytest.raises(NoTrainingSteps, match="training ran 0 steps"):
        trainer.train()


def test_a_bad_label_in_a_local_parquet_stream_names_the_file_and_row(data, tmp_path, capsys):
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (20, 20, 3), dtype=np.uint8) for _ in range(6)]
    plain = datasets.Features({"image": datasets.Image(), "label": datasets.Value("int64")})
    path = str(tmp_path / "bad-labels.parquet")
    datasets.Dataset.from_dict({"image": images, "label": [0, 1, 2, 3, 9, 1]}, features=plain).to_parquet(path)
    code = _train_on(data, [*data["train"], path], tmp_path / "out", "--training.max_steps", "2")
    assert code == 2
    line = _one_error_line(capsys)
    assert f"Label 9 in column 'label' at row 4 of {path}" in line and "[0, 5)" in line
