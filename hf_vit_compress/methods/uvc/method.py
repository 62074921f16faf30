"""UVC: Unified Visual transformer Compression (Yu et al., ICLR 2022; docs/methods.md).

Pruning (whole heads, value dims inside heads, MLP units), block skipping and distillation, optimised jointly
under one FLOPs budget by a primal-dual method:

    L = L_KD(W, theta) + sum_l [ y_l0 LS(s_l0; head scores) + y_l1 LS(s_l1; mlp scores) + p_l LS(r_l; dim scores) ]
        + z (R - B)

State (all float32, all in the state dict, so a checkpoint reproduces `decide()` exactly):
    counts (L, 3), columns head_counts (s_l0, heads removed, [0, H-1]), mlp_counts (s_l1, MLP units removed,
    [0, I-1]), vdim_counts (r_l, value dims removed per head, shared by the layer's heads, [0, d-1]): continuous,
    updated by projected SGD in `after_optimizer_step` (buffers: the trainer's optimizer never sees them);
    theta (L, 2): skip/run logits, an `nn.Parameter` (it gets dL_KD/dtheta through the block gates) that the
    method steps itself with SGD + momentum; it sits in the trainer's optimizer in a group with lr = 0, only so
    that fp16 loss scaling, gradient clipping and zeroing handle its gradient like the weights';
    duals (L, 3), columns head_duals y_l0, mlp_duals y_l1, vdim_duals p_l, and budget_dual z >= 0: projected
    dual ascent (the per-kind names are views of the columns; checkpoints with one buffer per kind still load);
    progress_step, theta_momentum, and after `finalize()` the final architecture's keep-masks.

Design choices and deviations from the paper and the official code, each with its reason: docs/methods.md (UVC,
"Implementation notes").
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from ...config import CompressionConfig
from ...surgery.gating import Masks
from ..base import CompressionMethod
from .budget import (  # noqa: F401  (MLP is this module's API too)
    HEADS,
    INITIAL_NEWTON_STEPS,
    MLP,
    OFFSET_RATE,
    VDIMS,
    UVCBudget,
    version_key,
)
from .decisions import UVCDecisions
from .groups import (  # noqa: F401  (LeastKSum and least_k_sum are part of this module's API)
    HiddenSets,
    LeastKSum,
    UnitGroups,
    least_k_sum,
    score_order,
)
from .hidden import HiddenGroup
from .projection import unit_floors


class UVCMethod(UVCDecisions, UVCBudget, CompressionMethod):
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
        # One column per kind (HEADS, MLP, VDIMS), so every update is one operation for all blocks and kinds.
        self.register_buffer("counts", torch.zeros(layers, 3))
        # Upper bounds of the counts (at least one head, value dim and MLP unit stays in a running block).
        upper = [0.0] * 3
        upper[HEADS], upper[MLP], upper[VDIMS] = float(heads - 1), float(max(inter - 1, 0)), float(head_dim - 1)
        self.register_buffer("count_max", torch.tensor([upper] * layers), persistent=False)
        self.theta = nn.Parameter(torch.tensor([list(settings.theta_init)] * layers, dtype=torch.float32))
        self.register_buffer("theta_momentum", torch.zeros(layers, 2))
        self.register_buffer("duals", torch.full((layers, 3), float(settings.dual_init)))
        self.register_buffer("budget_dual", torch.tensor(float(settings.dual_init)))
        # budget_control="projection": how far above B the continuous R is held so that the ceiled counts' R is on B
        self.register_buffer("budget_offset", torch.zeros(()))
        self.register_buffer("progress_step", torch.tensor(0, dtype=torch.long))
        # the skip warm-up's fixed gate (run = skip = 0.5), kept on the device: no host-to-device copy per step
        self.register_buffer("warmup_run", torch.tensor(0.5), persistent=False)
        # The final architecture (filled by `finalize()`), so a reload after the search reproduces it exactly.
        self.register_buffer("final_blocks", torch.ones(layers, dtype=torch.bool))
        self.register_buffer("final_heads", torch.ones(layers, heads, dtype=torch.bool))
        self.register_buffer("final_vdims", torch.ones(layers, heads * head_dim, dtype=torch.bool))
        self.register_buffer("final_mlp", torch.ones(layers, inter, dtype=torch.bool))
        # Residual-width pruning (optional): one global count s_D of removed residual channels, its dual, its bound
        # and the final kept channels; registered only when enabled, so the default state dict is unchanged.
        self.prune_hidden = settings.prune_hidden
        self._hidden_group = HiddenGroup(self.parts) if self.prune_hidden else None
        if self.prune_hidden:
            hidden_floor = unit_floors(geo, settings.channel_multiple)["hidden"]
            self.register_buffer("hidden_count", torch.zeros(()))
            self._hidden_min_kept = hidden_floor  # host copy: the masks keep at least this many (mean fill)
            self.register_buffer("hidden_count_max", torch.tensor(float(geo.hidden_size - hidden_floor)),
                                 persistent=False)
            self.register_buffer("hidden_dual", torch.tensor(float(settings.dual_init)))
            self.register_buffer("final_hidden", torch.ones(geo.hidden_size, dtype=torch.bool))
        self._last_logs: dict[str, torch.Tensor] = {}
        # the last step's two terms of the counts' gradient, (group duals x least-k slopes, budget dual x dR/dcounts),
        # each (L, 3), logged by `metrics()` (mean over blocks per kind)
        self._count_terms: tuple[torch.Tensor, ...] | None = None
        self._progress = 0  # host copy of progress_step (the skip warm-up is decided every step without a sync)
        self._width_macs = self._linear_macs_coefficients()
        # the same coefficients as one (2, 3) tensor: a searched residual width turns them into per-unit MACs in one
        # operation (every value an integer well under 2^24, so exact in float32 whichever way it is computed)
        self.register_buffer("_width_macs_table", torch.tensor(self._width_macs, dtype=torch.float32).t().contiguous(),
                             persistent=False)
        # The least-k sets computed at the end of `after_optimizer_step`, which the next forward's masks reuse while
        # the scored weights and the counts are unchanged: (key, groups).
        self._step_groups: tuple[tuple, UnitGroups] | None = None
        self._counts_cache: dict[str, tuple] = {}  # what the counts give, by name (`UVCBudget._counts_cached`)
        self.to(next(model.parameters()).device)
        if settings.budget_control == "projection":  # the search starts on the budget (`budget.py`)
            for _ in range(INITIAL_NEWTON_STEPS):
                self._project_to_budget()

    # per-kind views (read and written in place like the tensors they are)
    head_counts = property(lambda self: self.counts[:, HEADS])
    mlp_counts = property(lambda self: self.counts[:, MLP])
    vdim_counts = property(lambda self: self.counts[:, VDIMS])
    head_count_max = property(lambda self: self.count_max[:, HEADS])
    mlp_count_max = property(lambda self: self.count_max[:, MLP])
    vdim_count_max = property(lambda self: self.count_max[:, VDIMS])
    head_duals = property(lambda self: self.duals[:, HEADS])
    mlp_duals = property(lambda self: self.duals[:, MLP])
    vdim_duals = property(lambda self: self.duals[:, VDIMS])

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # Checkpoints written before counts and duals were one buffer each hold one buffer per kind: stack them.
        for name in ("counts", "duals"):
            keys = [f"{prefix}{kind}_{name}" for kind in ("head", "mlp", "vdim")]  # column order HEADS, MLP, VDIMS
            if f"{prefix}{name}" not in state_dict and all(key in state_dict for key in keys):
                state_dict[f"{prefix}{name}"] = torch.stack([state_dict.pop(key) for key in keys], 1)
        # Checkpoints written before the budget projection have no offset: it starts at 0 (unused by the dual).
        state_dict.setdefault(f"{prefix}budget_offset", torch.zeros(()))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        # A reload may carry another final architecture: rebuild it (and its masks) from the loaded buffers.
        self.final_architecture = None
        self._final_masks = None
        self._progress = int(self.progress_step)

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
        # new tensors: what the caches hold was computed from the old ones (whose ids a new tensor may reuse)
        self._step_groups, self._counts_cache = None, {}
        return result

    # -- schedule ----------------------------------------------------------------------------------------------
    @property
    def warmup_steps(self) -> int:
        return int(round(self.config.uvc.skip_warmup_fraction * self.total_search_steps))

    @property
    def in_skip_warmup(self) -> bool:
        return self._progress < self.warmup_steps

    def set_progress(self, step: int) -> None:
        self._progress = int(step)
        self.progress_step.fill_(self._progress)

    @property
    def budget_dual_log_lr(self) -> float:
        """eta of the log-space ascent of z: `budget_dual_log_lr`, or 200 / the number of search steps, at most 1
        (z then changes by at most a factor e^|R - B| per step)."""
        rate = self.config.uvc.budget_dual_log_lr
        return float(rate) if rate is not None else min(1.0, 200.0 / self.total_search_steps)

    # -- scores and least-k sets -------------------------------------------------------------------------------
    def _scored_weights(self) -> list[torch.Tensor]:
        blocks = self.parts.blocks
        weights = [block.o_proj.weight for block in blocks] + [block.fc2.weight for block in blocks]
        return weights + self._hidden_group.tensors() if self.prune_hidden else weights

    @torch.no_grad()
    def _scores(self, hidden_rest: torch.Tensor | None = None) -> tuple:
        """(head scores (L, H), dim scores (L, H, d), mlp scores (L, I), residual channel scores (D,) or None, their
        part outside o_proj / fc2 or None) of every block: squared column norms of o_proj and fc2 (and squared norms
        of each residual channel's group, `hidden.py`; `hidden_rest` given: that part taken as is), float32, all
        blocks at once."""
        geo = self.geometry
        blocks = self.parts.blocks
        o_proj = torch.stack([block.o_proj.weight for block in blocks]).float().pow(2)  # (L, D, H * d)
        fc2 = torch.stack([block.fc2.weight for block in blocks]).float().pow(2)  # (L, D, I)
        dim_scores = o_proj.sum(1)
        if self.config.uvc.shared_head_dims:  # a dim's group also holds its q and k rows (and biases)
            dim_scores = dim_scores + self._query_key_rows().float().pow(2).sum((1, 3))
        dim_scores = dim_scores.view(len(blocks), geo.num_heads, geo.head_dim)
        hidden = self._hidden_group.scores(o_proj, fc2, hidden_rest) if self.prune_hidden else (None, None)
        return dim_scores.sum(-1), dim_scores, fc2.sum(1), *hidden

    def _query_key_rows(self) -> torch.Tensor:
        """(L, 2, H * d, D [+ 1]): every block's q_proj and k_proj weights, their biases as a last column when they
        have them (`shared_head_dims`: the rows of a dim's group)."""
        projections = [linear for block in self.parts.blocks for linear in (block.q_proj, block.k_proj)]
        rows = torch.stack([linear.weight for linear in projections])
        if projections[0].bias is not None:
            rows = torch.cat([rows, torch.stack([linear.bias for linear in projections]).unsqueeze(-1)], -1)
        return rows.view(len(self.parts.blocks), 2, *rows.shape[1:])

    def _ceiled_counts(self) -> tuple[torch.Tensor, ...]:
        """ceil of the head (L, 1), value-dim (L, 1, 1) and MLP (L, 1) removal counts, shaped to broadcast along
        the units they count (what the least-k sets use), and of the residual count (1,) when it is searched.
        Reused while the counts are unchanged (`_counts_cached`: a step's end and the next step's start)."""
        def compute():
            columns = self.counts.ceil().unsqueeze(-1).unbind(1)
            ceiled = (columns[HEADS], columns[VDIMS].unsqueeze(-1), columns[MLP])
            return (*ceiled, self.hidden_count.ceil().reshape(1)) if self.prune_hidden else ceiled

        return self._counts_cached("ceiled", compute)

    def _groups(self, ceiled: tuple | None = None, heads_only: bool = False,
                hidden_rest: torch.Tensor | None = None) -> UnitGroups:
        """The current least-k sets of every block (the counts' lowest-scored units, stable ties); `hidden_rest`: see
        `_scores`."""
        head_scores, dim_scores, mlp_scores, hidden_scores, hidden_rest = self._scores(hidden_rest)
        ceiled = self._ceiled_counts() if ceiled is None else ceiled
        orders = [score_order(scores) for scores in (head_scores, dim_scores, mlp_scores)]
        hidden = None if hidden_scores is None else HiddenSets.of(hidden_scores, ceiled[3], hidden_rest)
        groups = UnitGroups(head_scores, dim_scores, mlp_scores, None, None, None,
                         tuple(ascending for ascending, _ in orders), tuple(ranks for _, ranks in orders), hidden)
        return groups.at_counts(ceiled, heads_only)

    def _state_key(self) -> tuple:
        """Identifies the scored weights and the counts by object and in-place version (no device read)."""
        return version_key([*self._scored_weights(), *self._count_tensors()])

    def _current_groups(self) -> UnitGroups:
        """`_groups()`, reusing the sets the last `after_optimizer_step` ended with while nothing they depend on has
        changed (the Trainer runs no other update between that step and the next forward)."""
        if self._step_groups is not None and self._step_groups[0] == self._state_key():
            return self._step_groups[1]
        return self._groups()

    # -- gates -------------------------------------------------------------------------------------------------
    def _gate_probabilities(self) -> torch.Tensor:
        """Noise-free (skip, run) probabilities softmax(theta / tau), float32, differentiable in theta."""
        return torch.softmax(self.theta.float() / self.config.uvc.gumbel_tau, dim=-1)

    def search_masks(self) -> Masks:
        geo = self.geometry
        device = self.theta.device
        with torch.autocast(device_type=device.type, enabled=False):
            if self.in_skip_warmup:  # (None, run): the skip weight is 1 - run = 0.5 too (see below)
                gates = [(None, self.warmup_run)] * geo.num_layers
            else:
                if self.training:
                    probabilities = F.gumbel_softmax(self.theta.float(), tau=self.config.uvc.gumbel_tau, hard=False)
                else:
                    probabilities = self._gate_probabilities()
                # (None, run): the skip weight is 1 - run (the two probabilities of a softmax), so the gate mixes
                # with one multiply-add: x + run * (block(x) - x)
                gates = [(None, run) for run in probabilities[:, 1].unbind(0)]
            groups = self._current_groups()
            kept_heads = (~groups.heads_removed).float()  # (L, H)
            # q and k get no mask: a removed head's value channels are all masked (below), so its output is 0
            # whatever its attention pattern, and no gradient reaches its q/k rows (dL/dP = dL/dout v^T = 0), exactly
            # as if q and k were masked too; two multiplies per block (and their backward) fewer.
            # residual channels: every LayerNorm normalises the kept ones only and outputs 0 on the others, so a
            # dropped channel reaches no q/k/v/fc1 and no classifier (`hidden.py`)
            hidden_keep = (~groups.hidden.removed).float() if self.prune_hidden else None
            values = ((~groups.dims_removed).float() * kept_heads.unsqueeze(-1)).flatten(-2)  # (L, H * d)
            return Masks(
                qk=values if self.config.uvc.shared_head_dims else [],  # the same dims (one fold for q, k and v)
                v=values,
                mlp=(~groups.mlp_removed).float(),
                hidden_keep=hidden_keep,
                hidden_min_kept=self._hidden_min_kept if self.prune_hidden else 0,
                block_gates=gates,
            )

    # -- losses ------------------------------------------------------------------------------------------------
    def loss(self, task_loss: torch.Tensor, logits: torch.Tensor, inputs: dict) -> tuple[torch.Tensor, dict]:
        """The task (distillation) loss unchanged: it already reaches theta through the Gumbel block gates. The
        budget's and the groups' terms are applied by the manual updates in `after_optimizer_step`; their last
        values (R, z) are logged (during the search only: they stop changing when it ends)."""
        return task_loss, {} if self._finalized else dict(self._last_logs)

    # -- manual primal-dual updates ----------------------------------------------------------------------------
    def optimizer_groups(self, learning_rate: float) -> list[dict]:
        """theta in a group with lr = 0 and no weight decay: the trainer's optimizer never moves it, but fp16 loss
        scaling unscales its gradient, gradient clipping and zeroing treat it like the weights'. UVC's own SGD with
        momentum moves it in `after_optimizer_step`. Counts and duals are buffers."""
        return [{"params": [self.theta], "lr": 0.0, "weight_decay": 0.0}]

    @torch.no_grad()
    def _prox(self, learning_rate: float, groups: UnitGroups) -> torch.Tensor | None:
        """W_g <- W_g / (1 + 2 lr dual) for every group in the current least-k sets (input columns of o_proj for
        heads and value dims, of fc2 for MLP units; the residual channels' groups), every block at once. Returns
        the residual channels' scores outside o_proj / fc2 after the shrink (None without `prune_hidden`)."""
        factors = torch.reciprocal(1.0 + 2.0 * learning_rate * self.duals)  # (L, 3)
        kinds = factors.view(*factors.shape, 1, 1).unbind(1)  # (L, 1, 1) each
        head_factor, vdim_factor, mlp_factor = kinds[HEADS], kinds[VDIMS], kinds[MLP]
        one = factors.new_ones(())
        columns = torch.where(groups.heads_removed.unsqueeze(-1), head_factor, one)
        columns = torch.where(groups.dims_removed, vdim_factor, columns)
        units = torch.where(groups.mlp_removed, mlp_factor.squeeze(-1), one)
        for linears, scale in (("o_proj", columns.flatten(1)), ("fc2", units)):
            weights = [getattr(block, linears).weight for block in self.parts.blocks]
            rows = scale.unsqueeze(1).to(weights[0].dtype).unbind(0)  # (1, in) per block: scales input columns
            torch._foreach_mul_(weights, list(rows))  # one operation for all blocks
        if self.config.uvc.shared_head_dims:  # the same factors on the q/k rows (and biases) of those groups
            blocks = self.parts.blocks
            factors = columns.flatten(1).to(blocks[0].q_proj.weight.dtype)  # (L, H * d)
            rows = factors.unsqueeze(-1).unbind(0)  # (H * d, 1) per block
            tensors = [linear.weight for block in blocks for linear in (block.q_proj, block.k_proj)]
            scales = [row for row in rows for _ in range(2)]
            if blocks[0].q_proj.bias is not None:
                tensors += [linear.bias for block in blocks for linear in (block.q_proj, block.k_proj)]
                scales += [factor for factor in factors.unbind(0) for _ in range(2)]
            torch._foreach_mul_(tensors, scales)
        if not self.prune_hidden:
            return None
        # every tensor of the removed residual channels' groups: their squared norms outside o_proj / fc2 (only
        # these factors touch those tensors) scale by the squared factors
        factors = self._hidden_group.shrink(groups.hidden.removed,
                                            torch.reciprocal(1.0 + 2.0 * learning_rate * self.hidden_dual))
        if self.config.uvc.shared_head_dims:  # the q/k rows shrunk above are in the rest too: computed afresh
            return None
        return groups.hidden.rest * factors.square()

    @staticmethod
    def _projected_sgd(values: torch.Tensor, grad: torch.Tensor, upper: torch.Tensor, lr: float,
                       space: str = "units", joint_columns: int | None = None) -> None:
        """values <- clamp(values - lr * clip_inf(grad), 0, upper), in place; at a bound, only moves back inside.

        With `space="fraction"` the step is taken on values / upper (gradient times upper, step times upper), so
        every count moves at most `lr` of its own range per step whatever its unit. The inf-norm clip is over the
        whole tensor, or, with `joint_columns=j` on an (L, n) tensor, over its first j columns and over the rest
        separately. On device, without reads."""
        grad = torch.where(values >= upper, grad.clamp(min=0.0), grad)
        grad = torch.where(values <= 0, grad.clamp(max=0.0), grad)
        if space == "fraction":
            grad = grad * upper
            step = lr * upper
        else:
            step = lr
        if grad.numel():
            magnitude = grad.abs()
            if joint_columns is None:
                peak = magnitude.max()
            else:
                first, rest = magnitude[:, :joint_columns].amax(), magnitude[:, joint_columns:].amax()
                peak = torch.stack([first] * joint_columns + [rest] * (grad.shape[1] - joint_columns))
            grad = grad / peak.clamp(min=1.0)  # divided by the inf-norm when it exceeds 1
        values.sub_(step * grad).clamp_(min=0.0)
        torch.minimum(values, upper, out=values)

    def after_optimizer_step(self, learning_rate: float) -> None:
        """One UVC step after the weights' optimizer step: prox, counts, theta, duals (docs/methods.md, steps 1-4),
        every block and kind at once and without reading anything back from the device."""
        # One function on purpose: prox, counts, theta and duals must run in this order on the same step's tensors,
        # and splitting it would pass a dozen of them around.
        if self._finalized:
            self.theta.grad = None
            return
        settings = self.config.uvc
        device = self.theta.device
        with torch.no_grad(), torch.autocast(device_type=device.type, enabled=False):
            # 1. proximal shrink of the current least-k groups (then the sets of the shrunk weights)
            ceiled = self._ceiled_counts()
            hidden_rest = self._prox(float(learning_rate), self._groups(ceiled)) if settings.prox else None
            groups = self._groups(ceiled, heads_only=True, hidden_rest=hidden_rest)
            slopes = [None] * 3
            slopes[HEADS], slopes[VDIMS], slopes[MLP] = groups.least_k_slopes(ceiled)
            # under budget_control="projection" the budget is the projection's (after theta's step), not z's; R and
            # its gradients are then the continuous counts' (the projection's Newton step uses them)
            projection = settings.budget_control == "projection"
            ratio, d_counts, d_theta, d_hidden = self._ratio_and_gradients(ceil=not projection)
            # the budget term is dropped only far under the budget: R - B < -clip
            budget = self.budget_dual * (ratio - self.target_ratio >= -settings.budget_gap_clip)
            # 2. counts: y * v_(ceil+1) + z * dR/ds, projected, inf-norm clipped (heads and MLP units jointly, value
            # dims apart), SGD (in `counts_space`)
            group_term = self.duals * torch.stack(slopes, 1)
            if projection:  # no budget term: the projection below moves the counts onto the budget
                self._count_terms, count_grads = (group_term,), group_term
            else:
                budget_term = budget * d_counts
                self._count_terms = (group_term, budget_term)  # kept for `metrics()` (no extra operation)
                count_grads = group_term + budget_term
            self._projected_sgd(self.counts, count_grads, self.count_max, settings.counts_lr, settings.counts_space,
                                joint_columns=2)
            if self.prune_hidden:  # the residual count: y_D * v_(ceil+1) + z * dR/ds_D, clipped on its own
                hidden_grad = self.hidden_dual * groups.hidden.slope(ceiled[3])
                hidden_grad = hidden_grad if projection else hidden_grad + budget * d_hidden
                self._projected_sgd(self.hidden_count, hidden_grad, self.hidden_count_max, settings.counts_lr,
                                    settings.counts_space)
            # 3. theta: dL_KD/dtheta + w * z * dR/dtheta, SGD with momentum (frozen during the skip warm-up); a
            # non-finite gradient (an fp16 overflow step) leaves theta and its momentum as they were
            if not self.in_skip_warmup:
                kd_grad = self.theta.grad.float() if self.theta.grad is not None else torch.zeros_like(d_theta)
                grad = kd_grad + settings.theta_budget_weight * budget * d_theta
                finite = torch.isfinite(grad).all()
                momentum = torch.where(finite, self.theta_momentum * settings.theta_momentum + grad,
                                       self.theta_momentum)
                self.theta_momentum.copy_(momentum)
                # theta - lr * momentum, or theta itself (times 0) when the gradient was not finite
                self.theta.sub_(settings.theta_lr * momentum.to(self.theta.dtype) * finite)
            self.theta.grad = None
            if projection:  # R and its gradients from before this step's count move: the next step corrects
                self._project_to_budget((ratio, d_counts, d_theta, d_hidden))
            run = self._gate_probabilities()[:, 1]  # at the new theta
            # 4. projected dual ascent at the new primal point (same weights: the same scores, new least-k sets,
            # which are also the next forward's)
            ceiled = self._ceiled_counts()
            groups = groups.at_counts(ceiled)
            self._step_groups = (self._state_key(), groups)
            sums = [None] * 3
            sums[HEADS], sums[VDIMS], sums[MLP] = groups.least_k_sums()
            # y, p and LS are >= 0, so the ascent keeps them >= 0 without a projection
            self.duals.add_(settings.dual_lr * torch.stack(sums, 1))
            if self.prune_hidden:
                self.hidden_dual.add_(settings.dual_lr * groups.hidden.least_k_sum())
            kept = self._kept_widths()
            new_ratio = self._ratio(self._block_costs(*kept)[0], run, kept[3])
            if projection:
                # the masks keep the ceiled counts, up to a whole head per block under the continuous R: the offset
                # integrates that gap slowly, so the masks' R settles on B without flipping units every step
                self.budget_offset.add_(OFFSET_RATE * (self.target_ratio - new_ratio)).clamp_(
                    min=0.0, max=1.0 - self.target_ratio)
            if settings.budget_dual_update == "log":  # z <- z exp(eta (R - B)), kept in [dual_init, 1e12]
                factor = torch.exp(self.budget_dual_log_lr * (new_ratio - self.target_ratio))
                self.budget_dual.mul_(factor).clamp_(min=settings.dual_init, max=1e12)
            else:  # the spec's projected ascent
                self.budget_dual.add_(settings.budget_dual_lr * (new_ratio - self.target_ratio)).clamp_(min=0.0)
            self._last_logs = {"uvc/ratio": new_ratio, "uvc/budget_dual": self.budget_dual.clone()}

    # -- logging -----------------------------------------------------------------------------------------------
    @torch.no_grad()
    def _device_values(self, per_block: bool) -> tuple[list[str], torch.Tensor]:
        """Names and one 1-D tensor of everything logged from the device (and, for the snapshot, per block the kept
        heads, value head dim and MLP width of the current counts and the block's run probability)."""
        geo = self.geometry
        heads = geo.num_heads - self.head_counts.ceil()
        vdim = geo.head_dim - self.vdim_counts.ceil()
        mlp = geo.intermediate_size - self.mlp_counts.ceil()
        run = self._gate_probabilities()[:, 1]
        hard_run = self._hard_run()
        values = {
            "uvc/ratio": self.expected_ratio(),
            "uvc/hard_ratio": self.expected_ratio(run=hard_run),
            "uvc/budget_dual": self.budget_dual,
            "uvc/head_dual_mean": self.head_duals.mean(),
            "uvc/vdim_dual_mean": self.vdim_duals.mean(),
            "uvc/mlp_dual_mean": self.mlp_duals.mean(),
            "uvc/mean_heads": heads.mean(),
            "uvc/mean_v_head_dim": vdim.mean(),
            "uvc/mean_mlp_width": mlp.mean(),
            **({"uvc/hidden_width": geo.hidden_size - self.hidden_count.ceil(), "uvc/hidden_dual": self.hidden_dual}
               if self.prune_hidden else {}),
            "uvc/skipped_blocks": (1.0 - hard_run).sum(),
            "uvc/run_probability_mean": run.mean(),
        }
        # what pushes the counts down (group term) and up (budget term; none under budget_control="projection")
        if self._count_terms is not None:
            for label, term in zip(("group", "budget"), self._count_terms):
                means = term.mean(0)
                for kind, column in (("heads", HEADS), ("mlp", MLP), ("vdims", VDIMS)):
                    values[f"uvc/count_grad_{label}_{kind}"] = means[column]
        names = list(values)
        tensors = [value.float().reshape(1) for value in values.values()]
        if per_block:
            for prefix, per_layer in (("heads", heads), ("v_head_dim", vdim), ("mlp_width", mlp),
                                      ("run_probability", run)):
                names += [f"{prefix}/{index}" for index in range(geo.num_layers)]
                tensors.append(per_layer.float())
        return names, torch.cat(tensors)

    def _host_values(self) -> dict[str, float]:
        return {"uvc/budget": self.target_ratio, "uvc/skip_warmup": float(self.in_skip_warmup)}

    def metrics(self) -> dict[str, float]:
        if self._finalized:
            return {}  # nothing here changes after the search
        names, values = self._device_values(per_block=False)
        return {**dict(zip(names, values.tolist())), **self._host_values()}  # one transfer

    def snapshot(self) -> dict[str, float | torch.Tensor]:
        """`metrics()` plus, per block, the kept heads, value head dim and MLP width of the current counts and the
        block's run probability (what the report's plot shows); device values stay 0-dim tensors (converted in
        bulk by the trainer)."""
        names, values = self._device_values(per_block=True)
        return {**dict(zip(names, values.unbind(0))), **self._host_values()}
