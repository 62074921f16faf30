"""Non-finite training stops loudly: a NaN/Inf loss, search state or weight is an error that names the first bad
step and what went bad, never a "completed" run that saves a NaN model.

Per step nothing here synchronises the host with the device: `TrainingHealth.record_losses` and
`record_state` keep, on the device, the first optimizer step at which each named value was non-finite
(`torch.where`). `check` reads that record back (one synchronisation) at the points where a wrong value would
escape: logging and evaluation steps, before every save (checkpoint or model), when the search ends, when training
ends, and every `CHECK_INTERVAL` steps otherwise; it raises `NonFiniteError` if anything was non-finite.
`assert_finite` is the same check for a model's tensors (starting model, checkpoint, exported model), naming them.

Written by hand: neither transformers nor accelerate stop a run on a non-finite loss (transformers'
`logging_nan_inf_filter` only hides it from the logged average).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

import torch
from transformers import TrainerCallback

from ..numerics import NonFiniteError, assert_finite, model_tensors, name_list, non_finite_tensors, peaks

#: "never non-finite" in the device-side record (larger than any step; MIN-reduces across ranks)
NEVER = 2**62

#: what each logged value of the trainer / methods is, for the error message
COMPONENTS = {
    "loss": "total loss",
    "task_loss": "task loss",
    "pmim_loss": "PMIM reconstruction loss",
    "module_loss": "one-hot/module loss",
    "flops_loss": "FLOPs loss",
    "expected_macs_ratio": "expected MACs (FLOPs loss input)",
    "expected_latency_ratio": "expected latency by the latency table (speed budget)",
    "uvc/ratio": "UVC budget ratio R",
    "uvc/budget_dual": "UVC budget dual z",
}

HINT = (
    "Lower the learning rate(s) or enable gradient clipping (TrainingArguments.max_grad_norm), check the labels "
    "(cross-entropy of a batch whose labels are all -100 is NaN) and the starting weights; resume from a checkpoint "
    "saved before that step."
)


def describe_state_tensor(name: str) -> str:
    """What a tensor of a method's search state is (`attention.0.alpha` -> OFB architecture logits ...)."""
    leaf = name.rsplit(".", 1)[-1]
    if leaf == "alpha":
        return "OFB architecture logits"
    if leaf == "score_logits":
        return "OFB importance scores"
    if name.startswith("pmim."):
        return "PMIM decoder"
    if leaf == "theta":
        return "UVC skip-gate logits theta"
    if leaf == "theta_momentum":
        return "UVC theta momentum"
    if leaf.endswith("_counts"):
        return "UVC removal counts"
    if leaf.endswith("_duals") or leaf == "budget_dual":
        return "UVC duals"
    return "search state"


class _FirstBadRecord:
    """Per name, the first step at which its value was non-finite, kept on the device (NEVER = not yet).

    An update is four operations whatever the number of names (every one a kernel launch on a GPU, so this stays
    small next to a training step): the non-finite flags, the step written where they are set, `minimum` keeps
    the first.
    """

    def __init__(self):
        self.slots: dict[str, int] = {}
        self.first: torch.Tensor | None = None
        self._index_cache: dict[tuple[str, ...], torch.Tensor] = {}

    def update(self, step: int, names: tuple[str, ...], values: torch.Tensor) -> None:
        """Record which of `values` (one float per name, on the device) are NaN or Inf at `step`."""
        new = [name for name in names if name not in self.slots]
        if new or self.first is None:
            for name in new:
                self.slots[name] = len(self.slots)
            grown = torch.full((len(self.slots),), NEVER, dtype=torch.long, device=values.device)
            if self.first is not None:
                grown[: self.first.numel()] = self.first.to(values.device)
            self.first = grown
            self._index_cache.clear()
        bad = (values - values).ne(0)  # x - x is NaN exactly for NaN and +-Inf (isfinite decomposes into 4 ops)
        if len(names) == len(self.slots) and all(self.slots[name] == i for i, name in enumerate(names)):
            torch.minimum(self.first, self.first.masked_fill(bad, step), out=self.first)  # the usual case
            return
        index = self._index_cache.get(names)
        if index is None or index.device != values.device:
            index = torch.tensor([self.slots[name] for name in names], device=values.device)
            self._index_cache[names] = index
        current = self.first[index]
        self.first[index] = torch.minimum(current, current.masked_fill(bad, step))


