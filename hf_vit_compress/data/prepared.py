"""`prepare_dataset`: `{image, label}` rows -> `{"pixel_values", "labels"}` examples, with every bad row named and
every random augmentation reproducible.

- Map-style data becomes a `PreparedImageDataset` (a `torch.utils.data.Dataset` over the `datasets.Dataset`): it
  knows each example's index, so the training augmentation of example `i` in epoch `e` is drawn from a generator
  seeded by `(transform seed, e, i)` once `set_epoch(e)` has been called (`CompressionTrainer` does every epoch;
  accelerate does for a plain single-process `Trainer`; before that, the transform's own generator is used). The
  result does not depend on DataLoader workers, prefetching or the batches a resumed run skips, which is what makes
  resume exact. Labels are range-checked up front (column, value and row named). No column is dropped by the
  Trainer (it only drops columns of `datasets.Dataset`s), so `remove_unused_columns` does not matter.
- Streams stay `datasets.IterableDataset`s (`map`); once an epoch is set, an example's key is its position in the
  epoch's stream as read by its DataLoader worker (resume re-reads the skipped examples, so positions repeat).
- Images are decoded here, not by `datasets`, so an undecodable image names its row (or stream position) and file;
  with `skip_undecodable_images=True` such rows are dropped and counted (`skipped_images`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from functools import partial
from typing import Any

import datasets
import numpy as np
import pyarrow
import torch
from datasets import ClassLabel, Dataset, DatasetDict, Features, IterableDataset

from .transforms import ImageTransformFn, to_rgb_image

#: DataLoader worker slots of the shared skip counter (slot 0: the main process)
MAX_WORKERS = 256


def _shared(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor` in shared memory, so that DataLoader workers (persistent ones too) see the same values."""
    try:
        return tensor.share_memory_()
    except RuntimeError:  # no shared memory here: workers then see the value they were started with
        return tensor


class AugmentationKeys:
    """The epoch that keys each example's augmentation, and the count of skipped images, shared with workers."""

    def __init__(self):
        self._epoch = _shared(torch.full((), -1, dtype=torch.long))
        self._skipped = _shared(torch.zeros(MAX_WORKERS + 1, dtype=torch.long))
        self._positions: dict[tuple[int, int], int] = {}

    def set_epoch(self, epoch: int) -> None:
        self._epoch.fill_(int(epoch))

    @property
    def epoch(self) -> int | None:
        """The epoch set by the trainer, or None (then transforms draw from their own generator stream)."""
        value = int(self._epoch)
        return None if value < 0 else value

    def stream_key(self) -> tuple[int, ...] | None:
        """(epoch, worker, position in this worker's stream this epoch) for the next streamed example."""
        epoch = self.epoch
        if epoch is None:
            return None
        worker = torch.utils.data.get_worker_info()
        slot = (epoch, 0 if worker is None else worker.id + 1)
        position = self._positions.get(slot, 0)
        self._positions[slot] = position + 1
        return (epoch, slot[1], position)

    def count_skipped(self) -> None:
        """One more skipped image (streams: counted per read, as a stream has no row numbers)."""
        worker = torch.utils.data.get_worker_info()
        self._skipped[0 if worker is None else min(worker.id + 1, MAX_WORKERS)] += 1

    @property
    def skipped(self) -> int:
        return int(self._skipped.sum())


# ---------------------------------------------------------------------------------------------------------------------
# Checks
# ---------------------------------------------------------------------------------------------------------------------
def _check_columns(columns: Iterable[str], image_column: str, label_column: str) -> None:
    columns = list(columns)
    for role, column in (("image", image_column), ("label", label_column)):
        if column not in columns:
            raise ValueError(
                f"{role.capitalize()} column {column!r} not found in the dataset; available columns: {columns}. "
                f"Pass `{role}_column=` to name the right one."
            )


