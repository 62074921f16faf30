"""OFB importance logits started from the dense weights (`OFBConfig.score_init="weights"`)."""

from __future__ import annotations

import pytest
import torch
from conftest import make_vit_classifier

from hf_vit_compress.config import CompressionConfig
from hf_vit_compress.methods.ofb.importance import logits_from_scores
from hf_vit_compress.methods.ofb.method import OFBMethod
from hf_vit_compress.surgery.targets import model_parts


def test_logits_follow_the_scores_order_per_module_within_the_random_inits_range():
    scores = torch.tensor([[3.0, 1.0, 2.0, 0.5], [0.1, 0.4, 0.3, 0.2]])
    logits = logits_from_scores(scores, std=0.2, unit_dims=1)
    for row, row_scores in zip(logits, scores):
        assert torch.equal(row.argsort(), row_scores.argsort())
        assert len(set(row.tolist())) == row.numel()  # no ties
    assert logits.abs().max() <= 0.4 + 1e-6
    # a (modules, heads, dims) grid is ranked over heads x dims, each module on its own
    grid = torch.arange(24.0).view(2, 3, 4)
    grid_logits = logits_from_scores(grid, std=0.2, unit_dims=2)
    assert torch.equal(grid_logits[0], grid_logits[1])
    assert torch.equal(grid_logits.flatten(1).argsort(-1), grid.flatten(1).argsort(-1))


def _weighted_model():
    """A tiny ViT whose MLP unit 5 and attention dim (head 1, dim 2) of block 0 and residual channel 7 carry no
    weight, and whose MLP unit 9 and attention dim (head 0, dim 1) carry the most."""
    model = make_vit_classifier(seed=0)
    parts = model_parts(model)
    block = parts.blocks[0]
    head_dim = model.config.hidden_size // model.config.num_attention_heads
    with torch.no_grad():
        block.fc1.weight[5].zero_()
        block.fc2.weight[:, 5].zero_()
        block.fc1.weight[9].mul_(10)
        weak, strong = 1 * head_dim + 2, 0 * head_dim + 1
        for linear in (block.q_proj, block.k_proj, block.v_proj):
            linear.weight[weak].zero_()
            linear.weight[strong].mul_(10)
        block.o_proj.weight[:, weak].zero_()
        parts.patch_projection.weight[7].zero_()
        for each in parts.blocks:
            each.o_proj.weight[7].zero_()
            each.fc2.weight[7].zero_()
    return model, weak, strong


def test_weights_init_ranks_units_by_their_weights():
    model, weak, strong = _weighted_model()
    method = OFBMethod(model, CompressionConfig(method="ofb", target_flops=0.5, ofb={"score_init": "weights"}))
    mlp = method.mlp.score_logits[0]
    assert mlp.argmin() == 5 and mlp.argmax() == 9
    attention = method.attention.score_logits[0].flatten()
    assert attention.argmin() == weak and attention.argmax() == strong
    assert method.embed.score_logits.argmin() == 7
    assert method.mlp.score_logits.abs().max() <= 2 * method.settings.score_init_std + 1e-6
    # the narrowest MLP candidate keeps the strong unit, not the empty one
    keep = method.mlp.keep_for(0, index=0)
    assert bool(keep[9]) and not bool(keep[5])


def test_weights_init_is_the_default_and_random_init_ignores_the_weights():
    assert CompressionConfig(method="ofb", target_flops=0.5).ofb.score_init == "weights"
    model, _, _ = _weighted_model()
    method = OFBMethod(model, CompressionConfig(method="ofb", target_flops=0.5, ofb={"score_init": "random"}))
    assert method.mlp.score_logits[0].argmin() != 5 or method.mlp.score_logits[0].argmax() != 9


def test_an_unknown_score_init_is_refused_naming_the_field():
    with pytest.raises(ValueError, match="ofb.score_init"):
        CompressionConfig(method="ofb", target_flops=0.5, ofb={"score_init": "taylor"})


@pytest.mark.parametrize("score_init", ["weights", "random"])
def test_score_init_mean_moves_every_logit_and_keeps_the_order(score_init):
    def build(**ofb):
        model, _, _ = _weighted_model()
        torch.manual_seed(0)  # the random init's draw
        config = CompressionConfig(method="ofb", target_flops=0.5, ofb={"score_init": score_init, **ofb})
        return OFBMethod(model, config)

    base, shifted = build(), build(score_init_mean=2.0)
    for name in ("attention", "mlp", "embed"):
        before, after = getattr(base, name).score_logits, getattr(shifted, name).score_logits
        assert torch.allclose(after - before, torch.full_like(before, 2.0), atol=1e-6)
    assert shifted.mlp.importance().min() > 0.8  # S = sigmoid(2 - 0.4) at the lowest rank
