"""Tests for OFB (`hf_vit_compress.methods.ofb.method`), pinned to spec/ofb.md (PMIM: tests/methods/test_pmim.py).

Expected values are computed by hand (or by plain Python loops over the spec's formulas), never by calling the
function under test a second way.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import make_deit_classifier, make_pixel_values, make_vit_classifier
from torch.nn import functional as F

from hf_vit_compress.config import CompressionConfig, OFBConfig
from hf_vit_compress.methods.ofb.method import (
    OFBMethod,
    SearchableAttention,
    SearchableWidth,
    embed_choices,
    head_choices,
    linear_schedule,
    one_hot_loss,
    sparsity_scores,
    width_choices,
)
from hf_vit_compress.surgery.flops import architecture_macs
from hf_vit_compress.surgery.gating import install_gates
from hf_vit_compress.surgery.targets import model_parts

DEFAULT_RATIOS = OFBConfig().head_dim_ratios



def width_module(num_units: int, widths: list[int]) -> SearchableWidth:
    return SearchableWidth((num_units,), widths, score_std=0.2, norm_coefficient=1e-4, sigma_eps=1e-3)


def set_probabilities(module: SearchableWidth, probabilities: list[float]) -> None:
    """alpha = log p, so softmax(alpha) = p (p sums to 1)."""
    with torch.no_grad():
        module.alpha.copy_(torch.tensor(probabilities).log())


def gated_ofb(target: float = 0.5, seed: int = 0, **ofb) -> tuple[torch.nn.Module, OFBMethod, object]:
    """A tiny ViT with an OFB method attached and its gates installed, as `CompressionTrainer` does."""
    model = make_vit_classifier(seed=seed)
    method = OFBMethod(model, CompressionConfig(method="ofb", target_flops=target, ofb=ofb))
    model.add_module("compression", method)
    handle = install_gates(model, method)
    return model, method, handle


def ranks_by_hand(scores: list[float]) -> list[int]:
    """Rank of each entry, 0 = largest."""
    order = sorted(range(len(scores)), key=lambda i: -scores[i])
    ranks = [0] * len(scores)
    for rank, index in enumerate(order):
        ranks[index] = rank
    return ranks


# ---------------------------------------------------------------------------------------------------------------
# Sparsity score V
# ---------------------------------------------------------------------------------------------------------------
def test_sparsity_scores_hand_computed_and_gradient_only_to_p():
    p = torch.tensor([0.2, 0.3, 0.5], requires_grad=True)
    widths = torch.tensor([1, 2, 4])
    ranks = torch.tensor([2, 0, 3, 1])
    v = sparsity_scores(p, widths, ranks)
    # rank 0: every candidate keeps it (1.0); rank 1: widths 2, 4 (0.8); ranks 2, 3: only width 4 (0.5)
    torch.testing.assert_close(v, torch.tensor([0.5, 1.0, 0.5, 0.8]))
    v.sum().backward()
    # d(sum V)/dp_k = number of units candidate k keeps
    torch.testing.assert_close(p.grad, torch.tensor([1.0, 2.0, 4.0]))


def test_width_sparsity_ranks_by_importance_and_is_a_sort_for_autograd():
    module = width_module(4, [1, 2, 4])
    set_probabilities(module, [0.2, 0.3, 0.5])
    with torch.no_grad():
        module.score_logits.copy_(torch.tensor([-1.0, 2.0, -3.0, 0.5]))  # ranks 2, 0, 3, 1
    v = module.sparsity()
    torch.testing.assert_close(v, torch.tensor([0.5, 1.0, 0.5, 0.8]))
    v.sum().backward()
    assert module.alpha.grad is not None and module.alpha.grad.abs().sum() > 0
    assert module.score_logits.grad is None or not module.score_logits.grad.any()


def test_mask_gives_importance_its_gradient_only_through_lambda_times_s():
    module = width_module(4, [1, 2, 4])
    set_probabilities(module, [0.2, 0.3, 0.5])
    logits = torch.tensor([-1.0, 2.0, -3.0, 0.5])
    with torch.no_grad():
        module.score_logits.copy_(logits)
    lam = 0.3
    mask = module.mask(lam)
    s = torch.sigmoid(logits)
    torch.testing.assert_close(mask, lam * s + (1 - lam) * torch.tensor([0.5, 1.0, 0.5, 0.8]))
    mask.sum().backward()
    torch.testing.assert_close(module.score_logits.grad, lam * s * (1 - s))


def test_attention_sparsity_on_a_heads_by_dims_grid():
    # 2 heads of 3 channels; candidates (n, d') in {1, 2} x {1, 2}, flattened row-major like alpha.
    module = SearchableAttention(2, 3, [1, 2], [1, 2], score_std=0.2, norm_coefficient=4e-4, sigma_eps=1e-3)
    with torch.no_grad():
        # Head 0 holds the single most important unit (S=0.95) but the smaller SUM (1.02 vs 2.17): heads are ranked
        # by the sum, so head 1 ranks first. Inside head 0: c0, c1, c2; inside head 1: c2, c0, c1.
        module.score_logits.copy_(torch.tensor([[3.0, -3.0, -4.0], [1.0, 0.5, 1.5]]))
    set_probabilities(module, [0.1, 0.2, 0.3, 0.4])  # p_(1,1), p_(1,2), p_(2,1), p_(2,2)
    # V_{h,c} = sum_ij p_ij [n_i > rank(h)] [d'_j > rank(c)]
    # head 1 (rank 0): c2 (rank 0) -> 1.0; c0 (rank 1) -> p_(1,2)+p_(2,2) = 0.6; c1 (rank 2) -> 0
    # head 0 (rank 1): c0 (rank 0) -> p_(2,1)+p_(2,2) = 0.7; c1 (rank 1) -> p_(2,2) = 0.4; c2 -> 0
    expected = torch.tensor([[0.7, 0.4, 0.0], [0.6, 0.0, 1.0]])
    torch.testing.assert_close(module.sparsity(), expected)
    # candidate (2 heads, 1 channel) keeps the top channel of each head
    assert module.keep_for(2).tolist() == [[True, False, False], [False, False, True]]
    # candidate (1 head, 2 channels) keeps head 1's top two channels
    assert module.keep_for(1).tolist() == [[False, False, False], [True, False, True]]


# ---------------------------------------------------------------------------------------------------------------
# One-hot loss
# ---------------------------------------------------------------------------------------------------------------
def test_one_hot_loss_values_and_ordering():
    eps = 1e-3
    uniform = one_hot_loss(torch.full((4,), 0.25), eps)
    # sigma = 0 is clamped to eps: log K + cot(pi * eps) / K
    assert math.isfinite(float(uniform))
    assert float(uniform) == pytest.approx(math.log(4) + 1 / math.tan(math.pi * eps) / 4, rel=1e-5)

    p = [0.4, 0.3, 0.2, 0.1]
    entropy = -sum(x * math.log(x) for x in p)
    sigma = sum((x - 0.25) ** 2 for x in p) / (1 - 0.25)  # 0.05 / 0.75 = 1/15
    assert sigma == pytest.approx(1 / 15)
    intermediate = one_hot_loss(torch.tensor(p), eps)
    assert float(intermediate) == pytest.approx(entropy + 1 / math.tan(math.pi * sigma) / 4, rel=1e-5)

    near_one_hot = one_hot_loss(torch.tensor([0.97, 0.01, 0.01, 0.01]), eps)
    one_hot = one_hot_loss(torch.tensor([1.0, 0.0, 0.0, 0.0]), eps)
    values = [float(uniform), float(intermediate), float(near_one_hot), float(one_hot)]
    assert all(math.isfinite(v) for v in values)
    assert values[0] > values[1] > values[2] > values[3]
    # at one-hot sigma is clamped to 1 - eps: entropy 0, cot(pi (1 - eps)) / K = -cot(pi eps) / K
    assert values[3] == pytest.approx(-1 / math.tan(math.pi * eps) / 4, rel=1e-4)
    assert float(one_hot_loss(torch.tensor([1.0]), eps)) == 0.0  # K = 1: nothing left to decide


def test_module_loss_adapts_to_the_active_candidates():
    module = width_module(4, [1, 2, 3, 4])
    set_probabilities(module, [0.1, 0.2, 0.3, 0.4])
    with torch.no_grad():
        module.active[0] = False  # eliminated: K = 3, p renormalised over the rest
    p = [0.2 / 0.9, 0.3 / 0.9, 0.4 / 0.9]
    entropy = -sum(x * math.log(x) for x in p)
    sigma = sum((x - 1 / 3) ** 2 for x in p) / (1 - 1 / 3)
    norm = 1e-4 * float(module.importance().detach().sum())
    expected = entropy + 1 / math.tan(math.pi * sigma) / 3 + norm
    assert float(module.module_loss().detach()) == pytest.approx(expected, rel=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# Schedules
# ---------------------------------------------------------------------------------------------------------------
def test_linear_schedule():
    assert linear_schedule(0.0, 0.2, 0.99, 0.1) == pytest.approx(0.99)
    assert linear_schedule(0.1, 0.2, 0.99, 0.1) == pytest.approx((0.99 + 0.1) / 2)
    assert linear_schedule(0.2, 0.2, 0.99, 0.1) == pytest.approx(0.1)
    assert linear_schedule(0.7, 0.2, 0.99, 0.1) == pytest.approx(0.1)
    assert linear_schedule(0.5, 0.0, 0.99, 0.1) == pytest.approx(0.1)  # no warm-up


def test_set_progress_ramps_lambda_and_pmim_ratio_over_warmup():
    model = make_vit_classifier()
    method = OFBMethod(model, CompressionConfig(method="ofb", target_flops=0.5))
    method.configure_schedule(total_search_steps=100, steps_per_epoch=10)  # warm-up = 20 steps
    expected = {0: (0.99, 0.05), 10: ((0.99 + 0.1) / 2, 0.15), 20: (0.1, 0.25), 60: (0.1, 0.25), 99: (0.1, 0.25)}
    for step, (lam, ratio) in expected.items():
        method.set_progress(step)
        assert method.lam == pytest.approx(lam), step
        assert method.pmim.mask_ratio == pytest.approx(ratio), step
        assert method.metrics()["lambda"] == pytest.approx(lam)
        assert method.metrics()["pmim_mask_ratio"] == pytest.approx(ratio)


def test_elimination_runs_about_three_times_per_epoch_under_the_papers_budget_control():
    model = make_vit_classifier()
    method = OFBMethod(model, CompressionConfig(method="ofb", target_flops=0.5, ofb={"budget_control": "paper"}))
    method.configure_schedule(total_search_steps=100, steps_per_epoch=9)  # every 3 optimizer steps
    weak = [0.01] + [0.99 / 6] * 6  # mlp widths: 7 candidates, threshold 0.2 / 7 = 0.0286
    set_probabilities(method.mlp[0], weak)
    for step in (0, 1, 3, 4):
        method.on_step_end(step)
        assert bool(method.mlp[0].active.all()), step
    method.on_step_end(2)  # the 3rd step
    assert method.mlp[0].active.tolist() == [False] + [True] * 6


# ---------------------------------------------------------------------------------------------------------------
# Elimination and finalisation of a module
# ---------------------------------------------------------------------------------------------------------------
def test_eliminate_switches_off_exactly_the_weak_candidates_adaptively():
    module = width_module(6, [1, 2, 3, 4, 5, 6])
    # K = 6: threshold 0.2 / 6 = 0.0333: 0.02 and 0.033 go, 0.034 stays
    set_probabilities(module, [0.02, 0.033, 0.034, 0.313, 0.3, 0.3])
    assert module.eliminate(0.2) == 2
    assert module.active.tolist() == [False, False, True, True, True, True]
    probabilities = module.probabilities()
    assert probabilities[:2].tolist() == [0.0, 0.0]
    torch.testing.assert_close(probabilities[2:], torch.tensor([0.034, 0.313, 0.3, 0.3]) / 0.947)
    assert not bool(module.is_final)
    # K = 4 now: threshold 0.05; 0.034 / 0.947 = 0.0359 goes
    assert module.eliminate(0.2) == 1
    assert module.active.tolist() == [False, False, False, True, True, True]
    # K = 3: threshold 0.0667; 0.313/0.913, 0.3/0.913 all stay
    assert module.eliminate(0.2) == 0
    assert not bool(module.is_final)


def test_module_with_one_candidate_left_is_final_with_top_units_by_importance():
    module = width_module(6, [1, 2, 3, 4, 5, 6])
    with torch.no_grad():
        module.score_logits.copy_(torch.tensor([0.3, -1.0, 2.0, 0.5, -0.2, 1.0]))
        module.alpha.copy_(torch.tensor([-30.0, -30.0, -30.0, 5.0, -5.0, -5.0]))
    assert module.eliminate(0.2) == 5
    assert bool(module.is_final) and module.active.tolist() == [False, False, False, True, False, False]
    keep = [True, False, True, True, False, True]  # width 4: the top four by S: units 2 (2.0), 5, 3, 0 (0.3)
    assert module.final_keep.tolist() == keep
    assert module.sparsity().tolist() == [float(k) for k in keep]
    lam = 0.1
    s = torch.sigmoid(module.score_logits.detach())
    torch.testing.assert_close(module.mask(lam), (lam * s + 1 - lam) * torch.tensor(keep, dtype=torch.float32))
    assert float(module.module_loss().detach()) == 0.0
    assert module.eliminate(0.2) == 0  # nothing more to do
    # the kept set no longer follows S
    with torch.no_grad():
        module.score_logits.copy_(torch.tensor([5.0, 4.0, -2.0, 0.0, 3.0, 0.0]))
    assert module.final_keep.tolist() == keep and module.keep_for(3).tolist() == keep


def test_a_candidate_exactly_at_the_threshold_is_eliminated():
    module = width_module(4, [1, 2, 3, 4])  # alpha = 0: p = 1/4 exactly, = threshold 1.0 / K for all four
    assert module.eliminate(1.0) == 3  # all four are at the threshold; the leader stays
    assert int(module.active.sum()) == 1 and bool(module.is_final)


def test_the_leader_is_never_eliminated():
    module = width_module(6, [1, 2, 3, 4, 5, 6])
    # with threshold 2: 2 / 6 = 0.333 is above every p, the leader (p = 0.30, candidate 4) included
    set_probabilities(module, [0.1, 0.12, 0.14, 0.16, 0.30, 0.18])
    assert module.eliminate(2.0) == 5
    assert module.active.tolist() == [False, False, False, False, True, False]
    assert bool(module.is_final) and int(module.final_keep.sum()) == 5


# ---------------------------------------------------------------------------------------------------------------
# Masks on the model
# ---------------------------------------------------------------------------------------------------------------
def _capture(module, store: dict, key: str, prepend: bool):
    def hook(mod, args, output):
        store[key] = (args[0].detach() if args else None, output.detach())

    return module.register_forward_hook(hook, prepend=prepend)


def test_search_masks_scale_qkv_fc1_and_embeddings_by_lambda_s_plus_one_minus_lambda_v():
    model, method, handle = gated_ofb(target=0.5)
    method.configure_schedule(total_search_steps=100, steps_per_epoch=10)
    method.set_progress(10)
    lam = 0.545
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for module in method.searchable_modules().values():
            module.score_logits.copy_(torch.randn(module.score_logits.shape, generator=generator))
            module.alpha.copy_(torch.randn(module.alpha.shape, generator=generator))

    def expected_width_mask(module: SearchableWidth) -> torch.Tensor:
        s = torch.sigmoid(module.score_logits.detach()).tolist()
        p = torch.softmax(module.alpha.detach(), -1).tolist()
        widths = module.widths.tolist()
        ranks = ranks_by_hand(s)
        v = [sum(pk for pk, w in zip(p, widths) if w > r) for r in ranks]
        return torch.tensor([lam * su + (1 - lam) * vu for su, vu in zip(s, v)])

    def expected_attention_mask(module: SearchableAttention) -> torch.Tensor:
        s = torch.sigmoid(module.score_logits.detach())
        heads, dims = module.head_counts.tolist(), module.dim_counts.tolist()
        p = torch.softmax(module.alpha.detach(), -1).view(len(heads), len(dims)).tolist()
        head_rank = ranks_by_hand(s.sum(-1).tolist())
        values = []
        for h in range(s.shape[0]):
            channel_rank = ranks_by_hand(s[h].tolist())
            for c in range(s.shape[1]):
                v = sum(
                    p[i][j]
                    for i, n in enumerate(heads)
                    for j, d in enumerate(dims)
                    if n > head_rank[h] and d > channel_rank[c]
                )
                values.append(lam * float(s[h, c]) + (1 - lam) * v)
        return torch.tensor(values)

    parts = model_parts(model)
    store: dict = {}
    hooks = []
    for index, block in enumerate(parts.blocks):
        for name in ("q_proj", "k_proj", "v_proj", "fc1"):
            hooks.append(_capture(getattr(block, name), store, f"{name}{index}", prepend=False))
    hooks.append(_capture(parts.embeddings, store, "embed.raw", prepend=True))
    hooks.append(_capture(parts.embeddings, store, "embed.gated", prepend=False))
    with torch.no_grad():
        model(pixel_values=make_pixel_values(2))
    for hook in hooks:
        hook.remove()

    def ungated(index: int, name: str):
        """(what the dense layer computes from the input it got, what came out of it with the gate)"""
        layer = getattr(parts.blocks[index], name)
        layer_input, gated = store[f"{name}{index}"]
        return F.linear(layer_input, layer.weight, layer.bias), gated

    for index in range(len(parts.blocks)):
        attention = expected_attention_mask(method.attention[index])
        for name in ("q_proj", "k_proj", "v_proj"):
            raw, gated = ungated(index, name)
            torch.testing.assert_close(gated, raw * attention, msg=f"{name} of block {index}")
        raw, gated = ungated(index, "fc1")
        torch.testing.assert_close(gated, raw * expected_width_mask(method.mlp[index]))
    raw, gated = store["embed.raw"][1], store["embed.gated"][1]
    torch.testing.assert_close(gated, raw * expected_width_mask(method.embed))  # class token + positions too
    masks = method.compute_masks()
    torch.testing.assert_close(masks.qk[0], expected_attention_mask(method.attention[0]))
    assert masks.hidden_keep is None  # the widest embedding candidate is alive: every channel has V > 0
    handle.remove()


def test_layernorms_normalise_only_channels_with_positive_v_once_the_widest_embedding_is_gone():
    model, method, handle = gated_ofb(target=0.5)
    embed = method.embed
    widths = embed.widths.tolist()
    assert widths == list(range(16, 33))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        embed.score_logits.copy_(torch.randn(embed.score_logits.shape, generator=generator))
        alpha = torch.zeros(len(widths))
        alpha[-3:] = -30.0  # widths 30, 31, 32: p ~ 0 <= 0.2 / 17
        embed.alpha.copy_(alpha)
    assert embed.eliminate(0.2) == 3
    ranks = ranks_by_hand(torch.sigmoid(embed.score_logits.detach()).tolist())
    keep = torch.tensor([r < 29 for r in ranks])  # the widest survivor keeps 29 channels
    masks = method.compute_masks()
    assert masks.hidden_keep is not None and masks.hidden_keep.bool().tolist() == keep.tolist()

    parts = model_parts(model)
    layernorm = parts.blocks[1].block.layernorm_before
    store: dict = {}
    hook = _capture(layernorm, store, "ln", prepend=False)
    with torch.no_grad():
        model(pixel_values=make_pixel_values(2))
    hook.remove()
    x, y = store["ln"]
    expected = F.layer_norm(x[..., keep], (int(keep.sum()),), layernorm.weight[keep], layernorm.bias[keep],
                            layernorm.eps)
    torch.testing.assert_close(y[..., keep], expected, atol=1e-5, rtol=1e-5)
    assert not y[..., ~keep].any()
    handle.remove()


def test_masks_after_finalize_are_learnable_scales_on_the_kept_units():
    model, method, handle = gated_ofb(target=0.5)
    arch = method.finalize()
    lam = method.settings.lambda_end
    masks = method.compute_masks()
    s = torch.sigmoid(method.mlp[0].score_logits.detach())
    keep = torch.zeros(64, dtype=torch.bool)
    keep[arch.layers[0].mlp_neurons] = True
    torch.testing.assert_close(masks.mlp[0], (lam * s + 1 - lam) * keep)
    hidden_keep = torch.zeros(32, dtype=torch.bool)
    hidden_keep[arch.hidden_channels] = True
    if len(arch.hidden_channels) < 32:
        assert masks.hidden_keep.bool().tolist() == hidden_keep.tolist()
    assert architecture_macs(model, arch) <= method.target_macs
    handle.remove()


# ---------------------------------------------------------------------------------------------------------------
# The budget
# ---------------------------------------------------------------------------------------------------------------
def test_budget_below_the_smallest_model_in_the_space_is_refused():
    model = make_vit_classifier()
    with pytest.raises(ValueError, match="target_flops"):
        OFBMethod(model, CompressionConfig(method="ofb", target_flops=0.01))


@pytest.mark.parametrize("target", [0.3, 0.5, 0.7])
def test_decide_never_exceeds_the_budget_and_lands_near_it(target):
    model = make_vit_classifier()
    for seed in range(4):
        method = OFBMethod(model, CompressionConfig(method="ofb", target_flops=target))
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for module in method.searchable_modules().values():
                module.alpha.copy_(torch.randn(module.alpha.shape, generator=generator) * 3)
                module.score_logits.copy_(torch.randn(module.score_logits.shape, generator=generator))
        ratio = architecture_macs(model, method.decide()) / method.dense_macs
        assert target - 0.03 <= ratio <= target, (seed, ratio)


def test_decide_shrinks_final_modules_when_the_budget_needs_it():
    model = make_vit_classifier()
    method = OFBMethod(model, CompressionConfig(method="ofb", target_flops=0.5))
    for module in method.searchable_modules().values():
        module.fix(len(module.widths) - 1)  # everything final at full width: 100% of the MACs
    arch = method.decide()
    ratio = architecture_macs(model, arch) / method.dense_macs
    assert 0.47 <= ratio <= 0.5
    # what survives of a final module lies inside its kept set
    assert set(arch.hidden_channels) <= set(method.embed.final_keep.nonzero().flatten().tolist())


# ---------------------------------------------------------------------------------------------------------------
# The search space beyond the tiny model (DeiT-T / DeiT-S shapes)
# ---------------------------------------------------------------------------------------------------------------
def test_search_space_generalises():
    assert head_choices(12, OFBConfig()) == [12]  # default: every head kept, the head dims searched
    settings = OFBConfig(prune_heads=True)  # the paper's head-count candidates
    assert head_choices(3, settings) == [1, 2, 3]  # DeiT-T
    assert head_choices(4, settings) == [1, 2, 3, 4]
    assert head_choices(6, settings) == [2, 4, 6]  # DeiT-S
    assert head_choices(12, settings) == [2, 4, 6, 8, 10, 12]  # DeiT-B
    assert head_choices(12, OFBConfig(head_choices=[3, 6, 24])) == [3, 6]  # explicit choices, either way
    with pytest.raises(ValueError, match="head_choices"):
        head_choices(3, OFBConfig(head_choices=[4, 8]))
    # head dim 64: 7 choices, multiples of 8; tiny head dims are not rounded
    assert width_choices(64, DEFAULT_RATIOS, 8) == [16, 24, 32, 40, 48, 56, 64]
    assert width_choices(8, DEFAULT_RATIOS, 8) == [2, 3, 4, 5, 6, 7, 8]
    assert width_choices(16, DEFAULT_RATIOS, 8) == [4, 6, 8, 10, 12, 14, 16]
    assert width_choices(1536, DEFAULT_RATIOS, 8) == [384, 576, 768, 960, 1152, 1344, 1536]  # DeiT-S MLP
    deit_s = embed_choices(384, settings)  # step min(384 // 32, 12) = 12 from 384 down to 192
    assert len(deit_s) == 17 and deit_s[0] == 192 and deit_s[-1] == 384 and all(w % 8 == 0 for w in deit_s)
    deit_t = embed_choices(192, settings)
    assert deit_t[0] == 96 and deit_t[-1] == 192 and all(w % 8 == 0 for w in deit_t)
    assert embed_choices(32, settings) == list(range(16, 33))  # tiny: step 1, no rounding


def test_default_search_keeps_every_head_and_exports_narrower_heads():
    """By default (`prune_heads=False`) every attention candidate keeps all H heads: the search and its export only
    narrow them."""
    model = make_deit_classifier(hidden_size=48, num_attention_heads=3)
    method = OFBMethod(model, CompressionConfig(method="ofb", target_flops=0.4))
    assert method.heads_grid == [3]
    architecture = method.decide()
    kept = [layer for layer in architecture.layers if layer.keep_block]
    assert kept and all(layer.num_heads == 3 for layer in kept)
    assert any(layer.qk_head_dim < 16 for layer in kept)
    assert method.architecture_macs(architecture) <= method.target_macs


def test_three_head_deit_builds_the_one_to_three_head_grid():
    model = make_deit_classifier(hidden_size=48, num_attention_heads=3)
    method = OFBMethod(model, CompressionConfig(method="ofb", target_flops=0.5, ofb={"prune_heads": True}))
    assert method.heads_grid == [1, 2, 3]
    assert method.dims_grid == [4, 6, 8, 10, 12, 14, 16]
    assert len(method.attention[0].alpha) == 3 * 7
    assert method.attention[0].score_logits.shape == (3, 16)
    assert architecture_macs(model, method.decide()) <= method.target_macs


@pytest.mark.parametrize("collapse_to", ["narrowest", "widest"])
def test_projection_fills_the_budget_after_every_module_collapsed(collapse_to):
    """Every module final (an early collapse) at its narrowest or widest candidate: decide() still lands at or
    under the budget and within 3 points of it, widening final modules with their next-best units if needed."""
    from hf_vit_compress.methods import build_method
    from hf_vit_compress.surgery.flops import architecture_macs

    torch.manual_seed(0)
    model = make_vit_classifier()
    method = build_method(model, CompressionConfig(method="ofb", target_flops=0.3))
    with torch.no_grad():
        for module in method.searchable_modules().values():
            module.score_logits.normal_()
            widths = module.widths.tolist()
            module.fix(widths.index(min(widths) if collapse_to == "narrowest" else max(widths)))
    architecture = method.decide()
    ratio = architecture_macs(model, architecture) / method.dense_macs
    assert 0.27 <= ratio <= 0.3
    # the kept units of a widened module include everything it had kept (it only takes further units)
    for name, module in method.searchable_modules().items():
        if collapse_to == "narrowest" and name.startswith("mlp"):
            index = int(name.split(".")[1])
            kept = set(module.final_keep.nonzero().flatten().tolist())
            assert kept <= set(architecture.layers[index].mlp_neurons)


# ---------------------------------------------------------------------------------------------------------------
# Batched modules: the same values as one module at a time
# ---------------------------------------------------------------------------------------------------------------
def test_batched_importance_logits_are_drawn_module_after_module():
    """Attention of every block, then MLP of every block, then the embedding, each module's logits drawn in turn:
    the initial state of one module per block (the random init; the default starts them from the weights)."""
    model = make_vit_classifier()
    torch.manual_seed(7)
    method = OFBMethod(model, CompressionConfig(method="ofb", target_flops=0.5, ofb={"score_init": "random"}))
    torch.manual_seed(7)
    expected = []
    for shape in [method.attention.score_logits.shape[1:]] * 2 + [method.mlp.score_logits.shape[1:]] * 2 + [
            method.embed.score_logits.shape]:
        logits = torch.empty(shape)
        torch.nn.init.trunc_normal_(logits, std=0.2, a=-0.4, b=0.4)
        expected.append(logits)
    got = [*method.attention.score_logits.detach(), *method.mlp.score_logits.detach(), method.embed.score_logits]
    for a, b in zip(got, expected):
        assert torch.equal(a.detach(), b)


def test_total_module_loss_equals_the_sum_of_per_module_losses_by_hand():
    from hf_vit_compress.methods.ofb.modules import total_module_loss

    model = make_vit_classifier()
    method = OFBMethod(model, CompressionConfig(method="ofb", target_flops=0.5))
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for module in method.searchable_modules().values():
            module.alpha.copy_(torch.randn(module.alpha.shape, generator=generator))
        method.mlp.active[1, :3] = False  # K = 4 of 7 in one MLP module
        method.embed.active[-5:] = False
    method.attention[0].fix(3)  # a final module contributes nothing
    eps, expected = method.settings.sigma_eps, 0.0
    for name, module in method.searchable_modules().items():
        if bool(module.is_final):
            continue
        p = module.probabilities().detach()[module.active].tolist()
        k = len(p)
        entropy = -sum(x * math.log(x) for x in p)
        sigma = min(max(sum((x - 1 / k) ** 2 for x in p) / (1 - 1 / k), eps), 1 - eps)
        expected += entropy + 1 / math.tan(math.pi * sigma) / k
        coefficient = method.settings.norm_coefficient_attention if name.startswith("attn") else \
            method.settings.norm_coefficient_other
        expected += coefficient * float(module.importance().detach().sum())
    groups = list(method.groups().values())
    got = total_module_loss(groups, [g.probabilities() for g in groups], [g.importance() for g in groups])
    assert float(got.detach()) == pytest.approx(expected, rel=1e-5)
    assert float(sum(g.module_loss().sum() for g in groups).detach()) == pytest.approx(expected, rel=1e-5)


def test_checkpoints_with_one_entry_per_module_still_load():
    # written before the dual budget control too: no budget_dual entry
    model, method, handle = gated_ofb(target=0.5, budget_control="paper")
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for module in method.searchable_modules().values():
            module.alpha.copy_(torch.randn(module.alpha.shape, generator=generator))
    method.mlp.eliminate(0.5)
    method.attention[1].fix(2)
    state = model.state_dict()
    old_layout = {}
    for key, value in state.items():
        if key.endswith("budget_dual"):
            continue
        group = next((g for g in ("attention", "mlp") if key.startswith(f"compression.{g}.")), None)
        if group is None:
            old_layout[key] = value
            continue
        name = key.split(".")[-1]
        for index in range(len(method.attention)):  # the layout of one module per block
            old_layout[f"compression.{group}.{index}.{name}"] = value if name in (
                "widths", "head_counts", "dim_counts") else value[index]
    handle.remove()
    fresh_model, fresh, _ = gated_ofb(target=0.5, seed=5, budget_control="paper")
    fresh_model.load_state_dict(old_layout)
    for name in ("score_logits", "alpha", "active", "is_final", "final_keep"):
        assert torch.equal(getattr(fresh.attention, name), getattr(method.attention, name)), name
        assert torch.equal(getattr(fresh.mlp, name), getattr(method.mlp, name)), name
    assert fresh.decide().same_units(method.decide())
