"""Finite checks of tensors: `assert_finite` names every tensor of a model (or any named tensors) that holds a
NaN/Inf, with one host synchronisation for all of them. Shared by the exporter, the saver and the trainer's health
checks (`training/health.py`)."""

from __future__ import annotations

from collections.abc import Iterable

import torch

#: how many tensor names an error lists before "(+N more)"
MAX_NAMES = 4


class NonFiniteError(FloatingPointError):
    """Training produced (or was given) NaN/Inf values; the message names the step and what was non-finite."""


def non_finite_tensors(named_tensors: Iterable[tuple[str, torch.Tensor]]) -> list[str]:
    """Names of the floating-point tensors that hold a NaN or Inf (one synchronisation for all of them)."""
    names, tensors = [], []
    for name, tensor in named_tensors:
        if tensor is not None and tensor.is_floating_point() and tensor.numel():
            names.append(name)
            tensors.append(tensor.detach())
    if not tensors:
        return []
    maxima = peaks(tensors)
    return [name for name, bad in zip(names, (~torch.isfinite(maxima)).tolist()) if bad]


def peaks(tensors: list[torch.Tensor]) -> torch.Tensor:
    """max |x| per tensor as one float32 vector on the first tensor's device (NaN and Inf survive; a finite tensor
    never overflows). No host synchronisation: no tensor is built from host data."""
    device = tensors[0].device
    if all(tensor.device == device for tensor in tensors):
        return torch.stack([norm.float() for norm in torch._foreach_norm(tensors, float("inf"))])
    return torch.stack([tensor.abs().amax().float().to(device) for tensor in tensors])


def name_list(names: list[str]) -> str:
    """Up to `MAX_NAMES` names, then how many more."""
    shown = ", ".join(names[:MAX_NAMES])
    return shown + (f" (+{len(names) - MAX_NAMES} more)" if len(names) > MAX_NAMES else "")


def assert_finite(named_tensors: Iterable[tuple[str, torch.Tensor]], what: str, advice: str = "") -> None:
    """Raise `NonFiniteError` naming every tensor of `named_tensors` that holds a NaN/Inf.

    Args:
        named_tensors: (name, tensor) pairs, e.g. `model.state_dict().items()`.
        what: what they are, for the message ("the starting model", "the exported model").
        advice: what to do about it, appended to the message.
    """
    bad = non_finite_tensors(named_tensors)
    if bad:
        raise NonFiniteError(f"{what} has non-finite (NaN/Inf) values in {len(bad)} tensor(s): {name_list(bad)}"
                             + (f". {advice}" if advice else ""))


def model_tensors(model: torch.nn.Module) -> list[tuple[str, torch.Tensor]]:
    """Every parameter and buffer of `model`, by name (what a save writes)."""
    return [*model.named_parameters(), *model.named_buffers()]


__all__ = ["MAX_NAMES", "NonFiniteError", "assert_finite", "model_tensors", "name_list", "non_finite_tensors", "peaks"]
