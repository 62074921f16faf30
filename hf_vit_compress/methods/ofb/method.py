"""OFB, "Once for Both" (arXiv 2403.15835): one-stage bi-mask importance + sparsity search (docs/methods.md).

Every searchable module (per block: attention over a (heads x head-dim) grid, MLP width; one global embedding
width) holds importance logits s (S = sigmoid(s), one per unit) and architecture logits alpha (one per candidate
width). Units are ranked by S; the sparsity score of the unit at rank rho is V_rho = sum_k p_k [width_k > rho]
with p = softmax(alpha over active candidates); the unit's output is scaled by m = lambda * S + (1 - lambda) * V.
The modules and their formulas are in `modules.py` (all blocks of a kind batched in one module), the prices and
the budget projections in `budget.py`; this file holds the method: schedules, losses, elimination and decisions.
"""

from __future__ import annotations

import torch
from torch import nn

from ...config import CompressionConfig
from ...surgery.architecture import Architecture, LayerArchitecture
from ...surgery.gating import Masks
from ...training.device_logs import LogWindow
from ..base import CompressionMethod
from .budget import INITIAL_NEWTON_STEPS, OFBBudget
from .importance import initialise_from_weights
from .modules import (  # noqa: F401  (re-exported: the search space and loss terms are part of this API)
    ModuleView,
    SearchableAttention,
    SearchableWidth,
    embed_choices,
    head_choices,
    linear_schedule,
    one_hot_loss,
    padded_candidates,
    sparsity_scores,
    total_module_loss,
    width_choices,
)
from .pmim import PMIM

#: the paper's architecture-logit learning rate (budget_control="paper" with arch_lr=None)
PAPER_ARCH_LR = 1e-3


