"""UVC's optional residual-width group (`UVCConfig.prune_hidden`, beyond the paper's search space).

One global count s_D of removed residual (embedding) channels. Channel c's group is every weight that uses it: the
patch projection's output row, the class/distillation tokens and position embeddings, every LayerNorm's weight and
bias, the input columns of q/k/v/fc1 and of the classifier head(s), and the output rows (and biases) of o_proj and
fc2. Its score is the squared norm of that group; the least-k set is the ceil(s_D) lowest-scored channels (stable
ties), the proximal step W_g <- W_g / (1 + 2 lr y_D) shrinks exactly that group, and the forward drops the channels
by normalising every LayerNorm over the kept ones only (`Masks.hidden_keep`): a dropped channel then reaches no
q/k/v/fc1 input and no classifier, so the masked dense model computes what the model exported with
`Architecture.hidden_channels` computes. Nothing here reads a value back from the device.
"""

from __future__ import annotations

import torch

from ...surgery.targets import ModelParts


class HiddenGroup:
    """The tensors of every residual channel's group, by the axis the channel lives on, scored and shrunk in a few
    batched operations (stacks of same-shaped tensors, one `_foreach_mul_` for the prox)."""

    def __init__(self, parts: ModelParts):
        blocks = parts.blocks
        projection = parts.patch_projection
        norms = [norm for block in blocks for norm in (block.layernorm_before, block.layernorm_after)]
        norms.append(parts.final_layernorm)
        # (D,) vectors: LayerNorm weights and biases, the biases of the channel-producing layers
        self.vectors = [t for norm in norms for t in (norm.weight, norm.bias) if t is not None]
        self.vectors += [t for t in [projection.bias] + [b.o_proj.bias for b in blocks] + [b.fc2.bias for b in blocks]
                         if t is not None]
        self.attention_inputs = [linear.weight for b in blocks for linear in (b.q_proj, b.k_proj, b.v_proj)]  # (., D)
        self.mlp_inputs = [b.fc1.weight for b in blocks]  # (I, D)
        self.head_inputs = [head.weight for head in parts.heads.values()]  # (labels, D)
        tokens = [parts.cls_token, parts.distillation_token, parts.position_embeddings]
        self.tokens = [t for t in tokens if t is not None]  # (1, n, D)
        self.outputs = [b.o_proj.weight for b in blocks] + [b.fc2.weight for b in blocks]  # (D, .): output rows
        self.patch_weight = projection.weight  # (D, C, p, p)
        self.size = projection.weight.shape[0]

    def tensors(self) -> list[torch.Tensor]:
        return [*self.vectors, *self.attention_inputs, *self.mlp_inputs, *self.head_inputs, *self.tokens,
                *self.outputs, self.patch_weight]

    @torch.no_grad()
    def scores(self, squared_o_proj: torch.Tensor, squared_fc2: torch.Tensor,
               rest: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Squared norm of every channel's group (D,), float32, and its part outside o_proj and fc2 (`rest`).
        `squared_o_proj` (L, D, H d) and `squared_fc2` (L, D, I) are the squared o_proj / fc2 weights the other
        kinds' scores are summed from (shared). `rest`, when given, is taken as is: after a prox that shrank only the
        residual groups, it is the previous rest times the squared shrink factors (`shrink`), a few operations
        instead of a pass over every tensor of the groups."""
        if rest is None:
            rest = self._rest_scores()
        return rest + squared_o_proj.sum((0, 2)) + squared_fc2.sum((0, 2)), rest

    def _rest_scores(self) -> torch.Tensor:
        size = self.size

        def column_sums(tensors: list[torch.Tensor]) -> torch.Tensor:  # same-shaped (..., D) tensors
            return torch.stack(tensors).float().pow(2).reshape(-1, size).sum(0)

        rest = column_sums(self.vectors) + column_sums(self.attention_inputs) + column_sums(self.mlp_inputs)
        rest = rest + torch.cat([t.reshape(-1, size) for t in self.head_inputs + self.tokens]).float().pow(2).sum(0)
        return rest + self.patch_weight.float().pow(2).reshape(size, -1).sum(1)

    @torch.no_grad()
    def shrink(self, removed: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
        """W_g <- W_g * factor for the groups of the `removed` channels (D,) bool, every tensor in one operation.
        Returns the per-channel factors (D,), float32 (the scores' rest outside o_proj / fc2 scales by their
        square)."""
        dtype = self.patch_weight.dtype
        factors = torch.where(removed, factor, factor.new_ones(()))  # (D,)
        scale = factors.to(dtype)
        rows = scale.unsqueeze(-1)  # (D, 1): output rows of o_proj / fc2
        last = [*self.vectors, *self.attention_inputs, *self.mlp_inputs, *self.head_inputs, *self.tokens]
        tensors = last + self.outputs + [self.patch_weight]
        scales = [scale] * len(last) + [rows] * len(self.outputs) + [rows.view(-1, 1, 1, 1)]
        torch._foreach_mul_(tensors, scales)
        return factors
