"""UVC's residual-width pruning (`UVCConfig.prune_hidden`) and the final projection's add-back: the new terms by hand,
export == masked dense model, exact MACs, the budget, the state dict."""

from __future__ import annotations

import ast
import math
from pathlib import Path

import pytest
import torch
from conftest import make_deit_with_teacher
from transformers import ViTConfig, ViTForImageClassification

from hf_vit_compress.config import CompressionConfig
from hf_vit_compress.methods.uvc.method import UVCMethod, least_k_sum
from hf_vit_compress.methods.uvc.projection import ProjectionLayer, unit_floors
from hf_vit_compress.surgery.architecture import Architecture, LayerArchitecture
from hf_vit_compress.surgery.export import export_compressed_model
from hf_vit_compress.surgery.flops import architecture_macs, count_macs, geometry, measured_macs
from hf_vit_compress.surgery.gating import install_gates
from hf_vit_compress.training.distill import frozen_teacher_copy

NUM_LABELS = 5


def vit(hidden: int = 32, layers: int = 3, seed: int = 0) -> ViTForImageClassification:
    torch.manual_seed(seed)
    config = ViTConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4,
                       intermediate_size=2 * hidden, image_size=16, patch_size=4, num_labels=NUM_LABELS)
    return ViTForImageClassification(config).eval()


def gated(model, target: float = 0.5, **uvc) -> UVCMethod:
    """The residual width searched, value dims only (`shared_head_dims=False`) unless given: the residual terms are
    written out by hand for the paper's head dims here (tests/methods/test_uvc_shared_dims.py: the shared ones)."""
    uvc = {"prune_hidden": True, "shared_head_dims": False, **uvc}
    method = UVCMethod(model, CompressionConfig(method="uvc", target_flops=target, uvc=uvc))
    install_gates(model, method)
    model.add_module("compression", method)
    return method


def channel_group(model, channel: int) -> dict[str, torch.Tensor]:
    """Every entry of every tensor that uses residual channel `channel`, by parameter name (written out from the
    model's structure, independently of `uvc_hidden`)."""
    hidden = model.config.hidden_size
    entries = {}
    for name, parameter in model.named_parameters():
        if name.startswith("compression."):
            continue
        tensor = parameter.detach()
        if name.endswith(("o_proj.weight", "fc2.weight", "patch_embeddings.projection.weight")):
            entries[name] = tensor[channel]  # output rows (and the patch projection's output channels)
        elif name.endswith(("o_proj.bias", "fc2.bias", "patch_embeddings.projection.bias")) or "layernorm" in name:
            entries[name] = tensor[channel]
        elif name.endswith(("q_proj.weight", "k_proj.weight", "v_proj.weight", "fc1.weight")) or \
                "classifier.weight" in name or name.endswith(("cls_token", "distillation_token",
                                                               "position_embeddings")):
            assert tensor.shape[-1] == hidden, name
            entries[name] = tensor[..., channel]
    return entries


@pytest.mark.parametrize("kind", ["vit", "deit"])
def test_channel_scores_are_the_squared_norm_of_every_tensor_using_the_channel(kind):
    if kind == "vit":
        model = vit()
    else:
        torch.manual_seed(0)
        model = make_deit_with_teacher()
    with torch.no_grad():  # make LayerNorm parameters and biases non-trivial
        for name, parameter in model.named_parameters():
            if "layernorm" in name or name.endswith("bias"):
                parameter.uniform_(-1.0, 1.0)
    method = gated(model)
    scores = method._scores()[3]
    expected = torch.stack([sum(t.float().pow(2).sum() for t in channel_group(model, c).values())
                            for c in range(model.config.hidden_size)])
    torch.testing.assert_close(scores, expected)
    names = channel_group(model, 0)
    assert any("distillation" in n for n in names) == (kind == "deit")
    assert len(names) == len(method._hidden_group.tensors())  # the method's group is exactly these tensors


