"""Tests for `hf_vit_compress.data`: digits data, transforms, streaming helpers and bad-data errors."""

from __future__ import annotations

import datasets
import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from hf_vit_compress.data import (
    IMAGENET_DEFAULT_MEAN,
    IMAGENET_DEFAULT_STD,
    EvalImageTransform,
    TrainImageTransform,
    collate_images,
    load_digits_dataset,
    load_image_dataset,
    prepare_dataset,
    shard_for_process,
    shuffle_stream,
    to_rgb_image,
    transforms_from_image_processor,
)

NUM_DIGITS = 1797


@pytest.fixture(scope="module")
def digits() -> datasets.DatasetDict:
    return load_digits_dataset(image_size=16, seed=0)


def _noise_image(size: int = 32, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8))


def _tiny_image_table(num_examples: int, start: int = 0) -> datasets.Dataset:
    """Small RGB / L / RGBA images (stored as such in parquet) with an `id` column, so examples can be told apart."""
    ids = list(range(start, start + num_examples))
    modes = ["RGB", "L", "RGBA"]
    images = [Image.new(modes[i % 3], (6 + i % 3, 6), color=(i * 7) % 256) for i in ids]
    features = datasets.Features(
        {"image": datasets.Image(), "label": datasets.ClassLabel(num_classes=3), "id": datasets.Value("int64")}
    )
    return datasets.Dataset.from_dict({"image": images, "label": [i % 3 for i in ids], "id": ids}, features=features)


@pytest.fixture()
def parquet_shards(tmp_path) -> list[str]:
    paths = []
    for shard, start in enumerate((0, 10)):
        path = str(tmp_path / f"train-{shard:05d}-of-00002.parquet")
        _tiny_image_table(10, start=start).to_parquet(path)
        paths.append(path)
    return paths


# ------------------------------------------------------------------------------------------------------------------
# Digits
# ------------------------------------------------------------------------------------------------------------------


def test_digits_sizes_classes_and_images(digits):
    assert set(digits) == {"train", "test"}
    assert len(digits["train"]) + len(digits["test"]) == NUM_DIGITS
    assert abs(len(digits["test"]) - 0.2 * NUM_DIGITS) <= 1

    label_feature = digits["train"].features["label"]
    assert isinstance(label_feature, datasets.ClassLabel)
    assert label_feature.names == [str(i) for i in range(10)]
    assert isinstance(digits["train"].features["image"], datasets.Image)
    for split in ("train", "test"):
        labels = np.asarray(digits[split]["label"])
        assert set(labels.tolist()) == set(range(10))
        # Stratified: every class has about its overall share in each split.
        shares = np.bincount(labels, minlength=10) / len(labels)
        assert np.all(np.abs(shares - 0.1) < 0.03)

    image = digits["test"][0]["image"]
    assert image.mode == "RGB"
    assert image.size == (16, 16)
    pixels = np.asarray(image)
    # Grayscale replicated to RGB, and not blank.
    assert np.array_equal(pixels[..., 0], pixels[..., 1]) and np.array_equal(pixels[..., 0], pixels[..., 2])
    assert pixels.max() > 200 and pixels.min() < 50


def test_digits_deterministic_given_seed():
    first = load_digits_dataset(image_size=8, seed=3)
    second = load_digits_dataset(image_size=8, seed=3)
    other = load_digits_dataset(image_size=8, seed=4)
    assert first["test"]["label"] == second["test"]["label"]
    assert np.array_equal(np.asarray(first["test"][5]["image"]), np.asarray(second["test"][5]["image"]))
    assert first["test"]["label"] != other["test"]["label"]


def test_digits_argument_validation():
    with pytest.raises(ValueError, match="test_fraction"):
        load_digits_dataset(test_fraction=1.5)


# ------------------------------------------------------------------------------------------------------------------
# Transforms
# ------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("transform_class", [TrainImageTransform, EvalImageTransform])
@pytest.mark.parametrize("mode", ["RGB", "L", "RGBA"])
def test_transform_output_shape_and_dtype(transform_class, mode):
    image = _noise_image(40).convert(mode).resize((40, 30))  # non-square on purpose
    output = transform_class(24, mean=0.5, std=0.5)(image)
    assert output.shape == (3, 24, 24)
    assert output.dtype == torch.float32
    assert output.min() >= -1.0 - 1e-6 and output.max() <= 1.0 + 1e-6


