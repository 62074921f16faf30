"""`CompressionTrainer`: a `transformers.Trainer` that searches a compressed architecture, then fine-tunes it.

The method (OFB, UVC) is attached to the model as the submodule `compression`, so its parameters and buffers
travel with the model everywhere the Trainer takes it: optimizer, Accelerate/DDP, mixed precision, checkpoints
and resume. Everything method-specific goes through `methods.base.CompressionMethod`.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F
from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.utils import logging

from .architecture import Architecture
from .config import CompressionConfig
from .device_logs import DeviceHistory, DeviceLogAccumulator
from .distill import distillation_loss, frozen_teacher_copy
from .export import export_compressed_model, save_atomically
from .gating import install_gates
from .methods import CompressionMethod, build_method
from .targets import model_parts

#: name of the submodule that holds the method's gates inside the compressed model
GATES_ATTRIBUTE = "compression"

logger = logging.get_logger(__name__)


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
        steps_per_epoch: optimizer steps per epoch, for the method's per-epoch schedules (OFB eliminates
            candidates `eliminations_per_epoch` times per epoch). Defaults to the train dataloader's length; a
            streaming dataset has none, so pass it (e.g. ceil(num_examples / global batch)); without it the
            whole run counts as one epoch.
        **kwargs: everything else `transformers.Trainer` takes (train_dataset, eval_dataset, data_collator,
            compute_metrics, callbacks, ...).

    A training step reads nothing back from the device outside logging steps (a GPU runs ahead of Python): the
    method's logged terms are summed on the device (`trainer.method_logs.last` holds the last step's terms by name
    as 0-dim tensors, `trainer.method_logs.totals()` their sums since the last log) and read in one transfer when
    the Trainer logs; `logging_nan_inf_filter` is applied on the device (see `training_step`).
    """

    def __init__(
        self,
        model: nn.Module | None = None,
        args=None,
        compression_config: CompressionConfig | None = None,
        teacher: nn.Module | None = None,
        steps_per_epoch: int | None = None,
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
        # Scale-out: DDP must NOT search for unused parameters. Method losses use parameters outside the model's
        # forward (the PMIM decoder, alpha in the FLOPs loss), which find_unused_parameters=True reports as unused
        # and then fails on ("Expected to mark a variable ready only once"); and the Trainer's own default for a
        # PreTrainedModel is True. Parameters that stop getting gradients (alpha after the search, the decoder once
        # PMIM is off, UVC's theta in its skip warm-up, skipped blocks) are handled in `compute_loss` instead.
        if args is None:
            args = TrainingArguments(output_dir="tmp_trainer")  # what Trainer would build, made explicit
        if args.ddp_find_unused_parameters is None:
            args.ddp_find_unused_parameters = False
        elif args.ddp_find_unused_parameters:
            raise ValueError(
                "TrainingArguments.ddp_find_unused_parameters=True is not supported by CompressionTrainer: allowed "
                "False or None (None -> False). The method's losses use parameters outside the model's forward, "
                "which DDP's unused-parameter search rejects; every trainable parameter gets a gradient each step "
                "instead."
            )
        if steps_per_epoch is not None and int(steps_per_epoch) < 1:
            raise ValueError(
                f"CompressionTrainer: steps_per_epoch={steps_per_epoch!r} is invalid: allowed None or >= 1"
            )
        self.steps_per_epoch = None if steps_per_epoch is None else int(steps_per_epoch)
        super().__init__(model=model, args=args, **kwargs)
        self.teacher = teacher
        # The loss is a per-batch mean; let the Trainer divide by gradient_accumulation_steps itself.
        self.model_accepts_loss_kwargs = False
        # The method's per-step terms and the search history stay on the device between logging steps.
        self.method_logs = DeviceLogAccumulator()
        self._history = DeviceHistory()
        self._nan_inf_filter_on_device = False
        self.add_callback(CompressionCallback(self))

    # -- access ------------------------------------------------------------------------------------------------
    @property
    def method(self) -> CompressionMethod:
        return getattr(self.accelerator.unwrap_model(self.model), GATES_ATTRIBUTE)

    @property
    def search_steps(self) -> int:
        return self.method.total_search_steps

    @property
    def compression_history(self) -> list[dict]:
        """The search's recorded values (`{"step": ..., **method.snapshot()}`), as Python numbers."""
        return self._history.records()

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
        weights = [
            (n, p) for n, p in opt_model.named_parameters() if p.requires_grad and id(p) not in method_parameters
        ]
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
            # summed on the device, read at logging steps; `method_logs.last` holds this step's terms by name
            self.method_logs.add({"task_loss": task_loss.detach(), **logs})
            if isinstance(model, nn.parallel.DistributedDataParallel):
                loss = loss + self._zero_gradient_term(model.module)
        return (loss, outputs) if return_outputs else loss

    @staticmethod
    def _zero_gradient_term(model: nn.Module) -> torch.Tensor:
        """0 * sum of every trainable parameter (scale-out). Under DDP (find_unused_parameters=False) every
        parameter must receive a gradient in every backward, or the next step fails with "Expected to have
        finished reduction in the prior iteration". Which parameters the search uses changes during training
        (alpha and the PMIM decoder go unused after the search, UVC's theta during its skip warm-up, weights of
        skipped blocks after it), so each one gets an exact zero contribution here. Only under DDP: a single
        process never sees a zero gradient where it would have seen none."""
        terms = [parameter.sum().float() for parameter in model.parameters() if parameter.requires_grad]
        return torch.stack(terms).sum() * 0.0

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

    # -- training step: no host-device synchronisation outside logging steps ------------------------------------
    def train(self, *args, **kwargs):
        self._user_filters_nan_inf = self.args.logging_nan_inf_filter
        try:
            return super().train(*args, **kwargs)
        finally:
            self.args.logging_nan_inf_filter = self._user_filters_nan_inf
            self._nan_inf_filter_on_device = False

    @contextlib.contextmanager
    def _user_nan_inf_filter(self):
        """Evaluation and saved arguments see the user's `logging_nan_inf_filter` while training filters on device."""
        if not self._nan_inf_filter_on_device:
            yield
            return
        self.args.logging_nan_inf_filter = True
        try:
            yield
        finally:
            self.args.logging_nan_inf_filter = False

    def training_step(self, model, inputs, num_items_in_batch=None) -> torch.Tensor:
        """The Trainer's step; with `logging_nan_inf_filter`, its filter is applied here on the device: the Trainer's
        own check reads every step's loss on the host (`torch.isnan(loss) or torch.isinf(loss)`), a device
        synchronisation per step, so it is switched off while training (where the Trainer keeps its running loss
        on the device as `_tr_loss`, as transformers 5 does; otherwise its own check stays)."""
        loss = super().training_step(model, inputs, num_items_in_batch)
        tracked = getattr(self, "_tr_loss", None)
        if getattr(self, "_user_filters_nan_inf", False) and torch.is_tensor(tracked):
            self._nan_inf_filter_on_device = True
            self.args.logging_nan_inf_filter = False
            # a non-finite loss counts as the mean of the losses since the last log (what the Trainer adds in its
            # place), without reading it
            steps = 1 + self.state.global_step - self._globalstep_last_logged
            finite = (loss - loss) == 0  # x - x is 0 for a finite x and NaN for NaN or +-inf
            loss = torch.where(finite, loss, tracked / steps)
        return loss

    def evaluation_loop(self, *args, **kwargs):
        with self._user_nan_inf_filter():
            return super().evaluation_loop(*args, **kwargs)

    # -- logging -----------------------------------------------------------------------------------------------
    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs:  # a training log: add the method's averaged terms and its schedules
            logs.update(self.method_logs.pop_means())  # one read of the device for all terms of all steps
            logs.update(self.method.metrics())
            self._history.records()  # convert the history recorded since the last log, in one read
        super().log(logs, start_time)

    def record_history(self, step: int) -> None:
        """Append the method's `snapshot()` at `step` to the history (device values are read later, in bulk)."""
        self._history.append(step, self.method.snapshot())

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
        writes the compressed model (safetensors + modeling files + auto_map), its `architecture.json` and
        `compression_config.json`, atomically: a failure leaves any previous folder untouched. Without a path it
        goes to `<args.output_dir>/compressed_model` (replacing `args.output_dir` itself would delete the
        checkpoints in it)."""
        method = self.method
        if _internal_call or not method.search_finished:
            return super().save_model(output_dir, _internal_call)
        output_dir = Path(output_dir) if output_dir else Path(self.args.output_dir) / "compressed_model"
        compressed = self.export_compressed_model()  # every rank builds it; only the main one writes
        if self.args.should_save:
            extra_files = {
                "architecture.json": json.dumps(method.export_architecture().to_dict()) + "\n",
                "compression_config.json": self.compression_config.to_json_string() + "\n",
            }
            save_atomically(compressed, output_dir, extra_files=extra_files)
        self.accelerator.wait_for_everyone()

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        # Checkpoints of the gated model are written under the model's own parameter names. `save_pretrained`
        # defaults to save_original_format=True, which renames ViT/DeiT weights to their legacy layout
        # (vit.encoder.layer.N.attention.attention.query...), while `Trainer._load_from_checkpoint` reloads with a
        # plain non-strict `load_state_dict`: a resumed run silently kept its initial block weights
        # (huggingface/transformers#48805).
        model = self.accelerator.unwrap_model(self.model, keep_torch_compile=False)
        model.__dict__["save_pretrained"] = functools.partial(type(model).save_pretrained, model,
                                                              save_original_format=False)
        try:
            with self._user_nan_inf_filter():  # training_args.bin holds the user's setting
                super()._save(output_dir, state_dict)
        finally:
            model.__dict__.pop("save_pretrained", None)

    # -- multi-process (scale-out) -----------------------------------------------------------------------------
    def _is_data_parallel(self) -> bool:
        """A multi-process DDP run whose ranks each hold the whole method (FSDP / DeepSpeed shard it: not checked)."""
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
            return False
        return not (getattr(self, "is_fsdp_enabled", False) or getattr(self, "is_deepspeed_enabled", False))

    def synchronize_search_state(self, when: str) -> bool:
        """Check that every rank holds bit-identical search state (OFB: alpha, S, active candidates, keep sets;
        UVC: theta, counts, duals, ...) and, if not, make rank 0's authoritative (broadcast) so that all ranks keep
        deciding the same. Every rank must call it (the trainer's callback does, at train begin and when the
        search ends). Returns True when the ranks already agreed (always True in a single process)."""
        if not self._is_data_parallel():
            return True
        import torch.distributed as dist

        method = self.method
        digests: list[str | None] = [None] * dist.get_world_size()
        dist.all_gather_object(digests, method.state_digest())
        if len(set(digests)) == 1:
            return True
        logger.warning(
            f"CompressionTrainer ({when}): the search state differs between ranks (digests "
            f"{[d[:12] for d in digests]}); broadcasting rank 0's to every rank."
        )
        method.broadcast_state(src=0)
        return False


class CompressionCallback(TrainerCallback):
    """Drives the method's schedules from the Trainer's state: resumable because all of it is a function of
    `state.global_step` plus the method's checkpointed buffers."""

    def __init__(self, trainer: CompressionTrainer):
        self.trainer = trainer

    def on_train_begin(self, args, state, control, train_dataloader=None, **kwargs):
        method = self.trainer.method
        # Scale-out: every rank must start from the same search state (DDP broadcast it when wrapping the model;
        # a resumed run loaded the same checkpoint everywhere): checked, and rank 0's enforced if not.
        self.trainer.synchronize_search_state("train begin")
        steps_per_epoch = self.trainer.steps_per_epoch  # explicit (streaming datasets: from the example count)
        if steps_per_epoch is None:
            try:
                steps_per_epoch = max(1, len(train_dataloader) // args.gradient_accumulation_steps)
            except TypeError:  # an IterableDataset without steps_per_epoch: the whole run counts as one epoch
                steps_per_epoch = state.max_steps
                logger.warning(
                    "CompressionTrainer: the train dataset has no length and no steps_per_epoch was given; per-epoch "
                    f"schedules (OFB candidate elimination) treat the whole run ({state.max_steps} steps) as one "
                    "epoch. Pass CompressionTrainer(steps_per_epoch=...) (the CLI derives it from "
                    "data.num_train_examples)."
                )
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
                # Scale-out: the final architecture must be the same on every rank (checked; rank 0's enforced).
                self.trainer.synchronize_search_state("end of search")
                self._record(state.global_step, method)

    def on_train_end(self, args, state, control, **kwargs):
        method = self.trainer.method
        was_searching = not method.search_finished
        method.finalize()
        if was_searching:  # stopped before the search's last step: same check as at the end of the search
            self.trainer.synchronize_search_state("train end")

    def _record(self, step: int, method: CompressionMethod) -> None:
        every = max(1, method.total_search_steps // 200)
        if step % every == 0 or method.search_finished:
            self.trainer.record_history(step)
