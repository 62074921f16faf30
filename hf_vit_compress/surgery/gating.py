"""Gates on an unmodified Hugging Face ViT/DeiT: forward hooks that scale unit outputs, and LayerNorms that see
only the kept residual channels.

The HF attention code is left alone (sdpa/eager/flex are still dispatched by transformers): a gate scales the
OUTPUT units of q_proj / k_proj / v_proj / fc1 and of the embeddings, and a block gate mixes a block's output with
its input. Parameter names and the state dict are unchanged.
A method supplies the multipliers through a `MaskProvider`; they are computed once per model forward (a pre-hook
on the top module) so that shared masks (q, k and v share one) are built once and autograd sees one graph. A
method may give the per-block masks of a kind as one `(num_blocks, units)` tensor: it is split into rows once per
forward (one operation, not one per block).

Per-step cost matters (every operation is a kernel launch on a GPU). A mask that needs a gradient is folded into
the weight rows and bias, x (m W)^T + m b, so that autograd keeps no (batch, tokens, out) activation for the mask's
gradient; given as one `(num_blocks, units)` tensor, it is folded into all the linears it gates at once (one stack
of their weights, one multiply, one split, whatever the number of blocks; `_FoldedWeights`). A constant mask (hard
0/1 masks, fixed scales) multiplies the linear's output: one multiply forward and one backward.

A pruned residual width (`Masks.hidden_keep`) is handled in `residual_width`: LayerNorms over the kept channels
and, cheaper, residual writers (embeddings, o_proj, fc2) that mean-fill the dropped channels.
"""

from __future__ import annotations

import functools
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Protocol

import torch
from torch import nn

from .architecture import Architecture
from .residual_width import MIN_FILL_CHANNELS, KeptChannelStatistics, MaskedLayerNorm, _MeanFill
from .targets import ModelParts, model_parts


@dataclass
class Masks:
    """Multipliers for one forward pass; `None` anywhere means "leave as is".

    Attributes:
        qk: per block, `(num_heads * head_dim,)` multiplier of the q and k projections' outputs (a list with one
            entry per block, or one `(num_blocks, num_heads * head_dim)` tensor).
        v: per block, `(num_heads * head_dim,)` multiplier of the v projection's output (list or tensor, as qk).
        mlp: per block, `(intermediate_size,)` multiplier of fc1's output, before the activation (list or tensor).
        hidden: `(hidden_size,)` multiplier of the embeddings' output (patches, prefix tokens and positions).
        hidden_keep: `(hidden_size,)` 0/1 indicator of the channels every LayerNorm normalises over; the others
            leave a LayerNorm as 0.
        hidden_min_kept: a lower bound, known on the host, of the channels `hidden_keep` keeps (0: unknown). The
            mean fill (module docstring) is used from `MIN_FILL_CHANNELS` on: with a single kept channel (no
            variance) the fill's rounding would be all a LayerNorm sees.
        block_gates: per block, `(skip_weight, run_weight)`: output = run * block(x) + skip * x; a skip weight of
            None means 1 - run (output = x + run * (block(x) - x), one multiply-add).
    """

    qk: list[torch.Tensor | None] | torch.Tensor = field(default_factory=list)
    v: list[torch.Tensor | None] | torch.Tensor = field(default_factory=list)
    mlp: list[torch.Tensor | None] | torch.Tensor = field(default_factory=list)
    hidden: torch.Tensor | None = None
    hidden_keep: torch.Tensor | None = None
    hidden_min_kept: int = 0
    block_gates: list[tuple[torch.Tensor | float | None, torch.Tensor | float] | None] = field(default_factory=list)



class MaskProvider(Protocol):
    def compute_masks(self) -> Masks: ...