def test_eval_transform_deterministic_and_center_crops():
    transform = EvalImageTransform(16, mean=0.5, std=0.5, crop_pct=0.5)
    image = _noise_image(32)
    assert torch.equal(transform(image), transform(image))

    # crop_pct=0.5: the image is resized to 32 (no-op here) and the central 16x16 kept, so a bright frame of width 8
    # is cut away completely while crop_pct=1.0 keeps it.
    framed = np.zeros((32, 32, 3), dtype=np.uint8)
    framed[:8], framed[-8:], framed[:, :8], framed[:, -8:] = 255, 255, 255, 255
    framed_image = Image.fromarray(framed)
    assert torch.allclose(transform(framed_image), torch.full((3, 16, 16), -1.0))
    assert EvalImageTransform(16, mean=0.5, std=0.5, crop_pct=1.0)(framed_image).max() > 0.9


def test_normalisation_of_mid_grey():
    grey = Image.new("RGB", (20, 20), (128, 128, 128))
    for transform in (EvalImageTransform(16, mean=0.5, std=0.5), TrainImageTransform(16, mean=0.5, std=0.5, seed=0)):
        output = transform(grey)
        assert torch.allclose(output, torch.zeros_like(output), atol=0.01)
    # ImageNet statistics per channel: (128/255 - mean_c) / std_c.
    output = EvalImageTransform(16)(grey)
    expected = [(128 / 255 - m) / s for m, s in zip(IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)]
    assert torch.allclose(output[:, 0, 0], torch.tensor(expected), atol=1e-5)


def test_train_transform_reproducible_with_seed_and_differs_across_seeds():
    images = [_noise_image(32, seed=i) for i in range(4)]

    def run(seed):
        transform = TrainImageTransform(16, mean=0.5, std=0.5, seed=seed)
        return torch.stack([transform(image) for image in images])

    assert torch.equal(run(0), run(0))
    assert not torch.equal(run(0), run(1))
    # Successive calls of one transform draw new crops.
    transform = TrainImageTransform(16, mean=0.5, std=0.5, seed=0)
    assert not torch.equal(transform(images[0]), transform(images[0]))


def test_train_transform_flip_is_configurable():
    # Full-area crops with a fixed aspect ratio: only the flip can change the output.
    image = _noise_image(16)
    kwargs = {"mean": 0.5, "std": 0.5, "scale": (1.0, 1.0), "ratio": (1.0, 1.0)}
    plain = EvalImageTransform(16, mean=0.5, std=0.5, crop_pct=1.0)(image)
    never = TrainImageTransform(16, hflip_prob=0.0, seed=0, **kwargs)
    always = TrainImageTransform(16, hflip_prob=1.0, seed=0, **kwargs)
    assert torch.equal(never(image), plain)
    assert torch.equal(always(image), plain.flip(-1))


def test_train_transform_workers_do_not_repeat_each_other():
    # Four copies of one image read by two forked workers: with a shared seed copied into both workers, each
    # worker would produce the same two augmentations.
    image = _noise_image(32)
    transform = TrainImageTransform(16, mean=0.5, std=0.5, seed=0)
    loader = DataLoader(
        [image] * 4, batch_size=2, num_workers=2, collate_fn=lambda batch: torch.stack([transform(i) for i in batch])
    )
    batches = list(loader)  # worker 0 -> batch 0, worker 1 -> batch 1
    assert not torch.equal(batches[0], batches[1])


def test_transforms_from_image_processor():
    from transformers import ViTImageProcessor

    processor = ViTImageProcessor(
        image_mean=[0.1, 0.2, 0.3], image_std=[0.4, 0.5, 0.6], size={"height": 48, "width": 48}
    )
    train_transform, eval_transform = transforms_from_image_processor(processor, crop_pct=1.0, seed=0)
    assert train_transform.image_size == eval_transform.image_size == 48
    assert train_transform.mean == eval_transform.mean == pytest.approx((0.1, 0.2, 0.3))
    assert eval_transform.std == pytest.approx((0.4, 0.5, 0.6))
    assert eval_transform(_noise_image(20)).shape == (3, 48, 48)

    train_transform, eval_transform = transforms_from_image_processor(None)
    assert eval_transform.image_size == 224 and eval_transform.crop_pct == 0.875
    assert eval_transform.resize_size == 256
    assert eval_transform.mean == pytest.approx(IMAGENET_DEFAULT_MEAN)
    assert train_transform.std == pytest.approx(IMAGENET_DEFAULT_STD)

    _, eval_transform = transforms_from_image_processor(None, 32, mean=0.5, std=0.5, crop_pct=1.0)
    assert eval_transform.image_size == 32 and eval_transform.mean == (0.5, 0.5, 0.5)