class TrainingHealth:
    """The device-side record of non-finite values during training, and its check.

    Args:
        task_loss_name: how to call the task loss in errors ("task loss (cross-entropy)" or "... (distillation)").
    """

    def __init__(self, task_loss_name: str = "task loss"):
        self.task_loss_name = task_loss_name
        self.reset()

    def reset(self) -> None:
        self._losses = _FirstBadRecord()
        self._state = _FirstBadRecord()
        self._host_first: dict[str, int] = {}  # values that arrived as Python floats: checked for free

    # -- per step (no synchronisation) ---------------------------------------------------------------------------
    def record_losses(self, step: int, values: Mapping[str, torch.Tensor | float]) -> None:
        """Record the loss terms of optimizer step `step` (1-based). Tensors stay on the device; floats (already
        on the host) are checked directly."""
        names, tensors = [], []
        for name, value in values.items():
            if torch.is_tensor(value):
                names.append(name)
                tensors.append((value.detach() if value.requires_grad else value).reshape(()).float())
            elif isinstance(value, float) and not math.isfinite(value):
                self._host_first.setdefault(name, step)
        if tensors:
            device = tensors[0].device
            self.record_stacked_losses(step, tuple(names), torch.stack([tensor.to(device) for tensor in tensors]))

    def record_stacked_losses(self, step: int, names: tuple[str, ...], stacked: torch.Tensor) -> None:
        """`record_losses` for terms already stacked into one vector on the device (as the trainer's log
        accumulator stacks them): four operations, whatever the number of terms."""
        self._losses.update(step, names, stacked)

    def record_state(self, step: int, named_tensors: Mapping[str, torch.Tensor]) -> None:
        """Record which floating-point tensors (the method's search state) are non-finite after step `step`."""
        named = {name: t for name, t in named_tensors.items() if t.is_floating_point() and t.numel()}
        if named:
            with torch.no_grad():  # no detach per tensor: one operation fewer each
                self._state.update(step, tuple(named), peaks(list(named.values())))

    # -- check points (one synchronisation) ----------------------------------------------------------------------
    def first_bad(self, reduce_across_ranks: bool = False) -> tuple[dict[str, int], dict[str, int]]:
        """({loss name: first bad step}, {state tensor name: first bad step}) of everything non-finite so far."""
        records = (self._losses, self._state)
        vectors = [record.first if record.first is not None else torch.empty(0, dtype=torch.long)
                   for record in records]
        device = next((vector.device for vector in vectors if vector.numel()), torch.device("cpu"))
        combined = torch.cat([vector.to(device) for vector in vectors])
        if reduce_across_ranks and combined.numel():
            import torch.distributed as dist

            dist.all_reduce(combined, op=dist.ReduceOp.MIN)
        values = combined.tolist()  # the one synchronisation
        found = []
        for record, offset in zip(records, (0, vectors[0].numel())):
            found.append({name: values[offset + slot] for name, slot in record.slots.items()
                          if values[offset + slot] != NEVER})
        losses, state = found
        for name, step in self._host_first.items():
            losses[name] = min(step, losses.get(name, step))
        return losses, state

    def check(self, where: str, weights: Iterable[tuple[str, torch.Tensor]] | None = None,
              reduce_across_ranks: bool = False) -> None:
        """Raise `NonFiniteError` if any recorded loss term or search-state tensor was non-finite, or if one of
        `weights` is non-finite now.

        Args:
            where: the check point, for the message ("at logging step 20", "before saving checkpoint-40").
            weights: (name, tensor) pairs of the model to check as well (saves and the end of training).
            reduce_across_ranks: MIN-reduce the record over a data-parallel group (every rank must call it).
        """
        losses, state = self.first_bad(reduce_across_ranks)
        bad_weights = non_finite_tensors(weights) if weights is not None else []
        if not (losses or state or bad_weights):
            return
        raise NonFiniteError(self.describe(where, losses, state, bad_weights))

    def describe(self, where: str, losses: dict[str, int], state: dict[str, int], bad_weights: list[str]) -> str:
        """The error message: first bad step, then each loss term and each kind of search state with the step at
        which it went non-finite, then the weights that are non-finite now."""
        steps = list(losses.values()) + list(state.values())
        if steps:
            parts = [f"training produced non-finite (NaN/Inf) values, first at optimizer step {min(steps)} "
                     f"(checked {where})"]
        else:
            parts = [f"non-finite (NaN/Inf) weights found {where}"]
        for name, step in sorted(losses.items(), key=lambda item: (item[1], item[0])):
            label = self.task_loss_name if name == "task_loss" else COMPONENTS.get(name, name)
            parts.append(f"{label} [{name}] from step {step}")
        groups: dict[str, list[tuple[int, str]]] = {}
        for name, step in state.items():
            groups.setdefault(describe_state_tensor(name), []).append((step, GATES_PREFIX + name))
        for label, entries in sorted(groups.items(), key=lambda item: min(item[1])):
            entries.sort()
            names = [name for _, name in entries]
            parts.append(f"search state: {label} after step {entries[0][0]} ({name_list(names)})")
        if bad_weights:
            parts.append(f"weights now non-finite: {name_list(bad_weights)}")
        return "; ".join(parts) + ". Nothing was saved with these values. " + HINT


