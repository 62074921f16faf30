"""Tests for UVC's least-k sums (`methods/uvc_groups.py`) and its batched step: the least-k terms, the ratio
gradients, the masks and the state of every block at once equal the per-block formulas."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import gated, tiny_vit, uvc_config

from hf_vit_compress.methods.uvc.method import least_k_sum


# -- least-k sum ----------------------------------------------------------------------------------------------
def test_least_k_sum_value_and_custom_gradient():
    values = torch.tensor([5.0, 1.0, 4.0, 2.0, 3.0], requires_grad=True)
    k = torch.tensor(1.3, requires_grad=True)
    total = least_k_sum(k, values)
    assert total.item() == pytest.approx(3.0)  # ceil(1.3) = 2 smallest: 1 + 2
    total.backward()
    assert k.grad.item() == pytest.approx(3.0)  # the 3rd smallest
    assert values.grad.tolist() == [0.0, 1.0, 0.0, 1.0, 0.0]  # indicator of the least-k set


@pytest.mark.parametrize("k, value, grad", [(0.0, 0.0, 1.0), (2.0, 3.0, 3.0), (4.2, 15.0, 5.0), (7.0, 15.0, 5.0)])
def test_least_k_sum_edges(k, value, grad):
    """k = 0: empty sum, marginal cost = smallest; ceil(k) + 1 > n: full sum, gradient = the largest value."""
    values = torch.tensor([5.0, 1.0, 4.0, 2.0, 3.0])
    k = torch.tensor(k, requires_grad=True)
    total = least_k_sum(k, values)
    total.backward()
    assert total.item() == pytest.approx(value)
    assert k.grad.item() == pytest.approx(grad)


# -- the batched step: the same least-k terms, ratio gradients and masks as the per-block formulas -----------------
def _random_counts(method, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        method.head_counts.copy_(torch.rand(3, generator=generator) * 3)
        method.vdim_counts.copy_(torch.rand(3, generator=generator) * 7)
        method.mlp_counts.copy_(torch.rand(3, generator=generator) * 63)


def test_least_k_slopes_and_sums_per_block_by_hand():
    """Per block: LS of heads, of value dims (per kept head, summed) and of MLP units, and their slopes (the
    (ceil + 1)-th smallest score), against least_k_sum on each block and head separately."""
    model = tiny_vit()
    method = gated(model, uvc_config(0.5))
    _random_counts(method, seed=1)
    groups = method._groups()
    ceiled = method._ceiled_counts()
    slopes = groups.least_k_slopes(ceiled)
    sums = groups.least_k_sums()
    for index in range(3):
        head_scores, dim_scores, mlp_scores = groups.head_scores[index], groups.dim_scores[index], groups.mlp_scores[
            index]
        counts = [c[index].clone().requires_grad_(True) for c in (method.head_counts, method.vdim_counts,
                                                                   method.mlp_counts)]
        kept = [h for h in range(4) if not bool(groups.heads_removed[index, h])]
        assert len(kept) == 4 - math.ceil(float(method.head_counts[index]))
        terms = [least_k_sum(counts[0], head_scores), sum(least_k_sum(counts[1], dim_scores[h]) for h in kept),
                 least_k_sum(counts[2], mlp_scores)]
        for kind, term in enumerate(terms):
            assert float(sums[kind][index]) == pytest.approx(float(term.detach()), rel=1e-5), (index, kind)
            slope = torch.autograd.grad(term, counts[kind])[0]
            assert float(slopes[kind][index]) == pytest.approx(float(slope), rel=1e-5), (index, kind)


def test_ratio_gradients_equal_autograd_through_the_straight_through_ceil():
    model = tiny_vit()
    method = gated(model, uvc_config(0.5))
    _random_counts(method, seed=2)
    with torch.no_grad():
        method.theta.copy_(torch.tensor([[-1.0, 1.0], [0.4, 0.1], [0.2, 0.9]]))
    ratio, d_counts, d_theta, d_hidden = method._ratio_and_gradients()
    assert d_hidden is None  # the paper's space: the residual width is not searched
    counts = [c.detach().clone().requires_grad_(True) for c in (method.head_counts, method.vdim_counts,
                                                                 method.mlp_counts)]
    theta = method.theta.detach().clone().requires_grad_(True)
    run = torch.softmax(theta / method.config.uvc.gumbel_tau, dim=-1)[:, 1]
    expected = method.expected_ratio(*counts, run=run)
    grads = torch.autograd.grad(expected, [*counts, theta])
    torch.testing.assert_close(ratio, expected.detach())
    torch.testing.assert_close(d_counts, torch.stack([grads[0], grads[2], grads[1]], 1))  # columns heads, mlp, vdims
    torch.testing.assert_close(d_theta, grads[3])


def test_unmasked_q_and_k_of_removed_heads_change_no_output_and_no_gradient():
    """UVC masks only the value channels of a removed head: its output is 0 whatever q and k are, and no gradient
    reaches its q/k rows, exactly as with q and k masked too."""
    from conftest import make_pixel_values

    from hf_vit_compress.surgery.gating import Masks

    model = tiny_vit(seed=4).train()
    method = gated(model, uvc_config(0.5))
    _random_counts(method, seed=3)
    method.configure_schedule(10, 10)
    method.set_progress(0)  # skip warm-up: fixed gates
    masks = method.compute_masks()
    assert masks.qk == [] and masks.v.shape == (3, 32)
    kept_heads = (~method._groups().heads_removed).float().repeat_interleave(8, dim=-1)
    explicit = Masks(qk=kept_heads, v=masks.v, mlp=masks.mlp, block_gates=masks.block_gates)

    def run(provider_masks):
        method.compute_masks = lambda: provider_masks  # the gates call the method's compute_masks
        model.zero_grad()
        logits = model(pixel_values=make_pixel_values(2, seed=5)).logits
        logits.pow(2).sum().backward()
        return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    try:
        logits, grads = run(masks)
        expected_logits, expected_grads = run(explicit)
    finally:
        del method.compute_masks
    torch.testing.assert_close(logits, expected_logits)
    for name, grad in expected_grads.items():
        torch.testing.assert_close(grads[name], grad, msg=name)


def test_checkpoints_with_one_buffer_per_kind_still_load():
    model = tiny_vit()
    method = gated(model, uvc_config(0.5))
    _random_counts(method, seed=6)
    with torch.no_grad():
        method.duals.copy_(torch.rand(3, 3))
    state = model.state_dict()
    # before counts and duals were one buffer each, and before the budget projection's offset existed
    old_layout = {k: v for k, v in state.items()
                  if not k.endswith(("compression.counts", "compression.duals", "compression.budget_offset"))}
    for kind, column in (("head", 0), ("mlp", 1), ("vdim", 2)):
        old_layout[f"compression.{kind}_counts"] = state["compression.counts"][:, column].clone()
        old_layout[f"compression.{kind}_duals"] = state["compression.duals"][:, column].clone()
    fresh_model = tiny_vit(seed=9)
    fresh = gated(fresh_model, uvc_config(0.5))
    fresh_model.load_state_dict(old_layout)  # strict
    assert torch.equal(fresh.counts, method.counts) and torch.equal(fresh.duals, method.duals)
    assert float(fresh.budget_offset) == 0.0


def test_the_next_forward_reuses_the_step_s_least_k_sets_only_while_nothing_changed():
    model = tiny_vit()
    method = gated(model, uvc_config(0.5))
    method.configure_schedule(10, 10)
    method.set_progress(0)
    _random_counts(method, seed=7)
    method.after_optimizer_step(1e-3)
    assert method._current_groups() is method._step_groups[1]  # weights and counts as the step left them
    fresh = method._groups()
    torch.testing.assert_close(method.compute_masks().v, ((~fresh.dims_removed).float() * (
        ~fresh.heads_removed).float().unsqueeze(-1)).flatten(-2))
    with torch.no_grad():
        method.parts.blocks[0].fc2.weight.mul_(torch.rand(32, 64))  # weights changed: recomputed
    assert method._current_groups() is not method._step_groups[1]
    assert torch.equal(method._current_groups().mlp_removed, method._groups().mlp_removed)


def test_ceiled_counts_and_kept_widths_are_reused_only_while_the_counts_are_unchanged():
    model = tiny_vit(seed=5)
    method = gated(model, uvc_config(0.5, prune_hidden=True))
    first, kept = method._ceiled_counts(), method._kept_widths()
    assert method._ceiled_counts() is first and method._kept_widths() is kept  # same counts: reused
    with torch.no_grad():
        method.counts[0, 0] += 1.0  # in place, as the counts' SGD step and load_state_dict write them
    second = method._ceiled_counts()
    assert second is not first and float(second[0][0, 0]) == float(first[0][0, 0]) + 1.0
    assert float(method._kept_widths()[0][0]) == float(kept[0][0]) - 1.0
    with torch.no_grad():
        method.hidden_count.fill_(3.5)
    assert float(method._ceiled_counts()[3]) == 4.0 and float(method._kept_widths()[3]) == kept[3] - 4.0
    third = method._ceiled_counts()
    model.to("cpu")  # a move makes new tensors (a new one may reuse an old id): the caches start afresh
    assert method._ceiled_counts() is not third and method._step_groups is None
