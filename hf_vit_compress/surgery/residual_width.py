"""A pruned residual width during a search (`gating.Masks.hidden_keep`): LayerNorms that normalise the kept
channels only, computed exactly as the narrower exported model computes them.

A pruned residual width (`Masks.hidden_keep`, K of D channels kept) is computed exactly as the narrower model does
it, at almost no cost: every layer that writes into the residual stream (the embeddings, o_proj, fc2) writes a times
its kept channels, a = sqrt(D / K), and a times their mean into the dropped ones (o_proj's and fc2's weight rows
rewritten so, all of them in a few batched operations; `_MeanFilledRows`). A plain LayerNorm over all D channels
then sees mean a * mu and variance a^2 (K / D) var = var of the kept channels, the same eps included; its weight
times keep / a and its bias times keep give the kept-channel LayerNorm exactly, and 0 on dropped channels. Where a
dropout after o_proj / fc2 is active (it would break the fill), each LayerNorm computes the kept channels'
statistics itself instead (`_KeptChannelLayerNorm`), and so it does with fewer than `MIN_FILL_CHANNELS` kept.
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import nn

#: the fewest kept residual channels with which the mean fill is used (fewer: kept-channel LayerNorms). The fill's
#: dropped channels hold the kept mean up to rounding, which adds (D - K) (rounding)^2 to a LayerNorm's variance:
#: nothing next to the kept channels' own variance, unless there is none (K = 1) or hardly any
MIN_FILL_CHANNELS = 8


class KeptChannelStatistics:
    """What every masked LayerNorm (and, with `fill`, every residual writer) of one forward shares: from the 0/1
    `keep` (D channels, K kept), keep / K, keep * a with a = sqrt(D / K), and every LayerNorm's rescaled affine terms
    weight * keep / a and bias * keep (see `_KeptChannelLayerNorm`), computed for all LayerNorms at once. Built once
    per forward.

    Args:
        keep: `(D,)` 0/1 indicator of the kept residual channels.
        layernorms: the LayerNorms that normalise the kept channels only.
        fill: whether the residual writers fill the dropped channels with the kept channels' mean (then every
            LayerNorm is a plain one with the rescaled affine terms; see the module docstring).
    """

    def __init__(self, keep: torch.Tensor, layernorms: list[nn.Module], fill: bool = False):
        keep = keep.detach().float()
        count = keep.sum()
        scale = (keep.shape[-1] / count).sqrt()
        self.fill = fill
        self.keep = keep
        self.keep_over_count = keep / count
        self.scaled_keep = keep * scale
        if fill:  # the row operator of `_MeanFilledRows`: r = a * keep, m = a * keep / K, d = 1 - keep
            self.fill_vectors = (self.scaled_keep, self.scaled_keep / count, 1.0 - keep)
        self.affine: dict[int, tuple] = {}
        self._filled: dict[int, tuple] = {}  # id(linear) -> its (weight, bias) with the dropped rows mean-filled
        if layernorms and all(ln.weight is not None and ln.bias is not None for ln in layernorms):
            count = len(layernorms)
            scaled = _ScaledStack.apply(keep / scale, keep, count, *[ln.weight for ln in layernorms],
                                        *[ln.bias for ln in layernorms])
            self.affine = {id(ln): pair for ln, pair in zip(layernorms, zip(scaled[:count], scaled[count:]))}
        else:
            for ln in layernorms:
                weight = None if ln.weight is None else ln.weight.float() * (keep / scale)
                self.affine[id(ln)] = (weight, None if ln.bias is None else ln.bias.float() * keep)

    def filled(self, linear: nn.Linear, writers: list[nn.Linear]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """`linear`'s (weight, bias) with every dropped output row replaced by the mean of the kept rows; on the
        first call, those of all `writers` at once (one `_MeanFilledRows` per shape)."""
        pair = self._filled.get(id(linear))
        if pair is not None:
            return pair
        if not any(writer is linear for writer in writers):  # e.g. a LoRA update's B: on its own
            pair = tuple(None if t is None else _MeanFilledRows.apply(*self.fill_vectors, t)[0]
                         for t in (linear.weight, linear.bias))
            self._filled[id(linear)] = pair
            return pair
        by_shape: dict[tuple, list[torch.Tensor]] = {}
        for tensor in (t for writer in writers for t in (writer.weight, writer.bias) if t is not None):
            by_shape.setdefault((tuple(tensor.shape), tensor.dtype), []).append(tensor)
        filled = {}
        for tensors in by_shape.values():
            filled.update(zip(map(id, tensors), _MeanFilledRows.apply(*self.fill_vectors, *tensors)))
        for writer in writers:
            self._filled[id(writer)] = (filled[id(writer.weight)],
                                        None if writer.bias is None else filled[id(writer.bias)])
        return self._filled[id(linear)]


class _MeanFilledRows(torch.autograd.Function):
    """W'_i = diag(r) W_i + d m^T W_i for same-shaped tensors W_i whose dim 0 is the residual channel (o_proj and
    fc2 weights, their biases): with r = a * keep, m = a * keep / K and d = 1 - keep, kept rows are scaled by a and
    every dropped row becomes a times the mean of the kept rows. A layer with such weights writes into every dropped
    channel the mean of what it writes into the kept ones, and a sum of such layers (the residual stream) keeps that
    property (module docstring). By hand: one stack, two batched matmuls and one multiply forward, whatever the number
    of tensors (autograd through `torch.stack` adds an operation per tensor)."""

    @staticmethod
    def forward(ctx, row_scale, mean_weights, dropped, *tensors):
        stacked = torch.stack(tensors)
        count, size = len(tensors), stacked.shape[1]
        flat = stacked.view(count, size, -1)  # (n, D, rest)
        row_scale, mean_weights, dropped = (v.to(flat.dtype) for v in (row_scale, mean_weights, dropped))
        means = torch.bmm(mean_weights.expand(count, 1, size), flat)  # (n, 1, rest): m^T W
        filled = torch.baddbmm(flat * row_scale.view(1, size, 1), dropped.view(1, size, 1).expand(count, size, 1),
                               means)
        ctx.shape = stacked.shape
        ctx.save_for_backward(row_scale, mean_weights, dropped)
        return filled.view(stacked.shape).unbind(0)

    @staticmethod
    def backward(ctx, *grads):
        row_scale, mean_weights, dropped = ctx.saved_tensors
        count, size = ctx.shape[0], ctx.shape[1]
        grads = torch.stack([torch.zeros(ctx.shape[1:], dtype=row_scale.dtype, device=row_scale.device)
                             if g is None else g for g in grads])
        flat = grads.view(count, size, -1)
        # dL/dW = diag(r) G + m (d^T G): what the dropped rows received goes to the kept ones
        dropped_sums = torch.bmm(dropped.to(flat.dtype).expand(count, 1, size), flat)  # (n, 1, rest)
        grad = torch.baddbmm(flat * row_scale.to(flat.dtype).view(1, size, 1),
                             mean_weights.to(flat.dtype).view(1, size, 1).expand(count, size, 1), dropped_sums)
        return (None, None, None, *grad.view(ctx.shape).unbind(0))


class _MeanFill(torch.autograd.Function):
    """x' = r * x + d * (x . m) along the last dim, with r, m, d as in `_MeanFilledRows`: the kept channels scaled by
    a, every dropped one set to a times the kept channels' mean. By hand: four operations forward and four backward."""

    @staticmethod
    def forward(ctx, x, row_scale, mean_weights, dropped):
        row_scale, mean_weights, dropped = (v.to(x.dtype) for v in (row_scale, mean_weights, dropped))
        ctx.save_for_backward(row_scale, mean_weights, dropped)
        return torch.addcmul(x * row_scale, (x * mean_weights).sum(-1, keepdim=True), dropped)

    @staticmethod
    def backward(ctx, grad):
        row_scale, mean_weights, dropped = ctx.saved_tensors
        return torch.addcmul(grad * row_scale, (grad * dropped).sum(-1, keepdim=True), mean_weights), None, None, None