# ---------------------------------------------------------------------------------------------------------------
# The method
# ---------------------------------------------------------------------------------------------------------------
class OFBMethod(OFBBudget, CompressionMethod):
    """OFB search: bi-masks on q/k/v, fc1 and the embedding; adaptive one-hot + FLOPs + PMIM losses."""

    name = "ofb"

    def __init__(self, model: nn.Module, config: CompressionConfig):
        super().__init__(model, config)
        settings = config.ofb
        self.settings = settings
        geo = self.geometry
        self.heads_grid = head_choices(geo.num_heads, settings)
        self.dims_grid = width_choices(geo.head_dim, settings.head_dim_ratios, settings.channel_multiple)
        # Built in this order (attention of every block, MLP of every block, embedding), each drawing its
        # importance logits module after module: the same initial state as one module per block.
        self.attention = SearchableAttention(
            geo.num_heads, geo.head_dim, self.heads_grid, self.dims_grid, settings.score_init_std,
            settings.norm_coefficient_attention, settings.sigma_eps, num_modules=geo.num_layers,
        )
        mlp_widths = width_choices(geo.intermediate_size, settings.mlp_ratios, settings.channel_multiple)
        self.mlp = SearchableWidth(
            (geo.intermediate_size,), mlp_widths, settings.score_init_std, settings.norm_coefficient_other,
            settings.sigma_eps, num_modules=geo.num_layers,
        )
        self.embed = SearchableWidth(
            (geo.hidden_size,), embed_choices(geo.hidden_size, settings), settings.score_init_std,
            settings.norm_coefficient_other, settings.sigma_eps,
        )
        if settings.score_init == "weights":  # after the random draw, so the rest of the run sees the same RNG stream
            initialise_from_weights(self.attention, self.mlp, self.embed, self.parts, geo.num_heads,
                                    settings.score_init_std)
        if settings.score_init_mean:
            with torch.no_grad():
                for group in (self.attention, self.mlp, self.embed):
                    group.score_logits.add_(settings.score_init_mean)
        # host copy of the narrowest embedding candidate: the masks keep at least this many channels (mean fill)
        self._min_embed_width = min(embed_choices(geo.hidden_size, settings))
        self._build_cost_tables()
        self.pmim = PMIM(self.parts, settings.pmim_window) if settings.pmim else None
        self.lam = settings.lambda_start
        self.progress = 0.0
        # (probabilities, importance, sparsity) per group from the last forward with gradients, which loss() reuses
        self._forward_terms: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] | None = None
        self._candidates: tuple | None = None  # (buffer versions, padded_candidates(...)), reused while unchanged
        self._check_budget_reachable()
        # budget_control="dual": the total shift the budget projection has applied to the logits (logged; 0 under
        # "paper")
        self.register_buffer("budget_dual", torch.zeros(()))
        self.dual_budget = settings.budget_control == "dual"
        if self.dual_budget:  # start the search at the budget, not at uniform probabilities
            self.hold_budget(newton_steps=INITIAL_NEWTON_STEPS)

    # -- helpers -----------------------------------------------------------------------------------------------
    def groups(self) -> dict[str, SearchableWidth]:
        """The batched modules by kind: attention (every block), mlp (every block), embed (one)."""
        return {"attention": self.attention, "mlp": self.mlp, "embed": self.embed}

    def searchable_modules(self) -> dict[str, SearchableWidth | ModuleView]:
        """Every searchable module by name (embed, attn.i, mlp.i), as views into the batched groups."""
        modules = {"embed": self.embed}
        for index, (attention, mlp) in enumerate(zip(self.attention, self.mlp)):
            modules[f"attn.{index}"] = attention
            modules[f"mlp.{index}"] = mlp
        return modules

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # Checkpoints written before the dual budget control have no dual variable: they searched without one.
        state_dict.setdefault(f"{prefix}budget_dual", torch.zeros_like(self.budget_dual))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def install_hooks(self) -> None:
        if self.pmim is not None:
            self.pmim.install(self.parts)

    def remove_hooks(self) -> None:
        if self.pmim is not None:
            self.pmim.remove_hooks()

    def after_optimizer_step(self, learning_rate: float) -> None:
        if self.dual_budget and not self.search_finished:
            self.hold_budget()

    def arch_learning_rate(self) -> float:
        """`ofb.arch_lr`, or when None: `arch_travel / search steps` (dual budget control), the paper's 1e-3 (paper)."""
        settings = self.settings
        if settings.arch_lr is not None:
            return settings.arch_lr
        return settings.arch_travel / self.total_search_steps if self.dual_budget else PAPER_ARCH_LR

    # -- schedule ----------------------------------------------------------------------------------------------
    def set_progress(self, step: int) -> None:
        settings = self.settings
        self.progress = step / self.total_search_steps
        self.lam = linear_schedule(self.progress, settings.warmup_fraction, settings.lambda_start, settings.lambda_end)
        if self.pmim is not None:
            keep = linear_schedule(
                self.progress, settings.warmup_fraction, settings.pmim_keep_start, settings.pmim_keep_end
            )
            self.pmim.mask_ratio = 1.0 - keep
            self.pmim.active = not self.search_finished

    @property
    def warmup_steps(self) -> int:
        """Search steps of the warm-up (lambda and PMIM ramps); the dual budget control eliminates only after it."""
        return round(self.settings.warmup_fraction * self.total_search_steps)

    def elimination_interval(self) -> int:
        """Steps between elimination rounds: the post-warm-up search / `elimination_rounds` (dual budget control),
        or an epoch / `eliminations_per_epoch` (paper)."""
        if self.dual_budget:
            return max(1, round((self.total_search_steps - self.warmup_steps) / self.settings.elimination_rounds))
        return max(1, round(self.steps_per_epoch / self.settings.eliminations_per_epoch))

    def is_elimination_step(self, step: int) -> bool:
        """Whether candidates are eliminated after optimizer step `step` (0-based)."""
        done = step + 1 - (self.warmup_steps if self.dual_budget else 0)
        return done > 0 and done % self.elimination_interval() == 0

    def on_step_end(self, step: int) -> None:
        if self.search_finished or not self.is_elimination_step(step):
            return
        for group in self.groups().values():  # all modules at once, on device
            group.eliminate(self.settings.elimination_threshold)

    # -- masks -------------------------------------------------------------------------------------------------
    def _terms(self) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """(probabilities, importance S, sparsity V) of every group, each computed once."""
        terms = {}
        for name, group in self.groups().items():
            probabilities, importance = group.probabilities(), group.importance()
            terms[name] = (probabilities, importance, group.sparsity(probabilities, importance))
        return terms

    def search_masks(self) -> Masks:
        lam = self.lam
        terms = self._terms()
        # The forward's terms are the loss's too (same parameters until the optimizer steps): computed once.
        self._forward_terms = terms if torch.is_grad_enabled() else None
        attention = self.attention.mask(lam, *terms["attention"][1:]).flatten(-2)  # (L, H * d), shared by q/k/v
        embed_sparsity = terms["embed"][2]
        masks = Masks(qk=attention, v=attention, mlp=self.mlp.mask(lam, *terms["mlp"][1:]),
                      hidden=self.embed.mask(lam, *terms["embed"][1:]))
        if not self.embed.keeps_every_unit():  # a host-side answer: no device read per step
            masks.hidden_keep = (embed_sparsity.detach() > 0).float()
            masks.hidden_min_kept = self._min_embed_width
        return masks

    def compute_masks(self) -> Masks:
        # One formula before and after finalize(): final modules yield (lambda * S + 1 - lambda) on their kept
        # units, a learnable scale that fine-tuning keeps training and export folds in.
        if self.final_architecture is None and self._finalized:
            self.final_architecture = self.decide()  # resumed from a checkpoint saved after the search
        return self.search_masks()

    # -- losses ------------------------------------------------------------------------------------------------
    def _padded_candidates(self) -> tuple:
        """`padded_candidates` of the groups, recomputed only when their `active` / `is_final` buffers changed."""
        groups = self.groups().values()
        key = tuple((g.active._version, g.is_final._version, g.finality() is None) for g in groups)
        if self._candidates is None or self._candidates[0] != key:
            self._candidates = (key, padded_candidates(list(groups)))
        return self._candidates[1]

    def loss(self, task_loss: torch.Tensor, logits: torch.Tensor, inputs: dict) -> tuple[torch.Tensor, dict]:
        logs: dict[str, torch.Tensor] = {}
        terms, self._forward_terms = self._forward_terms, None
        if self.search_finished:
            return task_loss, logs
        terms = self._terms() if terms is None else terms
        settings = self.settings
        total = task_loss
        if self.pmim is not None:
            reconstruction = self.pmim.reconstruction_loss(inputs["pixel_values"])
            if reconstruction is not None:
                weight = task_loss.detach() / reconstruction.detach().clamp_min(1e-8)  # CE / L_rec, a constant
                total = total + weight * reconstruction
                logs["pmim_loss"] = reconstruction.detach()
        groups = list(self.groups().values())
        module_losses = total_module_loss(groups, [terms[name][0] for name in self.groups()],
                                          [terms[name][1] for name in self.groups()], self._padded_candidates())
        expected = self.expected_cost(terms)
        total = total + settings.module_loss_weight * module_losses
        logs.update({"module_loss": module_losses.detach(), self._ratio_key: expected.detach() / self.dense_cost})
        if not self.dual_budget:  # the paper's FLOPs loss; the projection holds the budget otherwise
            flops_loss = ((expected - self.target_cost) / self.dense_cost) ** 2
            total = total + settings.flops_loss_weight * flops_loss
            logs["flops_loss"] = flops_loss.detach()
        return total, logs

    # -- optimisation ------------------------------------------------------------------------------------------
    def optimizer_groups(self, learning_rate: float) -> list[dict]:
        settings = self.settings
        modules = self.groups().values()
        groups = [
            {
                "params": [m.alpha for m in modules],
                "lr": self.arch_learning_rate(),
                "betas": settings.arch_betas,
                "weight_decay": settings.arch_weight_decay,
            },
            {
                "params": [m.score_logits for m in modules],
                "lr": settings.score_lr or learning_rate,
                "weight_decay": 0.0,
            },
        ]
        if self.pmim is not None:
            groups.append({"params": list(self.pmim.parameters()), "lr": settings.decoder_lr, "weight_decay": 0.0})
        return groups

    # -- decisions ---------------------------------------------------------------------------------------------
    def decide(self) -> Architecture:
        """Each module's most probable candidate, then projected onto the budget (never above it)."""
        return self._architecture_from(self._decide_choices())

    def _decide_choices(self) -> dict[str, int]:
        modules = self.searchable_modules()
        choices = {name: module.current_choice() for name, module in modules.items()}
        if self._finalized:
            return choices  # fixed by finalize(): the same units every time (only the scales keep training)
        return self._project_to_budget(modules, choices)

    def _architecture_from(self, choices: dict[str, int]) -> Architecture:
        lam = self.settings.lambda_end if self.search_finished else self.lam
        geo = self.geometry
        layers = []
        for index, (attention, mlp) in enumerate(zip(self.attention, self.mlp)):
            attention_keep = attention.keep_for(choices[f"attn.{index}"])
            heads = [h for h in range(geo.num_heads) if bool(attention_keep[h].any())]
            channels = [attention_keep[h].nonzero().flatten().tolist() for h in heads]
            attention_scale = (lam * attention.importance().detach() + (1 - lam)).flatten()
            mlp_keep = mlp.keep_for(choices[f"mlp.{index}"])
            layers.append(
                LayerArchitecture(
                    heads=heads,
                    qk_channels=channels,
                    v_channels=channels,
                    mlp_neurons=mlp_keep.nonzero().flatten().tolist(),
                    qk_scale=attention_scale,
                    v_scale=attention_scale,
                    mlp_scale=lam * mlp.importance().detach() + (1 - lam),
                )
            )
        embed_keep = self.embed.keep_for(choices["embed"])
        return Architecture(  # q/k and v head dims equal: never zero-padded (`cost.BudgetCost.with_padding`)
            layers=layers,
            hidden_channels=embed_keep.nonzero().flatten().tolist(),
            hidden_scale=lam * self.embed.importance().detach() + (1 - lam),
            metadata={"method": "ofb"},
        )

    def finalize(self) -> Architecture:
        """End the search: every module keeps its decided units; lambda stays at its final value."""
        if self.final_architecture is None:
            choices = self._decide_choices()
            modules = self.searchable_modules()
            keeps = {name: modules[name].keep_for(choice) for name, choice in choices.items()}
            for name, choice in choices.items():
                modules[name].fix(choice, keeps[name])
            self.lam = self.settings.lambda_end
            if self.pmim is not None:
                self.pmim.active = False
            self.finalized.fill_(True)
            self._finalized = True
            self.final_architecture = self._architecture_from(choices)
        return self.final_architecture

    # -- logging -----------------------------------------------------------------------------------------------
    def _schedule_values(self) -> dict[str, float]:
        values = {"lambda": float(self.lam), "search_progress": float(min(self.progress, 1.0))}
        if self.pmim is not None:
            values["pmim_mask_ratio"] = float(self.pmim.mask_ratio if not self.search_finished else 0.0)
        return values

    @torch.no_grad()
    def _device_values(self, per_module_means: bool) -> tuple[list[str], torch.Tensor]:
        """Names and one 1-D tensor of the values computed on the device: expected MACs ratio, active candidates
        per module, and (for the snapshot) every module's mean importance S and mean sparsity V."""
        terms = self._terms()
        # hard_macs_ratio: every module at its most probable candidate (what decide() starts from, before the
        # projection); budget_dual: the total shift of the budget projection (0 under the paper's budget control)
        # one-hot of the most probable candidates, compared on the device (F.one_hot reads the indices back to check
        # them; a 0-dim index would sync too)
        hard = {name: (terms[name][0].argmax(-1, keepdim=True)
                       == torch.arange(len(group.widths), device=group.widths.device)).float()
                for name, group in self.groups().items()}
        hard_cost = self._expected_cost(hard["attention"], hard["mlp"], hard["embed"])
        names = [self._ratio_key, f"hard_{self.cost.kind}_ratio", "budget_dual"]
        values = [(self.expected_cost(terms) / self.dense_cost).reshape(1), (hard_cost / self.dense_cost).reshape(1),
                  self.budget_dual.float().reshape(1)]
        modules = {"embed": [""], "attention": [f".{i}" for i in range(len(self.attention))],
                   "mlp": [f".{i}" for i in range(len(self.mlp))]}
        prefixes = {"embed": "embed", "attention": "attn", "mlp": "mlp"}
        for kind in ("embed", "attention", "mlp"):
            group, suffixes = self.groups()[kind], modules[kind]
            _, importance, sparsity = terms[kind]
            keys = [prefixes[kind] + suffix for suffix in suffixes]
            per_kind = {"active_candidates": group.active.sum(-1)}
            if per_module_means:
                axes = tuple(range(-group.unit_dims, 0))
                per_kind.update(importance=importance.mean(axes), sparsity=sparsity.mean(axes))
            for label, value in per_kind.items():
                names += [f"{label}/{key}" for key in keys]
                values.append(value.float().reshape(-1))
        return names, torch.cat(values)

    def metrics(self) -> dict[str, float]:
        if self.search_finished:
            return {}  # nothing here changes after the search
        logs = self._schedule_values()
        names, values = self._device_values(per_module_means=False)
        logs.update(zip(names, values.tolist()))  # one transfer
        return logs

    def loss_terms(self, window: LogWindow) -> dict[str, float]:
        """`loss` = `task_loss` + `loss/pmim` + `loss/one_hot` + `loss/flops`, each a share of the window's steps."""
        logged, settings = window.names(), self.settings
        terms = {}
        if "pmim_loss" in logged:  # weighted by CE / L_rec: the term equals the task loss on each step it is on
            terms["loss/pmim"] = window.mean_over_window("task_loss", where="pmim_loss")
        if "module_loss" in logged:
            terms["loss/one_hot"] = settings.module_loss_weight * window.mean_over_window("module_loss")
        if "flops_loss" in logged:
            terms["loss/flops"] = settings.flops_loss_weight * window.mean_over_window("flops_loss")
        return terms

    @torch.no_grad()
    def search_macs_ratio(self) -> float:
        """E[cost] / dense cost before the decision (MACs, or predicted ms under a speed budget)."""
        return float(self.expected_cost() / self.dense_cost)

    def export_architecture(self) -> Architecture:
        """The final units with the CURRENT learnable scales (fine-tuning keeps training them)."""
        self.finalize()
        return self.decide()

    def snapshot(self) -> dict[str, float | torch.Tensor]:
        """`metrics()` plus, per module, the mean importance S and mean sparsity V of its units (the paper's
        bi-mask evolution figure); the device values stay 0-dim tensors (converted in bulk by the trainer)."""
        values: dict[str, float | torch.Tensor] = self._schedule_values()
        names, device_values = self._device_values(per_module_means=True)
        values.update(zip(names, device_values.unbind(0)))
        return values