def check_ratio_terms(model, method) -> torch.Tensor:
    """Set uneven counts, residual count and gates; check R with hard gates against the hard architecture's MACs
    (at D - ceil(s_D) = 26 residual channels; the q/k dims follow the value dims with `shared_head_dims`) and R's
    closed-form gradients against autograd through the straight-through ceil. Returns the gates' run probabilities."""
    geo = method.geometry
    with torch.no_grad():
        method.head_counts.copy_(torch.tensor([0.5, 2.2, 0.0]))
        method.vdim_counts.copy_(torch.tensor([1.0, 3.5, 6.1]))
        method.mlp_counts.copy_(torch.tensor([10.2, 0.0, 40.0]))
        method.hidden_count.fill_(5.3)
        method.theta.copy_(torch.tensor([[-1.0, 1.0], [0.4, 0.1], [0.2, 0.9]]))
    hard = method._hard_run()
    layers = []
    for index, keep in enumerate(hard.tolist()):
        heads = geo.num_heads - math.ceil(float(method.head_counts[index]))
        v_dim = geo.head_dim - math.ceil(float(method.vdim_counts[index]))
        qk_dim = v_dim if method.config.uvc.shared_head_dims else geo.head_dim
        mlp = geo.intermediate_size - math.ceil(float(method.mlp_counts[index]))
        layers.append(LayerArchitecture(list(range(heads)), [list(range(qk_dim))] * heads,
                                        [list(range(v_dim))] * heads, list(range(mlp)), keep_block=bool(keep)))
    architecture = Architecture(layers=layers, hidden_channels=list(range(26)))
    assert float(method.expected_ratio(run=hard)) == pytest.approx(architecture_macs(model, architecture)
                                                                   / method.dense_macs, rel=1e-6)
    ratio, d_counts, d_theta, d_hidden = method._ratio_and_gradients()
    counts = [c.detach().clone().requires_grad_(True) for c in (method.head_counts, method.vdim_counts,
                                                             method.mlp_counts, method.hidden_count)]
    theta = method.theta.detach().clone().requires_grad_(True)
    run = torch.softmax(theta / method.config.uvc.gumbel_tau, dim=-1)[:, 1]
    expected = method.expected_ratio(*counts[:3], run=run, hidden_removed=counts[3])
    grads = torch.autograd.grad(expected, [*counts, theta])
    torch.testing.assert_close(ratio, expected.detach())
    torch.testing.assert_close(d_counts, torch.stack([grads[0], grads[2], grads[1]], 1))
    torch.testing.assert_close(d_theta, grads[4])
    torch.testing.assert_close(d_hidden, grads[3])
    return run


def test_residual_terms_of_R_by_hand_and_by_autograd():
    model = vit()
    method = gated(model)
    geo = method.geometry
    run = check_ratio_terms(model, method)
    d_hidden = method._ratio_and_gradients()[3]
    # by hand: one residual channel more removed saves the stem/head MACs per channel and, per block, its share
    per_channel = geo.num_patches * geo.patch_dim + geo.num_heads_out * geo.num_labels
    for index in range(3):
        heads = geo.num_heads - math.ceil(float(method.head_counts[index]))
        v_dim = geo.head_dim - math.ceil(float(method.vdim_counts[index]))
        mlp = geo.intermediate_size - math.ceil(float(method.mlp_counts[index]))
        # q, k, v and o read or write D: N (2 qk + v) + N v; fc1 and fc2: 2 N mlp
        block = geo.tokens * (2 * heads * geo.head_dim + 2 * heads * v_dim + 2 * mlp)
        per_channel += float(run[index].detach()) * block
    assert float(d_hidden) == pytest.approx(-per_channel / method.dense_macs, rel=1e-5)


def test_residual_least_k_slope_sum_dual_and_count_step_by_hand():
    model = vit()
    method = gated(model, prox=False, counts_space="units", counts_lr=0.5)
    with torch.no_grad():
        method.hidden_count.fill_(4.2)
        method.hidden_dual.fill_(0.3)
    scores = method._scores()[3]
    ceiled = method._ceiled_counts()
    groups = method._groups(ceiled)
    assert int(groups.hidden.removed.sum()) == 5
    assert set(groups.hidden.removed.nonzero().flatten().tolist()) == set(torch.argsort(scores)[:5].tolist())
    count = method.hidden_count.clone().requires_grad_(True)
    total = least_k_sum(count, scores)
    (slope,) = torch.autograd.grad(total, count)
    torch.testing.assert_close(groups.hidden.least_k_sum(), total.detach())
    torch.testing.assert_close(groups.hidden.slope(ceiled[3]), slope)
    # one step: s_D <- s_D - lr * clip(y_D * slope + z * dR/ds_D) (units space, its own clip), then
    # y_D <- y_D + dual_lr * LS(new s_D)
    _, _, _, d_hidden = method._ratio_and_gradients()
    budget = float(method.budget_dual)
    grad = 0.3 * float(slope) + budget * float(d_hidden)
    grad = grad / max(abs(grad), 1.0)
    expected_count = min(max(4.2 - 0.5 * grad, 0.0), float(method.hidden_count_max))
    method.after_optimizer_step(1e-3)
    assert float(method.hidden_count) == pytest.approx(expected_count, rel=1e-5)
    new_sum = least_k_sum(torch.tensor(expected_count), scores)
    assert float(method.hidden_dual) == pytest.approx(0.3 + 1e-4 * float(new_sum), rel=1e-5)