class _ScaledStack(torch.autograd.Function):
    """float(w_i) * weight_scale for the first `count` vectors and float(b_i) * bias_scale for the others, each
    group stacked into one multiply. By hand: autograd through `torch.stack` backs every vector out with its own
    operation (50 per step in a ViT-S); here the backward is one stack, one multiply and one split per group."""

    @staticmethod
    def forward(ctx, weight_scale, bias_scale, count: int, *vectors):
        ctx.count, ctx.dtypes = count, [v.dtype for v in vectors]
        ctx.save_for_backward(weight_scale, bias_scale)
        weights = torch.stack(vectors[:count]).float() * weight_scale
        biases = torch.stack(vectors[count:]).float() * bias_scale
        return (*weights.unbind(0), *biases.unbind(0))

    @staticmethod
    def backward(ctx, *grads):
        weight_scale, bias_scale = ctx.saved_tensors
        count = ctx.count
        outputs = []
        for part, scale in ((grads[:count], weight_scale), (grads[count:], bias_scale)):
            stacked = torch.stack([torch.zeros_like(scale) if g is None else g for g in part]) * scale
            outputs += stacked.unbind(0)
        outputs = [g if g.dtype == dtype else g.to(dtype) for g, dtype in zip(outputs, ctx.dtypes)]
        return (None, None, None, *outputs)


