"""Importance logits initialised from the dense weights (`OFBConfig.score_init="weights"`).

OFB learns a unit's importance S = sigmoid(s) during its search, from a random s. A short search on a converged
model cannot move s far (Adam moves a logit about one learning rate per step), so the random draw would decide
which units survive. Starting s from the weights' own ranking (a magnitude score per unit, as one-shot pruners
use) lets the search refine an informed order instead. The logits keep the random init's range: evenly spaced by
rank over [-2, 2] * `score_init_std` (no ties, the truncated normal's bounds), so S starts near 0.5 as before and
only the order changes.
"""

from __future__ import annotations

import torch

from ...surgery.targets import ModelParts


def _row_norms(weight: torch.Tensor) -> torch.Tensor:
    return weight.detach().float().norm(dim=1)


def _column_norms(weight: torch.Tensor) -> torch.Tensor:
    return weight.detach().float().norm(dim=0)


def attention_scores(parts: ModelParts, num_heads: int) -> torch.Tensor:
    """(L, H, head_dim): a q/k/v dim's share of the attention logits (|q row| |k row|) plus its share of the output
    (|v row| |o_proj column|); q, k and v share one mask per dim."""
    scores = []
    for block in parts.blocks:
        logits = _row_norms(block.q_proj.weight) * _row_norms(block.k_proj.weight)
        output = _row_norms(block.v_proj.weight) * _column_norms(block.o_proj.weight)
        scores.append((logits + output).view(num_heads, -1))
    return torch.stack(scores)


def mlp_scores(parts: ModelParts) -> torch.Tensor:
    """(L, intermediate): |fc1 row| |fc2 column| per hidden unit."""
    return torch.stack([_row_norms(b.fc1.weight) * _column_norms(b.fc2.weight) for b in parts.blocks])


def embed_scores(parts: ModelParts) -> torch.Tensor:
    """(hidden,): what writes a residual channel (patch projection, every o_proj / fc2 row) times what reads it
    (every q/k/v, fc1 and classifier column, through the LayerNorm weight in front of it)."""
    writes = parts.patch_projection.weight.detach().float().flatten(1).norm(dim=1)
    reads = torch.zeros_like(writes)
    for block in parts.blocks:
        writes = writes + _row_norms(block.o_proj.weight) + _row_norms(block.fc2.weight)
        qkv = torch.cat([block.q_proj.weight, block.k_proj.weight, block.v_proj.weight])
        reads = reads + block.layernorm_before.weight.detach().float().abs() * _column_norms(qkv)
        reads = reads + block.layernorm_after.weight.detach().float().abs() * _column_norms(block.fc1.weight)
    for head in parts.heads.values():
        reads = reads + parts.final_layernorm.weight.detach().float().abs() * _column_norms(head.weight)
    return writes * reads


def logits_from_scores(scores: torch.Tensor, std: float, unit_dims: int) -> torch.Tensor:
    """Importance logits in the order of `scores` over its last `unit_dims` axes (each module on its own): evenly
    spaced by rank over [-2 std, 2 std], the lowest score lowest."""
    flat = scores.flatten(-unit_dims)
    ranks = flat.argsort(-1).argsort(-1).to(torch.float32)  # 0 = least important
    units = flat.shape[-1]
    logits = std * (4 * (ranks + 0.5) / units - 2)
    return logits.view(scores.shape)


@torch.no_grad()
def initialise_from_weights(attention, mlp, embed, parts: ModelParts, num_heads: int, std: float) -> None:
    """Overwrite the importance logits of the three batched search modules with the weights' order."""
    for group, scores in ((attention, attention_scores(parts, num_heads)), (mlp, mlp_scores(parts)),
                          (embed, embed_scores(parts))):
        logits = logits_from_scores(scores, std, group.unit_dims)
        group.score_logits.copy_(logits.to(group.score_logits))
