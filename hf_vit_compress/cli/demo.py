"""The end-to-end demo: train a tiny ViT on scikit-learn's digits, compress it, fine-tune, evaluate, report.

Runs on a laptop CPU in minutes with no download: the data ships inside scikit-learn and the model is built from a
`ViTConfig`.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from transformers import Trainer, TrainingArguments, ViTConfig, ViTForImageClassification, set_seed
from transformers.utils import logging

from ..config import CompressionConfig
from ..data.loading import (
    collate_images,
    image_processor_for_transform,
    load_digits_dataset,
    prepare_dataset,
    transforms_from_image_processor,
)
from ..methods import build_method
from ..publishing.metrics import evaluate_classifier
from ..publishing.publish import compression_report, save_compressed_model
from ..publishing.report import PLOT_FILES, plot_search
from ..surgery.flops import count_macs, count_params
from ..training.progress import ProgressDescription, progress_bars
from ..training.trainer import CompressionTrainer


@dataclass
class DemoSettings:
    """Knobs of `run_demo` (the CLI flags of `hf-vit-compress demo`).

    Args:
        method: `"ofb"` or `"uvc"`.
        target_flops: budget as a fraction of the dense model's MACs.
        seed: seeds data split, initialisation and training.
        output_dir: where the model, report.json and the plot go.
        dense_epochs: epochs training the dense model from scratch.
        search_epochs: epochs of architecture search.
        finetune_epochs: epochs fine-tuning the fixed architecture.
        batch_size: per-step batch size.
        learning_rate: AdamW learning rate of the weights.
        progress: show progress bars.
        num_threads: torch CPU threads; tiny models run fastest on one (more threads mostly spin-wait, badly so
            on a busy machine). None keeps torch's default.
    """

    method: str = "ofb"
    target_flops: float = 0.5
    seed: int = 0
    output_dir: str = "demo_out"
    dense_epochs: int = 30
    search_epochs: int = 15
    finetune_epochs: int = 15
    batch_size: int = 64
    learning_rate: float = 2e-3
    progress: bool = True
    num_threads: int | None = 1


logger = logging.get_logger(__name__)

IMAGE_SIZE = 16  # digits are 8x8: 16 px with 4 px patches keeps every stroke at 17 tokens


def tiny_vit_config() -> ViTConfig:
    """A small ViT for 16 px digits: a 4x4 grid of 4 px patches, 4 blocks of width 64 with 4 heads of 16."""
    return ViTConfig(
        image_size=IMAGE_SIZE,
        patch_size=4,
        hidden_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        intermediate_size=256,
        num_labels=10,
        id2label={i: str(i) for i in range(10)},
        label2id={str(i): i for i in range(10)},
    )


def apply_short_run_settings(config: CompressionConfig) -> CompressionConfig:
    """Raise what the papers tune for tens of thousands of ImageNet steps so a search of a few hundred steps can
    move as far: UVC's count learning rate (a count moves at most `counts_lr` of its range per step). OFB needs
    nothing here: its architecture learning rate follows the search length and a dual variable holds its budget
    (`OFBConfig.budget_control`). Used by the demo and the CPU benchmarks; modifies `config` in place and returns
    it."""
    # Counts step in fractions of their range (the library's `counts_space`): 5% per step at most, so a count can
    # cross its whole range in 20 of the ~150 search steps; on CIFAR-10 (benchmarks/quality.py, seed 0, 50% MACs)
    # 0.02 and 0.05 gave 51.6% and 52.1%.
    config.uvc.counts_lr = 0.05
    return config


def demo_compression_config(settings: DemoSettings) -> CompressionConfig:
    """The papers' recipes shortened to a few hundred steps (see `apply_short_run_settings`)."""
    search_fraction = settings.search_epochs / (settings.search_epochs + settings.finetune_epochs)
    config = CompressionConfig(method=settings.method, target_flops=settings.target_flops,
                               search_fraction=search_fraction)
    return apply_short_run_settings(config)


def _training_arguments(settings: DemoSettings, output_dir: Path, epochs: int) -> TrainingArguments:
    return TrainingArguments(
        output_dir=str(output_dir),
        num_train_epochs=epochs,
        per_device_train_batch_size=settings.batch_size,
        learning_rate=settings.learning_rate,
        weight_decay=0.05,
        lr_scheduler_type="cosine",
        warmup_steps=0.05,
        logging_steps=20,
        save_strategy="no",
        report_to=[],
        seed=settings.seed,
        use_cpu=not torch.cuda.is_available(),
        disable_tqdm=not settings.progress,
        dataloader_num_workers=0,
        remove_unused_columns=False,  # the lazy image transform needs the raw columns
    )


def _epochs(count: int) -> str:
    return f"{count} epoch{'' if count == 1 else 's'}"


