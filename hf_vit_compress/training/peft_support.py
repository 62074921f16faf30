"""peft and compression: compressing a `PeftModel`, and LoRA fine-tuning after the search.

* `unwrap_peft_model`: `CompressionTrainer(model=peft_model)` compresses the function a `peft.PeftModel` computes:
  its LoRA / IA3 adapters are merged into the weights first (peft's `merge_and_unload`).
* `LoRARecovery`: `CompressionConfig.finetune="lora"`: once the search has ended, LoRA adapters on the frozen
  weights fine-tune the fixed architecture; export merges them, so the saved model is a plain compressed model.

(LoRA on an exported compressed model needs no code here: `CompressedViTForImageClassification` is a plain
`PreTrainedModel` whose Linear layers peft adapts as they are; see the README's "PEFT / LoRA" section.)

peft is an optional dependency (`pip install "hf_vit_compress[peft]"`): nothing here imports it unless a PeftModel
was passed or `finetune="lora"` was asked for.

Why the adapters go on the gated DENSE model rather than on an exported copy: the Trainer's optimizer, scheduler,
Accelerate/DDP wrapping and checkpoints are all built around the one model object it was given. Injecting the
adapters into that object at construction (inert until the search ends) keeps all of that, resume included,
unchanged; switching to another model mid-run would mean rebuilding each of them.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn
from transformers.utils import logging

from ..config import LoRARecoveryConfig
from ..surgery.gating import GateHandle
from ..surgery.targets import model_parts

logger = logging.get_logger(__name__)

#: peft adapter types that `unwrap_peft_model` merges; both fold exactly into the adapted layers' weights
MERGEABLE_PEFT_TYPES = ("LORA", "IA3")
#: name of the adapter that `LoRARecovery` injects
RECOVERY_ADAPTER = "recovery"


def import_peft():
    """`import peft`, or an ImportError that says how to install it."""
    try:
        import peft
    except ImportError as error:
        raise ImportError(
            'This needs the `peft` package: pip install "hf_vit_compress[peft]" (or: pip install peft).'
        ) from error
    return peft


def _peft_submodules(model: nn.Module) -> list[tuple[str, str]]:
    """(name, class) of every submodule defined by peft (adapter layers, modules_to_save wrappers)."""
    return [
        (name, f"{type(module).__module__}.{type(module).__qualname__}")
        for name, module in model.named_modules()
        if type(module).__module__.split(".")[0] == "peft"
    ]


# ----------------------------------------------------------------------------------------------------------------
# Compressing a PeftModel
# ----------------------------------------------------------------------------------------------------------------


def unwrap_peft_model(model: nn.Module) -> nn.Module:
    """The plain model to compress: a `peft.PeftModel`'s adapters merged into its base model's weights.

    Args:
        model: a ViT/DeiT image classifier, or a `peft.PeftModel` wrapping one with LoRA or IA3 adapters.

    Returns:
        `model` itself when it is not a PeftModel. Otherwise its base model with the active adapters merged
        (`merge_and_unload`, logged) and every parameter trainable again (`get_peft_model` froze the base weights,
        which the search trains).

    Raises:
        ValueError: for other adapter types (naming each adapter and its type), and for peft adapter layers inside
            a model that is not a PeftModel (`inject_adapter_in_model`, `add_adapter`): the gates and the export
            read the plain Linear weights and would silently leave such adapters out.
    """
    if sys.modules.get("peft") is None:  # no PeftModel can exist unless peft was imported: keep it unimported
        return model
    from peft import PeftModel

    if not isinstance(model, PeftModel):
        found = _peft_submodules(model)
        if found:
            listed = ", ".join(f"{name} ({kind})" for name, kind in found[:4])
            raise ValueError(
                f"CompressionTrainer: the model holds peft adapter layers outside a PeftModel ({listed}"
                f"{', ...' if len(found) > 4 else ''}). Pass the PeftModel itself (LoRA and IA3 adapters are merged "
                "into the weights first), or merge the adapters into the weights and pass the plain model."
            )
        return model
    types = {name: getattr(config.peft_type, "value", str(config.peft_type)) for name, config in
             model.peft_config.items()}
    rejected = {name: kind for name, kind in types.items() if kind not in MERGEABLE_PEFT_TYPES}
    if rejected:
        raise ValueError(
            f"CompressionTrainer: cannot compress a PeftModel with adapter type(s) {rejected} (adapter: type); "
            f"allowed: {list(MERGEABLE_PEFT_TYPES)}, which merge exactly into the weights. Merge the adapters "
            "yourself (`merge_and_unload()`, where your adapter type has one) and pass the merged model."
        )
    active = list(model.active_adapters)
    inactive = [name for name in types if name not in active]
    merged = model.merge_and_unload()
    merged.requires_grad_(True)
    logger.warning(
        f"CompressionTrainer: the model is a PeftModel; its active adapter(s) "
        f"{ {name: types[name] for name in active} } were merged into the weights (merge_and_unload) and the merged "
        f"{type(merged).__name__} is compressed, every parameter trainable"
        + (f"; inactive adapter(s) {inactive} were dropped" if inactive else "")
        + "."
    )
    return merged


# ----------------------------------------------------------------------------------------------------------------
# LoRA fine-tuning after the search
# ----------------------------------------------------------------------------------------------------------------


class LoRARecovery:
    """LoRA adapters for the fine-tuning phase of `CompressionTrainer` (`CompressionConfig.finetune="lora"`).

    Injected at construction (peft's `inject_adapter_in_model`, adapter name `"recovery"`) into the target Linear
    layers of every block of the gated dense model, so the optimizer, DDP and checkpoints hold them from the start.
    While the search runs they are bypassed (peft's disabled adapters: the search computes exactly what it computes
    with `finetune="full"`); once it has ended they are enabled (checked before every forward), and
    `begin_finetuning` freezes everything but the adapters and (with `settings.train_heads`) the heads: the
    backbone's weights and the method's parameters (OFB's per-unit scales stay as the search left them), whose
    optimizer state it drops.

    The gates (surgery/gating.py) scale the output units of q/k/v/fc1 by folding the mask into that Linear's rows,
    and peft adds the LoRA update outside that Linear, so the update's B gets the same gate (`GateHandle.gate_like`):
    the layer computes m * (W x + b + s B A x), which is what the exported Linear with rows m * (W + s B A)
    computes. Ungated, the adapters would write into pruned units and train a function that export cannot keep. The
    update of o_proj / fc2 writes into the residual stream, so its B gets their mean-filled rows under a pruned
    residual width (`GateHandle.writes_residual`).

    Args:
        model: the dense ViT/DeiT classifier with the gates installed.
        gates: the handle of those gates.
        settings: `CompressionConfig.lora`.
        method: the compression method attached to `model` (its `search_finished` and parameters).
    """

    def __init__(self, model: nn.Module, gates: GateHandle, settings: LoRARecoveryConfig, method: nn.Module):
        peft = import_peft()
        from peft.tuners.lora import LoraLayer

        parts = model_parts(model)
        self.settings = settings
        self._method = [method]  # a list: not an attribute torch or peft would walk
        names = {module: name for name, module in model.named_modules()}
        # Full names, so that nothing outside the blocks (the method's own modules) can match.
        targets = [names[getattr(block, kind)] for block in parts.blocks for kind in settings.target_modules]
        frozen = [*parts.backbone.parameters(), *method.parameters()]
        if not settings.train_heads:
            frozen += [parameter for head in parts.heads.values() for parameter in head.parameters()]
        trainable = [(parameter, parameter.requires_grad) for parameter in model.parameters()]
        config = peft.LoraConfig(r=settings.rank, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                                 target_modules=targets)
        peft.inject_adapter_in_model(config, model, adapter_name=RECOVERY_ADAPTER)
        for parameter, requires_grad in trainable:  # injection froze everything else; the search trains it
            parameter.requires_grad_(requires_grad)
        self.layers: list[LoraLayer] = [module for module in model.modules() if isinstance(module, LoraLayer)]
        self.parameters: list[nn.Parameter] = [
            parameter
            for layer in self.layers
            for adapter in (layer.lora_A[RECOVERY_ADAPTER], layer.lora_B[RECOVERY_ADAPTER])
            for parameter in adapter.parameters()
        ]
        self.frozen_parameters: list[nn.Parameter] = frozen
        self._pre_hook = model.register_forward_pre_hook(self._follow_search)
        for layer in self.layers:
            base = layer.get_base_layer()
            if gates.gates_output_of(base) or gates.writes_residual(base):
                gates.gate_like(layer.lora_B[RECOVERY_ADAPTER], base)
        self.enabled = True  # peft injects enabled adapters
        self.finetuning = False
        self._set_enabled(False)

    # -- phases ------------------------------------------------------------------------------------------------
    def _set_enabled(self, enabled: bool) -> None:
        for layer in self.layers:
            layer.enable_adapters(enabled)
        # Disabling also switches off requires_grad; DDP needs the set of trainable parameters it was built with.
        for parameter in self.parameters:
            parameter.requires_grad_(True)
        self.enabled = enabled

    def _follow_search(self, module, args) -> None:
        finished = bool(self._method[0].search_finished)
        if finished != self.enabled:
            self._set_enabled(finished)

    def begin_finetuning(self, optimizer: torch.optim.Optimizer | None, keep_requires_grad: bool = False) -> None:
        """Start the fine-tuning phase (idempotent): adapters on, frozen weights' gradients and optimizer state gone.

        Args:
            optimizer: the trainer's optimizer, whose state (AdamW moments) of the frozen weights is dropped.
            keep_requires_grad: leave `requires_grad` on the frozen weights (their gradients are then dropped after
                every backward by `drop_inactive_gradients`). Needed under DDP, which fails when a parameter it was
                built with stops receiving gradients; in one process they are switched off, which saves their
                gradients' memory and the weight-gradient products.
        """
        if self.finetuning:
            return
        self.finetuning = True
        self._set_enabled(True)
        for parameter in self.frozen_parameters:
            parameter.grad = None
            if not keep_requires_grad:
                parameter.requires_grad_(False)
            if optimizer is not None:
                optimizer.state.pop(parameter, None)

    def drop_inactive_gradients(self) -> None:
        """Clear the gradients of what the current phase does not train (before clipping and the optimizer step,
        so neither sees them): the adapters during the search, the frozen weights afterwards."""
        for parameter in self.frozen_parameters if self.finetuning else self.parameters:
            parameter.grad = None

    # -- optimizer and export ----------------------------------------------------------------------------------
    def optimizer_groups(self, learning_rate: float, weight_decay: float) -> list[dict]:
        """The adapters' parameter group: `settings.learning_rate` (or the weights'), the weights' weight decay."""
        lr = self.settings.learning_rate if self.settings.learning_rate is not None else learning_rate
        return [{"params": self.parameters, "lr": lr, "weight_decay": weight_decay}]

    @contextmanager
    def merged_into_weights(self) -> Iterator[None]:
        """Within the block, every adapted Linear's weight is W + s B A (peft's `merge`); afterwards exactly the
        original W again (restored from a copy, not by subtraction, so no rounding is left behind)."""
        originals = [(layer, layer.get_base_layer().weight.detach().clone()) for layer in self.layers]
        for layer in self.layers:
            layer.merge(adapter_names=[RECOVERY_ADAPTER])
        try:
            yield
        finally:
            with torch.no_grad():
                for layer, weight in originals:
                    layer.unmerge()
                    layer.get_base_layer().weight.copy_(weight)
