"""bf16 autocast on CPU (`TrainingArguments(bf16=True, use_cpu=True)`): the model's matmuls run in bfloat16 while
everything the search decides with stays float32: gate logits (OFB alpha and importance logits, UVC theta), the
masks built from them, duals and counts, the expected MACs and the FLOPs loss. The loss stays finite and the search
ends within the budget.

fp16 is for GPUs (it needs a GradScaler; on CPU accelerate runs fp16 autocast without loss scaling): use bf16 on CPU.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import make_vit_classifier
from transformers import TrainerCallback, TrainingArguments

from hf_vit_compress import CompressionConfig, count_macs
from hf_vit_compress.training.trainer import CompressionTrainer


class TinyImages(torch.utils.data.Dataset):
    def __init__(self, count: int = 16):
        generator = torch.Generator().manual_seed(0)
        self.pixels = torch.randn(count, 3, 16, 16, generator=generator)

    def __len__(self):
        return len(self.pixels)

    def __getitem__(self, index):
        return {"pixel_values": self.pixels[index], "labels": index % 5}


class DtypeProbe(TrainerCallback):
    """Records, at every optimizer step, the dtypes of the method's floating tensors and of the masks the gates
    applied in the last forward (read from the trainer's gate handle)."""

    def __init__(self, trainer):
        self.trainer = trainer
        self.state_dtypes: set[torch.dtype] = set()
        self.mask_dtypes: set[torch.dtype] = set()

    def on_step_end(self, args, state, control, **kwargs):
        method = self.trainer.method
        self.state_dtypes |= {t.dtype for t in method.search_state().values() if t.is_floating_point()}
        masks = self.trainer.gate_handle.current
        if masks is not None:
            tensors = [*masks.qk, *masks.v, *masks.mlp, masks.hidden, masks.hidden_keep]
            tensors += [g for gates in masks.block_gates if gates is not None for g in gates]
            self.mask_dtypes |= {t.dtype for t in tensors if torch.is_tensor(t)}


def _train_bf16(tmp_path, method: str):
    config = CompressionConfig(method=method, target_flops=0.5, search_fraction=0.75)
    config.ofb.arch_lr = 0.3
    args = TrainingArguments(
        output_dir=str(tmp_path), bf16=True, use_cpu=True, max_steps=6, per_device_train_batch_size=4,
        learning_rate=1e-3, logging_steps=1, save_strategy="no", report_to="none", disable_tqdm=True,
        dataloader_num_workers=0,
    )
    trainer = CompressionTrainer(model=make_vit_classifier().train(), args=args, compression_config=config,
                                 train_dataset=TinyImages())
    probe = DtypeProbe(trainer)
    trainer.add_callback(probe)
    # what autocast did to the model: the output dtype of a linear layer inside the forward
    linear_dtypes: set[torch.dtype] = set()
    fc1 = trainer.method.parts.blocks[0].fc1
    handle = fc1.register_forward_hook(lambda module, args, output: linear_dtypes.add(output.dtype))
    # the method's loss terms: expected MACs (OFB's FLOPs loss input) and the total the method returns
    loss_dtypes: set[torch.dtype] = set()
    method_loss = trainer.method.loss

    def recording_loss(task_loss, logits, inputs):
        total, logs = method_loss(task_loss, logits, inputs)
        loss_dtypes.add(total.dtype)
        if hasattr(trainer.method, "expected_macs") and not trainer.method.search_finished:
            loss_dtypes.add(trainer.method.expected_macs().dtype)
        return total, logs

    trainer.method.loss = recording_loss
    try:
        trainer.train()
    finally:
        handle.remove()
    return trainer, probe, linear_dtypes, loss_dtypes


@pytest.mark.parametrize("method", ["ofb", "uvc"])
def test_bf16_on_cpu_keeps_the_search_in_float32(tmp_path, method):
    if method == "uvc":
        pytest.importorskip("hf_vit_compress.methods.uvc.method", reason="methods/uvc.py is not importable yet")
    trainer, probe, linear_dtypes, loss_dtypes = _train_bf16(tmp_path, method)
    assert trainer.accelerator.mixed_precision == "bf16"
    assert torch.bfloat16 in linear_dtypes  # autocast really ran the matmuls in bf16
    assert probe.state_dtypes == {torch.float32}  # alpha, S logits, theta, duals, counts, decoder: float32 all along
    assert probe.mask_dtypes == {torch.float32}  # gates are built in float32 (cast only where they multiply)
    assert loss_dtypes == {torch.float32}  # expected MACs / FLOPs loss and the method's total loss
    method_state = trainer.method
    if method == "ofb":
        for module in method_state.searchable_modules().values():
            assert module.alpha.dtype == module.score_logits.dtype == torch.float32
    else:
        assert method_state.theta.dtype == torch.float32
        for name in ("head_duals", "mlp_duals", "vdim_duals", "budget_dual", "head_counts", "mlp_counts"):
            assert getattr(method_state, name).dtype == torch.float32
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 6 and all(math.isfinite(loss) for loss in losses)
    assert method_state.search_finished
    compressed = trainer.export_compressed_model()
    assert count_macs(compressed) <= method_state.target_macs
    assert next(compressed.parameters()).dtype == torch.float32