def _num_labels_from_features(features: Features | None, label_column: str) -> int | None:
    if features is not None and isinstance(features.get(label_column), ClassLabel):
        return features[label_column].num_classes
    return None


def _check_label(label: Any, num_labels: int | None, label_column: str, where: str = "") -> int:
    # Unwrap 0-d / 1-element tensors and numpy scalars into Python numbers.
    if isinstance(label, torch.Tensor) and label.numel() == 1:
        label = label.item()
    elif isinstance(label, (np.ndarray, np.generic)) and label.size == 1:
        label = label.item()
    at = f" at {where}" if where else ""
    if isinstance(label, bool) or not isinstance(label, int):
        if isinstance(label, float) and label.is_integer():
            label = int(label)
        else:
            raise ValueError(
                f"Label column {label_column!r} must hold integer class indices, got {label!r}{at} "
                f"({type(label).__name__}); encode string labels with `dataset.class_encode_column({label_column!r})`"
            )
    if num_labels is not None and not 0 <= label < num_labels:
        raise ValueError(
            f"Label {label} in column {label_column!r}{at} is outside the valid range [0, {num_labels}) "
            f"(num_labels={num_labels})"
        )
    return label


def _check_labels_up_front(dataset: Dataset, label_column: str, num_labels: int | None) -> None:
    """Range-check an integer label column of a map-style dataset before training (one pass over the column)."""
    if num_labels is None:
        return
    column = dataset.select_columns([label_column]).with_format("arrow")[label_column]
    if not pyarrow.types.is_integer(column.type):
        return  # other types are checked (and named) per row
    labels = column.to_numpy()
    bad = np.flatnonzero((labels < 0) | (labels >= num_labels))
    if bad.size:
        _check_label(int(labels[bad[0]]), num_labels, label_column, f"row {int(bad[0])}")


def _image_error(error: Exception, image: Any, image_column: str, where: str, skip_hint: bool) -> ValueError:
    path = image.get("path") if isinstance(image, Mapping) else None
    source = f" (file {path!r})" if path else ""
    hint = (" Pass skip_undecodable_images=True (data.skip_undecodable_images in a recipe) to skip such images; "
            "they are counted.") if skip_hint else ""
    return ValueError(f"Image in column {image_column!r} at {where}{source} cannot be read: "
                      f"{type(error).__name__}: {error}.{hint}")


def _read_image(image: Any, image_column: str, where: str) -> Any:
    """The image as a PIL RGB image (decoding `{"bytes", "path"}` here, so that a failure names its row)."""
    try:
        return to_rgb_image(image)
    except Exception as error:  # PIL raises many types (OSError, SyntaxError, ...) for broken files
        raise _image_error(error, image, image_column, where, skip_hint=True) from error


def _transform(transform: ImageTransformFn, image, key: tuple[int, ...] | None) -> torch.Tensor:
    if key is not None and getattr(transform, "accepts_sample_key", False):
        return transform(image, key=key)
    return transform(image)


