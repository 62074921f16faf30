"""OFB's budget: the price of every candidate, the expected cost over the candidates, the dual projection that holds
it at the target during the search, and the greedy projection of the decided candidates onto the budget.

A mixin of `OFBMethod` (method.py), as `uvc/budget.py` is of UVC's: it reads the method's groups (`attention`, `mlp`,
`embed`), `cost` (`surgery.cost.BudgetCost`: MACs or a latency table's ms), `target_cost` and `settings`.
"""

from __future__ import annotations

import torch

from .modules import SearchableWidth

#: Newton steps of the budget projection when the method is built (then one after every optimizer step)
INITIAL_NEWTON_STEPS = 30
#: the forward difference of the projection's Newton steps, in logits of the widest candidate
SLOPE_DELTA = 1e-2
#: largest change of the projection's shift t in one Newton step, in logits of the widest candidate
MAX_SHIFT_STEP = 4.0


class OFBBudget:
    """Prices, expected cost and budget projections of `OFBMethod`."""

    # -- prices -------------------------------------------------------------------------------------------------
    def _build_cost_tables(self) -> None:
        """The budget's price (`self.cost`: MACs or a latency table's ms) of every candidate at every embedding
        candidate: the stem (E,), an attention module (E, K_attention), an MLP module (E, K_mlp); as Python numbers
        (exact MACs for the decisions) and float32 buffers (the search's expectations). The expected cost over the
        candidates is then exact for any price, MACs or measured time: the candidates are independent, so
        E[cost] = p_embed . (stem + attention @ sum_l p_attention_l + mlp @ sum_l p_mlp_l)."""
        cost = self.cost
        embed = self.embed.widths.tolist()
        heads, dims = self.attention.head_counts.tolist(), self.attention.dim_counts.tolist()
        attention = [(h, d) for h in heads for d in dims]  # row-major, like the attention candidates
        mlp = self.mlp.widths.tolist()
        self._stem_costs = [cost.stem(width) for width in embed]
        self._attention_costs = [[cost.attention(width, h, d, d) for h, d in attention] for width in embed]
        self._mlp_costs = [[cost.mlp(width, m) for m in mlp] for width in embed]
        for name, values in (("stem", self._stem_costs), ("attention", self._attention_costs),
                             ("mlp", self._mlp_costs)):
            self.register_buffer(f"_{name}_cost_table", torch.tensor(values, dtype=torch.float64).float(),
                                 persistent=False)

    def _cost_per_embed(self, attention: torch.Tensor, mlp: torch.Tensor) -> torch.Tensor:
        """(K_embed,): E[cost] given each embedding candidate, from the blocks' probabilities: attention
        (L, K_attention), mlp (L, K_mlp)."""
        return (self._stem_cost_table + self._attention_cost_table @ attention.sum(0)
                + self._mlp_cost_table @ mlp.sum(0))

    def _expected_cost(self, attention: torch.Tensor, mlp: torch.Tensor, embed: torch.Tensor) -> torch.Tensor:
        """E[cost] from the candidates' probabilities: attention (L, K_attention), mlp (L, K_mlp), embed (K_embed)."""
        return embed @ self._cost_per_embed(attention, mlp)

    def _choice_cost(self, choices: dict[str, int]) -> float:
        """The price of one candidate per module (`choices`: candidate index by module name), from the host tables."""
        embed = choices["embed"]
        return (self._stem_costs[embed]
                + sum(self._attention_costs[embed][choices[f"attn.{i}"]] for i in range(len(self.attention)))
                + sum(self._mlp_costs[embed][choices[f"mlp.{i}"]] for i in range(len(self.mlp))))

    def _check_budget_reachable(self) -> None:
        narrowest = {name: int(module.widths.argmin()) for name, module in self.searchable_modules().items()}
        smallest = self._choice_cost(narrowest)
        if not self.cost.within(smallest, self.target_cost):
            field = "target_flops" if self.cost.kind == "macs" else "target_speedup / target_latency_ms"
            raise ValueError(
                f"CompressionConfig.{field}: the budget {self.target_cost_ratio:.3f} of the dense {self.cost.unit} is "
                f"below the smallest model in the OFB search space ({smallest / self.dense_cost:.3f}); "
                f"{'raise' if self.cost.kind == 'macs' else 'relax'} {field} or widen the search space "
                "(ofb.head_choices, ofb.head_dim_ratios, ofb.mlp_ratios, ofb.embed_min_ratio)."
            )

    # -- budget (budget_control="dual") -------------------------------------------------------------------------
    def _budget_directions(self) -> list[torch.Tensor]:
        """The direction the budget projection moves each group's logits in (`ofb.budget_direction`). "width": every
        group's candidate widths / its widest candidate (the same slope for every module, so no kind of module is
        singled out by its price). "cost": each candidate's marginal price at the current probabilities (what
        choosing it adds to E[cost]), in units of the dense model's mean price per module: the exponential tilt
        p_k exp(-t c_k) that moves the distribution least (in KL) for the budget, so a wide embedding, which prices
        every block, pays for what it costs."""
        if self.settings.budget_direction == "width":
            return [group.widths.float() / group.widths.max() for group in self.groups().values()]
        attention, mlp, embed = (group.probabilities().detach().float() for group in self.groups().values())
        unit = self.dense_cost / (len(self.attention) + len(self.mlp) + 1)
        return [embed @ self._attention_cost_table / unit, embed @ self._mlp_cost_table / unit,
                self._cost_per_embed(attention, mlp) / unit]

    def _expected_cost_at(self, shift: torch.Tensor, directions: list[torch.Tensor]) -> torch.Tensor:
        """E[cost] if every module's logits were alpha - shift * its direction (a function of `shift` alone)."""
        probabilities = []
        for group, direction in zip(self.groups().values(), directions):
            logits = (group.alpha.detach().float() - shift * direction).masked_fill(~group.active, float("-inf"))
            probabilities.append(logits.softmax(-1))
        return self._expected_cost(*probabilities)

    @torch.no_grad()
    def hold_budget(self, newton_steps: int = 1) -> None:
        """Project the architecture logits onto E[cost] = target (MACs, or predicted ms): alpha <- alpha - t * direction
        (`_budget_directions`: relative width, or marginal price), with t from Newton steps on E(t) (monotone in t),
        its slope by a forward difference (two evaluations, no backward). All on the device, no host read. Run after
        every optimizer step, where alpha moved by about its learning rate, one step from t = 0 is enough; the other
        loss terms decide how the budget is shared but never move it."""
        shift = torch.zeros((), device=self.embed.alpha.device)
        target = float(self.target_cost)  # a Python number: no host-to-device copy per step
        directions = self._budget_directions()  # once per projection: both evaluations and the update use it
        for _ in range(newton_steps):
            expected = self._expected_cost_at(shift, directions)
            slope = (self._expected_cost_at(shift + SLOPE_DELTA, directions) - expected) / SLOPE_DELTA
            # every module final: nothing left to move (slope 0)
            step = torch.where(slope < -1e-6 * target, (expected - target) / slope.clamp(max=-1e-12), 0.0)
            shift = shift - step.clamp(-MAX_SHIFT_STEP, MAX_SHIFT_STEP)
        for group, direction in zip(self.groups().values(), directions):
            group.alpha.sub_((shift * direction).to(group.alpha.dtype))
        self.budget_dual.add_(shift)

    def expected_cost(self, terms: dict | None = None) -> torch.Tensor:
        """Differentiable expected cost (MACs, or predicted ms for a speed budget) over the candidates."""
        terms = self._terms() if terms is None else terms
        return self._expected_cost(terms["attention"][0], terms["mlp"][0], terms["embed"][0])

    def expected_macs(self, terms: dict | None = None) -> torch.Tensor:
        """`expected_cost` (the name of the MACs budget's era; under a speed budget it is predicted ms)."""
        return self.expected_cost(terms)

    @property
    def _ratio_key(self) -> str:
        """The logged name of E[cost] / dense cost: `expected_macs_ratio`, or `expected_latency_ratio`."""
        return f"expected_{self.cost.kind}_ratio"

    def _project_to_budget(self, modules: dict[str, SearchableWidth], choices: dict[str, int]) -> dict[str, int]:
        """Greedy: shrink (most probable smaller candidate first) until within budget, then grow (most probable
        active larger candidate that still fits) so the result lands just under the budget."""
        # Host copies, read once: the projection below is a Python search over candidates.
        probabilities = {name: module.probabilities().detach().tolist() for name, module in modules.items()}
        widths = {name: module.widths.tolist() for name, module in modules.items()}
        # Growing uses candidates still in play; a final module (one candidate left) may also grow, taking its next
        # units by importance, so an early-collapsed search can still fill the budget.
        in_play = {name: (module.active | module.is_final).tolist() for name, module in modules.items()}

        def moves(shrink: bool):
            for name in modules:
                current = widths[name][choices[name]]
                for k, width in enumerate(widths[name]):
                    if (width < current) if shrink else (width > current and in_play[name][k]):
                        yield (probabilities[name][k], width if shrink else -width), name, k

        fits = lambda trial: self.cost.within(self._choice_cost(trial), self.target_cost)  # noqa: E731
        while not fits(choices):
            _, name, k = max(moves(shrink=True), key=lambda move: move[0])
            choices[name] = k
        while True:
            fitting = []
            for key, name, k in moves(shrink=False):
                trial = {**choices, name: k}
                if fits(trial):
                    fitting.append((key, name, k))
            if not fitting:
                return choices
            _, name, k = max(fitting, key=lambda move: move[0])
            choices[name] = k