# ------------------------------------------------------------------------------------------------------------------
# prepare_dataset / collate on map-style data
# ------------------------------------------------------------------------------------------------------------------


def test_prepare_map_style_digits_and_dataloader(digits):
    _, eval_transform = transforms_from_image_processor(None, 16, mean=0.5, std=0.5, crop_pct=1.0)
    prepared = prepare_dataset(digits["test"], eval_transform)
    example = prepared[0]
    assert set(example) == {"pixel_values", "labels"}
    assert example["pixel_values"].shape == (3, 16, 16)
    assert example["labels"] == digits["test"][0]["label"]

    batch = next(iter(DataLoader(prepared, batch_size=8, collate_fn=collate_images)))
    assert batch["pixel_values"].shape == (8, 3, 16, 16) and batch["pixel_values"].dtype == torch.float32
    assert batch["labels"].dtype == torch.long
    assert batch["labels"].tolist() == digits["test"]["label"][:8]


def test_collate_images_rejects_mixed_shapes():
    examples = [
        {"pixel_values": torch.zeros(3, 4, 4), "labels": 0},
        {"pixel_values": torch.zeros(3, 5, 5), "labels": 1},
    ]
    with pytest.raises(ValueError, match="same shape"):
        collate_images(examples)


# ------------------------------------------------------------------------------------------------------------------
# Streaming
# ------------------------------------------------------------------------------------------------------------------


def _ids(stream) -> list[int]:
    return [example["id"] for example in stream]


@pytest.fixture()
def no_thread_shutdown_sleep(monkeypatch):
    # datasets >= 5 sleeps 5 s at the end of every iteration that read parquet shards on threads (the default
    # shuffle interleaves shards); nothing exits the interpreter here, so the pause is not needed.
    monkeypatch.setattr(datasets.config, "SLEEP_TIME_ON_THREADS_SHUTDOWN", 0, raising=False)


def test_streaming_shuffle_shard_prepare_dataloader(parquet_shards, no_thread_shutdown_sleep):
    stream = load_image_dataset("parquet", "train", streaming=True, data_files=parquet_shards)
    assert isinstance(stream, datasets.IterableDataset)
    assert stream.n_shards == 2
    assert sorted(_ids(stream)) == list(range(20))

    shuffled = shuffle_stream(stream, seed=0, buffer_size=8)
    assert sorted(_ids(shuffled)) == list(range(20))
    assert _ids(shuffled) != list(range(20))
    assert _ids(shuffle_stream(stream, seed=0, buffer_size=8)) == _ids(shuffled)

    ranks = [_ids(shard_for_process(shuffled, rank=rank, world_size=2)) for rank in range(2)]
    assert ranks[0] and ranks[1]
    assert not set(ranks[0]) & set(ranks[1])
    assert sorted(ranks[0] + ranks[1]) == list(range(20))

    _, eval_transform = transforms_from_image_processor(None, 8, mean=0.5, std=0.5, crop_pct=1.0)
    prepared = prepare_dataset(shard_for_process(shuffled, rank=1, world_size=2), eval_transform)
    batches = list(DataLoader(prepared, batch_size=4, collate_fn=collate_images))
    assert sum(len(batch["labels"]) for batch in batches) == len(ranks[1])
    assert all(batch["pixel_values"].shape[1:] == (3, 8, 8) for batch in batches)
    labels = torch.cat([batch["labels"] for batch in batches])
    assert labels.dtype == torch.long
    assert labels.tolist() == [i % 3 for i in ranks[1]]


