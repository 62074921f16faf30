"""`CompressionTrainer`: a `transformers.Trainer` that searches a compressed architecture, then fine-tunes it.

The method (OFB, UVC) is attached to the model as the submodule `compression`, so its parameters and buffers
travel with the model everywhere the Trainer takes it: optimizer, Accelerate/DDP, mixed precision, checkpoints
and resume. Everything method-specific goes through `methods.base.CompressionMethod`.
"""

from __future__ import annotations

import contextlib
import functools
import math
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F
from transformers import Trainer, TrainingArguments
from transformers.utils import logging

from ..config import CompressionConfig
from ..methods import CompressionMethod, build_method
from ..publishing.publish import architecture_facts
from ..publishing.record import CompressionRecord
from ..publishing.report import architecture_table
from ..surgery.architecture import Architecture
from ..surgery.export import architecture_params, export_compressed_model
from ..surgery.gating import install_gates
from ..surgery.targets import model_parts
from .callback import _NO_STEPS_MESSAGE, CompressionCallback, NoTrainingSteps
from .checkpoints import ResumeChecks
from .device_logs import DeviceHistory, DeviceLogAccumulator
from .distill import distillation_loss, frozen_teacher_copy
from .health import HealthCallback, TrainingHealth, check_trainer
from .peft_support import LoRARecovery, unwrap_peft_model
from .speed_budget import measure_speed, predicted_speed

#: name of the submodule that holds the method's gates inside the compressed model
GATES_ATTRIBUTE = "compression"
#: a warning when the final projection moves the MACs by more than this fraction of the budget
PROJECTION_WARNING = 0.1

logger = logging.get_logger(__name__)


