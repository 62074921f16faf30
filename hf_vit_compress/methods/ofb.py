"""OFB, "Once for Both" (arXiv 2403.15835): one-stage bi-mask importance + sparsity search (spec/ofb.md).

Every searchable module (per block: attention over a (heads x head-dim) grid, MLP width; one global embedding
width) holds importance logits s (S = sigmoid(s), one per unit) and architecture logits alpha (one per candidate
width). Units are ranked by S; the sparsity score of the unit at rank rho is V_rho = sum_k p_k [width_k > rho]
with p = softmax(alpha over active candidates); the unit's output is scaled by m = lambda * S + (1 - lambda) * V.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..architecture import Architecture, LayerArchitecture
from ..config import CompressionConfig, OFBConfig
from ..flops import macs_from_widths
from ..gating import Masks
from ..pmim import PMIM
from .base import CompressionMethod


# ---------------------------------------------------------------------------------------------------------------
# Search space
# ---------------------------------------------------------------------------------------------------------------
def _round_width(width: float, size: int, multiple: int) -> int:
    if multiple > 1 and size >= 8 * multiple:
        return int(min(size, max(multiple, round(width / multiple) * multiple)))
    return int(min(size, max(1, round(width))))


def width_choices(size: int, ratios: list[float], multiple: int) -> list[int]:
    """Distinct candidate widths (ascending) for a dimension of `size` units."""
    return sorted({_round_width(ratio * size, size, multiple) for ratio in ratios})


def head_choices(num_heads: int, settings: OFBConfig) -> list[int]:
    """Candidate head counts: the configured ones, else 1..H for H <= 4, else even counts up to H (and H)."""
    if settings.head_choices is not None:
        choices = {h for h in settings.head_choices if h <= num_heads}
        if not choices:
            raise ValueError(
                f"CompressionConfig.ofb.head_choices={settings.head_choices} has no entry <= num_attention_heads "
                f"({num_heads})"
            )
        return sorted(choices)
    if num_heads <= 4:
        return list(range(1, num_heads + 1))
    return sorted(set(range(2, num_heads + 1, 2)) | {num_heads})


def embed_choices(hidden_size: int, settings: OFBConfig) -> list[int]:
    step = settings.embed_step or max(1, min(hidden_size // 32, 12))
    narrowest = math.ceil(settings.embed_min_ratio * hidden_size)
    widths = list(range(hidden_size, narrowest - 1, -step))
    return sorted({_round_width(w, hidden_size, settings.channel_multiple) for w in widths})


def _ranks(scores: torch.Tensor) -> torch.Tensor:
    """Rank of every entry along the last dim, 0 = highest score (ties broken by index, deterministically)."""
    order = torch.argsort(scores, dim=-1, descending=True, stable=True)
    ranks = torch.empty_like(order)
    ranks.scatter_(-1, order, torch.arange(scores.shape[-1], device=scores.device).expand_as(order))
    return ranks


# ---------------------------------------------------------------------------------------------------------------
# Loss terms (pure functions, pinned by unit tests)
# ---------------------------------------------------------------------------------------------------------------
def sparsity_scores(probabilities: torch.Tensor, widths: torch.Tensor, ranks: torch.Tensor) -> torch.Tensor:
    """V for units at `ranks`: sum_k p_k * [width_k > rank]. Differentiable in `probabilities` only."""
    keeps = (widths.unsqueeze(-1) > ranks.unsqueeze(0)).to(probabilities.dtype)
    return (probabilities.unsqueeze(-1) * keeps).sum(0)


def one_hot_loss(probabilities: torch.Tensor, eps: float = 1e-3) -> torch.Tensor:
    """Entropy + cot(pi * sigma) / K over the K given (active) candidate probabilities.

    sigma = sum_k (p_k - 1/K)^2 / (1 - 1/K) is 0 at uniform p and 1 at one-hot; it is clamped into
    (eps, 1 - eps) so the cotangent stays finite (+inf at uniform, -inf at one-hot otherwise).
    """
    num = probabilities.numel()
    if num < 2:
        return probabilities.new_zeros(())
    entropy = -(probabilities * torch.log(probabilities.clamp_min(1e-12))).sum()
    sigma = ((probabilities - 1.0 / num) ** 2).sum() / (1.0 - 1.0 / num)
    sigma = sigma.clamp(eps, 1.0 - eps)
    return entropy + 1.0 / torch.tan(math.pi * sigma) / num


def linear_schedule(progress: float, warmup: float, start: float, end: float) -> float:
    """`start` -> `end` linearly while progress (fraction of the search) < warmup, then `end`."""
    if warmup <= 0 or progress >= warmup:
        return end
    return start + (end - start) * max(progress, 0.0) / warmup


# ---------------------------------------------------------------------------------------------------------------
# Searchable modules
# ---------------------------------------------------------------------------------------------------------------
class SearchableWidth(nn.Module):
    """Bi-mask over a unit axis with candidate widths: MLP neurons, or embedding channels.

    Buffers `active` (candidates still in play), `is_final` and `final_keep` (the kept units once one candidate
    is left) make the search state part of every checkpoint.

    Args:
        unit_shape: shape of the unit grid ((units,) here; (heads, head_dim) for attention).
        widths: units kept by each candidate.
        score_std: std of the truncated-normal init of the importance logits.
        norm_coefficient: c of the norm term c * sum(S).
        sigma_eps: clamp of sigma in the one-hot loss.
    """

    def __init__(self, unit_shape, widths: list[int], score_std: float, norm_coefficient: float, sigma_eps: float):
        super().__init__()
        self.score_logits = nn.Parameter(torch.empty(unit_shape))
        nn.init.trunc_normal_(self.score_logits, std=score_std, a=-2 * score_std, b=2 * score_std)
        self.alpha = nn.Parameter(torch.zeros(len(widths)))
        self.register_buffer("widths", torch.tensor(widths, dtype=torch.long))
        self.register_buffer("active", torch.ones(len(widths), dtype=torch.bool))
        self.register_buffer("is_final", torch.tensor(False))
        self.register_buffer("final_keep", torch.zeros(unit_shape, dtype=torch.bool))
        self.norm_coefficient = norm_coefficient
        self.sigma_eps = sigma_eps

    # p over all candidates (eliminated ones get exactly 0)
    def probabilities(self) -> torch.Tensor:
        return self.alpha.float().masked_fill(~self.active, float("-inf")).softmax(-1)

    def importance(self) -> torch.Tensor:
        return torch.sigmoid(self.score_logits.float())

    def ranking_scores(self) -> torch.Tensor:
        """Importance used for ranking; once final, units outside the kept set rank below every kept one (in their
        own importance order, so a final module widened by the budget projection takes the next-best units). The
        offset exceeds any row sum of importances, so heads ranked by their sum stay below kept heads too."""
        importance = self.importance().detach()
        if not bool(self.is_final):
            return importance
        return importance - (~self.final_keep) * (2.0 * importance.shape[-1] + 2.0)

    def sparsity(self) -> torch.Tensor:
        if bool(self.is_final):
            return self.final_keep.float()
        return sparsity_scores(self.probabilities(), self.widths, _ranks(self.ranking_scores()))

    def mask(self, lam: float) -> torch.Tensor:
        scores = lam * self.importance() + (1 - lam)
        if bool(self.is_final):
            return scores * self.final_keep  # the learnable scale that export folds in
        return lam * self.importance() + (1 - lam) * self.sparsity()

    def module_loss(self) -> torch.Tensor:
        if bool(self.is_final):
            return self.alpha.new_zeros(())
        probabilities = self.probabilities()[self.active]
        return one_hot_loss(probabilities, self.sigma_eps) + self.norm_coefficient * self.importance().sum()

    def eliminate(self, threshold: float) -> int:
        """Switch off candidates with p <= threshold / K_active; finalise when one is left. Returns #removed."""
        if bool(self.is_final):
            return 0
        with torch.no_grad():
            probabilities = self.probabilities()
            num_active = int(self.active.sum())
            weak = self.active & (probabilities <= threshold / num_active)
            weak[probabilities.argmax()] = False  # never switch off the leader
            self.active &= ~weak
            if int(self.active.sum()) == 1:
                self.fix(int(self.active.nonzero()[0]))
        return int(weak.sum())

    def fix(self, choice: int, keep: torch.Tensor | None = None) -> None:
        """Make candidate `choice` final, keeping `keep` (default: its top units by importance) from now on."""
        with torch.no_grad():
            keep = self.keep_for(choice) if keep is None else keep
            self.active.zero_()
            self.active[choice] = True
            self.final_keep.copy_(keep)
            self.is_final.fill_(True)

    def keep_for(self, choice: int) -> torch.Tensor:
        """Units that candidate `choice` keeps: the top `widths[choice]` by importance (inside the kept set once
        final, so a final module can still be shrunk by the budget projection)."""
        if bool(self.is_final) and choice == self.current_choice():
            return self.final_keep.clone()
        return _ranks(self.ranking_scores()) < self.widths[choice]

    def current_choice(self) -> int:
        return int(self.active.nonzero()[0]) if bool(self.is_final) else int(self.probabilities().argmax())


