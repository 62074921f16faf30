"""OFB's search space and its bi-masks (docs/methods.md), batched over modules.

A searchable module (per block: attention over a (heads x head-dim) grid, MLP width; one global embedding width)
holds importance logits s (S = sigmoid(s), one per unit) and architecture logits alpha (one per candidate width).
Units are ranked by S; the sparsity score of the unit at rank rho is V_rho = sum_k p_k [width_k > rho] with
p = softmax(alpha over active candidates); the unit's output is scaled by m = lambda * S + (1 - lambda) * V.

All modules of one kind live in ONE `nn.Module` whose tensors carry a leading module dimension (the attention of
every block: score logits `(L, H, d)`, alpha `(L, K)`), so a step computes every mask and loss term of a kind with
a few tensor operations instead of one Python iteration per module, and reads nothing back from the device. The
embedding width is the same class without the module dimension. `group[i]` is a `ModuleView` of one module.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from ...config import OFBConfig


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
    """Candidate head counts: the configured ones, else H alone (`prune_heads` off: heads are narrowed, never
    removed), else 1..H for H <= 4 and even counts up to H (and H) above."""
    if settings.head_choices is not None:
        choices = {h for h in settings.head_choices if h <= num_heads}
        if not choices:
            raise ValueError(
                f"CompressionConfig.ofb.head_choices={settings.head_choices} has no entry <= num_attention_heads "
                f"({num_heads})"
            )
        return sorted(choices)
    if not settings.prune_heads:
        return [num_heads]
    if num_heads <= 4:
        return list(range(1, num_heads + 1))
    return sorted(set(range(2, num_heads + 1, 2)) | {num_heads})


def embed_choices(hidden_size: int, settings: OFBConfig) -> list[int]:
    step = settings.embed_step or max(1, min(hidden_size // 32, 12))
    narrowest = math.ceil(settings.embed_min_ratio * hidden_size)
    widths = list(range(hidden_size, narrowest - 1, -step))
    return sorted({_round_width(w, hidden_size, settings.channel_multiple) for w in widths})


def _ranks(scores: torch.Tensor) -> torch.Tensor:
    """Rank of every entry along the last dim, 0 = highest score (ties broken by index, deterministically): the
    inverse of the descending order, which is that order's own argsort."""
    order = torch.argsort(scores, dim=-1, descending=True, stable=True)
    return torch.argsort(order, dim=-1)


# ---------------------------------------------------------------------------------------------------------------
# Loss terms (pure functions, pinned by unit tests); any leading dimensions are modules
# ---------------------------------------------------------------------------------------------------------------
def sparsity_scores(probabilities: torch.Tensor, widths: torch.Tensor, ranks: torch.Tensor) -> torch.Tensor:
    """V for units at `ranks` (..., n): sum_k p_k * [width_k > rank], p (..., K). Differentiable in p only."""
    keeps = (widths.unsqueeze(-1) > ranks.unsqueeze(-2)).to(probabilities.dtype)  # (..., K, n)
    return (probabilities.unsqueeze(-1) * keeps).sum(-2)


def one_hot_loss(probabilities: torch.Tensor, eps: float = 1e-3, active: torch.Tensor | None = None) -> torch.Tensor:
    """Entropy + cot(pi * sigma) / K over the K active candidate probabilities (last dim; all when `active` is None;
    inactive candidates must have p = 0). 0 where fewer than two candidates are active (nothing left to decide).

    sigma = sum_k (p_k - 1/K)^2 / (1 - 1/K) over the active ones is 0 at uniform p and 1 at one-hot; it is clamped
    into (eps, 1 - eps) so the cotangent stays finite (+inf at uniform, -inf at one-hot otherwise).
    """
    if active is None:
        count = torch.full(probabilities.shape[:-1], probabilities.shape[-1], dtype=probabilities.dtype,
                           device=probabilities.device)
    else:
        count = active.sum(-1).to(probabilities.dtype)
    safe_count = count.clamp(min=2.0)  # K < 2 is masked out below; keeps its (unused) branch finite for autograd
    entropy = -(probabilities * torch.log(probabilities.clamp_min(1e-12))).sum(-1)
    deviation = (probabilities - 1.0 / safe_count.unsqueeze(-1)) ** 2
    if active is not None:
        deviation = deviation * active
    sigma = (deviation.sum(-1) / (1.0 - 1.0 / safe_count)).clamp(eps, 1.0 - eps)
    loss = entropy + 1.0 / torch.tan(math.pi * sigma) / safe_count
    return torch.where(count >= 2, loss, torch.zeros_like(loss))


