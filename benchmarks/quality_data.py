"""quality.py's data (CIFAR-10 parquet shards), evaluation, plain training and the dense model every run starts from.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402
from quality_setup import MODES, settings_of  # noqa: E402


def load_data(args):
    """(training set factory, test set, evaluation set). `make_train_set(seed)` gives the training images with an
    augmentation stream of their own, so a run's numbers do not depend on which runs came before it in the same
    process. The evaluation set is the test set, or with `--eval-on validation` the `validation_size` training
    images that follow the training subsample in the same seeded shuffle (disjoint from it, fixed)."""
    from hf_vit_compress.data import prepare_dataset, transforms_from_image_processor

    raw = C.cifar_parquet(args.data_dir)
    shuffled = raw["train"].shuffle(seed=0)
    train = shuffled.select(range(min(args.train_size, len(shuffled))))
    test = raw["test"].shuffle(seed=0).select(range(min(args.eval_size, len(raw["test"]))))
    validation = None
    if args.eval_on == "validation":
        end = args.train_size + args.validation_size
        if end > len(shuffled):
            raise SystemExit(f"--eval-on validation: --train-size {args.train_size} + --validation-size "
                             f"{args.validation_size} exceeds the {len(shuffled)} training images; allowed: a sum "
                             f"<= {len(shuffled)} (lower --train-size or --validation-size)")
        validation = shuffled.select(range(args.train_size, end))

    def transforms(seed: int):
        return transforms_from_image_processor(None, 32, mean=C.CIFAR_MEAN, std=C.CIFAR_STD, crop_pct=1.0,
                                               scale=(0.6, 1.0), hflip_prob=0.5, seed=seed)

    def make_train_set(seed: int):
        return prepare_dataset(train, transforms(seed)[0])

    test_set = prepare_dataset(test, transforms(0)[1])
    eval_set = test_set if validation is None else prepare_dataset(validation, transforms(0)[1])
    return make_train_set, test_set, eval_set


def accuracy(model, dataset, batch_size: int = 500) -> float:
    from hf_vit_compress.publishing.metrics import (
        evaluate_classifier,  # the package's own evaluation loop (top-1 by argmax)
    )

    with torch.no_grad():
        return evaluate_classifier(model, dataset, batch_size=batch_size)["accuracy"]


def training_arguments(args, output_dir: str, steps: int, lr: float, seed: int):
    from transformers import TrainingArguments

    return TrainingArguments(
        output_dir=output_dir, max_steps=steps, per_device_train_batch_size=args.batch_size, learning_rate=lr,
        weight_decay=0.05, lr_scheduler_type="cosine", warmup_steps=max(1, round(0.05 * steps)),
        logging_steps=max(1, steps // MODES[args.mode]["logs_per_run"]), save_strategy="no", report_to=[], seed=seed,
        use_cpu=not torch.cuda.is_available(), disable_tqdm=True, dataloader_num_workers=0,
        remove_unused_columns=False,
    )


def train_plain(model, args, train_set, steps: int, lr: float, seed: int):
    from transformers import Trainer

    from hf_vit_compress.data import collate_images

    with tempfile.TemporaryDirectory(prefix="quality-") as tmp:
        Trainer(model=model, args=training_arguments(args, tmp, steps, lr, seed), train_dataset=train_set,
                data_collator=collate_images).train()
    return model.eval()


def dense_model(args, train_set, test_set) -> tuple[torch.nn.Module, dict]:
    """Train (or load from the cache) the dense model of this mode; its cached accuracy is on the test subset."""
    from transformers import ViTForImageClassification, set_seed

    preset = MODES[args.mode]
    if args.dense_from:
        return loaded_dense_model(Path(args.dense_from), test_set)
    settings = settings_of(args)
    key_fields = {k: settings[k] for k in ("model", "patch_size", "train_size", "batch_size", "dense_steps",
                                          "dense_lr", "weight_decay", "augmentation", "data")}
    key = hashlib.sha1(json.dumps(key_fields, sort_keys=True).encode()).hexdigest()[:10]
    cache = Path(args.cache_dir) / f"dense-{preset.get('dense_cache', args.mode)}-{key}"
    if (cache / "dense.json").exists():
        model = ViTForImageClassification.from_pretrained(cache).eval()
        info = json.loads((cache / "dense.json").read_text())
        C.log(f"dense model loaded from {cache} (accuracy {info['accuracy']:.4f})")
        return model, info
    C.log(f"training the dense model ({args.dense_steps} steps); cached in {cache}")
    set_seed(0)
    model = C.dense_vit(preset["model"], seed=0, image_size=32, patch_size=preset["patch_size"], num_labels=10)
    started = time.perf_counter()
    train_plain(model, args, train_set, args.dense_steps, preset["dense_lr"], seed=0)
    seconds = time.perf_counter() - started
    from hf_vit_compress import count_macs, count_params

    info = {"accuracy": accuracy(model, test_set), "macs": count_macs(model), "params": count_params(model),
            "train_seconds": round(seconds, 1), "key": key, **key_fields}
    tmp = cache.with_name(cache.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    (tmp / "dense.json").write_text(json.dumps(info, indent=2) + "\n")
    shutil.rmtree(cache, ignore_errors=True)
    tmp.rename(cache)
    C.log(f"dense accuracy {info['accuracy']:.4f} after {seconds / 60:.1f} min")
    return model, info


def loaded_dense_model(folder: Path, test_set) -> tuple[torch.nn.Module, dict]:
    """The dense model saved by train_dense.py (weights + provenance.json); its accuracy is measured here on this
    run's test set (the provenance's curve is on the whole test set too)."""
    from transformers import ViTForImageClassification

    from hf_vit_compress import count_macs, count_params

    if not (folder / "provenance.json").is_file():
        raise SystemExit(f"--dense-from {folder}: no provenance.json (allowed: a folder train_dense.py wrote)")
    model = ViTForImageClassification.from_pretrained(folder).eval()
    provenance = json.loads((folder / "provenance.json").read_text())
    info = {"accuracy": accuracy(model, test_set), "macs": count_macs(model), "params": count_params(model),
            "dense_from": str(folder.relative_to(C.REPO)) if folder.is_relative_to(C.REPO) else str(folder),
            "provenance_test_accuracy": provenance["test_accuracy"], "curve": provenance["curve"],
            "plateau": provenance["plateau"], "git_commit": provenance.get("git_commit")}
    C.log(f"dense model loaded from {folder} (accuracy {info['accuracy']:.4f})")
    return model, info


def gradient_batches(train_set, batch_size: int, seed: int, count: int = 8):
    from hf_vit_compress.data import collate_images

    generator = torch.Generator().manual_seed(seed)
    loader = torch.utils.data.DataLoader(train_set, batch_size=batch_size, shuffle=True, generator=generator,
                                         collate_fn=collate_images)
    batches = []
    for batch in loader:
        batches.append((batch["pixel_values"], batch["labels"]))
        if len(batches) == count:
            break
    return batches