class _KeptChannelLayerNorm(torch.autograd.Function):
    """LayerNorm statistics over the kept channels only, through one plain LayerNorm over all D channels.

    The input is rewritten as x'' = mu + a * keep * (x - mu), mu = mean of the K kept channels, a = sqrt(D / K):
    dropped channels become mu, so over all D channels x'' has mean mu and variance var_kept (the kept deviations
    are scaled by a), and LayerNorm(x'') = a * (x - mu) / sqrt(var_kept + eps) on kept channels and 0 on dropped
    ones. The affine weight is passed as weight * keep / a and the bias as bias * keep, so the result is exactly the
    kept-channel LayerNorm with dropped channels 0. Written as an autograd Function (by hand: no library op
    normalises over a channel subset) so that forward and backward cost a handful of tensor operations instead of
    autograd through a dozen elementwise ones (25 of them per step in a ViT-S).
    """

    @staticmethod
    def forward(ctx, x, keep_over_count, scaled_keep, weight, bias, eps: float):
        mean = (x * keep_over_count).sum(-1, keepdim=True)
        shifted = torch.lerp(mean, x, scaled_keep)  # mean + scaled_keep * (x - mean), one operation
        out, ln_mean, ln_rstd = torch.native_layer_norm(shifted, (x.shape[-1],), weight, bias, eps)
        ctx.save_for_backward(shifted, ln_mean, ln_rstd, weight, bias, keep_over_count, scaled_keep)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        shifted, ln_mean, ln_rstd, weight, bias, keep_over_count, scaled_keep = ctx.saved_tensors
        grad_shifted, grad_weight, grad_bias = torch.ops.aten.native_layer_norm_backward(
            grad_out, shifted, (shifted.shape[-1],), ln_mean, ln_rstd, weight, bias,
            [True, ctx.needs_input_grad[3], ctx.needs_input_grad[4]],
        )
        # d x''_c / d x_j = (keep_j / K)(1 - a keep_c) + a keep_c [c = j], and a LayerNorm's input gradient sums to 0
        # over its channels, so grad_x = a * keep * (g'' - sum_c (keep_c / K) g''_c).
        grad_x = scaled_keep * (grad_shifted - (grad_shifted * keep_over_count).sum(-1, keepdim=True))
        return grad_x, None, None, grad_weight, grad_bias, None


class StatisticsSource(Protocol):
    """What a `MaskedLayerNorm` reads its forward's statistics from (`gating.GateHandle`; a protocol, so this
    module does not import gating, which imports it)."""

    def kept_channel_statistics(self) -> KeptChannelStatistics | None: ...


class MaskedLayerNorm(nn.Module):
    """A LayerNorm over a subset of channels, sharing the wrapped LayerNorm's parameters (same state-dict keys).

    Mean and variance are taken over the kept channels only, and dropped channels come out as 0, so the result on
    kept channels equals a LayerNorm of the sliced width: what the exported model computes.
    """

    def __init__(self, layernorm: nn.LayerNorm, state: StatisticsSource):
        super().__init__()
        self.weight = layernorm.weight
        self.bias = layernorm.bias
        self.eps = layernorm.eps
        self.normalized_shape = layernorm.normalized_shape
        self._original = [layernorm]  # a list: not registered as a submodule, restored on removal
        self._state = [state]

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        statistics = self._state[0].kept_channel_statistics()
        if statistics is None:
            return nn.functional.layer_norm(hidden_states, self.normalized_shape, self.weight, self.bias, self.eps)
        weight, bias = statistics.affine[id(self)]
        if statistics.fill:  # the dropped channels hold the kept channels' mean: a plain LayerNorm (module docstring)
            dtype = hidden_states.dtype
            if weight.dtype != dtype and not torch.is_autocast_enabled(hidden_states.device.type):
                weight, bias = weight.to(dtype), bias.to(dtype)  # (autocast runs LayerNorms in float32 itself)
            return nn.functional.layer_norm(hidden_states, self.normalized_shape, weight, bias, self.eps)
        # Statistics in float32 (as nn.LayerNorm does under autocast), in float64 for a float64 model.
        dtype = torch.float64 if hidden_states.dtype == torch.float64 else torch.float32
        x = hidden_states.to(dtype)
        vectors = [None if v is None else v.to(dtype) for v in (statistics.keep_over_count, statistics.scaled_keep,
                                                                   weight, bias)]
        out = _KeptChannelLayerNorm.apply(x, *vectors, self.eps)
        return out if out.dtype == hidden_states.dtype else out.to(hidden_states.dtype)