def test_shard_by_example_when_shards_do_not_divide(parquet_shards):
    # One file, two ranks: split by example, still disjoint and complete.
    stream = load_image_dataset("parquet", "train", streaming=True, data_files=parquet_shards[:1])
    stream = shuffle_stream(stream, seed=1, buffer_size=4, max_buffer_input_shards=1)
    ranks = [_ids(shard_for_process(stream, rank=rank, world_size=2)) for rank in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == 5
    assert sorted(ranks[0] + ranks[1]) == list(range(10))

    with pytest.raises(ValueError, match="rank"):
        shard_for_process(stream, rank=2, world_size=2)


def test_prepare_stream_without_known_features():
    def generate():
        for i in range(3):
            yield {"img": np.full((5, 5), 50 * i, dtype=np.uint8), "target": i, "extra": "x"}

    stream = datasets.IterableDataset.from_generator(generate)
    assert stream.features is None
    transform = EvalImageTransform(4, mean=0.5, std=0.5, crop_pct=1.0)
    prepared = list(prepare_dataset(stream, transform, image_column="img", label_column="target", num_labels=3))
    assert [set(example) for example in prepared] == [{"pixel_values", "labels"}] * 3
    assert [example["labels"] for example in prepared] == [0, 1, 2]

    # Columns are unknown up front, so a wrong name fails on the first example.
    lazy = prepare_dataset(stream, transform, image_column="image", label_column="target")
    with pytest.raises(ValueError, match=r"'image'.*\['img', 'target', 'extra'\]"):
        next(iter(lazy))


# ------------------------------------------------------------------------------------------------------------------
# Bad data
# ------------------------------------------------------------------------------------------------------------------


def test_missing_label_column_is_reported_eagerly(digits, parquet_shards):
    transform = EvalImageTransform(8, crop_pct=1.0)
    with pytest.raises(ValueError, match=r"'labels' not found.*\['image', 'label'\]"):
        prepare_dataset(digits["test"], transform, label_column="labels")
    without_labels = digits["test"].remove_columns("label")
    with pytest.raises(ValueError, match="'label' not found"):
        prepare_dataset(without_labels, transform)

    stream = load_image_dataset("parquet", "train", streaming=True, data_files=parquet_shards)
    with pytest.raises(ValueError, match=r"'pixels' not found.*\['image', 'label', 'id'\]"):
        prepare_dataset(stream, transform, image_column="pixels")


def test_label_out_of_range_names_value_and_range(digits):
    transform = EvalImageTransform(8, crop_pct=1.0)
    # The label feature says 10 classes, but the model has only 5: label 7 must be rejected.
    subset = digits["test"].filter(lambda label: label == 7, input_columns="label").select(range(2))
    with pytest.raises(ValueError, match=r"Label 7 in column 'label' at row 0 .*\[0, 5\)"):
        prepare_dataset(subset, transform, num_labels=5)  # checked up front, before any training
    # Without num_labels, the ClassLabel's 10 classes are the range and 7 is fine.
    assert prepare_dataset(subset, transform)[0]["labels"] == 7


def test_label_out_of_range_in_plain_int_column():
    table = datasets.Dataset.from_dict({"image": [np.zeros((4, 4, 3), np.uint8).tolist()] * 2, "label": [1, -1]})
    with pytest.raises(ValueError, match=r"Label -1 in column 'label' at row 1 .*\[0, 3\)"):
        prepare_dataset(table, EvalImageTransform(4, crop_pct=1.0), num_labels=3)
    assert prepare_dataset(table.select([0]), EvalImageTransform(4, crop_pct=1.0), num_labels=3)[0]["labels"] == 1


def test_image_with_two_channels_is_rejected():
    table = datasets.Dataset.from_dict({"image": [np.zeros((4, 4, 2), np.uint8).tolist()], "label": [0]})
    prepared = prepare_dataset(table, EvalImageTransform(4, crop_pct=1.0))
    with pytest.raises(ValueError, match="2 channels"):
        prepared[0]


@pytest.mark.parametrize(
    "image, message",
    [
        (np.zeros((4, 4, 2), np.uint8), "2 channels"),
        (torch.zeros(5, 4, 4), "5 channels"),
        (np.zeros((2, 4, 4, 3), np.uint8), "2 or 3 dimensions"),
        (np.full((4, 4), 300, np.int64), r"\[0, 255\]"),
        ("not an image", "Unsupported image type"),
    ],
)
def test_to_rgb_image_errors(image, message):
    with pytest.raises(ValueError, match=message):
        to_rgb_image(image)


@pytest.mark.parametrize(
    "image",
    [
        np.zeros((4, 4), np.uint8),
        np.zeros((4, 4, 1), np.uint8),
        np.zeros((4, 4, 4), np.uint8),
        torch.zeros(3, 4, 4),
        torch.zeros(1, 4, 4),
        Image.new("RGBA", (4, 4)),
        Image.new("L", (4, 4)),
    ],
)
def test_to_rgb_image_accepts_convertible_images(image):
    rgb = to_rgb_image(image)
    assert rgb.mode == "RGB" and rgb.size == (4, 4)
