"""Tests for PMIM (`hf_vit_compress.methods.ofb.pmim`), OFB's progressive masked image modelling, pinned to spec/ofb.md.

Expected values are computed by hand (or by plain Python loops over the spec's formulas), never by calling the
function under test a second way.
"""

from __future__ import annotations

import pytest
import torch
from conftest import NUM_PATCHES, make_pixel_values, make_vit_classifier
from test_ofb import _capture, gated_ofb
from torch.nn import functional as F

import hf_vit_compress.methods.ofb.pmim as pmim_module
from hf_vit_compress.methods.ofb.pmim import PMIM, local_window, locally_normalize, random_token_mask
from hf_vit_compress.surgery.targets import model_parts


def test_locally_normalize_constant_image_is_zero_and_window_scales():
    images = torch.full((2, 3, 16, 16), 0.7)
    assert locally_normalize(images, 3).abs().max() < 1e-3
    assert local_window(224) == 47
    assert local_window(16) == 3  # 47 * 16 / 224 = 3.36 -> 3 (odd)
    assert local_window(32) % 2 == 1
    # non-constant: a step edge normalises to +-1 near the edge (window 3, two values on each side)
    step = torch.zeros(1, 1, 8, 8)
    step[..., 4:] = 1.0
    normalised = locally_normalize(step, 3)
    assert normalised[0, 0, 4, 0].abs() < 1e-3  # flat region
    assert normalised[0, 0, 4, 3] < -0.5 and normalised[0, 0, 4, 4] > 0.5


@pytest.mark.parametrize("ratio,num_patches,expected", [(0.05, 16, 1), (0.15, 16, 2), (0.25, 16, 4),
                                                        (0.25, 196, 49), (0.0, 16, 0)])
def test_random_token_mask_masks_exactly_round_r_n_per_sample(ratio, num_patches, expected):
    torch.manual_seed(0)
    mask = random_token_mask(6, num_patches, ratio, "cpu")
    assert mask.shape == (6, num_patches) and mask.dtype == torch.bool
    assert mask.sum(1).tolist() == [expected] * 6
    if 0 < expected < num_patches:
        assert len({tuple(row.tolist()) for row in mask}) > 1  # per-sample randomness


def test_reconstruction_loss_counts_only_masked_pixels(monkeypatch):
    model = make_vit_classifier()
    pmim = PMIM(model_parts(model), 47)
    pmim.install(model_parts(model))
    pmim.mask_ratio = 0.25
    model.train()
    pixels = make_pixel_values(2, seed=5)
    torch.manual_seed(0)
    with torch.no_grad():
        model(pixel_values=pixels)
    token_mask, hidden = pmim._token_mask.clone(), pmim._last_hidden.clone()
    assert token_mask.sum(1).tolist() == [4, 4]  # round(0.25 * 16)
    # the target is the input itself here, so the comparison below is only about which pixels count
    monkeypatch.setattr(pmim_module, "locally_normalize", lambda images, window: images)

    def loss_for(target):
        pmim._token_mask, pmim._last_hidden = token_mask, hidden
        return float(pmim.reconstruction_loss(target).detach())

    pixel_mask = token_mask.reshape(2, 1, 4, 4).repeat_interleave(4, 2).repeat_interleave(4, 3).expand(2, 3, 16, 16)
    base = loss_for(pixels)
    # by hand: L1 over masked pixels / (number of masked pixel positions) / 3 channels
    with torch.no_grad():
        tokens = hidden[:, 1:].transpose(1, 2).reshape(2, 32, 4, 4)
        reconstruction = F.pixel_shuffle(F.conv2d(tokens, pmim.decoder[0].weight, pmim.decoder[0].bias), 4)
    masked_positions = int(token_mask.sum()) * 16
    expected = float(((reconstruction - pixels).abs() * pixel_mask).sum()) / masked_positions / 3
    assert base == pytest.approx(expected, rel=1e-4)
    changed_unmasked = torch.where(pixel_mask, pixels, pixels + 10.0)
    assert loss_for(changed_unmasked) == pytest.approx(base, rel=1e-6)
    changed_masked = torch.where(pixel_mask, pixels + 10.0, pixels)
    assert loss_for(changed_masked) > base + 1.0
    pmim.remove_hooks()


def test_no_masking_when_the_model_is_in_eval_mode():
    model = make_vit_classifier()  # in eval mode; the freshly built PMIM module itself is in training mode
    pmim = PMIM(model_parts(model), 47)
    pmim.install(model_parts(model))
    pmim.mask_ratio = 0.25
    with torch.no_grad():
        model(pixel_values=make_pixel_values(2))  # the MODEL's mode decides: no masking at inference
    assert pmim._token_mask is None
    assert pmim.reconstruction_loss(make_pixel_values(2)) is None
    pmim.remove_hooks()


def test_mask_token_replaces_patch_tokens_after_the_position_embedding_and_is_gated():
    model, method, handle = gated_ofb(target=0.5)
    method.configure_schedule(total_search_steps=100, steps_per_epoch=10)
    method.set_progress(50)  # mask ratio 0.25
    parts = model_parts(model)
    store: dict = {}
    hook = _capture(parts.embeddings, store, "embed", prepend=False)  # after PMIM and the gate
    model.train()
    torch.manual_seed(0)
    with torch.no_grad():
        model(pixel_values=make_pixel_values(3))
    hook.remove()
    output = store["embed"][1]
    token_mask = method.pmim._token_mask
    assert token_mask.shape == (3, NUM_PATCHES) and token_mask.sum(1).tolist() == [4, 4, 4]
    gate = handle.current.hidden
    expected = method.pmim.mask_token.detach()[0, 0] * gate
    patch_tokens = output[:, 1:]
    for b in range(3):
        for n in range(NUM_PATCHES):
            if token_mask[b, n]:
                torch.testing.assert_close(patch_tokens[b, n], expected)
            else:
                assert not torch.allclose(patch_tokens[b, n], expected)
    # the class token (+ its position) is never masked
    cls = (parts.cls_token.detach()[0, 0] + parts.position_embeddings.detach()[0, 0]) * gate
    torch.testing.assert_close(output[:, 0], cls.expand(3, -1))
    # and the loss sees it: a reconstruction term is available after a masked forward
    assert method.pmim.reconstruction_loss(make_pixel_values(3)) is not None
    handle.remove()
