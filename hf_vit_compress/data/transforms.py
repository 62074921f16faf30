"""Image preprocessing for ViT/DeiT without torchvision: any image -> RGB, and the usual train / eval transforms.

`TrainImageTransform` (random resized crop + flip) and `EvalImageTransform` (resize + center crop) follow
torchvision's recipes, written in PIL + numpy + torch because torchvision is an optional dependency here.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from typing import Any

import datasets
import numpy as np
import torch
from PIL import Image

IMAGENET_DEFAULT_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_DEFAULT_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
# The ratio timm/DeiT use between the resize and the center crop at evaluation (224 -> resize 256 -> crop 224).
DEFAULT_CROP_PCT = 0.875

ImageLike = Image.Image | np.ndarray | torch.Tensor | Sequence | Mapping
ImageTransformFn = Callable[[ImageLike], torch.Tensor]

__all__ = [
    "DEFAULT_CROP_PCT",
    "IMAGENET_DEFAULT_MEAN",
    "IMAGENET_DEFAULT_STD",
    "EvalImageTransform",
    "ImageTransformFn",
    "TrainImageTransform",
    "image_processor_for_transform",
    "to_rgb_image",
    "transforms_from_image_processor",
]

# ---------------------------------------------------------------------------------------------------------------------
# Images -> tensors
# ---------------------------------------------------------------------------------------------------------------------

_ALLOWED_CHANNELS = (1, 3, 4)


def _array_to_uint8(array: np.ndarray) -> np.ndarray:
    if array.dtype == np.uint8:
        return array
    if array.dtype == np.bool_:
        return array.astype(np.uint8) * 255
    if np.issubdtype(array.dtype, np.floating):
        # Float images follow the torch convention: values in [0, 1].
        return np.rint(np.clip(array, 0.0, 1.0) * 255.0).astype(np.uint8)
    if np.issubdtype(array.dtype, np.integer):
        if array.size and (array.min() < 0 or array.max() > 255):
            raise ValueError(
                f"Integer image values must be in [0, 255], got values in [{array.min()}, {array.max()}]"
            )
        return array.astype(np.uint8)
    raise ValueError(f"Unsupported image array dtype {array.dtype}; expected uint8, bool, integer or float")


_HIGH_BIT_DEPTH_MODES = ("I", "F")


def _high_bit_depth_to_8_bit(image: Image.Image) -> Image.Image:
    """Scale a single-channel 16/32-bit or float PIL image to mode "L" from the range its mode stands for."""
    values = np.asarray(image).astype(np.float64)
    low, high = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
    if image.mode == "F":
        full_scale, allowed = 1.0, "[0, 1]"
    elif image.mode == "I" and high <= 255:
        full_scale, allowed = 255.0, "[0, 65535]"
    else:  # "I;16", "I;16B", "I;16L", ... and 32-bit "I" images holding 16-bit values
        full_scale, allowed = 65535.0, "[0, 65535]"
    if low < 0 or high > full_scale or not np.isfinite(values).all():
        raise ValueError(
            f"Image of mode {image.mode!r} has values in [{low:g}, {high:g}]; this mode is read from {allowed} "
            "(scale it to that range, or convert it to 8 bits yourself)"
        )
    return Image.fromarray(np.rint(values * (255.0 / full_scale)).astype(np.uint8), mode="L")


def to_rgb_image(image: ImageLike) -> Image.Image:
    """Convert an image of any supported kind to a PIL RGB image, or raise a clear `ValueError`.

    Args:
        image (`PIL.Image.Image`, `np.ndarray`, `torch.Tensor`, nested list or `dict`):
            - PIL images of any 8-bit mode (`"L"`, `"RGBA"`, `"P"`, ...) are converted with `Image.convert("RGB")`.
              High-bit-depth modes are first scaled to 8 bits from their real range, because PIL's own
              conversion clips them at 255 (a 16-bit photo turns white): `"I;16*"` from [0, 65535]; `"I"` from
              [0, 255] when its values fit there, else from [0, 65535]; `"F"` from [0, 1], the float convention
              used for arrays too. Values outside that range raise a `ValueError` naming the mode and range.
            - numpy arrays / nested lists are channels-last, like PIL: `(H, W)` or `(H, W, C)`.
            - torch tensors are channels-first, like torch: `(H, W)` or `(C, H, W)`.
            - `{"bytes": ..., "path": ...}` dicts (undecoded `datasets.Image` values) are decoded first.

            Arrays and tensors must have 1 (grayscale), 3 (RGB) or 4 (RGBA) channels; float values are read as
            [0, 1], integer values as [0, 255].

    Returns:
        `PIL.Image.Image` in mode `"RGB"`.
    """
    if isinstance(image, Image.Image):
        if image.mode in _HIGH_BIT_DEPTH_MODES or image.mode.startswith("I;16"):
            image = _high_bit_depth_to_8_bit(image)
        return image if image.mode == "RGB" else image.convert("RGB")
    if isinstance(image, Mapping):
        # Streams without known features yield the raw `datasets.Image` storage format.
        if image.get("bytes") is None and image.get("path") is None:
            raise ValueError(f"Image dict must have 'bytes' or 'path', got keys {sorted(image)}")
        return to_rgb_image(datasets.Image().decode_example({"path": image.get("path"), "bytes": image.get("bytes")}))

    if isinstance(image, torch.Tensor):
        array = image.detach().cpu().numpy()
        layout = "channels-first (C, H, W)"
        if array.ndim == 3:
            array = np.moveaxis(array, 0, -1)
    elif isinstance(image, (np.ndarray, list, tuple)):
        array = np.asarray(image)
        layout = "channels-last (H, W, C)"
    else:
        raise ValueError(
            f"Unsupported image type {type(image).__name__}; expected a PIL image, numpy array, torch tensor, "
            "nested list or a {'bytes', 'path'} dict"
        )

    if array.ndim == 2:
        array = array[..., None]
    if array.ndim != 3:
        raise ValueError(f"Image must have 2 or 3 dimensions ({layout}), got shape {_image_shape(image)}")
    channels = array.shape[-1]
    if channels not in _ALLOWED_CHANNELS:
        raise ValueError(
            f"Image has {channels} channels (shape {_image_shape(image)}, read as {layout}); only 1 (grayscale), "
            "3 (RGB) or 4 (RGBA) channels can be converted to RGB"
        )
    array = _array_to_uint8(array)
    # uint8 (H, W) / (H, W, 3) / (H, W, 4) arrays map to PIL's L / RGB / RGBA modes.
    pil_image = Image.fromarray(np.ascontiguousarray(array[..., 0] if channels == 1 else array))
    return pil_image.convert("RGB")


def _image_shape(image: Any) -> tuple[int, ...]:
    """Shape of an array-like image, for error messages."""
    return tuple(image.shape) if hasattr(image, "shape") else tuple(np.asarray(image).shape)


def _as_triple(value: float | Sequence[float], name: str) -> tuple[float, float, float]:
    values = (float(value),) * 3 if isinstance(value, (int, float)) else tuple(float(v) for v in value)
    if len(values) != 3:
        raise ValueError(f"{name} needs 1 or 3 values (one per RGB channel), got {len(values)}")
    return values


def _to_normalized_tensor(image: Image.Image, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)
    return ((pixels - mean) / std).contiguous()


class _ImageTransformBase:
    """Shared normalisation: PIL RGB image -> `(3, H, W)` float tensor, `(x / 255 - mean) / std`."""

    def __init__(
        self,
        image_size: int,
        mean: float | Sequence[float],
        std: float | Sequence[float],
        resample: Image.Resampling,
    ):
        if image_size < 1:
            raise ValueError(f"image_size must be a positive integer, got {image_size}")
        self.image_size = int(image_size)
        self.mean = _as_triple(mean, "mean")
        self.std = _as_triple(std, "std")
        if any(s <= 0 for s in self.std):
            raise ValueError(f"std must be positive, got {self.std}")
        self.resample = resample
        self._mean = torch.tensor(self.mean).view(3, 1, 1)
        self._std = torch.tensor(self.std).view(3, 1, 1)

    def _finish(self, image: Image.Image) -> torch.Tensor:
        return _to_normalized_tensor(image, self._mean, self._std)


class TrainImageTransform(_ImageTransformBase):
    """Training augmentation: random resized crop, random horizontal flip, to tensor, normalise.

    Same recipe as torchvision's `RandomResizedCrop` + `RandomHorizontalFlip` (the DeiT/ViT fine-tuning default).

    Args:
        image_size (`int`):
            Side of the square output.
        mean (`float` or 3 `float`s, *optional*, defaults to the ImageNet mean):
            Per-channel mean subtracted after scaling pixels to [0, 1].
        std (`float` or 3 `float`s, *optional*, defaults to the ImageNet std):
            Per-channel std the result is divided by.
        scale (`tuple[float, float]`, *optional*, defaults to `(0.08, 1.0)`):
            Range of the crop area as a fraction of the image area. Use a narrower range (e.g. `(0.5, 1.0)`) for tiny
            images where small crops destroy the content.
        ratio (`tuple[float, float]`, *optional*, defaults to `(3/4, 4/3)`):
            Range of the crop aspect ratio (width / height), sampled log-uniformly.
        hflip_prob (`float`, *optional*, defaults to 0.5):
            Probability of a horizontal flip; 0 turns flipping off (e.g. for digits, where a flip changes the class).
        resample (`PIL.Image.Resampling`, *optional*, defaults to `BILINEAR`):
            Filter used to resize the crop.
        seed (`int`, *optional*):
            Seed of a private `torch.Generator`, so the sequence of augmentations is reproducible. Inside
            `DataLoader` workers the generator is re-seeded from `(seed, worker seed)`, so workers do not repeat each
            other and epochs differ. Without a seed the global torch RNG is used (which `DataLoader` seeds per worker).
            Called with a `key` (what `prepare_dataset` passes once the trainer has set the epoch: `(epoch, index)`),
            the augmentation is drawn from a generator seeded by `(seed, *key)` instead: a function of the sample
            alone, whatever the order, the workers or the batches a resumed run skips.
    """

    #: `prepare_dataset` may pass `key=`: the augmentation is then a function of (seed, key)
    accepts_sample_key = True

    def __init__(
        self,
        image_size: int,
        mean: float | Sequence[float] = IMAGENET_DEFAULT_MEAN,
        std: float | Sequence[float] = IMAGENET_DEFAULT_STD,
        scale: tuple[float, float] = (0.08, 1.0),
        ratio: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0),
        hflip_prob: float = 0.5,
        resample: Image.Resampling = Image.Resampling.BILINEAR,
        seed: int | None = None,
    ):
        super().__init__(image_size, mean, std, resample)
        if not 0.0 < scale[0] <= scale[1] <= 1.0:
            raise ValueError(f"scale must satisfy 0 < min <= max <= 1, got {scale}")
        if not 0.0 < ratio[0] <= ratio[1]:
            raise ValueError(f"ratio must satisfy 0 < min <= max, got {ratio}")
        if not 0.0 <= hflip_prob <= 1.0:
            raise ValueError(f"hflip_prob must be in [0, 1], got {hflip_prob}")
        self.scale = (float(scale[0]), float(scale[1]))
        self.ratio = (float(ratio[0]), float(ratio[1]))
        self.hflip_prob = float(hflip_prob)
        self.seed = seed
        self._generator: torch.Generator | None = None
        self._generator_key: int | None = None

    def _get_generator(self) -> torch.Generator | None:
        if self.seed is None:
            return None
        worker = torch.utils.data.get_worker_info()
        key = None if worker is None else worker.seed
        # Forked workers inherit a copy of the parent's generator; without re-seeding they would all (and every
        # epoch) replay the same augmentations.
        if self._generator is None or key != self._generator_key:
            seed = self.seed if worker is None else hash((self.seed, worker.seed)) & (2**63 - 1)
            self._generator = torch.Generator().manual_seed(seed)
            self._generator_key = key
        return self._generator

    def _uniform(self, low: float, high: float, generator: torch.Generator | None) -> float:
        return low + (high - low) * torch.rand((), generator=generator).item()

    def get_crop_box(self, width: int, height: int, generator: torch.Generator | None = None) -> tuple[int, ...]:
        """Sample a `(left, upper, right, lower)` crop box for an image of the given size."""
        area = width * height
        log_ratio = (math.log(self.ratio[0]), math.log(self.ratio[1]))
        for _ in range(10):
            target_area = area * self._uniform(*self.scale, generator)
            aspect = math.exp(self._uniform(*log_ratio, generator))
            crop_w = round(math.sqrt(target_area * aspect))
            crop_h = round(math.sqrt(target_area / aspect))
            if 0 < crop_w <= width and 0 < crop_h <= height:
                left = int(torch.randint(0, width - crop_w + 1, (), generator=generator))
                top = int(torch.randint(0, height - crop_h + 1, (), generator=generator))
                return left, top, left + crop_w, top + crop_h
        # Fallback (as torchvision): the largest centered crop whose aspect ratio is within `ratio`.
        aspect = width / height
        if aspect < self.ratio[0]:
            crop_w, crop_h = width, round(width / self.ratio[0])
        elif aspect > self.ratio[1]:
            crop_w, crop_h = round(height * self.ratio[1]), height
        else:
            crop_w, crop_h = width, height
        left, top = (width - crop_w) // 2, (height - crop_h) // 2
        return left, top, left + crop_w, top + crop_h

    def _keyed_generator(self, key: Sequence[int]) -> torch.Generator:
        # SeedSequence mixes (seed, epoch, index) into well-separated streams (plain sums would collide)
        words = np.random.SeedSequence([self.seed & (2**64 - 1), *(int(k) for k in key)]).generate_state(2)
        return torch.Generator().manual_seed((int(words[0]) | int(words[1]) << 32) & (2**63 - 1))

    def __call__(self, image: ImageLike, key: Sequence[int] | None = None) -> torch.Tensor:
        image = to_rgb_image(image)
        if key is not None and self.seed is not None:
            generator = self._keyed_generator(key)
        else:
            generator = self._get_generator()
        box = self.get_crop_box(*image.size, generator=generator)
        # Crop and resize in one resampling pass.
        image = image.resize((self.image_size, self.image_size), self.resample, box=box)
        if self.hflip_prob > 0 and torch.rand((), generator=generator).item() < self.hflip_prob:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return self._finish(image)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(image_size={self.image_size}, scale={self.scale}, ratio={self.ratio}, "
            f"hflip_prob={self.hflip_prob}, mean={self.mean}, std={self.std}, seed={self.seed})"
        )


class EvalImageTransform(_ImageTransformBase):
    """Evaluation preprocessing: resize the shorter side to `image_size / crop_pct`, center crop, to tensor, normalise.

    Deterministic. With the default `crop_pct=0.875`, a 224 model sees the central 224x224 of the image resized to 256.

    Args:
        image_size (`int`):
            Side of the square output.
        mean (`float` or 3 `float`s, *optional*, defaults to the ImageNet mean):
            Per-channel mean subtracted after scaling pixels to [0, 1].
        std (`float` or 3 `float`s, *optional*, defaults to the ImageNet std):
            Per-channel std the result is divided by.
        crop_pct (`float`, *optional*, defaults to 0.875):
            Fraction of the resized shorter side that is kept, in (0, 1]. Use 1.0 for tiny images (e.g. digits) where
            the border carries content: the image is then only resized.
        resample (`PIL.Image.Resampling`, *optional*, defaults to `BILINEAR`):
            Filter used for the resize.
    """

    def __init__(
        self,
        image_size: int,
        mean: float | Sequence[float] = IMAGENET_DEFAULT_MEAN,
        std: float | Sequence[float] = IMAGENET_DEFAULT_STD,
        crop_pct: float = DEFAULT_CROP_PCT,
        resample: Image.Resampling = Image.Resampling.BILINEAR,
    ):
        super().__init__(image_size, mean, std, resample)
        if not 0.0 < crop_pct <= 1.0:
            raise ValueError(f"crop_pct must be in (0, 1], got {crop_pct}")
        self.crop_pct = float(crop_pct)
        self.resize_size = math.floor(self.image_size / self.crop_pct + 1e-6)

    def __call__(self, image: ImageLike) -> torch.Tensor:
        image = to_rgb_image(image)
        width, height = image.size
        # Shorter side -> resize_size, keeping the aspect ratio (never below the crop size).
        factor = self.resize_size / min(width, height)
        new_w = max(self.image_size, round(width * factor))
        new_h = max(self.image_size, round(height * factor))
        if (new_w, new_h) != (width, height):
            image = image.resize((new_w, new_h), self.resample)
        left, top = round((new_w - self.image_size) / 2), round((new_h - self.image_size) / 2)
        image = image.crop((left, top, left + self.image_size, top + self.image_size))
        return self._finish(image)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(image_size={self.image_size}, crop_pct={self.crop_pct}, mean={self.mean}, "
            f"std={self.std})"
        )


def _size_from_image_processor(image_processor: Any) -> int | None:
    # The model input size is the crop size when the processor center-crops (e.g. ConvNeXt/CLIP-style processors).
    candidates = []
    if getattr(image_processor, "do_center_crop", False):
        candidates.append(getattr(image_processor, "crop_size", None))
    candidates.append(getattr(image_processor, "size", None))
    for size in candidates:
        if size is None:
            continue
        if isinstance(size, int):
            return size
        # `size` is a dict in older transformers and a `SizeDict` (attribute access) in newer ones.
        get = size.get if isinstance(size, Mapping) else partial(getattr, size)
        for key in ("height", "shortest_edge", "width"):
            value = get(key, None)
            if value:
                return int(value)
    return None


def transforms_from_image_processor(
    image_processor: Any | None = None,
    image_size: int | None = None,
    mean: float | Sequence[float] | None = None,
    std: float | Sequence[float] | None = None,
    crop_pct: float | None = None,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0),
    hflip_prob: float = 0.5,
    resample: Image.Resampling = Image.Resampling.BILINEAR,
    seed: int | None = None,
) -> tuple[TrainImageTransform, EvalImageTransform]:
    """Build the train and eval transforms matching a transformers image processor.

    Examples:

    ```python
    >>> from transformers import ViTImageProcessor
    >>> train_tf, eval_tf = transforms_from_image_processor(ViTImageProcessor())  # 224, mean = std = 0.5
    >>> train_tf, eval_tf = transforms_from_image_processor(None, 32, mean=0.5, std=0.5, crop_pct=1.0, hflip_prob=0.0)
    ```

    Args:
        image_processor (`BaseImageProcessor`, *optional*):
            Source of `image_mean`, `image_std`, `size` / `crop_size` and `crop_pct` (when it has them). `None` means
            ImageNet mean/std and a 224 input.
        image_size (`int`, *optional*):
            Overrides the processor's size. Defaults to the processor's size, or 224 without a processor.
        mean (`float` or 3 `float`s, *optional*):
            Overrides the processor's `image_mean` (default without processor: ImageNet mean).
        std (`float` or 3 `float`s, *optional*):
            Overrides the processor's `image_std` (default without processor: ImageNet std).
        crop_pct (`float`, *optional*):
            Eval center-crop fraction; defaults to the processor's `crop_pct` if it has one, else 0.875.
        scale, ratio, hflip_prob, resample, seed:
            See `TrainImageTransform`.

    Returns:
        `tuple[TrainImageTransform, EvalImageTransform]`.
    """
    if image_processor is not None:
        if getattr(image_processor, "do_normalize", True) is False:
            default_mean, default_std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
        else:
            default_mean = getattr(image_processor, "image_mean", None) or IMAGENET_DEFAULT_MEAN
            default_std = getattr(image_processor, "image_std", None) or IMAGENET_DEFAULT_STD
        default_size = _size_from_image_processor(image_processor) or 224
        default_crop_pct = getattr(image_processor, "crop_pct", None) or DEFAULT_CROP_PCT
    else:
        default_mean, default_std, default_size, default_crop_pct = (
            IMAGENET_DEFAULT_MEAN,
            IMAGENET_DEFAULT_STD,
            224,
            DEFAULT_CROP_PCT,
        )
    image_size = image_size or default_size
    mean = default_mean if mean is None else mean
    std = default_std if std is None else std
    crop_pct = default_crop_pct if crop_pct is None else crop_pct

    train_transform = TrainImageTransform(
        image_size, mean, std, scale=scale, ratio=ratio, hflip_prob=hflip_prob, resample=resample, seed=seed
    )
    eval_transform = EvalImageTransform(image_size, mean, std, crop_pct=crop_pct, resample=resample)
    return train_transform, eval_transform


def image_processor_for_transform(transform: EvalImageTransform):
    """A transformers image processor that preprocesses like `transform`, to save beside a model trained with it
    (so `pipeline("image-classification", model=...)` feeds the model what it was evaluated on).

    `crop_pct` 1.0 gives a `ViTImageProcessor` (resize to `image_size` x `image_size`), smaller gives a
    `DeiTImageProcessor` (resize to `image_size / crop_pct` square, centre crop `image_size`); same mean, std and
    resampling filter. On square images both equal `transform` exactly; on others the transform resizes the shorter
    side (keeping the aspect ratio) where these processors resize to a square.

    Args:
        transform: the evaluation transform (`EvalImageTransform`, e.g. from `transforms_from_image_processor`).
    """
    import transformers

    # The PIL backends need no torchvision (the default backend does); the saved JSON names the standard class.
    vit = getattr(transformers, "ViTImageProcessorPil", None) or transformers.ViTImageProcessor
    deit = getattr(transformers, "DeiTImageProcessorPil", None) or transformers.DeiTImageProcessor
    common = dict(image_mean=list(transform.mean), image_std=list(transform.std), resample=int(transform.resample))
    size = {"height": transform.image_size, "width": transform.image_size}
    if transform.crop_pct >= 1.0:
        return vit(size=size, **common)
    resized = {"height": transform.resize_size, "width": transform.resize_size}
    return deit(size=resized, crop_size=size, do_center_crop=True, **common)
