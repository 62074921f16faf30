"""`CompressionTrainer`: a `transformers.Trainer` that searches a compressed architecture, then fine-tunes it.

The method (OFB, UVC) is attached to the model as the submodule `compression`, so its parameters and buffers
travel with the model everywhere the Trainer takes it: optimizer, Accelerate/DDP, mixed precision, checkpoints
and resume. Everything method-specific goes through `methods.base.CompressionMethod`.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F
from transformers import Trainer, TrainerCallback

from .architecture import Architecture
from .config import CompressionConfig
from .distill import distillation_loss, frozen_teacher_copy
from .export import export_compressed_model, save_atomically
from .gating import install_gates
from .methods import CompressionMethod, build_method
from .targets import model_parts

#: name of the submodule that holds the method's gates inside the compressed model
GATES_ATTRIBUTE = "compression"


class CompressionTrainer(Trainer):
    """`transformers.Trainer` that compresses a ViT/DeiT image classifier under a FLOPs budget.

    The first `compression_config.search_fraction` of the optimizer steps search the architecture (the method's
    losses are added to the task loss); then the architecture is fixed and the remaining steps fine-tune it.
    Everything else (evaluation, logging, checkpoints, resume, gradient accumulation, Accelerate) is the
    Trainer's own.

    Args:
        model: a `ViTForImageClassification`, `DeiTForImageClassification` or
            `DeiTForImageClassificationWithTeacher` (gates are added to it in place).
        args: `transformers.TrainingArguments`.
        compression_config: what to compress to and with which method.
        teacher: optional frozen teacher (any image classifier with the same labels). UVC uses a frozen copy
            of the dense model when none is given; OFB distils only when one is given.
        **kwargs: everything else `transformers.Trainer` takes (train_dataset, eval_dataset, data_collator,
            compute_metrics, callbacks, ...).
    """

    def __init__(
        self,
        model: nn.Module | None = None,
        args=None,
        compression_config: CompressionConfig | None = None,
        teacher: nn.Module | None = None,
        **kwargs,
    ):
        if model is None:
            raise ValueError("CompressionTrainer needs `model` (a ViT/DeiT image classifier)")
        if not isinstance(compression_config, CompressionConfig):
            raise ValueError(
                f"CompressionTrainer needs compression_config=CompressionConfig(...), got {type(compression_config)}"
            )
        model_parts(model)  # clear error for unsupported models before anything else
        if hasattr(model, GATES_ATTRIBUTE):
            raise ValueError(f"model already has a `{GATES_ATTRIBUTE}` submodule: it is already being compressed")
        self.compression_config = compression_config
        method = build_method(model, compression_config)
        if teacher is None and method.uses_teacher_by_default:
            teacher = frozen_teacher_copy(model)  # taken before gates exist: the dense model
        model.add_module(GATES_ATTRIBUTE, method)
        self.gate_handle = install_gates(model, method)
        super().__init__(model=model, args=args, **kwargs)
        self.teacher = teacher
        # The loss is a per-batch mean; let the Trainer divide by gradient_accumulation_steps itself.
        self.model_accepts_loss_kwargs = False
        self.compression_history: list[dict] = []
        self._method_logs: dict[str, list[float]] = {}
        self.add_callback(CompressionCallback(self))

    # -- access ------------------------------------------------------------------------------------------------
    @property
    def method(self) -> CompressionMethod:
        return getattr(self.accelerator.unwrap_model(self.model), GATES_ATTRIBUTE)

    @property
    def search_steps(self) -> int:
        return self.method.total_search_steps

    # -- optimizer ---------------------------------------------------------------------------------------------
    def create_optimizer(self, model=None) -> torch.optim.Optimizer:
        """The Trainer's optimizer with the model weights in its usual decay/no-decay groups, plus the method's
        own groups (architecture logits, importance scores, decoder) with their own settings."""
        if self.optimizer is not None:
            return self.optimizer
        opt_model = self.model if model is None else model
        method = self.method
        method_parameters = {id(p) for p in method.parameters()}
        decay = set(self.get_decay_parameter_names(opt_model))
        weights = [(n, p) for n, p in opt_model.named_parameters() if p.requires_grad and id(p) not in method_parameters]
        groups = [
            {"params": [p for n, p in weights if n in decay], "weight_decay": self.args.weight_decay},
            {"params": [p for n, p in weights if n not in decay], "weight_decay": 0.0},
            *method.optimizer_groups(self.args.learning_rate),
        ]
        groups = [group for group in groups if group["params"]]
        optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, opt_model)
        self.optimizer = optimizer_cls(groups, **optimizer_kwargs)
        return self.optimizer

    # -- loss --------------------------------------------------------------------------------------------------
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        inputs = dict(inputs)
        labels = inputs.pop("labels", None)
        outputs = model(pixel_values=inputs["pixel_values"])
        if labels is None:
            raise ValueError("CompressionTrainer needs `labels` in every batch")
        task_loss = self._task_loss(outputs, labels, inputs["pixel_values"])
        loss = task_loss
        if model.training:
            loss, logs = self.method.loss(task_loss, outputs.logits, inputs)
            logs = {"task_loss": float(task_loss.detach()), **logs}
            for key, value in logs.items():
                self._method_logs.setdefault(key, []).append(value)
        return (loss, outputs) if return_outputs else loss

    def _task_loss(self, outputs, labels: torch.Tensor, pixel_values: torch.Tensor) -> torch.Tensor:
        smoothing = self.args.label_smoothing_factor
        if self.teacher is None:
            return F.cross_entropy(outputs.logits.float(), labels, label_smoothing=smoothing)
        if next(self.teacher.parameters()).device != pixel_values.device:
            self.teacher.to(pixel_values.device)
        with torch.no_grad():
            teacher_logits = self.teacher(pixel_values=pixel_values).logits
        student_logits = getattr(outputs, "cls_logits", None)
        distillation_logits = getattr(outputs, "distillation_logits", None)
        return distillation_loss(
            student_logits if student_logits is not None else outputs.logits,
            teacher_logits,
            labels,
            alpha=self.compression_config.distillation_alpha,
            temperature=self.compression_config.distillation_temperature,
            label_smoothing=smoothing,
            student_distillation_logits=distillation_logits,
        )

    # -- logging -----------------------------------------------------------------------------------------------
    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs:  # a training log: add the method's averaged terms and its schedules
            for key, values in self._method_logs.items():
                logs[key] = sum(values) / len(values)
            self._method_logs = {}
            logs.update(self.method.metrics())
        super().log(logs, start_time)

    # -- results -----------------------------------------------------------------------------------------------
    def finalize_architecture(self) -> Architecture:
        """End the search now (if it has not ended) and return the chosen architecture."""
        return self.method.finalize()

    def export_compressed_model(self):
        """The really smaller `CompressedViTForImageClassification` (ends the search first if needed)."""
        self.finalize_architecture()
        model = self.accelerator.unwrap_model(self.model)
        return export_compressed_model(model, self.method.export_architecture())

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Checkpoints (internal calls) save the gated model so training can resume. A user's call after the search
        writes the compressed model (safetensors + modeling files + auto_map), its architecture and the
        compression config, atomically: a failure leaves any previous folder untouched."""
        method = self.method
        if _internal_call or not method.search_finished:
            return super().save_model(output_dir, _internal_call)
        output_dir = Path(output_dir or self.args.output_dir)
        compressed = self.export_compressed_model()  # every rank builds it; only the main one writes
        if self.args.should_save:
            save_atomically(compressed, output_dir)
            (output_dir / "architecture.json").write_text(
                json.dumps(method.export_architecture().to_dict()) + "\n"
            )
            self.compression_config.save(output_dir / "compression_config.json")
        self.accelerator.wait_for_everyone()