class SearchableAttention(SearchableWidth):
    """Joint (number of heads x per-head dim) search over a (H, head_dim) unit grid shared by q, k and v.

    Heads are ranked by the sum of their importance; channels are ranked inside each head.
    """

    def __init__(self, num_heads, head_dim, heads: list[int], dims: list[int], score_std, norm_coefficient,
                 sigma_eps):
        # candidate (i, j) keeps heads[i] * dims[j] units; flattened row-major like alpha
        widths = [h * d for h in heads for d in dims]
        super().__init__((num_heads, head_dim), widths, score_std, norm_coefficient, sigma_eps)
        self.register_buffer("head_counts", torch.tensor(heads, dtype=torch.long))
        self.register_buffer("dim_counts", torch.tensor(dims, dtype=torch.long))

    def _ranks(self) -> tuple[torch.Tensor, torch.Tensor]:
        scores = self.ranking_scores()
        return _ranks(scores.sum(-1)), _ranks(scores)

    def sparsity(self) -> torch.Tensor:
        if bool(self.is_final):
            return self.final_keep.float()
        head_rank, channel_rank = self._ranks()
        probabilities = self.probabilities().view(len(self.head_counts), len(self.dim_counts))
        head_keep = (self.head_counts[:, None] > head_rank[None, :]).to(probabilities.dtype)  # (I, H)
        channel_keep = (self.dim_counts[:, None, None] > channel_rank[None]).to(probabilities.dtype)  # (J, H, d)
        return torch.einsum("ij,ih,jhc->hc", probabilities, head_keep, channel_keep)

    def keep_for(self, choice: int) -> torch.Tensor:
        if bool(self.is_final) and choice == self.current_choice():
            return self.final_keep.clone()
        head_rank, channel_rank = self._ranks()
        i, j = divmod(choice, len(self.dim_counts))
        return (head_rank[:, None] < self.head_counts[i]) & (channel_rank < self.dim_counts[j])


