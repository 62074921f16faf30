"""UVC with `shared_head_dims` (beyond the paper's space): a head-dim count removes the dim from q and k as well as
from v. Its terms by hand and by autograd, its prox, export == masked dense model with exact MACs under the budget,
and the stored architecture."""

from __future__ import annotations

import pytest
import torch
from test_uvc_hidden import _search, check_ratio_terms, gated, vit

from hf_vit_compress.surgery.export import export_compressed_model
from hf_vit_compress.surgery.flops import architecture_macs, count_macs, measured_macs
from hf_vit_compress.training.distill import frozen_teacher_copy


def shared(model, target: float = 0.5, **uvc):
    return gated(model, target, shared_head_dims=True, **uvc)


def test_dim_scores_hold_the_o_proj_column_and_the_q_and_k_rows():
    model = vit()
    method = shared(model)
    head_dim = method.geometry.head_dim
    scores = method._scores()[1]  # (L, H, d)
    block = model.vit.layers[1].attention
    channel = 2 * head_dim + 3  # head 2, dim 3
    expected = (block.o_proj.weight[:, channel].pow(2).sum() + block.q_proj.weight[channel].pow(2).sum()
                + block.k_proj.weight[channel].pow(2).sum() + block.q_proj.bias[channel] ** 2
                + block.k_proj.bias[channel] ** 2)
    torch.testing.assert_close(scores[1, 2, 3], expected.detach())


def test_ratio_and_its_gradients_count_the_q_and_k_channels_of_a_dim():
    model = vit()
    check_ratio_terms(model, shared(model))


def test_prox_shrinks_the_q_and_k_rows_of_the_removed_dims_and_heads():
    model = vit()
    method = shared(model, prune_hidden=False)
    with torch.no_grad():
        method.counts.copy_(torch.tensor([[1.0, 0.0, 2.0]] * 3))  # one head, no MLP unit, two dims per head
        method.duals.fill_(0.5)
    groups = method._groups()
    before = {name: p.detach().clone() for name, p in model.named_parameters() if "_proj" in name}
    method._prox(0.1, groups)
    factor = 1.0 / (1.0 + 2 * 0.1 * 0.5)
    head_dim = method.geometry.head_dim
    for index, block in enumerate(model.vit.layers):
        removed = groups.layer(index)
        rows = removed.dims_removed | removed.heads_removed.unsqueeze(-1)  # (H, d)
        scale = torch.where(rows.flatten(), factor, 1.0)
        assert rows.any() and not rows.all()
        for name in ("q_proj", "k_proj"):
            linear = getattr(block.attention, name)
            prefix = f"vit.layers.{index}.attention.{name}"
            torch.testing.assert_close(linear.weight, before[f"{prefix}.weight"] * scale[:, None])
            torch.testing.assert_close(linear.bias, before[f"{prefix}.bias"] * scale)
        v_proj = f"vit.layers.{index}.attention.v_proj.weight"
        assert torch.equal(block.attention.v_proj.weight, before[v_proj])  # the value rows are masked, not shrunk
        assert rows.flatten().shape[0] == 4 * head_dim


@pytest.mark.parametrize("prune_hidden", [False, True])
def test_search_export_equals_masked_dense_model_macs_exact_and_budget_met(prune_hidden):
    model = vit(hidden=64)
    teacher = frozen_teacher_copy(model)
    method = shared(model, target=0.35, prune_hidden=prune_hidden)
    _search(model, method, teacher)
    pixels = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(5))
    architecture = method.finalize()
    with torch.no_grad():
        masked = model(pixel_values=pixels).logits
        small = export_compressed_model(model, architecture)
        exported = small(pixel_values=pixels).logits
    torch.testing.assert_close(exported, masked, rtol=0, atol=1e-5)
    kept = [layer for layer in architecture.layers if layer.keep_block]
    assert kept and all(layer.qk_channels == layer.v_channels for layer in kept)
    assert any(layer.qk_head_dim < method.geometry.head_dim for layer in kept)
    macs = count_macs(small)
    assert macs == architecture_macs(model, architecture) == architecture.metadata["macs"] <= method.target_macs
    small.set_attn_implementation("eager")
    assert measured_macs(small, pixels) == macs
    # the stored architecture (after a reload too) keeps the q/k dims equal to the value dims
    again = vit(hidden=64, seed=3)
    reloaded = shared(again, target=0.35, prune_hidden=prune_hidden)
    again.load_state_dict(model.state_dict())
    assert reloaded.decide().same_units(architecture)
    assert all(layer.qk_channels == layer.v_channels for layer in reloaded.decide().layers if layer.keep_block)


def test_search_masks_gate_q_and_k_like_v():
    model = vit()
    method = shared(model, prune_hidden=False)
    with torch.no_grad():
        method.counts.copy_(torch.tensor([[1.0, 3.0, 2.0]] * 3))
    masks = method.search_masks()
    assert masks.qk is masks.v and torch.is_tensor(masks.v)
    assert 0 < int(masks.v.sum()) < masks.v.numel()
    paper = gated(vit(), prune_hidden=False)
    assert not len(paper.search_masks().qk)  # the paper's space: q and k are never masked