class _BlockMix(torch.autograd.Function):
    """x + r * (y - x), the block gate with skip weight 1 - r: two operations forward, four backward (by hand:
    autograd through sub, mul and add takes six backward operations per block)."""

    @staticmethod
    def forward(ctx, block_input, block_output, run):
        difference = block_output - block_input
        ctx.save_for_backward(difference, run)
        return torch.addcmul(block_input, difference, run)

    @staticmethod
    def backward(ctx, grad):
        difference, run = ctx.saved_tensors
        grad_output = grad * run
        grad_run = None
        if ctx.needs_input_grad[2]:
            grad_run = torch.sum(grad * difference, dtype=torch.float32)
            grad_run = grad_run if run.dim() == 0 else grad_run.reshape(run.shape)
            grad_run = grad_run if grad_run.dtype == run.dtype else grad_run.to(run.dtype)
        return grad - grad_output, grad_output, grad_run


class _FoldedWeights(torch.autograd.Function):
    """m_b * W_(b, j) (rows scaled) for the weights (or biases) W_(b, j), all of one shape, of the `per_block`
    linears of every block b (block-major order) gated by the per-block masks m `(num_blocks, out)`. Forward: one
    stack, one multiply, one split; backward: one stack of the incoming gradients, two multiplies, one sum, one
    split, however many weights (autograd through `torch.stack` adds one operation per weight, so this is written
    by hand)."""

    @staticmethod
    def forward(ctx, masks, per_block: int, *weights):
        stacked = torch.stack(weights)
        stacked = stacked.view(masks.shape[0], per_block, *stacked.shape[1:])  # (blocks, per_block, out, ...)
        rows = masks.view(masks.shape[0], 1, masks.shape[1], *([1] * (stacked.dim() - 3)))
        ctx.save_for_backward(stacked, rows)
        return (stacked * rows).flatten(0, 1).unbind(0)

    @staticmethod
    def backward(ctx, *grads):
        stacked, rows = ctx.saved_tensors
        grads = torch.stack([torch.zeros_like(stacked[0, 0]) if g is None else g for g in grads]).view(stacked.shape)
        grad_masks = None
        if ctx.needs_input_grad[0]:
            grad_masks = (grads * stacked).sum((1, *range(3, stacked.dim())))  # (blocks, out)
        return (grad_masks, None, *(grads * rows).flatten(0, 1).unbind(0))