# ---------------------------------------------------------------------------------------------------------------
# The method
# ---------------------------------------------------------------------------------------------------------------
class OFBMethod(CompressionMethod):
    """OFB search: bi-masks on q/k/v, fc1 and the embedding; adaptive one-hot + FLOPs + PMIM losses."""

    name = "ofb"

    def __init__(self, model: nn.Module, config: CompressionConfig):
        super().__init__(model, config)
        settings = config.ofb
        self.settings = settings
        geo = self.geometry
        self.heads_grid = head_choices(geo.num_heads, settings)
        self.dims_grid = width_choices(geo.head_dim, settings.head_dim_ratios, settings.channel_multiple)
        self.attention = nn.ModuleList(
            SearchableAttention(
                geo.num_heads, geo.head_dim, self.heads_grid, self.dims_grid,
                settings.score_init_std, settings.norm_coefficient_attention, settings.sigma_eps,
            )
            for _ in range(geo.num_layers)
        )
        mlp_widths = width_choices(geo.intermediate_size, settings.mlp_ratios, settings.channel_multiple)
        self.mlp = nn.ModuleList(
            SearchableWidth(
                (geo.intermediate_size,), mlp_widths, settings.score_init_std, settings.norm_coefficient_other,
                settings.sigma_eps,
            )
            for _ in range(geo.num_layers)
        )
        self.embed = SearchableWidth(
            (geo.hidden_size,), embed_choices(geo.hidden_size, settings), settings.score_init_std,
            settings.norm_coefficient_other, settings.sigma_eps,
        )
        self.pmim = PMIM(self.parts, settings.pmim_window) if settings.pmim else None
        self.lam = settings.lambda_start
        self.progress = 0.0
        self._last_logs: dict[str, float] = {}
        self._check_budget_reachable()

    # -- helpers -----------------------------------------------------------------------------------------------
    def searchable_modules(self) -> dict[str, SearchableWidth]:
        modules = {"embed": self.embed}
        for index, (attention, mlp) in enumerate(zip(self.attention, self.mlp)):
            modules[f"attn.{index}"] = attention
            modules[f"mlp.{index}"] = mlp
        return modules

    def _macs_for(self, hidden, attention_widths, mlp_widths):
        return macs_from_widths(self.geometry, hidden, attention_widths, attention_widths, mlp_widths)

    def _check_budget_reachable(self) -> None:
        smallest = self._macs_for(
            int(self.embed.widths.min()),
            [int(a.widths.min()) for a in self.attention],
            [int(m.widths.min()) for m in self.mlp],
        )
        if smallest > self.target_macs:
            raise ValueError(
                f"CompressionConfig.target_flops: the budget {self.target_macs / self.dense_macs:.3f} of the dense "
                f"MACs is below the smallest model in the OFB search space ({smallest / self.dense_macs:.3f}); "
                "raise target_flops or widen the search space (ofb.head_choices, ofb.head_dim_ratios, "
                "ofb.mlp_ratios, ofb.embed_min_ratio)."
            )

    def install_hooks(self) -> None:
        if self.pmim is not None:
            self.pmim.install(self.parts)

    def remove_hooks(self) -> None:
        if self.pmim is not None:
            self.pmim.remove_hooks()

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

    def elimination_interval(self) -> int:
        return max(1, round(self.steps_per_epoch / self.settings.eliminations_per_epoch))

    def on_step_end(self, step: int) -> None:
        if self.search_finished or (step + 1) % self.elimination_interval() != 0:
            return
        for module in self.searchable_modules().values():
            module.eliminate(self.settings.elimination_threshold)

    # -- masks -------------------------------------------------------------------------------------------------
    def search_masks(self) -> Masks:
        lam = self.lam
        masks = Masks()
        for attention, mlp in zip(self.attention, self.mlp):
            attention_mask = attention.mask(lam).flatten()
            masks.qk.append(attention_mask)
            masks.v.append(attention_mask)
            masks.mlp.append(mlp.mask(lam))
            masks.block_gates.append(None)
        masks.hidden = self.embed.mask(lam)
        keep = (self.embed.sparsity().detach() > 0).float()
        masks.hidden_keep = None if bool(keep.all()) else keep
        return masks

    def compute_masks(self) -> Masks:
        # One formula before and after finalize(): final modules yield (lambda * S + 1 - lambda) on their kept
        # units, a learnable scale that fine-tuning keeps training and export folds in.
        if self.final_architecture is None and bool(self.finalized):
            self.final_architecture = self.decide()  # resumed from a checkpoint saved after the search
        return self.search_masks()

    # -- losses ------------------------------------------------------------------------------------------------
    def expected_macs(self) -> torch.Tensor:
        """Differentiable expected MACs from the summed V masks (expected widths)."""
        return self._macs_for(
            self.embed.sparsity().sum(),
            [a.sparsity().sum() for a in self.attention],
            [m.sparsity().sum() for m in self.mlp],
        )

    def loss(self, task_loss: torch.Tensor, logits: torch.Tensor, inputs: dict) -> tuple[torch.Tensor, dict]:
        logs: dict[str, float] = {}
        if self.search_finished:
            return task_loss, logs
        settings = self.settings
        total = task_loss
        if self.pmim is not None:
            reconstruction = self.pmim.reconstruction_loss(inputs["pixel_values"])
            if reconstruction is not None:
                weight = (task_loss.detach() / reconstruction.detach().clamp_min(1e-8)).item()
                total = total + weight * reconstruction
                logs["pmim_loss"] = float(reconstruction.detach())
        module_losses = sum(module.module_loss() for module in self.searchable_modules().values())
        expected = self.expected_macs()
        flops_loss = ((expected - self.target_macs) / self.dense_macs) ** 2
        total = total + settings.module_loss_weight * module_losses + settings.flops_loss_weight * flops_loss
        logs.update(
            module_loss=float(module_losses.detach()),
            flops_loss=float(flops_loss.detach()),
            expected_macs_ratio=float(expected.detach()) / self.dense_macs,
        )
        self._last_logs = logs
        return total, logs

    # -- optimisation ------------------------------------------------------------------------------------------
    def optimizer_groups(self, learning_rate: float) -> list[dict]:
        settings = self.settings
        modules = self.searchable_modules().values()
        groups = [
            {
                "params": [m.alpha for m in modules],
                "lr": settings.arch_lr,
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
        if bool(self.finalized):
            return choices  # fixed by finalize(): the same units every time (only the scales keep training)
        return self._project_to_budget(modules, choices)

    def _choice_macs(self, choices: dict[str, int]) -> float:
        return self._macs_for(
            int(self.embed.widths[choices["embed"]]),
            [int(a.widths[choices[f"attn.{i}"]]) for i, a in enumerate(self.attention)],
            [int(m.widths[choices[f"mlp.{i}"]]) for i, m in enumerate(self.mlp)],
        )

    def _project_to_budget(self, modules: dict[str, SearchableWidth], choices: dict[str, int]) -> dict[str, int]:
        """Greedy: shrink (most probable smaller candidate first) until within budget, then grow (most probable
        active larger candidate that still fits) so the result lands just under the budget."""
        probabilities = {name: module.probabilities().detach() for name, module in modules.items()}

        def moves(shrink: bool):
            for name, module in modules.items():
                widths = module.widths
                current = int(widths[choices[name]])
                for k in range(len(widths)):
                    width = int(widths[k])
                    # Growing uses candidates still in play; a final module (one candidate left) may also grow,
                    # taking its next units by importance, so an early-collapsed search can still fill the budget.
                    in_play = bool(module.active[k]) or bool(module.is_final)
                    if (width < current) if shrink else (width > current and in_play):
                        yield (float(probabilities[name][k]), width if shrink else -width), name, k

        while self._choice_macs(choices) > self.target_macs:
            _, name, k = max(moves(shrink=True), key=lambda move: move[0])
            choices[name] = k
        while True:
            fitting = []
            for key, name, k in moves(shrink=False):
                trial = {**choices, name: k}
                if self._choice_macs(trial) <= self.target_macs:
                    fitting.append((key, name, k))
            if not fitting:
                return choices
            _, name, k = max(fitting, key=lambda move: move[0])
            choices[name] = k

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
        return Architecture(
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
            self.final_architecture = self._architecture_from(choices)
        return self.final_architecture

    # -- logging -----------------------------------------------------------------------------------------------
    def metrics(self) -> dict[str, float]:
        logs = {"lambda": float(self.lam), "search_progress": float(min(self.progress, 1.0))}
        if self.pmim is not None:
            logs["pmim_mask_ratio"] = float(self.pmim.mask_ratio if not self.search_finished else 0.0)
        with torch.no_grad():
            logs["expected_macs_ratio"] = float(self.expected_macs()) / self.dense_macs
            for name, module in self.searchable_modules().items():
                logs[f"active_candidates/{name}"] = float(module.active.sum())
        return logs

    def export_architecture(self) -> Architecture:
        """The final units with the CURRENT learnable scales (fine-tuning keeps training them)."""
        self.finalize()
        return self.decide()

    def snapshot(self) -> dict[str, float]:
        """`metrics()` plus, per module, the mean importance S and mean sparsity V of its units (the paper's
        bi-mask evolution figure)."""
        values = self.metrics()
        with torch.no_grad():
            for name, module in self.searchable_modules().items():
                values[f"importance/{name}"] = float(module.importance().mean())
                values[f"sparsity/{name}"] = float(module.sparsity().mean())
        return values
