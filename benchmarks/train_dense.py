"""Train the converged dense ViT that `quality.py --converged` compresses (CIFAR-10, the medium shape).

    python benchmarks/train_dense.py                       # 45,000 training images, 60 epochs, one core (~2.5 h)
    python benchmarks/train_dense.py --epochs 2 --output /tmp/dense-smoke --limit-train 2048   # smoke run

The run resumes by itself: every `--checkpoint-minutes` (and at every 10% of the schedule) it writes
`<output>/checkpoint/` (weights, AdamW moments and step, all safetensors; nothing is pickled), and a later call with
the same arguments continues from it. The data order and every augmentation draw are functions of (seed, step), so a
resumed run takes the same steps as an uninterrupted one.

Protocol:
* data: the CIFAR-10 training images shuffled with seed 0 (quality.py's order); the first `--train-size` (45,000)
  train, the next 5,000 are the validation split that quality.py's `--eval-on validation` tunes on, so tuning never
  sees an image the dense model trained on nor a test image. The full 10,000-image test set measures the curve.
* augmentation: quality.py's (random resized crop, area scale (0.6, 1), ratio (3/4, 4/3), horizontal flip), done
  on whole batches of decoded uint8 images with one `grid_sample` instead of per-image PIL work, so one core
  trains the schedule in about an hour.
* optimiser: AdamW (lr 2e-3, weight decay 0.05, betas (0.9, 0.999)), 5% linear warm-up then cosine to 0, batch 128.
* curve: test top-1 at every 10% of the schedule; `plateau` says whether the last 25% added under 0.5 points.

Written by hand rather than with `transformers.Trainer`: the Trainer's resumable checkpoints pickle the optimizer,
scheduler and RNG states (`torch.save`), and this file's weights are committed to the repository.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

MEDIUM_SHAPE = dict(hidden_size=96, num_hidden_layers=4, num_attention_heads=3, intermediate_size=384)
DEFAULT_OUTPUT = C.REPO / "benchmarks" / "dense" / "cifar10_medium"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default=str(C.REPO.parent / "shared" / "data" / "cifar10"))
    parser.add_argument("--output", default=str(DEFAULT_OUTPUT), help="folder of the final model and provenance")
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--weight-decay", type=float, default=0.05)
    parser.add_argument("--train-size", type=int, default=45000,
                        help="training images (the next 5,000 of the seeded order are quality.py's validation split)")
    parser.add_argument("--limit-train", type=int, default=None, help="smoke runs: fewer training images")
    parser.add_argument("--limit-test", type=int, default=None, help="smoke runs: fewer test images")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--checkpoint-minutes", type=float, default=5.0)
    return parser.parse_args(argv)


# ---------------------------------------------------------------------------------------------------------------
# Data: decoded once into uint8 tensors
# ---------------------------------------------------------------------------------------------------------------


def decode(dataset) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, 3, 32, 32) uint8 images and (N,) labels of a `datasets` split whose `image` column holds encoded bytes."""
    from PIL import Image

    table = dataset.with_format("arrow")[:]
    images = np.stack([np.asarray(Image.open(io.BytesIO(item["bytes"])).convert("RGB"))
                       for item in table.column("image").to_pylist()])
    labels = torch.tensor(table.column("label").to_pylist())
    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), labels


def load_splits(args):
    raw = C.cifar_parquet(args.data_dir)
    train = raw["train"].shuffle(seed=0).select(range(min(args.limit_train or args.train_size, args.train_size)))
    test = raw["test"] if args.limit_test is None else raw["test"].select(range(args.limit_test))
    return decode(train), decode(test)