def test_prox_shrinks_exactly_the_removed_channels_groups():
    model = vit()
    method = gated(model)
    with torch.no_grad():
        method.hidden_count.fill_(3.0)
        method.hidden_dual.fill_(0.5)
    removed = method._groups().hidden.removed.nonzero().flatten().tolist()
    assert len(removed) == 3
    before = {name: p.detach().clone() for name, p in model.named_parameters() if not name.startswith("compression")}
    method._prox(0.1, method._groups())  # other counts are 0: only the residual groups change
    factor = 1.0 / (1.0 + 2 * 0.1 * 0.5)
    group_names = set()
    for channel in range(model.config.hidden_size):
        for name, entry in channel_group(model, channel).items():
            group_names.add(name)
            old = channel_group_of(before, name, channel, model.config.hidden_size)
            torch.testing.assert_close(entry, old * factor if channel in removed else old)
    for name, tensor in before.items():
        if name not in group_names:  # e.g. q/k/v biases: not in any residual group
            assert torch.equal(model.get_parameter(name).detach(), tensor), name


def test_prox_returns_the_residual_scores_rest_of_the_shrunk_weights():
    """After a prox of every kind, the residual scores' part outside o_proj / fc2 (scaled from the previous one)
    equals the one computed afresh from the shrunk weights, and so do the least-k sets the step goes on with."""
    model = vit()
    method = gated(model)
    with torch.no_grad():
        method.counts.copy_(torch.tensor([[1.0, 5.0, 2.0]] * method.geometry.num_layers))
        method.hidden_count.fill_(3.0)
        method.duals.fill_(0.4)
        method.hidden_dual.fill_(0.5)
    ceiled = method._ceiled_counts()
    rest = method._prox(0.1, method._groups(ceiled))
    fresh_scores, fresh_rest = method._hidden_group.scores(*[
        torch.stack([getattr(block, name).weight for block in method.parts.blocks]).float().pow(2)
        for name in ("o_proj", "fc2")])
    torch.testing.assert_close(rest, fresh_rest)
    reused = method._groups(ceiled, hidden_rest=rest).hidden
    torch.testing.assert_close(reused.scores, fresh_scores)
    assert torch.equal(reused.removed, method._groups(ceiled).hidden.removed)
    assert method._groups(ceiled).hidden.removed.sum() == 3


def channel_group_of(tensors: dict[str, torch.Tensor], name: str, channel: int, hidden: int) -> torch.Tensor:
    tensor = tensors[name]
    if name.endswith(("o_proj.weight", "fc2.weight", "projection.weight", "o_proj.bias", "fc2.bias",
                      "projection.bias")) or ("layernorm" in name):
        return tensor[channel]
    return tensor[..., channel]


def _search(model, method, teacher, steps: int = 12, lr: float = 1e-3) -> None:
    generator = torch.Generator().manual_seed(1)
    weights = [p for name, p in model.named_parameters() if not name.startswith("compression.")]
    optimizer = torch.optim.AdamW(weights, lr=lr)
    method.configure_schedule(steps, 4)
    model.train()
    for step in range(steps):
        method.set_progress(step)
        pixels = torch.randn(8, 3, 16, 16, generator=generator)
        logits = model(pixel_values=pixels).logits
        with torch.no_grad():
            target = teacher(pixel_values=pixels).logits.softmax(-1)
        torch.nn.functional.cross_entropy(logits, target).backward()
        optimizer.step()
        method.after_optimizer_step(lr)
        optimizer.zero_grad()
    model.eval()