class CompressionTrainer(ResumeChecks, Trainer):
    """`transformers.Trainer` that compresses a ViT/DeiT image classifier under a FLOPs budget.

    The first `compression_config.search_fraction` of the optimizer steps search the architecture (the method's
    losses are added to the task loss); then the architecture is fixed and the remaining steps fine-tune it.
    Everything else (evaluation, logging, checkpoints, resume, gradient accumulation, Accelerate) is the
    Trainer's own, with checks on top: a non-finite loss or search state stops training naming the step
    (`health.py`), a checkpoint is checked before resuming from it and `resume_from_checkpoint=True` skips
    incomplete ones (`checkpoints.py`), and data from `prepare_dataset` is augmented reproducibly per epoch.

    Args:
        model: a `ViTForImageClassification`, `DeiTForImageClassification` or
            `DeiTForImageClassificationWithTeacher` (gates are added to it in place), or a `peft.PeftModel`
            wrapping one with LoRA / IA3 adapters (merged into the weights first; `peft_support.py`).
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
    the Trainer logs. Non-finite values are recorded on the device too and checked at logging and save steps
    (`health.py`); transformers' `logging_nan_inf_filter`, a host read of every step's loss, is switched off.
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
        # Long on purpose: each part (method, gates, teacher, LoRA, logs, callbacks) must be wired before
        # Trainer.__init__ builds the optimizer and wraps the model; each step is a few lines with its reason.
        if model is None:
            raise ValueError("CompressionTrainer needs `model` (a ViT/DeiT image classifier)")
        model = unwrap_peft_model(model)  # a PeftModel: its adapters merged into the weights (logged)
        if not isinstance(compression_config, CompressionConfig):
            raise ValueError(
                f"CompressionTrainer needs compression_config=CompressionConfig(...), got {type(compression_config)}"
            )
        model_parts(model)  # clear error for unsupported models before anything else
        if hasattr(model, GATES_ATTRIBUTE):
            raise ValueError(f"model already has a `{GATES_ATTRIBUTE}` submodule: it is already being compressed")
        self.compression_config = compression_config
        method = build_method(model, compression_config)
        self._config_at_build = compression_config.to_dict()  # the method's budget and schedules come from it
        if teacher is None and method.uses_teacher_by_default:
            teacher = frozen_teacher_copy(model)  # taken before gates exist: the dense model
        model.add_module(GATES_ATTRIBUTE, method)
        self.gate_handle = install_gates(model, method)
        # finetune="lora": adapters injected now (inert until the search ends), so optimizer/DDP/checkpoints see them
        self.lora_recovery = (
            LoRARecovery(model, self.gate_handle, compression_config.lora, method)
            if compression_config.finetune == "lora" else None
        )
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
        # A non-finite loss stops the run (health.py), so there is nothing left for transformers' NaN filter to hide;
        # with it on, a diverged run logged "loss 0.0" (it also synchronises with the device every step).
        args.logging_nan_inf_filter = False
        super().__init__(model=model, args=args, **kwargs)
        self.teacher = teacher
        self.health = TrainingHealth("task loss (distillation)" if teacher is not None else "task loss (cross-entropy)")
        # The loss is a per-batch mean; let the Trainer divide by gradient_accumulation_steps itself.
        self.model_accepts_loss_kwargs = False
        #: every evaluate()/evaluate_dense() result, for the model card: {"kind", "step", "prefix", "metrics"}
        self.evaluations: list[dict] = []
        #: model card facts only the caller knows (publish.CARD_INFO_KEYS: dataset ids, license, eval dataset, ...)
        self.model_card_info: dict = {}
        # The method's per-step terms and the search history stay on the device between logging steps.
        self.method_logs = DeviceLogAccumulator()
        self._history = DeviceHistory()
        self._logged_final_ratio = False
        # an optimizer built before train() (the run's length unknown) is built again when training starts
        self._optimizer_before_training = False
        #: the search's own MACs ratio when it ended, before the final projection (None until then, or when this
        #: trainer did not see the search end: resumed after it)
        self.search_macs_ratio: float | None = None
        #: a speed budget's measurement at the end of training (`speed_budget.measure_speed`), None until then
        self.measured_speed: dict | None = None
        #: the final architecture as a table (`report.architecture_table`), logged when the search ends
        self.architecture_table: str | None = None
        self.add_callback(HealthCallback(self))  # first: reports a non-finite search state before it is finalised
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

    def _search_steps_for(self, max_steps: int) -> int:
        """Optimizer steps of the search in a run of `max_steps`."""
        return max(1, math.ceil(self.compression_config.search_fraction * max_steps))

    # -- optimizer ---------------------------------------------------------------------------------------------
    def create_optimizer(self, model=None) -> torch.optim.Optimizer:
        """The Trainer's optimizer with the model weights in its usual decay/no-decay groups, plus the method's
        own groups (architecture logits, importance scores, decoder) with their own settings."""
        in_training = self.state.max_steps > 0
        if self.optimizer is not None and not (in_training and self._optimizer_before_training):
            return self.optimizer
        # Built before train() (the run's length unknown), it is built again when training starts: the search
        # length sets OFB's architecture learning rate.
        self._optimizer_before_training = not in_training
        opt_model = self.model if model is None else model
        method = self.method
        if in_training:
            method.configure_schedule(self._search_steps_for(self.state.max_steps), method.steps_per_epoch)
        method_parameters = {id(p) for p in method.parameters()}
        lora = self.lora_recovery
        method_parameters |= {id(p) for p in lora.parameters} if lora else set()  # in a group of their own
        decay = set(self.get_decay_parameter_names(opt_model))
        weights = [
            (n, p) for n, p in opt_model.named_parameters() if p.requires_grad and id(p) not in method_parameters
        ]
        groups = [
            {"params": [p for n, p in weights if n in decay], "weight_decay": self.args.weight_decay},
            {"params": [p for n, p in weights if n not in decay], "weight_decay": 0.0},
            *method.optimizer_groups(self.args.learning_rate),
            *(lora.optimizer_groups(self.args.learning_rate, self.args.weight_decay) if lora else []),
        ]
        groups = [group for group in groups if group["params"]]
        optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, opt_model)
        self.optimizer = optimizer_cls(groups, **optimizer_kwargs)
        return self.optimizer

    def train(self, *args, **kwargs):
        try:
            return super().train(*args, **kwargs)
        except ValueError as error:
            # accelerate's message for a stream that ends before its first batch names no data: say what happened
            if self.state.global_step == 0 and "does not contain any data" in str(error):
                raise NoTrainingSteps(_NO_STEPS_MESSAGE) from error
            raise

    # -- step --------------------------------------------------------------------------------------------------
    def training_step(self, model, inputs, num_items_in_batch=None) -> torch.Tensor:
        lora = self.lora_recovery
        if lora is not None and self.method.search_finished:
            # Under DDP the frozen weights keep requires_grad (DDP fails when a parameter stops getting gradients).
            lora.begin_finetuning(self.optimizer, keep_requires_grad=self._is_data_parallel())
        loss = super().training_step(model, inputs, num_items_in_batch)
        if lora is not None:
            lora.drop_inactive_gradients()  # before clipping and the optimizer step
        return loss

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
            logs = {"task_loss": task_loss.detach(), **logs}
            # summed on the device, read at logging steps; `method_logs.last` holds this step's terms by name
            names, stacked = self.method_logs.add(logs)
            step = self.state.global_step + 1
            self.health.record_losses(step, {name: value for name, value in logs.items() if name not in names})
            if stacked is not None:  # the same stacked terms: the non-finite record costs four operations
                self.health.record_stacked_losses(step, names, stacked)
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

    # -- logging -----------------------------------------------------------------------------------------------
    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs:  # a training log: add the method's averaged terms and its schedules
            window = self.method_logs.pop_window()  # one read of the device for all terms of all steps
            logs.update(window.means())
            logs.update(self.method.loss_terms(window))  # loss = task_loss + loss/* (README: Reading the logs)
            logs.update(self.method.metrics())  # empty after the search: its values stopped changing
            if self.method.search_finished and not self._logged_final_ratio:
                macs = self.method.architecture_macs(self.method.finalize())  # the fixed architecture's
                logs["compressed_macs_ratio"] = macs / self.method.dense_macs
                self._logged_final_ratio = True  # once: it no longer changes
            self._history.records()  # convert the history recorded since the last log, in one read
        super().log(logs, start_time)

    def record_history(self, step: int) -> None:
        """Append the method's `snapshot()` at `step` to the history (device values are read later, in bulk)."""
        self._history.append(step, self.method.snapshot())

    # -- results -----------------------------------------------------------------------------------------------
    def finalize_architecture(self) -> Architecture:
        """End the search now (if it has not ended) and return the chosen architecture."""
        if not self.method.search_finished:
            self.search_macs_ratio = self.method.search_macs_ratio()  # before the final projection changes it
        return self.method.finalize()

    def end_search(self, when: str) -> None:
        """End the search during training: fix the architecture, check every rank holds the same one (scale-out:
        rank 0's is enforced otherwise), and log it as a table (`report.architecture_table`) at INFO level, with a
        warning when the final projection had to move the MACs far from where the search left them."""
        self.finalize_architecture()
        self.synchronize_search_state(when)
        facts = architecture_facts(self)
        self.architecture_table = architecture_table(facts)
        if not self.is_world_process_zero():
            return
        logger.info(f"Search finished at step {self.state.global_step} ({when}).\n{self.architecture_table}")
        method = self.method
        search, target = self.search_macs_ratio, method.target_cost_ratio  # in the budget's unit (MACs or ms)
        if search is not None and abs(search - target) > PROJECTION_WARNING * target:
            final = method.architecture_cost(method.final_architecture) / method.dense_cost
            logger.warning(
                f"The search ended ({when}, step {self.state.global_step}) at {search:.3f} of the dense "
                f"{method.cost.unit} for a budget of {target:.3f}; the final projection "
                f"{'removed' if search > target else 'added back'} units to land at {final:.3f}. The search did not "
                "reach the budget by itself: search longer, or weigh its budget term more (ofb.flops_loss_weight, "
                "uvc.budget_dual_lr)."
            )

    def phase(self) -> str:
        """What training is doing now, for the progress bar: "OFB search", "fine-tuning" or "LoRA fine-tuning"."""
        if not self.method.search_finished:
            return f"{self.compression_config.method.upper()} search"
        return "LoRA fine-tuning" if self.lora_recovery is not None else "fine-tuning"

    def export_compressed_model(self):
        """The really smaller `CompressedViTForImageClassification` (ends the search first if needed)."""
        self.finalize_architecture()
        model = self.accelerator.unwrap_model(self.model)
        lora = self.lora_recovery
        with lora.merged_into_weights() if lora else contextlib.nullcontext():  # a plain model, adapters merged
            return export_compressed_model(model, self.method.export_architecture())

    def measure_speed_budget(self) -> dict | None:
        """Under a speed budget with `latency.measure_after`: time the exported model against the dense one on the
        budget's device, dtype and batch size (interleaved), keep the figures for the report and the card, and warn
        when the measured speed-up is under 0.9x the target (`speed_budget.py`). Runs at the end of `train()`."""
        method = self.method
        if method.cost.kind != "latency" or not self.compression_config.latency.measure_after:
            return None
        model = self.accelerator.unwrap_model(self.model)
        target = float(method.dense_cost) / float(method.target_cost)
        self.measured_speed = measure_speed(self.export_compressed_model(), model.config,
                                            self.compression_config.latency, target)
        return self.measured_speed

    def speed_budget_facts(self, architecture: Architecture) -> dict | None:
        """A speed budget's predicted (and, once measured, measured) speed-up; None for a MACs budget."""
        method = self.method
        if method.cost.kind != "latency":
            return None
        return {**predicted_speed(method, architecture, self.search_macs_ratio), **(self.measured_speed or {})}

    def compression_record(self) -> CompressionRecord:
        """The run's facts for publishing (report, card, sidecars): publishing reads this, not the trainer."""
        model = self.accelerator.unwrap_model(self.model)
        architecture = self.method.export_architecture()
        speed = self.speed_budget_facts(architecture)
        return CompressionRecord(
            dense_config=model.config, compression_config=self.compression_config, architecture=architecture,
            dense_macs=int(self.method.dense_macs), dense_params=self._dense_params(model),
            compressed_macs=self.method.architecture_macs(architecture),
            compressed_params=architecture_params(model, architecture), steps=self.state.global_step,
            training_args=self.args, export=self.export_compressed_model,
            # under a speed budget the search's own ratio is of predicted ms: it goes with the speed facts
            search_macs_ratio=self.search_macs_ratio if speed is None else None, speed_budget=speed,
            evaluations=self.evaluations, eval_dataset_size=_length(self.eval_dataset),
            card_info=self.model_card_info,
        )

    def _dense_params(self, model: nn.Module) -> int:
        """Parameters of the dense model: the gated model's, less the method's and any LoRA adapters'."""
        added = {id(parameter) for parameter in self.method.parameters()}
        lora = self.lora_recovery
        added |= {id(parameter) for parameter in lora.parameters} if lora is not None else set()
        return sum(parameter.numel() for parameter in model.parameters() if id(parameter) not in added)

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict[str, float]:
        """`Trainer.evaluate`, remembered for the model card (after the search: the compressed model's figures)."""
        metrics = super().evaluate(eval_dataset, ignore_keys, metric_key_prefix)
        if eval_dataset is None and not isinstance(self.eval_dataset, dict):
            kind = "compressed" if self.method.search_finished else "search"
            self.evaluations.append({"kind": kind, "step": self.state.global_step, "prefix": metric_key_prefix,
                                     "metrics": metrics})
        return metrics

    def evaluate_dense(self, metric_key_prefix: str = "dense") -> dict[str, float]:
        """Evaluate the model with every gate off: before `train()`, the source (dense) model. Metrics are named
        `dense_*` (e.g. `dense_accuracy`) and go on the model card next to the compressed model's."""
        self.gate_handle.enabled = False
        try:
            metrics = super().evaluate(metric_key_prefix=metric_key_prefix)
        finally:
            self.gate_handle.enabled = True
        self.evaluations.append({"kind": "dense", "step": self.state.global_step, "prefix": metric_key_prefix,
                                 "metrics": metrics})
        return metrics

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Checkpoints (internal calls) save the gated model so training can resume. A user's call after the search
        writes the compressed model (safetensors + modeling files + auto_map), its image processor
        (`processing_class`), `architecture.json`, `compression_config.json`, `compression_report.json` and a
        README.md model card, atomically (see `publish.py`). Without a path it goes to
        `<args.output_dir>/compressed_model` (replacing `args.output_dir` itself would delete the checkpoints in
        it). Nothing else in the folder (checkpoints, your files) is removed, and an interruption leaves the old or
        the new model (`saving.save_atomically`). With `args.push_to_hub` it then pushes the same files
        (`push_to_hub`); a call before the search has finished saves the gated model and pushes nothing. Every save
        first checks that training stayed finite (`health.py`)."""
        check_trainer(self, f"before saving to {output_dir or self.args.output_dir}", include_weights=True)
        if _internal_call or not self.method.search_finished:
            return super().save_model(output_dir, _internal_call=True)
        from .hub import save_trainer_model

        save_trainer_model(self, output_dir or Path(self.args.output_dir) / "compressed_model")
        self.accelerator.wait_for_everyone()
        if self.args.push_to_hub:
            self.push_to_hub(commit_message="Model save", revision=self.args.hub_revision)

    def push_to_hub(self, commit_message: str | None = "End of training", blocking: bool = True,
                    token: str | None = None, revision: str | None = None, private: bool | None = None, **kwargs):
        """Upload the COMPRESSED model with its image processor, sidecars and model card (the files `save_model`
        writes), staged in a temporary folder, to `args.hub_model_id`; never `args.output_dir` (the gated dense
        model and checkpoints). Arguments as in `Trainer.push_to_hub` (`hub_token`, `hub_private_repo`,
        `hub_revision` are the defaults); `kwargs` are model card facts (`publish.CARD_INFO_KEYS`, plus Trainer's
        `finetuned_from` / `dataset_tags`). Returns the `CommitInfo` (a `Future` if not `blocking`; None on
        non-main processes)."""
        from .hub import push_trainer_model

        return push_trainer_model(self, commit_message=commit_message, blocking=blocking, token=token,
                                  revision=revision, private=private, **kwargs)

    def _push_from_checkpoint(self, checkpoint_folder: str) -> None:
        # Trainer pushes every checkpoint's model files to the repo root: here the gated dense model, which must not
        # reach the Hub. The compressed model is pushed by push_to_hub() / save_model() instead.
        if not getattr(self, "_told_no_checkpoint_push", False):
            logger.warning("CompressionTrainer does not push checkpoints (they hold the gated dense model); "
                           "push_to_hub() and save_model() push the compressed model.")
            self._told_no_checkpoint_push = True

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


def _length(dataset) -> int | None:
    """Examples in a map-style dataset; None for a stream, a dict of datasets or none."""
    try:
        return len(dataset) if dataset is not None and not isinstance(dataset, dict) else None
    except TypeError:  # a stream
        return None