def normalise(images: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(C.CIFAR_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(C.CIFAR_STD).view(1, 3, 1, 1)
    return (images.float() / 255 - mean) / std


def augment(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random resized crop (area (0.6, 1), aspect (3/4, 4/3), bilinear) and horizontal flip of a uint8 batch, as
    one affine `grid_sample`: the crop's half-sizes scale the sampling grid, its centre shifts it, a flip negates x."""
    n = images.shape[0]
    area = torch.empty(n).uniform_(0.6, 1.0, generator=generator)
    log_ratio = torch.empty(n).uniform_(math.log(3 / 4), math.log(4 / 3), generator=generator)
    ratio = log_ratio.exp()
    width = (area * ratio).sqrt().clamp(max=1.0)   # fractions of the side
    height = (area / ratio).sqrt().clamp(max=1.0)
    centre_x = (torch.rand(n, generator=generator) * 2 - 1) * (1 - width)
    centre_y = (torch.rand(n, generator=generator) * 2 - 1) * (1 - height)
    flip = torch.where(torch.rand(n, generator=generator) < 0.5, -1.0, 1.0)
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0], theta[:, 0, 2] = width * flip, centre_x
    theta[:, 1, 1], theta[:, 1, 2] = height, centre_y
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(normalise(images), grid, mode="bilinear", padding_mode="border", align_corners=False)


def batch_indices(step: int, steps_per_epoch: int, batch_size: int, size: int, seed: int) -> torch.Tensor:
    """The training images of global step `step`: epoch e's order is a permutation seeded by (seed, e)."""
    epoch, position = divmod(step, steps_per_epoch)
    order = torch.randperm(size, generator=torch.Generator().manual_seed(seed * 100003 + epoch))
    return order[position * batch_size:(position + 1) * batch_size]


# ---------------------------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------------------------


def learning_rate(step: int, total: int, peak: float) -> float:
    warmup = max(1, round(0.05 * total))
    if step < warmup:
        return peak * (step + 1) / warmup
    return 0.5 * peak * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def make_optimizer(model, args):
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embeddings" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embeddings" not in n)]
    return torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=args.lr, betas=(0.9, 0.999))


@torch.no_grad()
def test_accuracy(model, images, labels, batch_size: int = 1000) -> float:
    model.eval()
    correct = 0
    for start in range(0, len(labels), batch_size):
        logits = model(pixel_values=normalise(images[start:start + batch_size])).logits
        correct += (logits.argmax(-1) == labels[start:start + batch_size]).sum().item()
    model.train()
    return correct / len(labels)


def save_checkpoint(folder: Path, model, optimizer, step: int, curve: list, seconds: float) -> None:
    """Weights + AdamW state as safetensors, progress as JSON; written beside and renamed so a kill keeps the last."""
    from safetensors.torch import save_file

    tmp = folder.with_name(folder.name + ".partial")
    tmp.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp / "model.safetensors"))
    state = {}
    for index, param in enumerate(p for group in optimizer.param_groups for p in group["params"]):
        moments = optimizer.state.get(param, {})
        for key in ("exp_avg", "exp_avg_sq", "step"):
            if key in moments:
                state[f"{index}.{key}"] = torch.as_tensor(moments[key]).reshape(-1).clone()
    save_file(state, str(tmp / "optimizer.safetensors"))
    (tmp / "progress.json").write_text(json.dumps({"step": step, "curve": curve, "seconds": seconds}, indent=1))
    if folder.exists():
        for path in folder.iterdir():
            path.unlink()
        folder.rmdir()
    tmp.rename(folder)


def load_checkpoint(folder: Path, model, optimizer) -> tuple[int, list, float]:
    from safetensors.torch import load_file

    model.load_state_dict(load_file(str(folder / "model.safetensors")))
    state = load_file(str(folder / "optimizer.safetensors"))
    for index, param in enumerate(p for group in optimizer.param_groups for p in group["params"]):
        if f"{index}.exp_avg" in state:
            optimizer.state[param] = {"exp_avg": state[f"{index}.exp_avg"].view_as(param).clone(),
                                      "exp_avg_sq": state[f"{index}.exp_avg_sq"].view_as(param).clone(),
                                      "step": state[f"{index}.step"].reshape(()).clone()}
    progress = json.loads((folder / "progress.json").read_text())
    return progress["step"], progress["curve"], progress["seconds"]