#: prefix of the method's tensors inside the model (trainer.GATES_ATTRIBUTE; repeated to avoid an import cycle)
GATES_PREFIX = "compression."
#: steps between two checks when nothing else (logging, saving, evaluation) asks for one
CHECK_INTERVAL = 100


def check_trainer(trainer, where: str, include_weights: bool = False) -> None:
    """`trainer.health.check` for a `CompressionTrainer`: its (unwrapped) model's weights if asked, reduced over
    the data-parallel group so that every rank stops together. Every rank must call it."""
    weights = None
    if include_weights:
        weights = model_tensors(trainer.accelerator.unwrap_model(trainer.model))
    trainer.health.check(where, weights, reduce_across_ranks=trainer._is_data_parallel())


class HealthCallback(TrainerCallback):
    """Feeds `trainer.health` and checks it: the starting model at train begin, the search state after every step,
    everything at logging / evaluation / save steps, every `CHECK_INTERVAL` steps, when the search ends, at each
    epoch's end and at train end. Added before `CompressionCallback`, so a non-finite search state is reported
    before the search is finalised from it."""

    def __init__(self, trainer):
        self.trainer = trainer

    def on_train_begin(self, args, state, control, **kwargs):
        trainer = self.trainer
        trainer.health.reset()
        what = "the model loaded from the checkpoint" if state.global_step else "the starting model"
        assert_finite(model_tensors(trainer.accelerator.unwrap_model(trainer.model)), what,
                      "Training would only spread them; load or build a model with finite weights.")
        if trainer.teacher is not None:
            assert_finite(model_tensors(trainer.teacher), "the teacher", "Pass a teacher with finite weights.")

    def on_step_end(self, args, state, control, **kwargs):
        trainer = self.trainer
        method = trainer.method
        trainer.health.record_state(state.global_step, dict(method.search_state()))
        search_ends = not method.search_finished and state.global_step >= method.total_search_steps
        if (control.should_log or control.should_evaluate or control.should_save or control.should_training_stop
                or search_ends or state.global_step % CHECK_INTERVAL == 0):
            check_trainer(trainer, f"after step {state.global_step}")

    def on_epoch_end(self, args, state, control, **kwargs):
        check_trainer(self.trainer, f"at the end of epoch {round(state.epoch or 0)}")

    def on_train_end(self, args, state, control, **kwargs):
        check_trainer(self.trainer, f"at the end of training (step {state.global_step})", include_weights=True)


__all__ = [
    "HealthCallback",
    "NonFiniteError",
    "TrainingHealth",
    "assert_finite",
    "check_trainer",
    "describe_state_tensor",
    "non_finite_tensors",
]
