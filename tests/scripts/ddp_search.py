"""A short OFB search in 2 data-parallel CPU processes (gloo); launched by tests/training/test_distributed.py with

    python -m torch.distributed.run --nproc_per_node 2 tests/scripts/ddp_search.py OUT_DIR

Three phases run in the same process group (one launch, so the test pays the start-up once):

* full:   an uninterrupted search + fine-tune of MAX_STEPS steps; then trainer.save_model(OUT_DIR/full/model)
* stop:   the same run, stopped by a callback right after the checkpoint of step STOP_AT
* resume: a fresh trainer resumed from that checkpoint, run to MAX_STEPS
* diverge: like full, but rank 1 perturbs its architecture logits right before the search ends, so the ranks would
          decide differently: the trainer's check must notice and enforce rank 0's state
* uvc:    a UVC search (theta unused during the skip warm-up, blocks may be skipped): ranks must agree

Every rank writes OUT_DIR/<phase>_rank<r>.json: the final architecture (Architecture.to_dict), the digest of the
method's state after training and after every optimizer step, the exported model's logits on a fixed input and
its MACs. The test compares ranks, phases and the saved model.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import datasets
import numpy as np
import torch
from transformers import TrainerCallback, TrainingArguments, ViTConfig, ViTForImageClassification

from hf_vit_compress import CompressionConfig, count_macs
from hf_vit_compress.data import EvalImageTransform, collate_images, prepare_dataset
from hf_vit_compress.training.trainer import CompressionTrainer

MAX_STEPS = 8  # 2 epochs of 4 steps (32 examples, 2 ranks x batch 4)
STOP_AT = 3
IMAGE_SIZE = 16


def tiny_model() -> ViTForImageClassification:
    torch.manual_seed(0)
    config = ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                       image_size=IMAGE_SIZE, patch_size=4, num_labels=5, hidden_dropout_prob=0.0,
                       attention_probs_dropout_prob=0.0)
    return ViTForImageClassification(config)


def tiny_dataset():
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8) for _ in range(32)]
    labels = [int(i % 5) for i in range(32)]
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(num_classes=5)})
    raw = datasets.Dataset.from_dict({"image": images, "label": labels}, features=features)
    return prepare_dataset(raw, EvalImageTransform(IMAGE_SIZE, mean=0.5, std=0.5, crop_pct=1.0))


def compression_config(method: str = "ofb") -> CompressionConfig:
    config = CompressionConfig(method=method, target_flops=0.5, search_fraction=0.75)
    config.ofb.arch_lr = 0.3  # alpha moves enough in 6 search steps for candidates to be eliminated
    config.ofb.warmup_fraction = 0.5
    return config


class DigestRecorder(TrainerCallback):
    """The method's state digest after every optimizer step (all ranks must agree at every step)."""

    def __init__(self, trainer):
        self.trainer, self.digests = trainer, {}

    def on_step_end(self, args, state, control, **kwargs):
        self.digests[state.global_step] = self.trainer.method.state_digest()


class Diverge(TrainerCallback):
    """On rank 1 only, at the last search step (before the trainer's callback finalises), favour another embedding
    width: without the trainer's check the two ranks would fix different architectures."""

    def __init__(self, search_steps: int):
        self.search_steps, self.trainer = search_steps, None

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.search_steps and int(os.environ.get("RANK", "0")) == 1:
            embed = self.trainer.method.embed
            with torch.no_grad():
                embed.alpha.fill_(-10.0)
                embed.alpha[0] = 10.0  # the narrowest embedding candidate


class StopAt(TrainerCallback):
    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= self.step:
            control.should_training_stop = True


def run(phase: str, out: Path) -> None:
    rank = int(os.environ.get("RANK", "0"))
    work = out / phase
    args = TrainingArguments(
        output_dir=str(out / ("stop" if phase == "resume" else phase)),
        max_steps=MAX_STEPS,
        per_device_train_batch_size=4,
        learning_rate=1e-3,
        lr_scheduler_type="cosine",
        logging_steps=1,
        save_strategy="steps" if phase == "stop" else "no",
        save_steps=STOP_AT,
        report_to="none",
        seed=0,
        use_cpu=True,
        ddp_backend="gloo",
        ddp_timeout=120,
        disable_tqdm=True,
        dataloader_num_workers=0,
        remove_unused_columns=False,
    )
    config = compression_config("uvc" if phase == "uvc" else "ofb")
    diverge = Diverge(search_steps=6)  # ceil(0.75 * MAX_STEPS)
    trainer = CompressionTrainer(model=tiny_model(), args=args, compression_config=config,
                                 train_dataset=tiny_dataset(), data_collator=collate_images,
                                 # a constructor callback runs BEFORE the trainer's own CompressionCallback
                                 callbacks=[diverge] if phase == "diverge" else None)
    diverge.trainer = trainer
    sync_results = []  # (when, ranks agreed, this rank's final architecture before the check)
    synchronize = trainer.synchronize_search_state

    def recorded_synchronize(when):
        before = trainer.method.final_architecture
        before = None if before is None else before.to_dict()
        sync_results.append((when, synchronize(when), before))
        return sync_results[-1][1]

    trainer.synchronize_search_state = recorded_synchronize
    recorder = DigestRecorder(trainer)
    trainer.add_callback(recorder)
    if phase == "stop":
        trainer.add_callback(StopAt(STOP_AT))
    resume = str(out / "stop" / f"checkpoint-{STOP_AT}") if phase == "resume" else None
    trainer.train(resume_from_checkpoint=resume)

    method = trainer.method
    compressed = trainer.export_compressed_model().eval()
    pixel_values = torch.randn(3, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = compressed(pixel_values=pixel_values).logits
    record = {
        "rank": rank,
        "world_size": int(os.environ.get("WORLD_SIZE", "1")),
        "global_step": trainer.state.global_step,
        "finalized": bool(method.search_finished),
        "architecture": method.export_architecture().to_dict(),
        "digest": method.state_digest(),
        "step_digests": {str(k): v for k, v in recorder.digests.items()},
        "logits": logits.tolist(),
        "compressed_macs": count_macs(compressed),
        "target_macs": float(method.target_macs),
        "find_unused_parameters": trainer.args.ddp_find_unused_parameters,
        "wrapped": type(trainer.model_wrapped).__name__,
        "sync_results": sync_results,
    }
    if phase == "full":
        trainer.save_model(str(work / "model"))  # every rank calls it; only rank 0 writes
    (out / f"{phase}_rank{rank}.json").write_text(json.dumps(record))
    trainer.accelerator.wait_for_everyone()


def main() -> None:
    out = Path(sys.argv[1])
    phases = sys.argv[2:] or ["full", "stop", "resume", "diverge", "uvc"]
    for phase in phases:
        run(phase, out)


if __name__ == "__main__":
    main()
