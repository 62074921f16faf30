"""Shared tiny models and configs for the test suite.

Everything here is available two ways:

* as a plain function: ``from conftest import tiny_vit_config, make_vit_classifier, ...`` (pytest puts ``tests/`` on
  ``sys.path``), for building variants inside a test or a hypothesis strategy;
* as a pytest fixture: the factories under the same name
  (``def test_x(tiny_vit_config): tiny_vit_config(num_labels=3)``) and ready-made objects: ``vit_config``,
  ``deit_config``, ``vit_model``, ``deit_model``, ``deit_teacher_model``, ``compressed_config`` (random per-layer
  shapes), ``compressed_model`` (the hand-picked `heterogeneous_layers`), ``pixel_values``.

All models are tiny (hidden 32, 2 blocks, 16x16 images, 4x4 patches -> 16 patches), built from configs in code (no
download), seeded with ``torch.manual_seed`` and returned in eval mode.
"""

from __future__ import annotations

import random
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from transformers import (
    DeiTConfig,
    DeiTForImageClassification,
    DeiTForImageClassificationWithTeacher,
    TrainingArguments,
    ViTConfig,
    ViTForImageClassification,
)

from hf_vit_compress.config import CompressionConfig
from hf_vit_compress.methods.uvc.method import UVCMethod
from hf_vit_compress.modeling import CompressedViTConfig, CompressedViTForImageClassification
from hf_vit_compress.surgery.gating import install_gates
from hf_vit_compress.training.trainer import CompressionTrainer

IMAGE_SIZE = 16
PATCH_SIZE = 4
NUM_PATCHES = (IMAGE_SIZE // PATCH_SIZE) ** 2
NUM_LABELS = 5

_TINY = dict(
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=64,
    image_size=IMAGE_SIZE,
    patch_size=PATCH_SIZE,
    num_channels=3,
    num_labels=NUM_LABELS,
    hidden_dropout_prob=0.0,
    attention_probs_dropout_prob=0.0,
)


# ----------------------------------------------------------------------------------------------------------------------
# Plain functions
# ----------------------------------------------------------------------------------------------------------------------


def tiny_vit_config(**overrides) -> ViTConfig:
    """A tiny `ViTConfig` (hidden 32, 2 layers, 4 heads, MLP 64, 16x16 images, patch 4, 5 labels)."""
    return ViTConfig(**{**_TINY, **overrides})


def tiny_deit_config(**overrides) -> DeiTConfig:
    """The same tiny shapes as `tiny_vit_config`, as a `DeiTConfig`."""
    return DeiTConfig(**{**_TINY, **overrides})


def _build(model_class, config, seed: int):
    torch.manual_seed(seed)
    return model_class(config).eval()


def make_vit_classifier(seed: int = 0, **overrides) -> ViTForImageClassification:
    return _build(ViTForImageClassification, tiny_vit_config(**overrides), seed)


def make_deit_classifier(seed: int = 0, **overrides) -> DeiTForImageClassification:
    return _build(DeiTForImageClassification, tiny_deit_config(**overrides), seed)


def make_deit_with_teacher(seed: int = 0, **overrides) -> DeiTForImageClassificationWithTeacher:
    return _build(DeiTForImageClassificationWithTeacher, tiny_deit_config(**overrides), seed)


def make_pixel_values(batch_size: int = 2, seed: int = 0, image_size: int = IMAGE_SIZE) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch_size, 3, image_size, image_size, generator=generator)


def layer_spec(num_heads: int, qk_head_dim: int, v_head_dim: int, intermediate_size: int, scaling: float | None = None):
    """One entry of `CompressedViTConfig.layers` (scaling defaults to the dense head_dim 8 of the tiny models)."""
    return {
        "num_heads": num_heads,
        "qk_head_dim": qk_head_dim,
        "v_head_dim": v_head_dim,
        "intermediate_size": intermediate_size,
        "scaling": 8**-0.5 if scaling is None else scaling,
    }


def heterogeneous_layers() -> list[dict]:
    """Hand-picked edge cases: full layer, qk != v with an odd head count, no heads at all, no MLP at all."""
    return [
        layer_spec(4, 8, 8, 64),
        layer_spec(3, 5, 7, 40),
        layer_spec(0, 0, 0, 17),
        layer_spec(2, 6, 3, 0),
    ]


def make_compressed_config(
    layers: list[dict] | None = None,
    hidden_size: int = 24,
    use_distillation_token: bool = False,
    distillation_head: bool = False,
    **overrides,
) -> CompressedViTConfig:
    """A `CompressedViTConfig` for 16x16 images, 5 labels; `layers` defaults to `heterogeneous_layers()`."""
    return CompressedViTConfig(
        hidden_size=hidden_size,
        layers=heterogeneous_layers() if layers is None else layers,
        image_size=IMAGE_SIZE,
        patch_size=PATCH_SIZE,
        num_labels=NUM_LABELS,
        use_distillation_token=use_distillation_token,
        distillation_head=distillation_head,
        **overrides,
    )


