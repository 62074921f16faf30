"""The one place a compression method plugs in.

A method is an `nn.Module` attached to the model (so optimizers, DDP, mixed precision and checkpoints see its
parameters and buffers). It owns its gates, its losses, its schedules and `decide()`; the trainer, the exporter
and the compressed-model format are shared.

Life cycle, driven by `CompressionTrainer`:
    set_progress(step)            before every optimizer step (schedules read the step; resumable by design)
    compute_masks()               at the start of every model forward (via gating.GateHandle)
    loss(...)                     adds the method's terms to the task loss
    after_optimizer_step(lr)      after the optimizer stepped (proximal / dual updates)
    on_step_end(step)             after every optimizer step (candidate elimination, ...)
    finalize()                    once, when the search ends: the architecture is fixed, masks become hard

Multi-process (data-parallel) runs: everything the search decides lives in the method's parameters and buffers, so
it is part of the model that DDP keeps in sync and that checkpoints save. `state_digest()` and `broadcast_state()`
let the trainer CHECK that every rank holds the same search state (at train begin and when the search ends) and
make rank 0's authoritative if they ever differ; `state_changed()` drops the Python-side caches derived from them.
"""

from __future__ import annotations

import hashlib

import torch
from torch import nn

from ..config import CompressionConfig
from ..surgery.architecture import Architecture
from ..surgery.cost import BudgetCost, budget_cost
from ..surgery.flops import Geometry, architecture_macs, dense_macs, geometry
from ..surgery.gating import Masks, architecture_masks
from ..surgery.targets import ModelParts, model_parts
from ..training.device_logs import LogWindow
from .registry import method_entry