class GateHandle:
    """Hooks and LayerNorm swaps installed on a model; `remove()` restores the model exactly."""

    def __init__(self, model: nn.Module, provider: MaskProvider, parts: ModelParts | None = None):
        self.model = model
        self.provider = provider
        self.parts = parts or model_parts(model)
        self.current: Masks | None = None
        self._rows: dict[tuple, list] = {}  # per forward: (id of a mask, dtype) -> its rows in that dtype
        self._folded: dict[int, dict[int, tuple]] = {}  # per forward: id of a mask -> {id(linear): (weight, bias)}
        self._slots: list[tuple[nn.Linear, str, int]] = []  # gated linears with their mask kind and block
        self._extra_slots: list[tuple[nn.Linear, str, int]] = []  # linears gated like one of them
        self._statistics: KeptChannelStatistics | None = None  # per forward, for the masked LayerNorms
        self._residual_writers: list[nn.Linear] = []  # o_proj and fc2 of every block
        self._extra_writers: list[nn.Linear] = []  # linears that write into the residual stream like one of them
        # a dropout after o_proj / fc2 would break the mean fill while training (module docstring)
        self._writer_dropout = float(getattr(self.parts.backbone.config, "hidden_dropout_prob", 0.0) or 0.0)
        self.enabled = True
        self._hooks: list[torch.utils.hooks.RemovableHandle] = []
        self._gated_linears: list[nn.Linear] = []
        self._mask_getters: dict[nn.Linear, Callable[[], torch.Tensor | None]] = {}
        self._swapped: list[tuple[nn.Module, str, nn.LayerNorm]] = []
        self._install()

    # -- installation -------------------------------------------------------------------------------------------
    def _install(self) -> None:
        parts = self.parts
        self._hooks.append(self.model.register_forward_pre_hook(self._refresh_masks))
        self._hooks.append(parts.embeddings.register_forward_hook(self._embeddings_output))
        for index, block in enumerate(parts.blocks):
            for linear, kind in ((block.q_proj, "qk"), (block.k_proj, "qk"), (block.v_proj, "v"), (block.fc1, "mlp")):
                self._gate_linear(linear, kind, index)
            for linear in (block.o_proj, block.fc2):  # residual writers: mean-filled rows under a pruned width
                linear.forward = functools.partial(self._residual_forward, linear)
                self._gated_linears.append(linear)
                self._residual_writers.append(linear)
            self._hooks.append(block.block.register_forward_hook(self._block_gate(index), with_kwargs=True))
        for parent, name in self._layernorm_slots():
            original = getattr(parent, name)
            setattr(parent, name, MaskedLayerNorm(original, self))
            self._swapped.append((parent, name, original))
        if hasattr(self.provider, "install_hooks"):
            self.provider.install_hooks()

    def _gate_linear(self, linear: nn.Linear, kind: str, index: int) -> None:
        # An instance attribute shadows nn.Linear.forward; deleting it restores the class's forward.
        linear.forward = functools.partial(self._gated_forward, linear, kind, index)
        self._gated_linears.append(linear)
        self._slots.append((linear, kind, index))

    def gates_output_of(self, linear: nn.Module) -> bool:
        """Whether this handle gates `linear`'s output units (q/k/v projections and fc1, or a `gate_like` one)."""
        return any(linear is gated for gated, _, _ in self._slots + self._extra_slots)

    def writes_residual(self, linear: nn.Module) -> bool:
        """Whether `linear` writes into the residual stream through this handle (o_proj, fc2, or a `gate_like` one):
        its dropped residual rows are mean-filled under a pruned residual width."""
        return any(linear is writer for writer in self._residual_writers + self._extra_writers)

    def gate_like(self, linear: nn.Linear, gated: nn.Linear) -> None:
        """Gate `linear`'s output units with `gated`'s mask, or mean-fill its dropped residual rows like `gated`'s
        when `gated` writes into the residual stream (undone by `remove()`). For a Linear whose output is added to
        `gated`'s, such as a LoRA update's B: the dense model then computes what the exported model, which keeps
        only the gated Linear's kept units, computes. Folded on its own, not in the batched fold of the block
        linears (its weight has another shape)."""
        self._gated_linears.append(linear)
        if any(gated is writer for writer in self._residual_writers):  # its output goes into the residual stream too
            linear.forward = functools.partial(self._residual_forward, linear)
            self._extra_writers.append(linear)
            return
        kind, index = next((kind, index) for other, kind, index in self._slots if other is gated)
        linear.forward = functools.partial(self._gated_forward, linear, kind, index)
        self._extra_slots.append((linear, kind, index))

    def _gated_forward(self, linear: nn.Linear, kind: str, index: int, input: torch.Tensor) -> torch.Tensor:
        """`linear` with its output unit j scaled by block `index`'s mask of `kind` (see the module docstring)."""
        masks = None if self.current is None else getattr(self.current, kind)
        if masks is None or index >= len(masks):
            return nn.functional.linear(input, linear.weight, linear.bias)
        if torch.is_tensor(masks):  # one (num_blocks, out) tensor for all blocks
            # folded into the weights of every linear it gates, all at once: a few operations per forward and
            # backward instead of a multiply (and its backward) per linear; exact for 0/1 masks too (UVC's)
            folded = self._folded_weights(masks).get(id(linear))
            if folded is None:  # gated like another linear (`gate_like`): folded on its own
                mask = self._mask(kind, index, linear.weight.dtype)
                folded = (linear.weight * mask[:, None], None if linear.bias is None else linear.bias * mask)
            return nn.functional.linear(input, *folded)
        row = masks[index]
        if row is None:
            return nn.functional.linear(input, linear.weight, linear.bias)
        if row.requires_grad:
            mask = row.to(linear.weight.dtype)
            bias = None if linear.bias is None else linear.bias * mask
            return nn.functional.linear(input, linear.weight * mask[:, None], bias)
        output = nn.functional.linear(input, linear.weight, linear.bias)
        return output * self._mask(kind, index, output.dtype)

    def _residual_forward(self, linear: nn.Linear, input: torch.Tensor) -> torch.Tensor:
        """`linear` (o_proj, fc2, or one gated like them), its dropped residual rows mean-filled when the residual
        width is pruned and the fill is on (module docstring)."""
        statistics = self.kept_channel_statistics()
        if statistics is None or not statistics.fill:
            return nn.functional.linear(input, linear.weight, linear.bias)
        return nn.functional.linear(input, *statistics.filled(linear, self._residual_writers))

    def _embeddings_output(self, module, args, output):
        """The embeddings' output times `Masks.hidden`, then its dropped residual channels mean-filled (with the
        fill on)."""
        mask = self._mask("hidden", None, output.dtype)
        output = output if mask is None else output * mask
        statistics = self.kept_channel_statistics()
        if statistics is not None and statistics.fill:
            output = _MeanFill.apply(output, *statistics.fill_vectors)
        return output

    def _folded_weights(self, masks: torch.Tensor) -> dict[int, tuple]:
        """(m * W, m * b) for every linear gated by the per-block masks `masks` (num_blocks, out): for all of them at
        once (`_FoldedWeights`) when they come block after block, the same number per block (as q, k, v and fc1
        do), else one by one. Reads no value from the device: shapes only."""
        folded = self._folded.get(id(masks))
        if folded is not None:
            return folded
        slots = [(linear, index) for linear, kind, index in self._slots
                 if getattr(self.current, kind) is masks and index < len(masks)]
        rows = masks.to(slots[0][0].weight.dtype)
        per_block = len(slots) // len(rows)
        if per_block * len(rows) == len(slots) and all(index == i // per_block for i, (_, index) in enumerate(slots)):
            weights = _FoldedWeights.apply(rows, per_block, *[linear.weight for linear, _ in slots])
            if all(linear.bias is not None for linear, _ in slots):
                biases = _FoldedWeights.apply(rows, per_block, *[linear.bias for linear, _ in slots])
            else:
                biases = [None if linear.bias is None else linear.bias * rows[index] for linear, index in slots]
        else:
            weights = [linear.weight * rows[index, :, None] for linear, index in slots]
            biases = [None if linear.bias is None else linear.bias * rows[index] for linear, index in slots]
        folded = {id(linear): (weight, bias) for (linear, _), weight, bias in zip(slots, weights, biases)}
        self._folded[id(masks)] = folded
        return folded

    def _layernorm_slots(self):
        for block in self.parts.blocks:
            yield block.block, "layernorm_before"
            yield block.block, "layernorm_after"
        yield self.parts.backbone, "layernorm"

    def _refresh_masks(self, module, args):
        self._rows = {}
        self._folded = {}
        self._statistics = None
        self.current = self.provider.compute_masks() if self.enabled else None

    def kept_channel_statistics(self) -> KeptChannelStatistics | None:
        """The LayerNorms' shared kept-channel statistics for this forward (None: every channel is kept)."""
        keep = None if self.current is None else self.current.hidden_keep
        if keep is None:
            return None
        if self._statistics is None:
            layernorms = [getattr(parent, name) for parent, name, _ in self._swapped]
            fill = self.current.hidden_min_kept >= MIN_FILL_CHANNELS and not (
                self._writer_dropout > 0 and self.model.training)
            self._statistics = KeptChannelStatistics(keep, layernorms, fill=fill)
        return self._statistics

    def _mask(self, kind: str, index: int | None, dtype: torch.dtype) -> torch.Tensor | None:
        """Mask `kind` of block `index` (None: a global mask) in `dtype`. Per-block masks are split into rows and
        cast once per forward and kind (masks shared by several layers, such as q/k/v's in OFB, once for all)."""
        masks = self.current
        value = None if masks is None else getattr(masks, kind)
        if value is None or index is None:
            return None if value is None else value.to(dtype)
        key = (id(value), dtype)
        rows = self._rows.get(key)
        if rows is None:
            if torch.is_tensor(value):
                rows = value.to(dtype).unbind(0)
            else:
                rows = [None if row is None else row.to(dtype) for row in value]
            self._rows[key] = rows
        return rows[index] if index < len(rows) else None

    def _get(self, kind: str, index: int | None = None):
        masks = self.current
        if masks is None:
            return None
        value = getattr(masks, kind)
        if index is None:
            return value
        return value[index] if index < len(value) else None

    def _block_gate(self, index: int):
        def hook(module, args, kwargs, output):
            gate = self._get("block_gates", index)
            if gate is None:
                return output
            skip, run = gate
            block_input = args[0] if args else kwargs["hidden_states"]
            if isinstance(run, (int, float)) and run == 0:
                return block_input  # a removed block contributes nothing (and no NaN can leak through 0 * x)
            if skip is None:
                if not torch.is_tensor(run):
                    return block_input + run * (output - block_input)
                return _BlockMix.apply(block_input, output, run)
            return run * output + skip * block_input

        return hook

    def remove(self) -> None:
        if hasattr(self.provider, "remove_hooks"):
            self.provider.remove_hooks()
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()
        for linear in self._gated_linears:
            del linear.forward
        self._gated_linears.clear()
        self._slots.clear()
        self._extra_slots.clear()
        self._residual_writers.clear()
        self._extra_writers.clear()
        for parent, name, original in self._swapped:
            setattr(parent, name, original)
        self._swapped.clear()
        self.current = None


def install_gates(model: nn.Module, provider: MaskProvider) -> GateHandle:
    """Attach gates to `model`; the provider's `compute_masks()` runs at the start of every forward.

    Args:
        model: a supported ViT/DeiT classifier (see `targets.py`).
        provider: anything with `compute_masks() -> Masks`. If it is an `nn.Module` holding parameters, attach it
            to the model yourself (as the trainer does) so optimizers, DDP and checkpoints see it.
    """
    return GateHandle(model, provider)


class StaticMasks:
    """A `MaskProvider` that returns the fixed masks of an `Architecture`."""

    def __init__(self, architecture: Architecture, parts: ModelParts, device=None):
        self.masks = architecture_masks(architecture, parts, device=device)

    def compute_masks(self) -> Masks:
        return self.masks


def _unit_mask(size: int, kept: list[int], scale: torch.Tensor | None, device) -> torch.Tensor | None:
    if len(kept) == size and scale is None:
        return None
    mask = torch.zeros(size, device=device)
    index = torch.as_tensor(kept, dtype=torch.long, device=device)
    mask[index] = 1.0 if scale is None else scale.detach().to(device=device, dtype=torch.float32)[index]
    return mask


def architecture_masks(architecture: Architecture, parts: ModelParts, device=None) -> Masks:
    """The hard masks under which the dense model computes exactly what the exported model computes."""
    config = parts.backbone.config
    architecture.validate(config, num_blocks=len(parts.blocks))
    head_dim = config.hidden_size // config.num_attention_heads
    width = config.num_attention_heads * head_dim
    device = device or parts.patch_projection.weight.device
    masks = Masks()
    for layer in architecture.layers:
        masks.qk.append(_unit_mask(width, layer.flat_indices(head_dim, "qk"), layer.qk_scale, device))
        masks.v.append(_unit_mask(width, layer.flat_indices(head_dim, "v"), layer.v_scale, device))
        masks.mlp.append(_unit_mask(config.intermediate_size, layer.mlp_neurons, layer.mlp_scale, device))
        masks.block_gates.append(None if layer.keep_block else (1.0, 0.0))
    masks.hidden = _unit_mask(config.hidden_size, architecture.hidden_channels, architecture.hidden_scale, device)
    if len(architecture.hidden_channels) < config.hidden_size:
        masks.hidden_keep = _unit_mask(config.hidden_size, architecture.hidden_channels, None, device)
        masks.hidden_min_kept = len(architecture.hidden_channels)
    return masks


@contextmanager
def apply_architecture(model: nn.Module, architecture: Architecture):
    """Run the dense `model` with the units that `architecture` drops masked to zero (and its scales applied)."""
    parts = model_parts(model)
    handle = GateHandle(model, StaticMasks(architecture, parts), parts)
    try:
        yield handle
    finally:
        handle.remove()