def linear_schedule(progress: float, warmup: float, start: float, end: float) -> float:
    """`start` -> `end` linearly while progress (fraction of the search) < warmup, then `end`."""
    if warmup <= 0 or progress >= warmup:
        return end
    return start + (end - start) * max(progress, 0.0) / warmup


# ---------------------------------------------------------------------------------------------------------------
# Searchable modules, batched
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class _Finality:
    """Device tensors derived from the finality buffers, reused until a buffer changes."""

    final_units: torch.Tensor  # (*batch, 1..) bool: the module is final
    kept: torch.Tensor  # float final_keep
    dropped: torch.Tensor  # bool: final and not kept
    dropped_offset: torch.Tensor  # float: the ranking offset on dropped units
    not_final: torch.Tensor  # (*batch) float


class SearchableWidth(nn.Module):
    """Bi-masks over a unit axis with candidate widths (MLP neurons, or embedding channels), for `num_modules`
    modules at once (None: a single module, no module dimension).

    Buffers `active` (candidates still in play), `is_final` and `final_keep` (the kept units once one candidate is
    left) make the search state part of every checkpoint. Every batched method works on device without reading it.

    Args:
        unit_shape: shape of the unit grid of one module ((units,) here; (heads, head_dim) for attention).
        widths: units kept by each candidate (shared by the modules).
        score_std: std of the truncated-normal init of the importance logits.
        norm_coefficient: c of the norm term c * sum(S).
        sigma_eps: clamp of sigma in the one-hot loss.
        num_modules: number of modules of this kind (None: one module without a leading dimension).
    """

    def __init__(self, unit_shape, widths: list[int], score_std: float, norm_coefficient: float, sigma_eps: float,
                 num_modules: int | None = None):
        super().__init__()
        unit_shape = tuple(unit_shape)
        self.batch_shape = () if num_modules is None else (int(num_modules),)
        self.unit_dims = len(unit_shape)
        self.score_logits = nn.Parameter(torch.empty(*self.batch_shape, *unit_shape))
        with torch.no_grad():  # module after module: the same random draws as separately built modules
            for logits in self.score_logits.view(-1, *unit_shape):
                nn.init.trunc_normal_(logits, std=score_std, a=-2 * score_std, b=2 * score_std)
        self.alpha = nn.Parameter(torch.zeros(*self.batch_shape, len(widths)))
        self.register_buffer("widths", torch.tensor(widths, dtype=torch.long))
        self.register_buffer("active", torch.ones(*self.batch_shape, len(widths), dtype=torch.bool))
        self.register_buffer("is_final", torch.zeros(self.batch_shape, dtype=torch.bool))
        self.register_buffer("final_keep", torch.zeros(*self.batch_shape, *unit_shape, dtype=torch.bool))
        self.norm_coefficient = norm_coefficient
        self.sigma_eps = sigma_eps
        # Host copies of two facts that change only when the search state does (elimination, fix, a load): whether
        # every unit has V > 0 and whether any module is final. None: refresh from the device when next asked.
        self._host_flags: tuple[bool, bool] | None = (True, False)
        self._finality: tuple[tuple[int, int], _Finality] | None = None

    # -- views ---------------------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return self.batch_shape[0] if self.batch_shape else 1

    def __getitem__(self, index: int) -> ModuleView:
        if not self.batch_shape:
            raise TypeError("a single searchable module has no module dimension to index")
        if not -len(self) <= index < len(self):
            raise IndexError(f"module index {index} out of range for {len(self)} modules")
        return ModuleView(self, index % len(self))

    def __iter__(self):
        return (self[index] for index in range(len(self)))

    def _per_unit(self, per_module: torch.Tensor) -> torch.Tensor:
        """A per-module tensor shaped to broadcast over every unit of its module."""
        return per_module.view(*per_module.shape, *([1] * self.unit_dims))

    def _unit_axes(self) -> tuple[int, ...]:
        return tuple(range(-self.unit_dims, 0))

    # -- scores ----------------------------------------------------------------------------------------------------
    def probabilities(self) -> torch.Tensor:
        """p over all candidates (eliminated ones get exactly 0), float32."""
        return self.alpha.float().masked_fill(~self.active, float("-inf")).softmax(-1)

    def importance(self) -> torch.Tensor:
        return torch.sigmoid(self.score_logits.float())

    def finality(self) -> _Finality | None:
        """Tensors derived from `is_final` / `final_keep` (None while no module is final: the formulas then skip
        their final-module branch), recomputed only when one of those buffers changed."""
        if not self._flags()[1]:
            return None
        key = (self.is_final._version, self.final_keep._version)
        if self._finality is None or self._finality[0] != key:
            final_units = self._per_unit(self.is_final)
            dropped = final_units & ~self.final_keep
            offset = 2.0 * self.final_keep.shape[-1] + 2.0  # exceeds any (row) sum of importances
            self._finality = (key, _Finality(final_units, self.final_keep.float(), dropped, dropped * offset,
                                             (~self.is_final).float()))
        return self._finality[1]

    def ranking_scores(self, importance: torch.Tensor | None = None) -> torch.Tensor:
        """Importance used for ranking; in a final module, units outside the kept set rank below every kept one (in
        their own importance order, so a final module widened by the budget projection takes the next-best units).
        The offset exceeds any row sum of importances, so heads ranked by their sum stay below kept heads too."""
        importance = (self.importance() if importance is None else importance).detach()
        finality = self.finality()
        return importance if finality is None else importance - finality.dropped_offset

    def _search_sparsity(self, probabilities: torch.Tensor, ranking: torch.Tensor) -> torch.Tensor:
        return sparsity_scores(probabilities, self.widths, _ranks(ranking))

    def sparsity(self, probabilities: torch.Tensor | None = None,
                 importance: torch.Tensor | None = None) -> torch.Tensor:
        """V of every unit; a final module's is its 0/1 kept set."""
        probabilities = self.probabilities() if probabilities is None else probabilities
        search = self._search_sparsity(probabilities, self.ranking_scores(importance))
        finality = self.finality()
        return search if finality is None else torch.where(finality.final_units, finality.kept, search)

    def mask(self, lam: float, importance: torch.Tensor | None = None,
             sparsity: torch.Tensor | None = None) -> torch.Tensor:
        """m = lambda * S + (1 - lambda) * V; in a final module (V = its kept set) this is the learnable scale
        (lambda * S + 1 - lambda) on kept units and 0 elsewhere, which export folds into the weights."""
        importance = self.importance() if importance is None else importance
        sparsity = self.sparsity(importance=importance) if sparsity is None else sparsity
        scores = lam * importance + (1 - lam) * sparsity
        finality = self.finality()
        return scores if finality is None else scores.masked_fill(finality.dropped, 0.0)

    def module_loss(self, probabilities: torch.Tensor | None = None,
                    importance: torch.Tensor | None = None) -> torch.Tensor:
        """Adaptive one-hot loss over the active candidates + c * sum(S), per module (0 for final modules)."""
        probabilities = self.probabilities() if probabilities is None else probabilities
        importance = self.importance() if importance is None else importance
        loss = one_hot_loss(probabilities, self.sigma_eps, self.active)
        loss = loss + self.norm_coefficient * importance.sum(self._unit_axes())
        return loss.masked_fill(self.is_final, 0.0)

    def _flags(self) -> tuple[bool, bool]:
        """(every unit of every module has V > 0, some module is final), from the host copy."""
        if self._host_flags is None:
            widest = self.active[..., int(self.widths.argmax())]
            alive = torch.where(self.is_final, self.final_keep.flatten(len(self.batch_shape)).all(-1), widest)
            self._host_flags = tuple(bool(flag) for flag in torch.stack([alive.all(), self.is_final.any()]).tolist())
        return self._host_flags

    def keeps_every_unit(self) -> bool:
        """Whether every unit of every module has V > 0: the widest candidate is still active (its p > 0; an
        underflow to 0 would need alpha 100 below the leader's, long after elimination removed it) or a final
        module keeps all units. Answered from a host copy, refreshed from the device only when the search state
        changes (elimination, fix: rare steps) or was overwritten (a load, a broadcast)."""
        return self._flags()[0]

    def state_changed(self) -> None:
        """The buffers changed: the host copies are refreshed when next needed."""
        self._host_flags = None

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        _stack_per_module_entries(self, state_dict, prefix)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self.state_changed()

    # -- elimination and final choices -----------------------------------------------------------------------------
    @torch.no_grad()
    def eliminate(self, threshold: float, index: int | None = None) -> torch.Tensor:
        """Switch off candidates with p <= threshold / K_active (never a module's leader) in every module (or only
        in module `index`); a module with one left becomes final, keeping its top units by importance. Returns the
        number switched off (a tensor: reading it synchronises)."""
        probabilities = self.probabilities()
        num_active = self.active.sum(-1, keepdim=True)
        limit = (threshold / num_active.double()).float()  # as a Python threshold / count, rounded to float32
        weak = self.active & (probabilities <= limit) & ~self.is_final.unsqueeze(-1)
        weak.scatter_(-1, probabilities.argmax(-1, keepdim=True), False)  # never switch off the leader
        if index is not None:
            only = torch.zeros_like(self.is_final)
            only[index] = True
            weak &= only.unsqueeze(-1)
        self.active &= ~weak
        newly_final = (self.active.sum(-1) == 1) & ~self.is_final
        keep = self._keep_for_choices(self.active.to(torch.uint8).argmax(-1))  # the one left, where only one is
        self.final_keep.copy_(torch.where(self._per_unit(newly_final), keep, self.final_keep))
        self.is_final |= newly_final
        self.state_changed()
        self._flags()  # refreshed now, at this (rare) step, rather than in the next forward
        return weak.sum()

    def _keep_for_choices(self, choices: torch.Tensor) -> torch.Tensor:
        """Units each module's candidate `choices[...]` keeps: its top `widths[choice]` by ranking score."""
        return _ranks(self.ranking_scores()) < self.widths[choices].unsqueeze(-1)

    @torch.no_grad()
    def fix(self, choice: int, keep: torch.Tensor | None = None, index: int | None = None) -> None:
        """Make candidate `choice` final in module `index` (None: a single module), keeping `keep` (default: its top
        units by importance) from now on."""
        keep = self.keep_for(choice, index) if keep is None else keep
        active = _row(self.active, index)
        active.zero_()
        active[choice] = True
        _row(self.final_keep, index).copy_(keep)
        _row(self.is_final, index).fill_(True)
        self.state_changed()
        self._flags()

    def keep_for(self, choice: int, index: int | None = None) -> torch.Tensor:
        """Units that candidate `choice` of module `index` keeps: its top `widths[choice]` by importance (inside the
        kept set once final, so a final module can still be shrunk by the budget projection)."""
        if bool(_row(self.is_final, index)) and choice == self.current_choice(index):
            return _row(self.final_keep, index).clone()
        choices = torch.full(self.batch_shape, choice, dtype=torch.long, device=self.widths.device)
        return _row(self._keep_for_choices(choices), index)

    def current_choice(self, index: int | None = None) -> int:
        if bool(_row(self.is_final, index)):
            return int(_row(self.active, index).nonzero()[0])
        return int(_row(self.probabilities(), index).argmax())


