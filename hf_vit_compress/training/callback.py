"""`CompressionCallback`: drives the method's schedules from the Trainer's state (search start, steps, end), and
`NoTrainingSteps`, raised when a run trained nothing."""

from __future__ import annotations

import math

from transformers import Trainer, TrainerCallback
from transformers.utils import logging

from ..data.prepared import augmentation_keys
from ..methods.base import CompressionMethod
from .checkpoints import RunAlreadyComplete
from .health import model_tensors
from .progress import describe_progress

logger = logging.get_logger(__name__)


class NoTrainingSteps(ValueError):
    """`CompressionTrainer.train()` ran no optimizer step: the training data yielded no batch."""


_NO_STEPS_MESSAGE = ("training ran 0 steps: the training data gave no batch (an empty file or stream, or every "
                     "example skipped), so there is no compressed model to save")


class CompressionCallback(TrainerCallback):
    """Drives the method's schedules from the Trainer's state: resumable because all of it is a function of
    `state.global_step` plus the method's checkpointed buffers."""

    def __init__(self, trainer: Trainer):  # a CompressionTrainer (not imported: it imports this module)
        self.trainer = trainer

    def on_train_begin(self, args, state, control, train_dataloader=None, **kwargs):
        method = self.trainer.method
        config = self.trainer.compression_config
        config.validate()
        changed = sorted(key for key, value in config.to_dict().items() if self.trainer._config_at_build[key] != value)
        if changed:
            raise ValueError(f"CompressionConfig fields {changed} were changed after CompressionTrainer was built, "
                             "which has already set up its method from them: build a new CompressionTrainer instead")
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
        search_steps = self.trainer._search_steps_for(state.max_steps)
        method.configure_schedule(search_steps, steps_per_epoch)
        method.set_progress(state.global_step)
        if state.global_step >= search_steps:
            method.finalize()
        if state.global_step >= state.max_steps > 0:  # resumed from the run's last checkpoint: no step is left
            raise RunAlreadyComplete()
        describe_progress(self.trainer, self.trainer.phase())

    def on_epoch_begin(self, args, state, control, **kwargs):
        # Data from `prepare_dataset`: key each example's augmentation by (seed, epoch, index), so a resumed run
        # draws exactly what the uninterrupted one drew (the Trainer skips the done batches without reading them).
        keys = augmentation_keys(self.trainer.train_dataset)
        if keys is not None:
            keys.set_epoch(math.floor((state.epoch or 0.0) + 1e-6))

    def on_step_begin(self, args, state, control, **kwargs):
        self.trainer.method.set_progress(state.global_step)

    def on_optimizer_step(self, args, state, control, **kwargs):
        learning_rate = self.trainer.optimizer.param_groups[0]["lr"]
        try:
            self.trainer.method.after_optimizer_step(learning_rate)
        except (ValueError, RuntimeError) as error:  # e.g. UVC's counts cannot be rounded once they are NaN
            self.trainer.health.check(f"when the method's update after step {state.global_step + 1} failed ({error})",
                                      model_tensors(self.trainer.accelerator.unwrap_model(self.trainer.model)))
            raise

    def on_step_end(self, args, state, control, **kwargs):
        method = self.trainer.method
        step = state.global_step - 1  # the step that just completed
        if not method.search_finished:
            method.on_step_end(step)
            self._record(state.global_step, method)
            if state.global_step >= method.total_search_steps:
                self.trainer.end_search("end of search")
                self._record(state.global_step, method)
                describe_progress(self.trainer, self.trainer.phase())

    def on_train_end(self, args, state, control, **kwargs):
        if state.global_step == 0:  # e.g. an empty stream: the Trainer stops quietly, the "compressed" model is dense
            raise NoTrainingSteps(_NO_STEPS_MESSAGE)
        if not self.trainer.method.search_finished:  # stopped before the search's last step
            self.trainer.end_search("train end")
        if self.trainer.is_world_process_zero():  # a speed budget: time the result (one process is enough)
            self.trainer.measure_speed_budget()

    def _record(self, step: int, method: CompressionMethod) -> None:
        every = max(1, method.total_search_steps // 200)
        if step % every == 0 or method.search_finished:
            self.trainer.record_history(step)