@pytest.mark.parametrize("hidden", [32, 64])  # 64: the residual width is rounded to multiples of 8
def test_search_export_equals_masked_dense_model_macs_exact_and_budget_met(hidden):
    model = vit(hidden=hidden)
    teacher = frozen_teacher_copy(model)
    method = gated(model, target=0.35)
    _search(model, method, teacher)
    with torch.no_grad():  # make sure the residual width is cut, whatever the short search did
        method.hidden_count.fill_(max(float(method.hidden_count), hidden / 4))
    pixels = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        searched = model(pixel_values=pixels).logits  # the search's masks drop the least-k residual channels
    architecture = method.finalize()
    kept = len(architecture.hidden_channels)
    assert kept < hidden
    if hidden >= 64:
        assert kept % 8 == 0 and unit_floors(method.geometry, 8)["hidden"] == 8
    assert not method.final_hidden[[c for c in range(hidden) if c not in architecture.hidden_channels]].any()
    with torch.no_grad():
        masked = model(pixel_values=pixels).logits
        small = export_compressed_model(model, architecture)
        exported = small(pixel_values=pixels).logits
    assert small.config.hidden_size == kept
    torch.testing.assert_close(exported, masked, rtol=0, atol=1e-5)
    assert searched.shape == masked.shape
    macs = count_macs(small)
    assert macs == architecture_macs(model, architecture) == architecture.metadata["macs"] <= method.target_macs
    small.set_attn_implementation("eager")
    assert measured_macs(small, pixels) == macs  # torch's own count of what really runs


def test_search_masks_are_the_exported_model_of_the_current_counts():
    """During the search the masked dense model computes what the hard architecture of the counts computes."""
    model = vit()
    method = gated(model, target=0.9)
    with torch.no_grad():
        method.hidden_count.fill_(6.5)
    groups = method._groups()
    keep = (~groups.hidden.removed).nonzero().flatten().tolist()
    assert len(keep) == 32 - 7
    geo = method.geometry
    full = [LayerArchitecture(list(range(4)), [list(range(geo.head_dim))] * 4, [list(range(geo.head_dim))] * 4,
                              list(range(geo.intermediate_size)))] * 3
    architecture = Architecture(layers=full, hidden_channels=keep)
    model.eval()
    method.set_progress(10**6)  # past the skip warm-up: eval-mode gates are softmax(theta / tau), not hard
    with torch.no_grad():
        method.theta.copy_(torch.tensor([[-50.0, 50.0]] * 3))  # every block runs (probability 1)
        pixels = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(3))
        masked = model(pixel_values=pixels).logits
        exported = export_compressed_model(model, architecture)(pixel_values=pixels).logits
    torch.testing.assert_close(exported, masked, rtol=0, atol=1e-5)


def test_state_dict_holds_the_residual_state_and_reproduces_decide():
    model = vit()
    teacher = frozen_teacher_copy(model)
    method = gated(model, target=0.35)
    _search(model, method, teacher, steps=6)
    with torch.no_grad():
        method.hidden_count.fill_(9.5)
        method.hidden_dual.fill_(0.25)
    state = model.state_dict()
    for name in ("hidden_count", "hidden_dual", "final_hidden"):
        assert f"compression.{name}" in state
    assert "compression.hidden_count_max" not in state  # derived from the config
    decided = method.decide()
    fresh_model = vit(seed=9)
    fresh = gated(fresh_model, target=0.35)
    fresh_model.load_state_dict(state)
    assert float(fresh.hidden_count) == 9.5 and float(fresh.hidden_dual) == 0.25
    assert fresh.decide().same_units(decided) and decided.hidden_channels != list(range(32))
    assert fresh.state_digest() == method.state_digest()
    # after finalize the stored architecture (kept channels included) survives a reload
    architecture = method.finalize()
    again = vit(seed=3)
    reloaded = gated(again, target=0.35)
    again.load_state_dict(model.state_dict())
    assert reloaded.search_finished and reloaded.decide().same_units(architecture)
    assert reloaded.decide().hidden_channels == architecture.hidden_channels
    # the default searches the residual width; the paper's space keeps the state dict it always had
    plain = vit()
    default = UVCMethod(plain, CompressionConfig(method="uvc", target_flops=0.5))
    assert default.prune_hidden and "hidden_count" in default.state_dict()
    paper = UVCMethod(plain, CompressionConfig(method="uvc", target_flops=0.5, uvc={"prune_hidden": False}))
    assert not any("hidden" in name for name in paper.state_dict())


# -- the final projection lands just under the budget --------------------------------------------------------------
def _widths(architecture) -> list[tuple[int, int, int] | None]:
    return [(len(layer.heads), len(layer.v_channels[0]), len(layer.mlp_neurons)) if layer.keep_block else None
            for layer in architecture.layers]


def _architecture(geo, widths, hidden: int) -> Architecture:
    layers = []
    for width in widths:
        if width is None:
            layers.append(LayerArchitecture([], [], [], [], keep_block=False))
            continue
        heads, v_dim, mlp = width
        layers.append(LayerArchitecture(list(range(heads)), [list(range(geo.head_dim))] * heads,
                                        [list(range(v_dim))] * heads, list(range(mlp))))
    return Architecture(layers=layers, hidden_channels=list(range(hidden)))