def random_compressed_config(seed: int = 0, num_layers: int = 4, hidden_size: int = 24, **overrides):
    """A random `CompressedViTConfig` whose blocks all differ (heads, qk/v head dims, MLP width; some may be 0)."""
    rng = random.Random(seed)
    layers, seen = [], set()
    while len(layers) < num_layers:
        num_heads = rng.randint(0, 4)
        qk, v = (rng.randint(1, 9), rng.randint(1, 9)) if num_heads else (0, 0)
        spec = layer_spec(num_heads, qk, v, rng.randint(0, 48), scaling=rng.uniform(0.2, 0.5))
        key = tuple(spec[name] for name in ("num_heads", "qk_head_dim", "v_head_dim", "intermediate_size"))
        if key not in seen:  # every block gets its own shape
            seen.add(key)
            layers.append(spec)
    return make_compressed_config(layers=layers, hidden_size=hidden_size, **overrides)


@torch.no_grad()
def randomize_parameters(model: torch.nn.Module, seed: int = 0, std: float = 0.3) -> torch.nn.Module:
    """Overwrite every parameter with seeded noise (non-zero biases, LayerNorm gains around 1).

    `_init_weights` zeroes biases and keeps attention near-uniform, which would hide bugs in bias-only sub-layers
    (pruned to 0 heads / 0 MLP width) and in the attention kernels; this makes every path matter.
    """
    generator = torch.Generator().manual_seed(seed)
    for name, parameter in model.named_parameters():
        noise = torch.randn(parameter.shape, generator=generator) * std
        if "layernorm" in name and name.endswith("weight"):
            noise += 1.0
        parameter.copy_(noise.to(parameter.dtype))
    return model


def make_compressed_model(
    config: CompressedViTConfig | None = None, seed: int = 0
) -> CompressedViTForImageClassification:
    """A `CompressedViTForImageClassification` (eval mode) with every parameter randomized by `seed`."""
    torch.manual_seed(seed)
    model = CompressedViTForImageClassification(make_compressed_config() if config is None else config)
    return randomize_parameters(model, seed).eval()


# ----------------------------------------------------------------------------------------------------------------------
# Fixtures. Factories keep their function's name; the objects get nouns.
# ----------------------------------------------------------------------------------------------------------------------


def _factory_fixture(function):
    return pytest.fixture(name=function.__name__)(lambda: function)


for _function in (
    tiny_vit_config,
    tiny_deit_config,
    make_vit_classifier,
    make_deit_classifier,
    make_deit_with_teacher,
    make_pixel_values,
    make_compressed_config,
    random_compressed_config,
    make_compressed_model,
    randomize_parameters,
):
    globals()[f"_{_function.__name__}_fixture"] = _factory_fixture(_function)
del _function


@pytest.fixture(name="vit_config")
def _vit_config():
    return tiny_vit_config()


@pytest.fixture(name="deit_config")
def _deit_config():
    return tiny_deit_config()


@pytest.fixture(name="vit_model")
def _vit_model():
    return make_vit_classifier()


@pytest.fixture(name="deit_model")
def _deit_model():
    return make_deit_classifier()


@pytest.fixture(name="deit_teacher_model")
def _deit_teacher_model():
    return make_deit_with_teacher()


@pytest.fixture(name="compressed_config")
def _compressed_config():
    """Random per-layer shapes (seed 0), no distillation token."""
    return random_compressed_config(seed=0)


@pytest.fixture(name="compressed_model")
def _compressed_model():
    return make_compressed_model(make_compressed_config())


@pytest.fixture(name="pixel_values")
def _pixel_values():
    return make_pixel_values()


