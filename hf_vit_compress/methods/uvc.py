"""UVC: Unified Visual transformer Compression (Yu et al., ICLR 2022; spec/uvc.md).

Pruning (whole heads, value dims inside heads, MLP units), block skipping and distillation, optimised jointly
under one FLOPs budget by a primal-dual method:

    L = L_KD(W, theta) + sum_l [ y_l0 LS(s_l0; head scores) + y_l1 LS(s_l1; mlp scores) + p_l LS(r_l; dim scores) ]
        + z (R - B)

State (all float32, all in the state dict, so a checkpoint reproduces `decide()` exactly):
    head_counts (s_l0, heads removed, [0, H-1]), vdim_counts (r_l, value dims removed per head, shared by the
    layer's heads, [0, d-1]), mlp_counts (s_l1, MLP units removed, [0, I-1]): continuous, updated by projected
    SGD in `after_optimizer_step` (buffers: the trainer's optimizer never sees them);
    theta (L, 2): skip/run logits, an `nn.Parameter` (it gets dL_KD/dtheta through the block gates) that the
    method steps itself with SGD + momentum; it sits in the trainer's optimizer in a group with lr = 0, only so
    that fp16 loss scaling, gradient clipping and zeroing handle its gradient like the weights';
    head_duals y_l0, mlp_duals y_l1, vdim_duals p_l, budget_dual z >= 0: projected dual ascent;
    progress_step, theta_momentum, and after `finalize()` the final architecture's keep-masks.

Design choices and deviations from the official code (VITA-Group/UVC), each for a stated reason:
  * One value width per layer: r_l is shared by the layer's heads (the spec allows it: the compressed format has
    one v head dim per layer); each head still keeps its OWN best value channels. The dims' least-k sum is
    summed over the kept heads (LS(r_l) = sum_h LS(r_l; dims of head h)); removed heads are excluded because
    their whole o_proj block is already penalised by y_l0.
  * Groups: a score is the squared norm of the weights that read the unit: head h -> o_proj columns of h,
    value dim c -> o_proj column c, MLP unit j -> fc2 column j. The proximal step of y * ||W_g||^2 is exactly
    W_g <- W_g / (1 + 2 lr y), so it shrinks only those columns (not the q/k/v or fc1 rows, which the penalty does
    not contain). An MLP unit's fc1 row is removed together with its fc2 column at export.
  * FLOPs: R comes from `flops.macs_from_widths` (stem and classifier head included) with widths
    qk = (H - ceil s0) d, v = (H - ceil s0)(d - ceil r), mlp = I - ceil s1 (straight-through ceil), weighted by
    the blocks' run probabilities. The v projection is counted at the value width (what the exported model runs)
    instead of the spec's a_l. With hard gates R equals the exported model's MACs ratio exactly.
  * Block-gate probabilities in R: gamma_l = softmax(theta_l / tau)[run] (the noise-free Gumbel-softmax). The
    forward uses a Gumbel sample; R, its gradients and the dual updates use the noise-free value, so every
    manual update is deterministic and identical on every data-parallel rank (theta's KD gradient is averaged
    by DDP like any parameter's).
  * Gap clip: the official code clamps (R - B) to +-budget_gap_clip with torch.clamp, which also zeroes the
    budget's gradient whenever |R - B| > clip; for budgets under 0.5 (R - B > 0.5 at the start) the search then
    never moves. Here the budget term of the counts' and theta's gradients is dropped only when R < B - clip
    (far under budget, as the official code does); above the budget it always acts.
  * Count steps in fractions of each count's range (`counts_space="fraction"`, default): the spec's SGD on the
    counts in units, inf-norm clipped jointly, moves a head count (one head = (3D + N) / (2H) MLP units of
    MACs) and MLP counts with the same unit step; MLP counts then barely move (measured on CIFAR-10, 4-block
    ViT, counts_lr 1.0: mean MLP width 383 of 384 at search steps 60-120, while heads fell to 1.5-1.75 of 3)
    and the budget is met by heads alone. Stepping s / range instead gives every kind a comparable relative
    speed; `counts_space="units"` restores the spec's update.
  * Skip warm-up (the first `skip_warmup_fraction` of the search): gates fixed at (0.5, 0.5), theta frozen (spec).
    Counts, prox and duals run from the first step (the spec freezes only theta; the official code also froze
    the counts). R keeps using softmax(theta / tau) during warm-up (about 0.98 per block at init), not the
    forward's 0.5, so the budget is not counted as half met by gates that will not stay at 0.5.
  * theta is stepped every optimizer step (the official code accumulated 50 steps), without weight decay. Its
    gradient is whatever the trainer left in `theta.grad` (unscaled, clipped, accumulated: see
    `optimizer_groups`); a non-finite gradient (an fp16 overflow step) skips the update. The method sets
    `theta.grad = None` afterwards.
  * Eval-mode forwards during the search use the noise-free gates softmax(theta / tau) (the skip warm-up's
    (0.5, 0.5) during warm-up); after `finalize()` the final hard masks.
  * Final projection: `decide()` takes the hard architecture of the current counts (ceil, magnitude top-k) and
    theta (block l runs iff theta_l[1] > theta_l[0]; if no block would run, the one with the largest run margin
    is kept), then greedily removes the remaining unit group with the least damage per MAC saved (damage =
    removed squared column norms: an MLP unit, one value dim in every kept head, a head, or a whole block while
    more than one is kept) until `architecture_macs <= target_macs` holds exactly; MLP widths and value head dims
    stay at or above `channel_multiple` and are then rounded to multiples of it (`uvc_projection.project_and_round`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from ..architecture import Architecture, LayerArchitecture
from ..config import CompressionConfig
from ..flops import macs_from_widths
from ..gating import Masks
from .base import CompressionMethod
from .uvc_projection import ProjectionLayer, project_and_round


# -- least-k sum ----------------------------------------------------------------------------------------------
class LeastKSum(torch.autograd.Function):
    """LS(k; v) = sum of the ceil(k) smallest entries of v, with dLS/dk = the (ceil(k)+1)-th smallest entry.

    Edge: when ceil(k) >= len(v) there is no (ceil(k)+1)-th entry; dLS/dk is then the largest entry (the official
    code's convention: the marginal cost of one more group is taken as the costliest group). ceil(k) is clamped
    to [0, len(v)]. dLS/dv is the 0/1 indicator of the least-k set.
    """

    @staticmethod
    def forward(ctx, k: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        flat = values.detach().reshape(-1).float()
        n = flat.numel()
        m = min(max(math.ceil(float(k)), 0), n)
        ordered, order = torch.sort(flat, stable=True)
        indicator = torch.zeros_like(flat)
        indicator[order[:m]] = 1.0
        if n == 0:
            next_value = flat.new_zeros(())
        else:
            next_value = ordered[m] if m < n else ordered[-1]
        ctx.save_for_backward(next_value, indicator)
        ctx.values_shape = values.shape
        return ordered[:m].sum()

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        next_value, indicator = ctx.saved_tensors
        grad_k = grad_output * next_value if ctx.needs_input_grad[0] else None
        grad_values = (grad_output * indicator).view(ctx.values_shape) if ctx.needs_input_grad[1] else None
        return grad_k, grad_values


def least_k_sum(k, values: torch.Tensor) -> torch.Tensor:
    """Sum of the ceil(k) smallest entries of `values` (float32); d/dk = the (ceil(k)+1)-th smallest (see
    `LeastKSum` for the edge ceil(k) >= len(values))."""
    if not torch.is_tensor(k):
        k = torch.tensor(float(k), device=values.device)
    return LeastKSum.apply(k, values)


def straight_through_ceil(value: torch.Tensor) -> torch.Tensor:
    """ceil(value) forward, identity backward."""
    return value + (value.ceil() - value).detach()


def _removed_by_rank(scores: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """Boolean mask of the ceil(count) lowest scores along the last dim (stable: ties go to the lower index).

    Works on device without synchronising (no `.item()`): a unit is removed iff its ascending rank < ceil(count).
    """
    order = torch.argsort(scores, dim=-1, stable=True)
    ranks = torch.empty_like(order)
    ranks.scatter_(-1, order, torch.arange(scores.shape[-1], device=scores.device).expand_as(order))
    return ranks < count.ceil()


def _scale_columns(linear: nn.Linear, factors: torch.Tensor) -> None:
    """linear.weight[:, j] *= factors[j] (in place, in the weight's dtype)."""
    linear.weight.mul_(factors.reshape(1, -1).to(device=linear.weight.device, dtype=linear.weight.dtype))


@dataclass
class _Groups:
    """Current least-k sets of one block (boolean masks) and the scores they come from (float32, detached)."""

    head_scores: torch.Tensor  # (H,)
    dim_scores: torch.Tensor  # (H, d)
    mlp_scores: torch.Tensor  # (I,)
    heads_removed: torch.Tensor  # (H,) bool
    dims_removed: torch.Tensor  # (H, d) bool, rows of removed heads included (all False for them)
    mlp_removed: torch.Tensor  # (I,) bool


class UVCMethod(CompressionMethod):
    """UVC's primal-dual search (see the module docstring for every design choice).

    Args:
        model: the dense ViT/DeiT classifier.
        config: `CompressionConfig`; `config.uvc` holds every step size and schedule.
    """

    name = "uvc"
    uses_teacher_by_default = True

    def __init__(self, model: nn.Module, config: CompressionConfig):
        super().__init__(model, config)
        geo = self.geometry
        layers, heads, head_dim, inter = geo.num_layers, geo.num_heads, geo.head_dim, geo.intermediate_size
        settings = config.uvc
        self.register_buffer("head_counts", torch.zeros(layers))
        self.register_buffer("vdim_counts", torch.zeros(layers))
        self.register_buffer("mlp_counts", torch.zeros(layers))
        # Upper bounds of the counts (at least one head, value dim and MLP unit stays in a running block).
        self.register_buffer("head_count_max", torch.full((layers,), float(heads - 1)), persistent=False)
        self.register_buffer("vdim_count_max", torch.full((layers,), float(head_dim - 1)), persistent=False)
        self.register_buffer("mlp_count_max", torch.full((layers,), float(max(inter - 1, 0))), persistent=False)
        self.theta = nn.Parameter(torch.tensor([list(settings.theta_init)] * layers, dtype=torch.float32))
        self.register_buffer("theta_momentum", torch.zeros(layers, 2))
        self.register_buffer("head_duals", torch.full((layers,), float(settings.dual_init)))
        self.register_buffer("mlp_duals", torch.full((layers,), float(settings.dual_init)))
        self.register_buffer("vdim_duals", torch.full((layers,), float(settings.dual_init)))
        self.register_buffer("budget_dual", torch.tensor(float(settings.dual_init)))
        self.register_buffer("progress_step", torch.tensor(0, dtype=torch.long))
        # The final architecture (filled by `finalize()`), so a reload after the search reproduces it exactly.
        self.register_buffer("final_blocks", torch.ones(layers, dtype=torch.bool))
        self.register_buffer("final_heads", torch.ones(layers, heads, dtype=torch.bool))
        self.register_buffer("final_vdims", torch.ones(layers, heads * head_dim, dtype=torch.bool))
        self.register_buffer("final_mlp", torch.ones(layers, inter, dtype=torch.bool))
        self._last_logs: dict[str, float] = {}
        self.to(next(model.parameters()).device)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        # A reload may carry another final architecture: rebuild it (and its masks) from the loaded buffers.
        self.final_architecture = None
        self._final_masks = None

    # -- dtype guard -------------------------------------------------------------------------------------------
    def _apply(self, fn, recurse=True):
        """Keep counts, duals, theta and momentum float32 when the model is cast (e.g. `model.to(bfloat16)`)."""
        before = {name: buf for name, buf in self._buffers.items() if buf is not None and buf.is_floating_point()}
        theta = self.theta.data
        result = super()._apply(fn, recurse)
        for name, old in before.items():
            new = self._buffers[name]
            if new.dtype != torch.float32:
                self._buffers[name] = old.to(device=new.device, dtype=torch.float32)
        if self.theta.dtype != torch.float32:
            self.theta.data = theta.to(device=self.theta.device, dtype=torch.float32)
        return result

    # -- schedule ----------------------------------------------------------------------------------------------
    @property
    def warmup_steps(self) -> int:
        return int(round(self.config.uvc.skip_warmup_fraction * self.total_search_steps))

    @property
    def in_skip_warmup(self) -> bool:
        return int(self.progress_step) < self.warmup_steps

    def set_progress(self, step: int) -> None:
        self.progress_step.fill_(int(step))

    @property
    def target_ratio(self) -> float:
        return float(self.target_macs) / float(self.dense_macs)

    # -- scores and least-k sets -------------------------------------------------------------------------------
    def _scores(self, index: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(head scores (H,), dim scores (H, d), mlp scores (I,)) of block `index`: squared column norms."""
        geo = self.geometry
        block = self.parts.blocks[index]
        dim_scores = block.o_proj.weight.detach().float().pow(2).sum(0).view(geo.num_heads, geo.head_dim)
        mlp_scores = block.fc2.weight.detach().float().pow(2).sum(0)
        return dim_scores.sum(1), dim_scores, mlp_scores

    def _groups(self, index: int) -> _Groups:
        head_scores, dim_scores, mlp_scores = self._scores(index)
        counts = (self.head_counts[index], self.vdim_counts[index], self.mlp_counts[index])
        heads_removed = _removed_by_rank(head_scores, counts[0].to(head_scores.device))
        dims_removed = _removed_by_rank(dim_scores, counts[1].to(dim_scores.device)) & ~heads_removed[:, None]
        mlp_removed = _removed_by_rank(mlp_scores, counts[2].to(mlp_scores.device))
        return _Groups(head_scores, dim_scores, mlp_scores, heads_removed, dims_removed, mlp_removed)

    # -- gates -------------------------------------------------------------------------------------------------
    def _gate_probabilities(self) -> torch.Tensor:
        """Noise-free (skip, run) probabilities softmax(theta / tau), float32, differentiable in theta."""
        return torch.softmax(self.theta.float() / self.config.uvc.gumbel_tau, dim=-1)

    def search_masks(self) -> Masks:
        geo = self.geometry
        device = self.theta.device
        with torch.autocast(device_type=device.type, enabled=False):
            if self.in_skip_warmup:
                half = torch.tensor(0.5, device=device)
                gates = [(half, half)] * geo.num_layers
            else:
                if self.training:
                    probabilities = F.gumbel_softmax(self.theta.float(), tau=self.config.uvc.gumbel_tau, hard=False)
                else:
                    probabilities = self._gate_probabilities()
                gates = [(probabilities[i, 0], probabilities[i, 1]) for i in range(geo.num_layers)]
            masks = Masks()
            for index in range(geo.num_layers):
                groups = self._groups(index)
                kept_heads = (~groups.heads_removed).float()
                masks.qk.append(kept_heads.repeat_interleave(geo.head_dim))
                masks.v.append(((~groups.dims_removed).float() * kept_heads[:, None]).reshape(-1))
                masks.mlp.append((~groups.mlp_removed).float())
                masks.block_gates.append(gates[index])
        return masks

    # -- budget ------------------------------------------------------------------------------------------------
    def expected_ratio(self, head_removed=None, vdim_removed=None, mlp_removed=None, run=None) -> torch.Tensor:
        """R = expected MACs / dense MACs (stem and head included) from removal counts (straight-through ceil)
        and per-block run probabilities (default: the current counts and softmax(theta / tau)[run], detached)."""
        geo = self.geometry
        head_removed = self.head_counts if head_removed is None else head_removed
        vdim_removed = self.vdim_counts if vdim_removed is None else vdim_removed
        mlp_removed = self.mlp_counts if mlp_removed is None else mlp_removed
        run = self._gate_probabilities().detach()[:, 1] if run is None else run
        heads_kept = geo.num_heads - straight_through_ceil(head_removed.float())
        qk = heads_kept * geo.head_dim
        v = heads_kept * (geo.head_dim - straight_through_ceil(vdim_removed.float()))
        mlp = geo.intermediate_size - straight_through_ceil(mlp_removed.float())
        macs = macs_from_widths(geo, geo.hidden_size, qk, v, mlp, run.float())
        return macs / float(self.dense_macs)

    def hard_ratio(self) -> float:
        """MACs ratio of the hard architecture before the final projection (ceil counts, theta decisions)."""
        with torch.no_grad():
            run = (self.theta[:, 1] > self.theta[:, 0]).float()
            return float(self.expected_ratio(run=run))

    # -- losses ------------------------------------------------------------------------------------------------
    def loss(self, task_loss: torch.Tensor, logits: torch.Tensor, inputs: dict) -> tuple[torch.Tensor, dict]:
        """The task (distillation) loss unchanged: it already reaches theta through the Gumbel block gates. The
        budget's and the groups' terms are applied by the manual updates in `after_optimizer_step`."""
        return task_loss, dict(self._last_logs)

    # -- manual primal-dual updates ----------------------------------------------------------------------------
    def optimizer_groups(self, learning_rate: float) -> list[dict]:
        """theta in a group with lr = 0 and no weight decay: the trainer's optimizer never moves it, but fp16 loss
        scaling unscales its gradient, gradient clipping and zeroing treat it like the weights'. UVC's own SGD with
        momentum moves it in `after_optimizer_step`. Counts and duals are buffers."""
        return [{"params": [self.theta], "lr": 0.0, "weight_decay": 0.0}]

    @torch.no_grad()
    def _prox(self, learning_rate: float, groups: list[_Groups]) -> None:
        """W_g <- W_g / (1 + 2 lr dual) for every group in the current least-k sets (input columns of o_proj for
        heads and value dims, of fc2 for MLP units)."""
        for index, (block, group) in enumerate(zip(self.parts.blocks, groups)):
            def factor(dual: torch.Tensor) -> torch.Tensor:
                return 1.0 / (1.0 + 2.0 * learning_rate * dual.to(group.dim_scores.device))

            columns = torch.ones_like(group.dim_scores)
            columns = torch.where(group.heads_removed[:, None], factor(self.head_duals[index]), columns)
            columns = torch.where(group.dims_removed, factor(self.vdim_duals[index]), columns)
            _scale_columns(block.o_proj, columns.reshape(-1))
            units = torch.ones_like(group.mlp_scores)
            _scale_columns(block.fc2, torch.where(group.mlp_removed, factor(self.mlp_duals[index]), units))

    def _least_sums(self, groups: list[_Groups], with_grad: bool):
        """Per block: LS values (heads, dims, mlp) as an (L, 3) tensor and, if asked, their derivatives in the
        counts (the (ceil + 1)-th smallest scores, summed over the kept heads for the dims)."""
        values, grads = [], []
        for index, group in enumerate(groups):
            counts = [c[index].detach().clone() for c in (self.head_counts, self.vdim_counts, self.mlp_counts)]
            counts = [count.requires_grad_(with_grad) for count in counts]
            with torch.enable_grad():
                kept = (~group.heads_removed).nonzero().flatten().tolist()
                terms = [
                    least_k_sum(counts[0], group.head_scores),
                    sum((least_k_sum(counts[1], group.dim_scores[h]) for h in kept), counts[1].new_zeros(())),
                    least_k_sum(counts[2], group.mlp_scores),
                ]
                if with_grad:
                    grads.append(torch.stack([
                        torch.autograd.grad(term, count)[0] if term.requires_grad else torch.zeros_like(count)
                        for term, count in zip(terms, counts)
                    ]))
            values.append(torch.stack([term.detach() for term in terms]))
        return torch.stack(values), (torch.stack(grads) if with_grad else None)

    def _ratio_gradients(self):
        """R (noise-free) and dR/d(head, vdim, mlp counts), dR/dtheta."""
        counts = [c.detach().clone().requires_grad_(True) for c in (self.head_counts, self.vdim_counts,
                                                                      self.mlp_counts)]
        theta = self.theta.detach().float().clone().requires_grad_(True)
        with torch.enable_grad():
            run = torch.softmax(theta / self.config.uvc.gumbel_tau, dim=-1)[:, 1]
            ratio = self.expected_ratio(*counts, run=run)
            grads = torch.autograd.grad(ratio, [*counts, theta])
        return ratio.detach(), [g.detach() for g in grads]

    @staticmethod
    def _projected_sgd(values: torch.Tensor, grad: torch.Tensor, upper: torch.Tensor, lr: float,
                       space: str = "units") -> None:
        """values <- clamp(values - lr * clip_inf(grad), 0, upper); at a bound, only moves back inside.

        With `space="fraction"` the step is taken on values / upper (gradient times upper, step times upper), so
        every count moves at most `lr` of its own range per step whatever its unit."""
        grad = grad.clone()
        at_upper, at_lower = values >= upper, values <= 0
        grad[at_upper] = grad[at_upper].clamp(min=0.0)
        grad[at_lower] = grad[at_lower].clamp(max=0.0)
        scale = upper if space == "fraction" else torch.ones_like(upper)
        grad = grad * scale
        peak = grad.abs().max() if grad.numel() else grad.new_zeros(())
        if peak > 1.0:
            grad = grad / peak
        values.copy_(torch.minimum((values - lr * scale * grad).clamp(min=0.0), upper))

    def after_optimizer_step(self, learning_rate: float) -> None:
        """One UVC step after the weights' optimizer step: prox, counts, theta, duals (spec/uvc.md, steps 1-4)."""
        if bool(self.finalized):
            self.theta.grad = None
            return
        settings = self.config.uvc
        device = self.theta.device
        with torch.no_grad(), torch.autocast(device_type=device.type, enabled=False):
            layers = self.geometry.num_layers
            # 1. proximal shrink of the current least-k groups
            if settings.prox:
                self._prox(float(learning_rate), [self._groups(i) for i in range(layers)])
            groups = [self._groups(i) for i in range(layers)]
            _, ls_grads = self._least_sums(groups, with_grad=True)  # (L, 3): v_(ceil+1) per group kind
            ratio, (d_heads, d_vdims, d_mlp, d_theta) = self._ratio_gradients()
            gap = float(ratio) - self.target_ratio
            z = self.budget_dual.detach().float()
            budget_on = 0.0 if gap < -settings.budget_gap_clip else 1.0
            # 2. counts: y * v_(ceil+1) + z * dR/ds, projected, inf-norm clipped, SGD (in `counts_space`)
            count_grads = torch.stack([
                self.head_duals * ls_grads[:, 0] + budget_on * z * d_heads,
                self.mlp_duals * ls_grads[:, 2] + budget_on * z * d_mlp,
            ], dim=1)
            stacked = torch.stack([self.head_counts, self.mlp_counts], dim=1)
            self._projected_sgd(stacked, count_grads, torch.stack([self.head_count_max, self.mlp_count_max], 1),
                                settings.counts_lr, settings.counts_space)
            self.head_counts.copy_(stacked[:, 0])
            self.mlp_counts.copy_(stacked[:, 1])
            vdim_grads = self.vdim_duals * ls_grads[:, 1] + budget_on * z * d_vdims
            self._projected_sgd(self.vdim_counts, vdim_grads, self.vdim_count_max, settings.counts_lr,
                                settings.counts_space)
            # 3. theta: dL_KD/dtheta + w * z * dR/dtheta, SGD with momentum (frozen during the skip warm-up)
            if not self.in_skip_warmup:
                kd_grad = self.theta.grad.detach().float() if self.theta.grad is not None else torch.zeros_like(d_theta)
                grad = kd_grad + settings.theta_budget_weight * budget_on * z * d_theta
                if torch.isfinite(grad).all():
                    self.theta_momentum.mul_(settings.theta_momentum).add_(grad)
                    self.theta.data.sub_(settings.theta_lr * self.theta_momentum.to(self.theta.dtype))
            self.theta.grad = None
            # 4. projected dual ascent at the new primal point
            groups = [self._groups(i) for i in range(layers)]
            sums, _ = self._least_sums(groups, with_grad=False)
            self.head_duals.add_(settings.dual_lr * sums[:, 0]).clamp_(min=0.0)
            self.vdim_duals.add_(settings.dual_lr * sums[:, 1]).clamp_(min=0.0)
            self.mlp_duals.add_(settings.dual_lr * sums[:, 2]).clamp_(min=0.0)
            new_ratio = float(self.expected_ratio())
            self.budget_dual.add_(settings.budget_dual_lr * (new_ratio - self.target_ratio)).clamp_(min=0.0)
            self._last_logs = {"uvc/ratio": new_ratio, "uvc/budget_dual": float(self.budget_dual)}

    # -- decisions ---------------------------------------------------------------------------------------------
    def decide(self) -> Architecture:
        """The hard architecture of the current counts and theta, projected to `architecture_macs <= target`.

        After `finalize()` (also after a reload), the stored final architecture.
        """
        if bool(self.finalized):
            return self._stored_architecture()
        geo = self.geometry
        with torch.no_grad():
            keep_blocks = (self.theta[:, 1] > self.theta[:, 0]).tolist()
            if geo.num_layers and not any(keep_blocks):
                keep_blocks[int(torch.argmax(self.theta[:, 1] - self.theta[:, 0]))] = True
            layers = [ProjectionLayer.from_groups(self._groups(i), keep) for i, keep in enumerate(keep_blocks)]
        removed, rounded = project_and_round(layers, geo, self.target_macs, self.config.uvc.channel_multiple)
        architecture = Architecture(
            layers=[layer.to_layer_architecture(geo.head_dim) for layer in layers],
            hidden_channels=list(range(geo.hidden_size)),
        )
        macs = self.architecture_macs(architecture)
        if macs > self.target_macs:  # cannot happen: _project_to_budget counts with the same formula
            raise RuntimeError(f"UVC final projection failed: {macs} MACs > target {self.target_macs:.0f}")
        architecture.metadata.update(
            method=self.name, macs=macs, ratio=macs / self.dense_macs, target_macs=float(self.target_macs),
            hard_ratio=self.hard_ratio(), projection_removals=removed, rounding_removals=rounded,
        )
        return architecture

    def finalize(self) -> Architecture:
        architecture = super().finalize()
        self._store_architecture(architecture)
        return architecture

    @torch.no_grad()
    def _store_architecture(self, architecture: Architecture) -> None:
        head_dim = self.geometry.head_dim
        self.final_blocks.zero_()
        self.final_heads.zero_()
        self.final_vdims.zero_()
        self.final_mlp.zero_()
        for index, layer in enumerate(architecture.layers):
            if not layer.keep_block:
                continue
            self.final_blocks[index] = True
            self.final_heads[index, layer.heads] = True
            self.final_vdims[index, layer.flat_indices(head_dim, "v")] = True
            self.final_mlp[index, layer.mlp_neurons] = True

    def _stored_architecture(self) -> Architecture:
        geo = self.geometry
        layers = []
        for index in range(geo.num_layers):
            if not bool(self.final_blocks[index]):
                layers.append(LayerArchitecture([], [], [], [], keep_block=False))
                continue
            heads = self.final_heads[index].nonzero().flatten().tolist()
            vdims = self.final_vdims[index].view(geo.num_heads, geo.head_dim)
            layers.append(LayerArchitecture(
                heads=heads,
                qk_channels=[list(range(geo.head_dim)) for _ in heads],
                v_channels=[vdims[h].nonzero().flatten().tolist() for h in heads],
                mlp_neurons=self.final_mlp[index].nonzero().flatten().tolist(),
            ))
        architecture = Architecture(layers=layers, hidden_channels=list(range(geo.hidden_size)))
        macs = self.architecture_macs(architecture)
        architecture.metadata.update(method=self.name, macs=macs, ratio=macs / self.dense_macs,
                                     target_macs=float(self.target_macs))
        return architecture

    # -- logging -----------------------------------------------------------------------------------------------
    def metrics(self) -> dict[str, float]:
        geo = self.geometry
        with torch.no_grad():
            heads = geo.num_heads - self.head_counts.ceil()
            vdim = geo.head_dim - self.vdim_counts.ceil()
            mlp = geo.intermediate_size - self.mlp_counts.ceil()
            skipped = int((self.theta[:, 1] <= self.theta[:, 0]).sum())
            return {
                "uvc/ratio": float(self.expected_ratio()),
                "uvc/hard_ratio": self.hard_ratio(),
                "uvc/budget": self.target_ratio,
                "uvc/budget_dual": float(self.budget_dual),
                "uvc/head_dual_mean": float(self.head_duals.mean()),
                "uvc/vdim_dual_mean": float(self.vdim_duals.mean()),
                "uvc/mlp_dual_mean": float(self.mlp_duals.mean()),
                "uvc/mean_heads": float(heads.mean()),
                "uvc/mean_v_head_dim": float(vdim.mean()),
                "uvc/mean_mlp_width": float(mlp.mean()),
                "uvc/skipped_blocks": float(skipped),
                "uvc/run_probability_mean": float(self._gate_probabilities()[:, 1].mean()),
                "uvc/skip_warmup": float(self.in_skip_warmup),
            }

    def snapshot(self) -> dict[str, float]:
        """`metrics()` plus, per block, the kept heads, value head dim and MLP width of the current counts and the
        block's run probability (what the report's plot shows)."""
        geo = self.geometry
        values = self.metrics()
        with torch.no_grad():
            run = self._gate_probabilities()[:, 1]
            for index in range(geo.num_layers):
                values[f"heads/{index}"] = float(geo.num_heads - self.head_counts[index].ceil())
                values[f"v_head_dim/{index}"] = float(geo.head_dim - self.vdim_counts[index].ceil())
                values[f"mlp_width/{index}"] = float(geo.intermediate_size - self.mlp_counts[index].ceil())
                values[f"run_probability/{index}"] = float(run[index])
        return values