class CompressionMethod(nn.Module):
    """Base class of OFB, UVC and any later method.

    Args:
        model: the dense HF model being compressed (not registered as a submodule of the method).
        config: the `CompressionConfig`.
    """

    name: str = "base"
    #: whether the method distils from a teacher even when the user passes none (a frozen copy of the dense model)
    uses_teacher_by_default: bool = False

    def __init__(self, model: nn.Module, config: CompressionConfig):
        super().__init__()
        self.config = config
        # Plain attributes (not submodules): the method lives inside the model, not the other way round.
        self.__dict__["parts"] = model_parts(model)
        self.__dict__["model_config"] = model.config
        self.geometry: Geometry = geometry(model)
        self.dense_macs = dense_macs(model)
        self.target_macs = config.target_macs(self.dense_macs)
        if self.target_macs >= self.dense_macs:  # only target_gmacs can: target_flops is < 1
            raise ValueError(
                f"CompressionConfig.target_gmacs={config.target_gmacs} is invalid: allowed a budget below the dense "
                f"model's {self.dense_macs / 1e9:.6g} GMACs (at or above it nothing would be compressed; the papers' "
                "\"FLOPs\" are MACs: use the same number as them, or target_flops for a fraction)"
            )
        # What the budget is counted in (MACs, or a latency table's milliseconds for a speed budget): the methods
        # hold `target_cost` with these prices; for a MACs budget they equal dense_macs / target_macs.
        self.cost: BudgetCost = budget_cost(model, config)
        self.dense_cost = self.dense_macs if self.cost.kind == "macs" else self.cost.dense()
        self.target_cost = config.target_cost(self.dense_cost, self.dense_macs)
        if self.cost.kind == "latency" and self.target_cost >= self.dense_cost:
            raise ValueError(
                f"CompressionConfig.target_latency_ms={config.target_latency_ms} is invalid: allowed a budget below "
                f"the dense model's predicted {self.dense_cost:.4g} ms on this device (nothing would be compressed)")
        self.total_search_steps = 1
        self.steps_per_epoch = 1.0
        self.register_buffer("finalized", torch.tensor(False))
        # Host copy of `finalized`, read every step: reading the buffer would synchronise with the device. Kept in
        # step by finalize(), state-dict loads and state_changed().
        self._finalized = False
        self.final_architecture: Architecture | None = None

    parts: ModelParts

    # -- hooks -------------------------------------------------------------------------------------------------
    def install_hooks(self) -> None:
        """Attach any hooks of the method's own (called by `gating.install_gates`); construction has no side
        effect on the model, so building a method is also a cheap way to validate a config against a model."""

    def remove_hooks(self) -> None:
        """Detach what `install_hooks` attached (called by `GateHandle.remove`)."""

    # -- schedule ----------------------------------------------------------------------------------------------
    def configure_schedule(self, total_search_steps: int, steps_per_epoch: float) -> None:
        """Told once by the trainer before training: search length (optimizer steps) and steps per epoch."""
        self.total_search_steps = max(1, int(total_search_steps))
        self.steps_per_epoch = max(1.0, float(steps_per_epoch))

    def set_progress(self, step: int) -> None:
        """Update schedules for optimizer step `step` (0-based)."""

    @property
    def search_finished(self) -> bool:
        return self._finalized

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._finalized = bool(self.finalized)  # a load is rare: reading the device here is fine

    # -- forward -----------------------------------------------------------------------------------------------
    def compute_masks(self) -> Masks:
        """Masks for this forward. After `finalize()`, the hard masks of the final architecture."""
        if self.final_architecture is None and self._finalized:
            self.final_architecture = self.decide()  # resumed from a checkpoint saved after the search
        if self.final_architecture is not None:
            if getattr(self, "_final_masks", None) is None:
                self._final_masks = architecture_masks(self.final_architecture, self.parts)
            return self._final_masks
        return self.search_masks()

    def search_masks(self) -> Masks:
        raise NotImplementedError

    # -- losses ------------------------------------------------------------------------------------------------
    def loss(self, task_loss: torch.Tensor, logits: torch.Tensor, inputs: dict) -> tuple[torch.Tensor, dict]:
        """Total loss from the task (CE or distillation) loss, and the terms to log by name as detached 0-dim
        tensors on the device (the trainer averages them there and reads them only at logging steps)."""
        return task_loss, {}

    # -- optimisation ------------------------------------------------------------------------------------------
    def optimizer_groups(self, learning_rate: float) -> list[dict]:
        """Parameter groups (torch.optim style, with their own lr/betas/weight_decay) for the method's own
        parameters that the trainer's optimizer should step. Parameters absent from every group are either
        stepped by the method itself or frozen."""
        return []

    def after_optimizer_step(self, learning_rate: float) -> None:
        """Called after each optimizer step, before gradients are zeroed."""

    def on_step_end(self, step: int) -> None:
        """Called after optimizer step `step` (0-based) has completed."""

    # -- decisions ---------------------------------------------------------------------------------------------
    def decide(self) -> Architecture:
        """The architecture the search has chosen so far (always within the budget)."""
        raise NotImplementedError

    def finalize(self) -> Architecture:
        """End the search: fix the architecture; from now on the masks are its hard masks."""
        if self.final_architecture is None:
            self.final_architecture = self.decide()
            self._final_masks = None
            self.finalized.fill_(True)
            self._finalized = True
        return self.final_architecture

    def export_architecture(self) -> Architecture:
        """What the exporter slices by (ends the search if it has not ended). Methods with learnable scales
        override this to return their current values."""
        return self.finalize()

    def metrics(self) -> dict[str, float]:
        """Scalars to log (lambda, mask ratio, expected MACs ratio, ...). Called at logging steps only: it may read
        values from the device. Empty once the search has ended: its values no longer change (the trainer logs the
        final architecture's MACs ratio once instead)."""
        return {}

    def loss_terms(self, window: LogWindow) -> dict[str, float]:
        """The method's weighted terms of the logged `loss` over a logging window (`window`: what `loss()` logged
        since the last logging step), by name (`loss/<term>`), so that `loss` = `task_loss` + the terms. Called
        at logging steps only, from the host copies: no device work. Empty when the method adds nothing."""
        return {}

    def search_macs_ratio(self) -> float | None:
        """The MACs ratio (of the dense model) that the search itself has reached, before `decide()` projects it
        onto the budget (OFB: expected MACs; UVC: R). Read once, when the search ends. None if not defined."""
        return None

    def snapshot(self) -> dict[str, float | torch.Tensor]:
        """Scalars recorded through the search for the report's plot (defaults to `metrics()`). Values may be
        floats or 0-dim tensors; the trainer keeps tensors on the device and converts them in bulk later, so a
        method that returns tensors costs no synchronisation at recording steps."""
        return self.metrics()

    def architecture_macs(self, architecture: Architecture) -> int:
        return architecture_macs(self.geometry, architecture)

    def architecture_cost(self, architecture: Architecture) -> float:
        """`architecture`'s price in the budget's unit (its MACs for a MACs budget)."""
        if self.cost.kind == "macs":
            return self.architecture_macs(architecture)
        return self.cost.architecture(architecture)

    @property
    def target_cost_ratio(self) -> float:
        """The budget as a fraction of the dense model's cost (MACs, or predicted milliseconds)."""
        return float(self.target_cost) / float(self.dense_cost)

    # -- multi-process (scale-out) -----------------------------------------------------------------------------
    def search_state(self) -> dict[str, torch.Tensor]:
        """Every tensor the search decides with: all parameters and buffers (non-persistent ones included)."""
        return {**dict(self.named_parameters()), **dict(self.named_buffers())}

    @torch.no_grad()
    def state_digest(self) -> str:
        """sha256 of the search state (names, dtypes, shapes and bytes): equal on two ranks iff their states are
        bit-identical. Used by `CompressionTrainer` to check data-parallel ranks agree (and by the tests)."""
        digest = hashlib.sha256()
        for name, tensor in sorted(self.search_state().items()):
            data = tensor.detach().to("cpu").contiguous()
            digest.update(f"{name}|{data.dtype}|{tuple(data.shape)}|".encode())
            digest.update(data.reshape(-1).view(torch.uint8).numpy().tobytes())
        return digest.hexdigest()

    @torch.no_grad()
    def broadcast_state(self, src: int = 0) -> None:
        """Overwrite this rank's search state with rank `src`'s (torch.distributed, every rank must call it), then
        drop the caches derived from it (`state_changed`). A no-op outside an initialised process group."""
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
            return
        for tensor in self.search_state().values():
            data = tensor.data
            # gloo has no bool type and collectives need contiguous memory: go through a uint8 / contiguous copy
            buffer = data.to(torch.uint8) if data.dtype == torch.bool else data.contiguous()
            dist.broadcast(buffer, src=src)
            if buffer is not data:
                data.copy_(buffer.to(data.dtype))
        self.state_changed()

    def state_changed(self) -> None:
        """The parameters/buffers were overwritten from outside (e.g. `broadcast_state`): rebuild what is cached
        from them. After the search that is the final architecture and its masks (re-derived by `decide()`, which
        every method answers from its final buffers once `finalized` is set)."""
        self._final_masks = None
        self._finalized = bool(self.finalized)
        self.final_architecture = self.decide() if self._finalized else None


def build_method(model: nn.Module, config: CompressionConfig) -> CompressionMethod:
    """Instantiate the method registered under `config.method` for `model` (the config is validated again first: a
    list field may have been changed in place)."""
    config.validate()
    return method_entry(config.method).load_class()(model, config)