@pytest.fixture(autouse=True, scope="session")
def one_torch_thread():
    """Tiny models run fastest on one intra-op thread; more threads mostly spin-wait, badly so on a busy machine."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


# ---------------------------------------------------------------------------------------------------------------
# CLI runs: a tiny saved ViT and parquet shards (module-scoped `assets`), recipe overrides (shared by several folders)
# ---------------------------------------------------------------------------------------------------------------
def write_parquet_shards(folder: Path, image_size: int = 20) -> dict[str, list[str]]:
    """Two train shards of 8 examples and one validation shard of 4: random RGB images, 5 classes."""
    rng = np.random.default_rng(0)
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(num_classes=5)})
    files = {"train": [], "validation": []}
    for name, split, count in (("train-0", "train", 8), ("train-1", "train", 8), ("val-0", "validation", 4)):
        images = [rng.integers(0, 256, (image_size, image_size, 3), dtype=np.uint8) for _ in range(count)]
        dataset = datasets.Dataset.from_dict({"image": images, "label": [i % 5 for i in range(count)]},
                                             features=features)
        path = folder / f"{name}.parquet"
        dataset.to_parquet(str(path))
        files[split].append(str(path))
    return files


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cli_assets")
    make_vit_classifier().save_pretrained(folder / "tiny_vit")
    (folder / "data").mkdir()
    return {"model": str(folder / "tiny_vit"), **write_parquet_shards(folder / "data")}


def tiny_overrides(assets, output_dir: Path) -> list[str]:
    """Everything a recipe needs changed to run here in seconds (the recipe's other values stay)."""
    return [
        "--model.model_name_or_path", assets["model"],
        "--data.dataset_name", "parquet",
        "--data.train_files", *assets["train"],
        "--data.eval_files", *assets["validation"],
        "--data.shuffle_buffer_size", "16",
        "--data.shuffle_buffer_input_shards", "1",
        "--training.output_dir", str(output_dir),
        "--training.per_device_train_batch_size", "4",
        "--training.per_device_eval_batch_size", "4",
        "--training.dataloader_num_workers", "0",
        "--training.save_strategy", "no",
        "--training.use_cpu", "true",
        "--training.disable_tqdm", "true",
        "--training.logging_steps", "1",
    ]


# ---------------------------------------------------------------------------------------------------------------
# CompressionTrainer runs on random tensors (shared by several folders)
# ---------------------------------------------------------------------------------------------------------------
def tiny_dataset(size: int = 40, seed: int = 0) -> list[dict]:
    generator = torch.Generator().manual_seed(seed)
    return [
        {"pixel_values": torch.randn(3, 16, 16, generator=generator), "labels": int(i % NUM_LABELS)}
        for i in range(size)
    ]


def training_args(output_dir, **overrides) -> TrainingArguments:
    values = dict(
        output_dir=str(output_dir), max_steps=30, per_device_train_batch_size=8, learning_rate=1e-3,
        logging_steps=5, save_strategy="no", report_to=[], use_cpu=True, remove_unused_columns=False,
        dataloader_num_workers=0, disable_tqdm=True, seed=0, data_seed=0,
    )
    values.update(overrides)
    return TrainingArguments(**values)


def ofb_trainer(output_dir, config: CompressionConfig, dataset_size: int = 40, **overrides) -> CompressionTrainer:
    return CompressionTrainer(
        model=make_vit_classifier(seed=0), args=training_args(output_dir, **overrides), compression_config=config,
        train_dataset=tiny_dataset(dataset_size),
    )


# ---------------------------------------------------------------------------------------------------------------
# UVC on a tiny ViT, in the paper's search space unless told otherwise (shared by several folders)
# ---------------------------------------------------------------------------------------------------------------
def tiny_vit(layers: int = 3, seed: int = 0) -> ViTForImageClassification:
    torch.manual_seed(seed)
    config = ViTConfig(
        hidden_size=32, num_hidden_layers=layers, num_attention_heads=4, intermediate_size=64, image_size=16,
        patch_size=4, num_labels=NUM_LABELS,
    )
    return ViTForImageClassification(config).eval()


def uvc_config(target: float = 0.5, **uvc) -> CompressionConfig:
    """The paper's search space (`prune_hidden=False`, `shared_head_dims=False`) unless given: this file pins the
    paper's formulas; the defaults (the residual width searched too, q/k dims pruned with the value dims) run end to
    end below and in tests/methods/test_uvc_hidden.py, tests/methods/test_uvc_shared_dims.py."""
    uvc.setdefault("prune_hidden", False)
    uvc.setdefault("shared_head_dims", False)
    return CompressionConfig(method="uvc", target_flops=target, uvc=uvc)


def gated(model, config: CompressionConfig) -> UVCMethod:
    method = UVCMethod(model, config)
    install_gates(model, method)
    model.add_module("compression", method)
    return method


def synthetic_latency_table(dense_config, batch_size: int = 1, per_head_ms: float = 0.01,
                            fused_speedup: float = 1.0):
    """A latency table with made-up, deterministic timings for `dense_config` (what a speed budget's tests price
    with, instead of noisy measurements): a fixed cost per head and per sub-block on top of a part proportional to
    the MACs, so it ranks widths differently from MACs, as a device does. Equal head dims run `fused_speedup` times
    faster (1: no fused kernel, so nothing is ever padded)."""
    from hf_vit_compress.surgery.latency import LatencyGrid, LatencyTable, latency_key

    grid = LatencyGrid.for_model(dense_config, 3)
    stem = [0.02 + 1e-3 * hidden for hidden in grid.hidden]

    def attention_ms(hidden, heads, qk, v):
        return 0.01 + per_head_ms * heads + 2e-5 * hidden * heads * (qk + v)

    attention = [[[[attention_ms(hidden, heads, qk, v) for v in grid.v_head_dims] for qk in grid.qk_head_dims]
                  for heads in grid.heads] for hidden in grid.hidden]
    fused = [[[attention_ms(hidden, heads, d, d) / fused_speedup for d in grid.qk_head_dims] for heads in grid.heads]
             for hidden in grid.hidden]
    mlp = [[0.01 + 3e-5 * hidden * width for width in grid.mlp] for hidden in grid.hidden]
    return LatencyTable(latency_key(dense_config, batch_size), grid, stem, attention, fused, mlp,
                        {"synthetic": True})