class CompressionCallback(TrainerCallback):
    """Drives the method's schedules from the Trainer's state: resumable because all of it is a function of
    `state.global_step` plus the method's checkpointed buffers."""

    def __init__(self, trainer: CompressionTrainer):
        self.trainer = trainer

    def on_train_begin(self, args, state, control, train_dataloader=None, **kwargs):
        method = self.trainer.method
        steps_per_epoch = state.max_steps
        try:
            steps_per_epoch = max(1, len(train_dataloader) // args.gradient_accumulation_steps)
        except TypeError:  # an IterableDataset: no length; elimination runs by optimizer steps only
            pass
        search_steps = max(1, math.ceil(self.trainer.compression_config.search_fraction * state.max_steps))
        method.configure_schedule(search_steps, steps_per_epoch)
        method.set_progress(state.global_step)
        if state.global_step >= search_steps:
            method.finalize()

    def on_step_begin(self, args, state, control, **kwargs):
        self.trainer.method.set_progress(state.global_step)

    def on_optimizer_step(self, args, state, control, **kwargs):
        learning_rate = self.trainer.optimizer.param_groups[0]["lr"]
        self.trainer.method.after_optimizer_step(learning_rate)

    def on_step_end(self, args, state, control, **kwargs):
        method = self.trainer.method
        step = state.global_step - 1  # the step that just completed
        if not method.search_finished:
            method.on_step_end(step)
            self._record(state.global_step, method)
            if state.global_step >= method.total_search_steps:
                method.finalize()
                self._record(state.global_step, method)

    def on_train_end(self, args, state, control, **kwargs):
        self.trainer.method.finalize()

    def _record(self, step: int, method: CompressionMethod) -> None:
        every = max(1, method.total_search_steps // 200)
        if step % every == 0 or method.search_finished:
            self.trainer.compression_history.append({"step": step, **method.snapshot()})