class SearchableAttention(SearchableWidth):
    """Joint (number of heads x per-head dim) search over a (H, head_dim) unit grid shared by q, k and v.

    Heads are ranked by the sum of their importance; channels are ranked inside each head. Candidate (i, j) keeps
    heads[i] heads of dims[j] channels; candidates are flattened row-major like alpha.
    """

    def __init__(self, num_heads, head_dim, heads: list[int], dims: list[int], score_std, norm_coefficient,
                 sigma_eps, num_modules: int | None = None):
        widths = [h * d for h in heads for d in dims]
        super().__init__((num_heads, head_dim), widths, score_std, norm_coefficient, sigma_eps, num_modules)
        self.register_buffer("head_counts", torch.tensor(heads, dtype=torch.long))
        self.register_buffer("dim_counts", torch.tensor(dims, dtype=torch.long))

    def _grid_ranks(self, ranking: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return _ranks(ranking.sum(-1)), _ranks(ranking)

    def _search_sparsity(self, probabilities: torch.Tensor, ranking: torch.Tensor) -> torch.Tensor:
        # V[h, c] = sum_ij p_ij [heads_i > rank(h)] [dims_j > rank(c)] = sum_i [heads_i > rank(h)] A[i, h, c]
        # with A = p @ [dims_j > rank(c)]: one matmul instead of a three-way einsum.
        head_rank, channel_rank = self._grid_ranks(ranking)
        grid = probabilities.view(*probabilities.shape[:-1], len(self.head_counts), len(self.dim_counts))
        head_keep = (self.head_counts.unsqueeze(-1) > head_rank.unsqueeze(-2)).to(grid.dtype)  # (..., I, H)
        channel_keep = (self.dim_counts.unsqueeze(-1) > channel_rank.flatten(-2).unsqueeze(-2)).to(grid.dtype)
        per_head_count = torch.matmul(grid, channel_keep)  # (..., I, H * d)
        per_head_count = per_head_count.view(*head_keep.shape, -1)  # (..., I, H, d)
        return (head_keep.unsqueeze(-1) * per_head_count).sum(-3)

    def _keep_for_choices(self, choices: torch.Tensor) -> torch.Tensor:
        head_rank, channel_rank = self._grid_ranks(self.ranking_scores())
        heads = self.head_counts[choices // len(self.dim_counts)]
        dims = self.dim_counts[choices % len(self.dim_counts)]
        return (head_rank < heads.unsqueeze(-1)).unsqueeze(-1) & (channel_rank < dims[..., None, None])


def padded_candidates(groups: list[SearchableWidth]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """For `total_module_loss`: every module's active candidates, padded with inactive ones to the longest candidate
    axis `(modules, K_max)`, and 1 - is_final per module (None while no module is final)."""
    width = max(len(g.widths) for g in groups)
    active = torch.cat([F.pad(g.active.reshape(-1, len(g.widths)), (0, width - len(g.widths))) for g in groups])
    if all(g.finality() is None for g in groups):
        return active, None
    return active, torch.cat([(~g.is_final).reshape(-1) for g in groups]).float()


def total_module_loss(groups: list[SearchableWidth], probabilities: list[torch.Tensor],
                      importances: list[torch.Tensor], candidates: tuple | None = None) -> torch.Tensor:
    """Sum over every module of every group of `module_loss` (one-hot loss over its active candidates + c * sum(S),
    0 for final modules), with one one-hot computation for all modules: the candidate axes are padded to the
    longest with inactive candidates (p = 0), which contribute nothing to any term. `candidates`: the result of
    `padded_candidates(groups)`, if the caller keeps it."""
    if len({g.sigma_eps for g in groups}) != 1:
        raise ValueError("total_module_loss: the groups must share sigma_eps")
    active, not_final = padded_candidates(groups) if candidates is None else candidates
    width = active.shape[-1]
    rows = torch.cat([F.pad(p.reshape(-1, p.shape[-1]), (0, width - p.shape[-1])) for p in probabilities])
    norms = torch.cat([(g.norm_coefficient * s.sum(g._unit_axes())).reshape(-1) for g, s in zip(groups, importances)])
    losses = one_hot_loss(rows, groups[0].sigma_eps, active) + norms
    return (losses if not_final is None else losses * not_final).sum()


class ModuleView:
    """One module of a batched `SearchableWidth` / `SearchableAttention`: views of its parameters and buffers
    (writable under `torch.no_grad()`) and its slice of every batched quantity. For decisions, reports and tests;
    the search itself uses the batched group."""

    def __init__(self, group: SearchableWidth, index: int):
        self.group, self.index = group, index

    score_logits = property(lambda self: self.group.score_logits[self.index])
    alpha = property(lambda self: self.group.alpha[self.index])
    active = property(lambda self: self.group.active[self.index])
    is_final = property(lambda self: self.group.is_final[self.index])
    final_keep = property(lambda self: self.group.final_keep[self.index])
    widths = property(lambda self: self.group.widths)
    head_counts = property(lambda self: self.group.head_counts)
    dim_counts = property(lambda self: self.group.dim_counts)

    def probabilities(self) -> torch.Tensor:
        return self.group.probabilities()[self.index]

    def importance(self) -> torch.Tensor:
        return self.group.importance()[self.index]

    def ranking_scores(self) -> torch.Tensor:
        return self.group.ranking_scores()[self.index]

    def sparsity(self) -> torch.Tensor:
        return self.group.sparsity()[self.index]

    def mask(self, lam: float) -> torch.Tensor:
        return self.group.mask(lam)[self.index]

    def module_loss(self) -> torch.Tensor:
        return self.group.module_loss()[self.index]

    def eliminate(self, threshold: float) -> torch.Tensor:
        return self.group.eliminate(threshold, self.index)

    def fix(self, choice: int, keep: torch.Tensor | None = None) -> None:
        self.group.fix(choice, keep, self.index)

    def keep_for(self, choice: int) -> torch.Tensor:
        return self.group.keep_for(choice, self.index)

    def current_choice(self) -> int:
        return self.group.current_choice(self.index)


def _row(tensor: torch.Tensor, index: int | None) -> torch.Tensor:
    return tensor if index is None else tensor[index]


def _stack_per_module_entries(group: SearchableWidth, state_dict: dict, prefix: str) -> None:
    """Checkpoints written before the modules of a kind were batched hold one entry per module
    (`<prefix><i>.score_logits`); stack them into the batched layout so those checkpoints still resume."""
    if not group.batch_shape or f"{prefix}0.score_logits" not in state_dict:
        return
    for name in ("score_logits", "alpha", "active", "is_final", "final_keep"):
        keys = [f"{prefix}{index}.{name}" for index in range(len(group))]
        if f"{prefix}{name}" not in state_dict and all(key in state_dict for key in keys):
            state_dict[f"{prefix}{name}"] = torch.stack([state_dict.pop(key) for key in keys])
    for name in ("widths", "head_counts", "dim_counts"):  # identical in every module
        keys = [f"{prefix}{index}.{name}" for index in range(len(group))]
        if all(key in state_dict for key in keys):
            state_dict[f"{prefix}{name}"] = state_dict[keys[0]]
            for key in keys:
                state_dict.pop(key)