@pytest.mark.parametrize("multiple,prune_hidden", [(1, False), (8, False), (1, True), (8, True)])
@pytest.mark.parametrize("target,state", [(0.3, "uneven"), (0.5, "uneven"), (0.5, "one_head")])
def test_projection_fills_the_budget_up_to_one_growth_step(multiple, prune_hidden, target, state):
    """No single growth the format allows (one more MLP step, value-dim step or head in a kept block, or a wider
    residual stream up to the search's width) still fits: the projection stops just under the budget."""
    model = vit(hidden=64)  # head dim 16, MLP 128: MLP widths (and the residual width) round to multiples of 8
    method = gated(model, target=target, channel_multiple=multiple, prune_hidden=prune_hidden)
    with torch.no_grad():
        if state == "uneven":  # far over budget, uneven blocks
            method.head_counts.copy_(torch.tensor([0.0, 1.0, 2.0]))
            method.mlp_counts.copy_(torch.tensor([5.0, 30.0, 70.0]))
            method.vdim_counts.copy_(torch.tensor([3.0, 0.0, 9.0]))
        else:  # under budget with one head per block: only heads can fill it
            method.head_counts.fill_(3.0)
        if prune_hidden:
            method.hidden_count.fill_(12.0)  # the search's width 52: the projection may go up to 56, not beyond
    architecture = method.decide()
    macs = architecture_macs(model, architecture)
    assert macs <= method.target_macs
    geo = geometry(model)
    floors = unit_floors(geo, multiple)
    hidden = len(architecture.hidden_channels)
    limit = 56 if prune_hidden and multiple == 8 else 52 if prune_hidden else 64
    assert hidden <= limit and (multiple == 1 or hidden % 8 == 0)
    widths = _widths(architecture)
    grown = []  # every single growth step of the final architecture the add-back could have taken
    for index, width in enumerate(widths):
        if width is None:
            continue
        heads, v_dim, mlp = width
        for new in ((heads + 1, v_dim, mlp), (heads, v_dim + floors["vdim"], mlp), (heads, v_dim, mlp + floors["mlp"])):
            if new[0] <= geo.num_heads and new[1] <= geo.head_dim and new[2] <= geo.intermediate_size:
                grown.append(_architecture(geo, widths[:index] + [new] + widths[index + 1:], hidden))
    if prune_hidden and hidden + floors["hidden"] <= limit:
        grown.append(_architecture(geo, widths, hidden + floors["hidden"]))
    assert grown and all(architecture_macs(model, bigger) > method.target_macs for bigger in grown)
    assert (method.target_macs - macs) / method.dense_macs < 0.02


def test_projection_layer_growth_options_steps_by_kind():
    heads = {0: [(5.0, 0), (4.0, 1)], 1: [(6.0, 1), (2.0, 0)]}
    layer = ProjectionLayer(True, heads, [(3.0, 0), (1.0, 1)], dims_out={0: [(0.5, 2)], 1: [(0.7, 3)]},
                            mlp_out=[(0.1, 2), (0.2, 3), (9.0, 4)])
    geo = geometry(vit())
    options = {kind: (gain, step) for gain, _, kind, step in layer.growth_options(geo, {"mlp": 1, "vdim": 1})}
    assert options == {"mlp": (9.0, 1), "vdim": (0.5 + 0.7, 1)}
    options = {kind: (gain, step) for gain, _, kind, step in layer.growth_options(geo, {"mlp": 2})}
    assert options == {"mlp": (0.2 + 9.0, 2)}  # MLP width 2 is a multiple of 2; value dims not asked for


def test_uvc_helper_modules_do_not_import_the_method_module():
    """uvc/method.py imports budget, decisions, groups, hidden and projection; none of them may import method.py back
    (not even for type checking), and groups imports none of the others."""
    methods = Path(__file__).resolve().parents[2] / "hf_vit_compress" / "methods" / "uvc"
    imported = {}
    for name in ("budget", "decisions", "groups", "hidden", "projection"):
        tree = ast.parse((methods / f"{name}.py").read_text())
        imported[name] = {node.module for node in ast.walk(tree)
                          if isinstance(node, ast.ImportFrom) and node.level == 1}
    assert all("method" not in modules for modules in imported.values()), imported
    assert not imported["groups"] & {"budget", "hidden", "projection"}, imported