def plateau(curve: list[dict]) -> dict:
    """Did the last 25% of the schedule add under 0.5 points of test top-1?"""
    final = curve[-1]
    at_75 = min(curve, key=lambda point: abs(point["fraction"] - 0.75))
    gain = 100 * (final["test_accuracy"] - at_75["test_accuracy"])
    return {"last_25_percent_gain_points": round(gain, 2), "plateaued": gain < 0.5}


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    output = Path(args.output)
    checkpoint = output / "checkpoint"
    (train_x, train_y), (test_x, test_y) = load_splits(args)
    C.log(f"decoded {len(train_y)} training and {len(test_y)} test images")
    steps_per_epoch = len(train_y) // args.batch_size
    total = steps_per_epoch * args.epochs
    marks = {round(total * k / 10) for k in range(1, 11)}

    model = C.dense_vit(MEDIUM_SHAPE, seed=args.seed, image_size=32, patch_size=4, num_labels=10).train()
    optimizer = make_optimizer(model, args)
    step, curve, seconds = 0, [], 0.0
    if (checkpoint / "progress.json").exists():
        step, curve, seconds = load_checkpoint(checkpoint, model, optimizer)
        C.log(f"resumed from {checkpoint} at step {step} of {total}")
    last_save = time.perf_counter()
    started = time.perf_counter() - seconds
    while step < total:
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, total, args.lr)
        index = batch_indices(step, steps_per_epoch, args.batch_size, len(train_y), args.seed)
        generator = torch.Generator().manual_seed(args.seed * 1_000_003 + step)
        logits = model(pixel_values=augment(train_x[index], generator)).logits
        loss = F.cross_entropy(logits, train_y[index])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        step += 1
        if step in marks:
            accuracy = test_accuracy(model, test_x, test_y)
            curve.append({"step": step, "fraction": round(step / total, 3), "epoch": round(step / steps_per_epoch, 2),
                          "test_accuracy": accuracy, "train_loss": round(loss.item(), 4),
                          "minutes": round((time.perf_counter() - started) / 60, 1)})
            C.log(f"step {step}/{total} ({step / total:.0%}): test top-1 {100 * accuracy:.2f}%, loss {loss.item():.3f}")
        if step in marks or time.perf_counter() - last_save > 60 * args.checkpoint_minutes:
            save_checkpoint(checkpoint, model, optimizer, step, curve, time.perf_counter() - started)
            last_save = time.perf_counter()

    model.eval().save_pretrained(output)  # config.json + model.safetensors
    from hf_vit_compress import count_macs, count_params

    provenance = {
        **C.provenance([sys.argv[0], *(sys.argv[1:] if argv is None else argv)]),
        "model": MEDIUM_SHAPE, "patch_size": 4, "image_size": 32, "num_labels": 10,
        "schedule": {"epochs": args.epochs, "steps": total, "batch_size": args.batch_size, "lr": args.lr,
                     "weight_decay": args.weight_decay, "warmup": "5% linear", "decay": "cosine to 0",
                     "optimizer": "AdamW (0.9, 0.999)", "seed": args.seed},
        "data": {"train_images": len(train_y), "train_selection": "CIFAR-10 train shuffled with seed 0, first N",
                 "validation": "the next 5000 of that order (never trained on)", "test_images": len(test_y),
                 "augmentation": "random resized crop area (0.6, 1), ratio (3/4, 4/3) + horizontal flip"},
        "curve": curve, "test_accuracy": curve[-1]["test_accuracy"], "plateau": plateau(curve),
        "train_minutes": round((time.perf_counter() - started) / 60, 1),
        "macs": count_macs(model), "params": count_params(model),
    }
    (output / "provenance.json").write_text(json.dumps(provenance, indent=2) + "\n")
    for path in checkpoint.iterdir():
        path.unlink()
    checkpoint.rmdir()
    C.log(f"wrote {output}: test top-1 {100 * provenance['test_accuracy']:.2f}%, {provenance['plateau']}")


if __name__ == "__main__":
    main()