# ---------------------------------------------------------------------------------------------------------------------
# Map-style
# ---------------------------------------------------------------------------------------------------------------------
class PreparedImageDataset(torch.utils.data.Dataset):
    """A map-style `datasets.Dataset` of `{image, label}` rows read as `{"pixel_values", "labels"}` examples.

    Args:
        dataset: the rows.
        transform: PIL RGB image -> `(3, H, W)` tensor; a `TrainImageTransform` is keyed per (epoch, index).
        image_column, label_column: where the images and the integer labels are.
        num_labels: labels must lie in `[0, num_labels)` (checked up front for integer columns).
        skip_undecodable_images: drop (and count) rows whose image cannot be decoded instead of raising.
    """

    def __init__(self, dataset: Dataset, transform: ImageTransformFn, image_column: str, label_column: str,
                 num_labels: int | None, skip_undecodable_images: bool = False):
        self.dataset = dataset
        self.transform = transform
        self.image_column, self.label_column, self.num_labels = image_column, label_column, num_labels
        self.skip_undecodable_images = skip_undecodable_images
        self.augmentation = AugmentationKeys()
        self._skipped_rows = _shared(torch.zeros(len(dataset), dtype=torch.bool))  # rows, not reads: epochs repeat
        # arrow rows: images arrive undecoded ({"bytes", "path"}) and are decoded in `_example`
        self._rows = dataset.select_columns([image_column, label_column]).with_format("arrow")
        _check_labels_up_front(dataset, label_column, num_labels)

    def __len__(self) -> int:
        return len(self.dataset)

    @property
    def column_names(self) -> list[str]:
        return ["pixel_values", "labels"]

    def set_epoch(self, epoch: int) -> None:
        """Key the training augmentation by (seed, epoch, index) from now on (DataLoader workers included)."""
        self.augmentation.set_epoch(epoch)

    @property
    def skipped_images(self) -> int:
        """Rows dropped so far because their image could not be decoded (all DataLoader workers)."""
        return int(self._skipped_rows.sum())

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self._example(int(index), *self._read([int(index)])[0], skip=False)

    def __getitems__(self, indices: Sequence[int]) -> list[dict[str, Any]]:
        indices = [int(index) for index in indices]
        examples = [self._example(index, image, label, skip=self.skip_undecodable_images)
                    for index, (image, label) in zip(indices, self._read(indices))]
        kept = [example for example in examples if example is not None]
        if examples and not kept:
            raise ValueError(f"Every image of the batch at rows {indices} in column {self.image_column!r} could not "
                             "be decoded")
        return kept

    def _read(self, indices: list[int]) -> list[tuple[Any, Any]]:
        table = self._rows[indices]
        return list(zip(table.column(self.image_column).to_pylist(), table.column(self.label_column).to_pylist()))

    def _example(self, index: int, image: Any, label: Any, skip: bool) -> dict[str, Any] | None:
        where = f"row {index}"
        label = _check_label(label, self.num_labels, self.label_column, where)
        try:
            image = _read_image(image, self.image_column, where)
        except ValueError:
            if not skip:
                raise
            self._skipped_rows[index] = True
            return None
        epoch = self.augmentation.epoch
        key = None if epoch is None else (epoch, index)
        return {"pixel_values": _transform(self.transform, image, key), "labels": label}


# ---------------------------------------------------------------------------------------------------------------------
# Streams
# ---------------------------------------------------------------------------------------------------------------------
def _prepare_streamed(example: Mapping[str, Any], position: int, transform: ImageTransformFn, image_column: str,
                      label_column: str, num_labels: int | None, keys: AugmentationKeys,
                      skip_undecodable_images: bool) -> dict[str, Any]:
    # Streams with unknown features could not be checked up front; check each example instead.
    _check_columns(example.keys(), image_column, label_column)
    worker = torch.utils.data.get_worker_info()
    where = f"example {position} of the stream" + (f" (DataLoader worker {worker.id})" if worker else "")
    label = _check_label(example[label_column], num_labels, label_column, where)
    key = keys.stream_key()
    try:
        image = _read_image(example[image_column], image_column, where)
    except ValueError:
        if not skip_undecodable_images:
            raise
        keys.count_skipped()
        return {"pixel_values": None, "labels": label}
    return {"pixel_values": _transform(transform, image, key), "labels": label}


def _undecoded(dataset: IterableDataset, image_column: str) -> IterableDataset:
    """The stream with its `datasets.Image` column left undecoded (decoded in `_read_image`, errors named)."""
    features = dataset.features
    if features is not None and isinstance(features.get(image_column), datasets.Image):
        return dataset.cast_column(image_column, datasets.Image(decode=False))
    return dataset