def run_demo(settings: DemoSettings) -> dict:
    """Train dense, compress, fine-tune, evaluate (top-1 and top-5 through `evaluate`); write the model (with its
    image processor and model card), report.json and a plot to `output_dir`."""
    with progress_bars(settings.progress):  # also transformers' own (saving), not only the Trainer's
        return _run_demo(settings)


def _run_demo(settings: DemoSettings) -> dict:
    # Long on purpose: the demo's steps in the order a user reads them (data, dense, search, fine-tune, report).
    if settings.num_threads:
        torch.set_num_threads(settings.num_threads)
    output_dir = Path(settings.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    work_dir = output_dir / "trainer"
    set_seed(settings.seed)
    digits = load_digits_dataset(image_size=IMAGE_SIZE, seed=settings.seed)
    train_transform, eval_transform = transforms_from_image_processor(
        None, IMAGE_SIZE, mean=0.5, std=0.5, crop_pct=1.0, scale=(0.7, 1.0), hflip_prob=0.0, seed=settings.seed
    )
    train_set = prepare_dataset(digits["train"], train_transform)
    test_set = prepare_dataset(digits["test"], eval_transform)

    started = time.perf_counter()
    model = ViTForImageClassification(tiny_vit_config())
    config = demo_compression_config(settings)
    build_method(model, config)  # fail now, not after dense training, if the budget cannot be met
    steps_per_epoch = math.ceil(len(train_set) / settings.batch_size)
    logger.info(f"Phase 1 of 2: dense training, {_epochs(settings.dense_epochs)} "
                f"({settings.dense_epochs * steps_per_epoch} steps)")
    dense_trainer = Trainer(model=model, args=_training_arguments(settings, work_dir, settings.dense_epochs),
                            train_dataset=train_set, data_collator=collate_images)
    dense_trainer.add_callback(ProgressDescription(dense_trainer, "dense training"))
    dense_trainer.train()
    dense_metrics = evaluate_classifier(model, test_set)
    dense_macs, dense_params = count_macs(model), count_params(model)
    dense_seconds = time.perf_counter() - started

    trainer = CompressionTrainer(
        model=model,
        args=_training_arguments(settings, work_dir, settings.search_epochs + settings.finetune_epochs),
        compression_config=config,
        train_dataset=train_set,
        data_collator=collate_images,
    )
    epochs = settings.search_epochs + settings.finetune_epochs
    logger.info(f"Phase 2 of 2: {settings.method.upper()} search ({_epochs(settings.search_epochs)}), then "
                f"fine-tuning ({_epochs(settings.finetune_epochs)}): {epochs * steps_per_epoch} steps")
    trainer.train()
    compressed = trainer.export_compressed_model()
    compressed_seconds = time.perf_counter() - started - dense_seconds
    compressed_metrics = evaluate_classifier(compressed, test_set)
    architecture = trainer.method.export_architecture()
    report = {
        "method": settings.method,
        "target_flops": settings.target_flops,
        "seed": settings.seed,
        "dense_accuracy": dense_metrics["accuracy"],
        "compressed_accuracy": compressed_metrics["accuracy"],
        "dense_top5_accuracy": dense_metrics["top5_accuracy"],
        "compressed_top5_accuracy": compressed_metrics["top5_accuracy"],
        "dense_macs": dense_macs,
        "compressed_macs": count_macs(compressed),
        "compressed_macs_ratio": count_macs(compressed) / dense_macs,
        "dense_params": dense_params,
        "compressed_params": count_params(compressed),
        "architecture": architecture.summary(),
        "dense_training_seconds": round(dense_seconds, 1),
        "compression_seconds": round(compressed_seconds, 1),
        "settings": asdict(settings),
        "compression_config": config.to_dict(),
    }
    card_facts = compression_report(
        trainer, compressed, dense_metrics=dense_metrics, compressed_metrics=compressed_metrics,
        eval_dataset={"name": "scikit-learn digits (16 px)", "split": "test", "num_examples": len(test_set)},
    )
    save_compressed_model(compressed, output_dir / "model", card_facts, architecture.to_dict(),
                          processor=image_processor_for_transform(eval_transform))
    report.update({key: card_facts[key] for key in ("search_macs_ratio", "architecture_table")})
    (output_dir / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    (output_dir / "history.json").write_text(json.dumps(trainer.compression_history) + "\n")
    if settings.method in PLOT_FILES:  # a registered method without a search plot writes none
        plot_search(trainer.compression_history, settings.method, output_dir / PLOT_FILES[settings.method],
                    target_ratio=config.target_ratio(dense_macs), architecture=report["architecture"],
                    final_macs_ratio=report["compressed_macs_ratio"])
    return report
