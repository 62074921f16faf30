"""Image-classification data through the `datasets` library, without torchvision.

What lives here:

- `load_digits_dataset`: scikit-learn's 8x8 digits as a small, real `DatasetDict` (offline; what the demo and the
  tests train on).
- `load_image_dataset`: a thin wrapper over `datasets.load_dataset` for ImageNet-style data (hub id or local
  parquet/arrow files), map-style or streaming.
- `TrainImageTransform` / `EvalImageTransform` and `transforms_from_image_processor` (from `transforms.py`): the
  usual ViT/DeiT preprocessing in PIL + numpy + torch.
- `prepare_dataset` (from `prepared.py`): turns `{image, label}` rows into `{"pixel_values", "labels"}` with clear
  errors on bad data (row named) and reproducible augmentation.
- `shard_for_process` / `shuffle_stream`: streaming helpers for multi-process training.
- `collate_images`: the `data_collator` for `DataLoader` / `Trainer`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import datasets
import numpy as np
import torch
from datasets import ClassLabel, Dataset, DatasetDict, Features, IterableDataset
from datasets.distributed import split_dataset_by_node
from PIL import Image

from .prepared import PreparedImageDataset, prepare_dataset  # re-exported: preparation is part of the data API
from .transforms import (  # re-exported: the transforms are part of the data API
    DEFAULT_CROP_PCT,
    IMAGENET_DEFAULT_MEAN,
    IMAGENET_DEFAULT_STD,
    EvalImageTransform,
    ImageTransformFn,  # noqa: F401  (re-exported)
    TrainImageTransform,
    image_processor_for_transform,
    to_rgb_image,
    transforms_from_image_processor,
)

__all__ = [
    "DEFAULT_CROP_PCT",
    "IMAGENET_DEFAULT_MEAN",
    "IMAGENET_DEFAULT_STD",
    "EvalImageTransform",
    "PreparedImageDataset",
    "TrainImageTransform",
    "collate_images",
    "image_processor_for_transform",
    "load_digits_dataset",
    "load_image_dataset",
    "prepare_dataset",
    "shard_for_process",
    "shuffle_stream",
    "to_rgb_image",
    "transforms_from_image_processor",
]


# ---------------------------------------------------------------------------------------------------------------------
# Datasets
# ---------------------------------------------------------------------------------------------------------------------


def load_digits_dataset(image_size: int = 32, seed: int = 0, test_fraction: float = 0.2) -> DatasetDict:
    """Load scikit-learn's digits (1797 8x8 grayscale images, 10 classes) as an RGB image `DatasetDict`.

    The data ships with scikit-learn, so this works offline. Images are upsampled to `image_size` x `image_size` and
    replicated to 3 channels so that they go through exactly the same pipeline as ImageNet-style data.

    Args:
        image_size (`int`, *optional*, defaults to 32):
            Side of the square RGB images in the `image` column.
        seed (`int`, *optional*, defaults to 0):
            Seed of the train/test split; the same seed always gives the same split.
        test_fraction (`float`, *optional*, defaults to 0.2):
            Fraction of the examples in the `"test"` split. The split is stratified by label, so both splits hold
            every class in (almost) the same proportions.

    To train on digits, use mean = std = 0.5, `crop_pct=1.0` and no horizontal flips (a mirrored digit is not the
    same digit), e.g. `transforms_from_image_processor(None, image_size, mean=0.5, std=0.5, crop_pct=1.0,
    hflip_prob=0.0)`.

    Returns:
        `datasets.DatasetDict`: splits `"train"` and `"test"`, with features `image` (`datasets.Image`, PIL RGB) and
        `label` (`datasets.ClassLabel` with names `"0"` ... `"9"`).
    """
    from sklearn.datasets import load_digits

    if image_size < 1:
        raise ValueError(f"image_size must be a positive integer, got {image_size}")
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")

    digits = load_digits()
    # Pixel values are counts in [0, 16]; stretch them to the full 8-bit range before resizing.
    pixels = np.rint(digits.images * (255.0 / 16.0)).astype(np.uint8)
    images = [
        Image.fromarray(image).resize((image_size, image_size), Image.Resampling.BILINEAR).convert("RGB")
        for image in pixels
    ]
    features = Features({"image": datasets.Image(), "label": ClassLabel(names=[str(i) for i in range(10)])})
    dataset = Dataset.from_dict({"image": images, "label": digits.target.tolist()}, features=features)
    return dataset.train_test_split(test_size=test_fraction, seed=seed, stratify_by_column="label")


def load_image_dataset(
    path_or_name: str,
    split: str,
    streaming: bool = False,
    data_files: str | Sequence[str] | Mapping[str, str | Sequence[str]] | None = None,
    **load_kwargs: Any,
) -> Dataset | IterableDataset:
    """Load one split of an image-classification dataset with `datasets.load_dataset`.

    Examples:

    ```python
    >>> files = {"train": "imagenet/train-*.parquet"}
    >>> train = load_image_dataset("parquet", "train", streaming=True, data_files=files)
    >>> val = load_image_dataset("imagenet-1k", "validation")  # hub id (needs network / a filled cache)
    ```

    Args:
        path_or_name (`str`):
            A hub dataset id, a local dataset folder, or a packaged builder name (`"parquet"`, `"arrow"`,
            `"imagefolder"`) used together with `data_files`.
        split (`str`):
            The split to return, e.g. `"train"` or `"validation"`. With `data_files` given as a plain path or list,
            `datasets` names the only split `"train"`.
        streaming (`bool`, *optional*, defaults to `False`):
            Return an `IterableDataset` that reads the files lazily instead of building an Arrow cache first (what you
            want for ImageNet-sized data). See `shuffle_stream` and `shard_for_process`.
        data_files (`str`, `list[str]` or `dict`, *optional*):
            Local or remote data files, e.g. `{"train": [...], "validation": [...]}`; globs are allowed.
        load_kwargs:
            Passed on to `datasets.load_dataset` (e.g. `name`, `cache_dir`, `token`, `revision`).

    Returns:
        `datasets.Dataset` or `datasets.IterableDataset` (when `streaming=True`).
    """
    if data_files is not None and not isinstance(data_files, (str, Mapping)):
        data_files = list(data_files)
    return datasets.load_dataset(path_or_name, split=split, streaming=streaming, data_files=data_files, **load_kwargs)


# ---------------------------------------------------------------------------------------------------------------------
# Streaming helpers and collation
# ---------------------------------------------------------------------------------------------------------------------


def shuffle_stream(
    dataset: IterableDataset, seed: int, buffer_size: int = 1000, max_buffer_input_shards: int | None = None
) -> IterableDataset:
    """Approximately shuffle a stream: shuffle the order of its shards, then sample from a buffer of examples.

    Use the same `seed` on every process (so that sharding by example stays disjoint) and call
    `dataset.set_epoch(epoch)` each epoch to get a new order (`transformers.Trainer` does this for you).

    Args:
        dataset (`datasets.IterableDataset`):
            The stream.
        seed (`int`):
            Seed of the shard order and of the buffer sampling.
        buffer_size (`int`, *optional*, defaults to 1000):
            Number of examples held in memory; larger shuffles better and starts slower. Data written in class order
            needs a buffer much larger than one class (or many shards) to mix well.
        max_buffer_input_shards (`int`, *optional*):
            How many shards `datasets` (>= 5) reads at once into the buffer, which mixes files better. Defaults to the
            library's default. Reading several parquet shards uses threads, and `datasets` pauses a few seconds when
            such an iteration ends; 1 reads one shard at a time, without threads or pause.

    Returns:
        `datasets.IterableDataset`.
    """
    if not isinstance(dataset, IterableDataset):
        raise TypeError(
            f"shuffle_stream expects a datasets.IterableDataset, got {type(dataset).__name__}; "
            "use Dataset.shuffle(seed=...) for map-style datasets"
        )
    if buffer_size < 1:
        raise ValueError(f"buffer_size must be a positive integer, got {buffer_size}")
    # Only pass it when asked: older `datasets` releases have no such argument.
    kwargs = {} if max_buffer_input_shards is None else {"max_buffer_input_shards": max_buffer_input_shards}
    return dataset.shuffle(seed=seed, buffer_size=buffer_size, **kwargs)


def shard_for_process(dataset: IterableDataset, rank: int, world_size: int) -> IterableDataset:
    """Keep the part of a stream that process `rank` of `world_size` should read (`split_dataset_by_node`).

    If the number of shards (files) is divisible by `world_size`, each process reads whole shards of its own;
    otherwise every process reads all of the data and keeps every `world_size`-th example. Shuffle (with the same
    seed everywhere) before or after this call, and prepare after it.

    Note: `transformers.Trainer` cannot take the length of an `IterableDataset`, so its `TrainingArguments` must set
    `max_steps`. In multi-process runs the Trainer (through accelerate) already distributes a stream's batches
    between processes (by default the main process reads and dispatches them), so do not also shard the stream you
    pass to it; this helper is for your own training loops, where each process reads only its part of the files.

    Args:
        dataset (`datasets.IterableDataset`):
            The stream.
        rank (`int`):
            This process's index, in `[0, world_size)` (e.g. `int(os.environ["RANK"])`).
        world_size (`int`):
            Number of processes.

    Returns:
        `datasets.IterableDataset`: this process's part.
    """
    if not isinstance(dataset, IterableDataset):
        raise TypeError(f"shard_for_process expects a datasets.IterableDataset, got {type(dataset).__name__}")
    if world_size < 1:
        raise ValueError(f"world_size must be a positive integer, got {world_size}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
    return split_dataset_by_node(dataset, rank=rank, world_size=world_size)


def collate_images(examples: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
    """Stack prepared examples into a batch, for `DataLoader(collate_fn=...)` or `Trainer(data_collator=...)`.

    Args:
        examples (`list[dict]`):
            Examples with `"pixel_values"` (`(3, H, W)` tensors of one shape) and `"labels"` (integers).

    Returns:
        `dict` with `"pixel_values"` (`FloatTensor` of shape `(batch, 3, H, W)`) and `"labels"` (`LongTensor` of
        shape `(batch,)`).
    """
    if len(examples) == 0:
        raise ValueError("collate_images got an empty list of examples")
    pixel_values = [torch.as_tensor(example["pixel_values"], dtype=torch.float32) for example in examples]
    shapes = {tuple(p.shape) for p in pixel_values}
    if len(shapes) > 1:
        raise ValueError(f"All pixel_values must have the same shape to be stacked, got shapes {sorted(shapes)}")
    labels = torch.tensor([int(example["labels"]) for example in examples], dtype=torch.long)
    return {"pixel_values": torch.stack(pixel_values), "labels": labels}