def prepare_dataset(
    dataset: Dataset | IterableDataset,
    transform: ImageTransformFn,
    image_column: str = "image",
    label_column: str = "label",
    num_labels: int | None = None,
    skip_undecodable_images: bool = False,
) -> PreparedImageDataset | IterableDataset:
    """Turn `{image, label}` rows into `{"pixel_values": FloatTensor(3, H, W), "labels": int}` examples.

    The transform runs lazily, each time an example is read (random augmentations differ per epoch). Images may be
    PIL images of any mode (grayscale and RGBA are converted to RGB), encoded `{"bytes", "path"}` values, arrays or
    tensors with 1, 3 or 4 channels (see `to_rgb_image`).

    Args:
        dataset (`datasets.Dataset` or `datasets.IterableDataset`):
            The data; other columns are dropped.
        transform (`Callable`):
            Maps a PIL RGB image to a `(3, H, W)` float tensor, e.g. a `TrainImageTransform` or `EvalImageTransform`.
        image_column (`str`, *optional*, defaults to `"image"`):
            Column holding the images.
        label_column (`str`, *optional*, defaults to `"label"`):
            Column holding integer class indices.
        num_labels (`int`, *optional*):
            When given, every label must be in `[0, num_labels)`. Defaults to the number of classes of a `ClassLabel`
            label column, if the dataset has one.
        skip_undecodable_images (`bool`, *optional*, defaults to `False`):
            Drop examples whose image cannot be decoded (truncated or corrupt files) instead of raising; the count is
            `skipped_images` of a map-style result (`CompressionTrainer` and the CLI report it).

    Returns:
        Map-style data: a `PreparedImageDataset` (a torch `Dataset`; `set_epoch(e)` keys the augmentation of
        example `i` by `(seed, e, i)`, see the module docstring). Streams: a `datasets.IterableDataset`.

    Raises:
        `ValueError`: a missing column (eagerly when the columns are known, otherwise on the first example), a label
        outside `[0, num_labels)` (up front for integer columns of map-style data, naming the row), an image that
        cannot be decoded or made RGB (naming the row or stream position and the file, when read).
    """
    if isinstance(dataset, (DatasetDict, datasets.IterableDatasetDict)):
        raise TypeError("prepare_dataset takes one split; call it on dataset['train'], dataset['test'], ...")
    if num_labels is not None and num_labels < 1:
        raise ValueError(f"num_labels must be a positive integer, got {num_labels}")

    features = dataset.features
    if features is not None:
        _check_columns(features, image_column, label_column)
    if num_labels is None:
        num_labels = _num_labels_from_features(features, label_column)

    if isinstance(dataset, Dataset):
        return PreparedImageDataset(dataset, transform, image_column, label_column, num_labels,
                                    skip_undecodable_images)
    if isinstance(dataset, IterableDataset):
        keys = AugmentationKeys()
        function = partial(_prepare_streamed, transform=transform, image_column=image_column,
                           label_column=label_column, num_labels=num_labels, keys=keys,
                           skip_undecodable_images=skip_undecodable_images)
        stream = _undecoded(dataset, image_column)
        if features is not None:
            prepared = stream.map(function, with_indices=True, remove_columns=list(features))
        else:  # column names unknown: drop the extra columns after mapping instead
            prepared = stream.map(function, with_indices=True).select_columns(["pixel_values", "labels"])
        if skip_undecodable_images:
            prepared = prepared.filter(lambda example: example["pixel_values"] is not None)
        prepared.augmentation = keys  # CompressionTrainer sets its epoch (and reads the skip count)
        return prepared
    raise TypeError(f"Expected a datasets.Dataset or datasets.IterableDataset, got {type(dataset).__name__}")


def augmentation_keys(dataset: Any) -> AugmentationKeys | None:
    """The `AugmentationKeys` of a dataset made by `prepare_dataset` (None for any other dataset)."""
    keys = getattr(dataset, "augmentation", None)
    return keys if isinstance(keys, AugmentationKeys) else None


__all__ = ["AugmentationKeys", "PreparedImageDataset", "augmentation_keys", "prepare_dataset"]
