"""LoRA recovery (`CompressionConfig.finetune="lora"`) in 2 data-parallel CPU processes (gloo); launched by
tests/training/test_peft_recovery.py with

    python -m torch.distributed.run --nproc_per_node 2 tests/scripts/ddp_lora.py OUT_DIR

The tiny model, data and OFB settings of ddp_search.py: MAX_STEPS = 8 steps, the search ends after step 6. Phases:

* full:   an uninterrupted search + LoRA fine-tuning
* stop:   the same run, stopped right after the checkpoint of step 7 (inside the LoRA phase)
* resume: a fresh trainer resumed from that checkpoint, run to MAX_STEPS

Every rank writes OUT_DIR/<phase>_rank<r>.json: digests of the adapters and of the frozen weights after every
optimizer step, the exported model's logits on a fixed input and the gated model's own logits on it.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

import torch
from ddp_search import IMAGE_SIZE, MAX_STEPS, StopAt, compression_config, tiny_dataset, tiny_model
from transformers import TrainerCallback, TrainingArguments

from hf_vit_compress.data import collate_images
from hf_vit_compress.training.trainer import CompressionTrainer

STOP_AT = 7


def digest(parameters) -> str:
    hasher = hashlib.sha256()
    for parameter in parameters:
        hasher.update(parameter.detach().cpu().contiguous().numpy().tobytes())
    return hasher.hexdigest()


class Recorder(TrainerCallback):
    def __init__(self, trainer):
        self.trainer, self.lora, self.frozen = trainer, {}, {}

    def on_step_end(self, args, state, control, **kwargs):
        recovery = self.trainer.lora_recovery
        self.lora[state.global_step] = digest(recovery.parameters)
        self.frozen[state.global_step] = digest(recovery.frozen_parameters)


def run(phase: str, out: Path) -> None:
    rank = int(os.environ.get("RANK", "0"))
    args = TrainingArguments(
        output_dir=str(out / ("stop" if phase == "resume" else phase)), max_steps=MAX_STEPS,
        per_device_train_batch_size=4, learning_rate=1e-3, lr_scheduler_type="cosine", logging_steps=1,
        save_strategy="steps" if phase == "stop" else "no", save_steps=STOP_AT, report_to="none", seed=0,
        use_cpu=True, ddp_backend="gloo", ddp_timeout=120, disable_tqdm=True, dataloader_num_workers=0,
        remove_unused_columns=False,
    )
    config = compression_config("ofb")
    config.finetune = "lora"
    config.lora.rank = 4
    config.lora.learning_rate = 1e-2
    trainer = CompressionTrainer(model=tiny_model(), args=args, compression_config=config,
                                 train_dataset=tiny_dataset(), data_collator=collate_images)
    recorder = Recorder(trainer)
    trainer.add_callback(recorder)
    if phase == "stop":
        trainer.add_callback(StopAt(STOP_AT))
    resume = str(out / "stop" / f"checkpoint-{STOP_AT}") if phase == "resume" else None
    trainer.train(resume_from_checkpoint=resume)

    pixel_values = torch.randn(3, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(1))
    model = trainer.accelerator.unwrap_model(trainer.model).eval()
    compressed = trainer.export_compressed_model().eval()
    with torch.no_grad():
        gated_logits = model(pixel_values=pixel_values).logits
        logits = compressed(pixel_values=pixel_values).logits
    record = {
        "rank": rank,
        "world_size": int(os.environ.get("WORLD_SIZE", "1")),
        "wrapped": type(trainer.model_wrapped).__name__,
        "global_step": trainer.state.global_step,
        "search_steps": trainer.method.total_search_steps,
        "lora_digests": {str(k): v for k, v in recorder.lora.items()},
        "frozen_digests": {str(k): v for k, v in recorder.frozen.items()},
        "lora_b_nonzero": all(bool(layer.lora_B["recovery"].weight.abs().sum() > 0)
                              for layer in trainer.lora_recovery.layers),
        "logits": logits.tolist(),
        "gated_logits": gated_logits.tolist(),
        "peft_modules_in_export": [name for name, module in compressed.named_modules()
                                   if type(module).__module__.startswith("peft")],
    }
    (out / f"{phase}_rank{rank}.json").write_text(json.dumps(record))
    trainer.accelerator.wait_for_everyone()


def main() -> None:
    out = Path(sys.argv[1])
    for phase in sys.argv[2:] or ["full", "stop", "resume"]:
        run(phase, out)


if __name__ == "__main__":
    main()
