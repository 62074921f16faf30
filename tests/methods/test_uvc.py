"""Tests for UVC (`hf_vit_compress.methods.uvc.method`); the least-k sums and the batched step:
tests/methods/test_uvc_step.py; the distillation loss: tests/training/test_distill.py."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import gated, tiny_vit, uvc_config

from hf_vit_compress.config import CompressionConfig
from hf_vit_compress.methods import build_method
from hf_vit_compress.methods.uvc.method import UVCMethod
from hf_vit_compress.methods.uvc.projection import ProjectionLayer, round_to_multiple
from hf_vit_compress.surgery.export import export_compressed_model
from hf_vit_compress.surgery.flops import architecture_macs, count_macs, geometry, measured_macs, stem_and_head_macs
from hf_vit_compress.training.distill import distillation_loss, frozen_teacher_copy, split_student_logits

NUM_LABELS = 5


def search(model, method: UVCMethod, teacher, steps: int, lr: float = 1e-3, seed: int = 1) -> None:
    """What the trainer does, by hand: forward, KD loss, backward, optimizer step, UVC's manual step."""
    generator = torch.Generator().manual_seed(seed)
    weights = [p for name, p in model.named_parameters() if not name.startswith("compression.")]
    optimizer = torch.optim.AdamW(weights, lr=lr)
    method.configure_schedule(steps, max(1, steps // 3))
    model.train()
    for step in range(steps):
        method.set_progress(step)
        pixels = torch.randn(8, 3, 16, 16, generator=generator)
        labels = torch.randint(0, NUM_LABELS, (8,), generator=generator)
        logits = model(pixel_values=pixels).logits
        with torch.no_grad():
            teacher_logits = teacher(pixel_values=pixels).logits
        task = distillation_loss(logits, teacher_logits, labels, alpha=0.5, temperature=1.0, label_smoothing=0.1)
        loss, logs = method.loss(task, logits, {"pixel_values": pixels})
        # logged terms stay on the device as detached 0-dim tensors (the trainer reads them at logging steps)
        assert all(torch.is_tensor(v) and v.dim() == 0 and not v.requires_grad for v in logs.values())
        loss.backward()
        optimizer.step()
        method.after_optimizer_step(lr)
        optimizer.zero_grad()
        method.on_step_end(step)
    model.eval()


# -- budget dual and counts ---------------------------------------------------------------------------------
def test_budget_dual_rises_over_budget_and_stays_nonnegative_under():
    """The spec's additive ascent z <- max(0, z + eta_z (R - B)) (`budget_dual_update="additive"`)."""
    model = tiny_vit()
    method = gated(model, uvc_config(0.5, budget_dual_update="additive"))
    z0 = float(method.budget_dual)
    ratio = float(method.expected_ratio())
    assert ratio > 0.9  # nothing removed yet (all blocks run with probability softmax([-1, 1] / 0.5) ~ 0.98)
    method.after_optimizer_step(1e-3)
    z1 = float(method.budget_dual)
    assert z1 == pytest.approx(z0 + float(method.expected_ratio()) - 0.5)  # z <- z + eta_z (R - B), eta_z = 1
    assert z1 > z0 + 0.3
    method.after_optimizer_step(1e-3)
    assert float(method.budget_dual) > z1  # still over budget: z keeps rising
    # with z ~ 0.5 the budget outweighs the group penalties: the counts grew
    assert float(method.head_counts.min()) > 0 and float(method.mlp_counts.min()) > 0

    relaxed = tiny_vit()
    method = gated(relaxed, uvc_config(0.9, budget_dual_update="additive"))
    with torch.no_grad():  # a small architecture: R << B
        method.head_counts.fill_(3)
        method.vdim_counts.fill_(7)
        method.mlp_counts.fill_(60)
        method.budget_dual.fill_(0.05)
    assert float(method.expected_ratio()) < 0.5
    for _ in range(3):
        method.after_optimizer_step(1e-3)
        assert float(method.budget_dual) >= 0.0
    assert float(method.budget_dual) == 0.0


def test_budget_dual_log_space_ascent_by_hand():
    """The default `budget_dual_update="log"`: z <- z exp(eta (R_new - B)) with eta = 200 / search steps (or
    `budget_dual_log_lr`), R_new the ratio after the step's count update; z stays in [dual_init, 1e12]."""
    model = tiny_vit()
    method = gated(model, uvc_config(0.5))
    method.configure_schedule(400, 10)
    assert method.budget_dual_log_lr == pytest.approx(0.5)
    z0 = float(method.budget_dual)
    method.after_optimizer_step(1e-3)
    assert float(method.budget_dual) == pytest.approx(z0 * math.exp(0.5 * (float(method.expected_ratio()) - 0.5)))
    method.config.uvc.budget_dual_log_lr = 3.0  # an explicit rate wins over the rule
    z1 = float(method.budget_dual)
    method.after_optimizer_step(1e-3)
    assert float(method.budget_dual) == pytest.approx(z1 * math.exp(3.0 * (float(method.expected_ratio()) - 0.5)))

    relaxed = tiny_vit()
    method = gated(relaxed, uvc_config(0.9, budget_dual_log_lr=50.0))
    with torch.no_grad():  # far under budget: z falls geometrically, but never under dual_init
        method.head_counts.fill_(3)
        method.mlp_counts.fill_(60)
        method.budget_dual.fill_(0.05)
    method.after_optimizer_step(1e-3)
    assert float(method.budget_dual) == pytest.approx(1e-3)  # 0.05 exp(50 (R - 0.9)) < 1e-3: clamped at dual_init
    method.after_optimizer_step(1e-3)
    assert float(method.budget_dual) == pytest.approx(1e-3)


def test_projected_sgd_units_and_fraction_spaces():
    upper = torch.tensor([3.0, 63.0])
    grad = torch.tensor([-2.0, -0.02])  # a head weighs 100x an MLP unit: the budget gradient is 100x larger
    units = torch.zeros(2)
    UVCMethod._projected_sgd(units, grad, upper, lr=0.5, space="units")
    # joint inf-norm clip in units: the head count moves lr, the MLP count 1/100 of that
    assert units.tolist() == pytest.approx([0.5, 0.005])
    fractions = torch.zeros(2)
    UVCMethod._projected_sgd(fractions, grad, upper, lr=0.5, space="fraction")
    # on s / range: gradients become [-6, -1.26]; clipped by 6 -> steps of 0.5 and 0.105 of each range
    assert (fractions / upper).tolist() == pytest.approx([0.5, 0.5 * 1.26 / 6])
    # bounds hold, and a count at its upper bound does not move further up
    full = upper.clone()
    UVCMethod._projected_sgd(full, grad, upper, lr=0.5, space="fraction")
    assert full.tolist() == upper.tolist()


def test_unknown_counts_space_is_refused_with_the_field_named():
    with pytest.raises(ValueError, match=r"uvc\.counts_space='meters'.*'fraction' or 'units'"):
        uvc_config(counts_space="meters")


@pytest.mark.parametrize("space", ["fraction", "units"])
def test_counts_space_decides_which_counts_move(space):
    model = tiny_vit()
    method = gated(model, uvc_config(0.5, counts_space=space, counts_lr=0.05))
    with torch.no_grad():
        method.budget_dual.fill_(50.0)  # far over budget: the budget term dominates every count's gradient
    method.after_optimizer_step(1e-3)
    head_move = float(method.head_counts.mean() / method.head_count_max.mean())
    mlp_move = float(method.mlp_counts.mean() / method.mlp_count_max.mean())
    if space == "fraction":
        assert mlp_move > 0.2 * head_move > 0  # comparable relative speed
    else:
        assert 0 < mlp_move < 0.05 * head_move  # MLP counts crawl: the spec's joint clip in units


def test_expected_ratio_equals_real_macs_with_hard_gates():
    model = tiny_vit()
    method = gated(model, uvc_config(0.5))
    with torch.no_grad():
        method.head_counts.copy_(torch.tensor([1.0, 0.2, 2.5]))
        method.vdim_counts.copy_(torch.tensor([0.0, 3.1, 6.0]))
        method.mlp_counts.copy_(torch.tensor([10.0, 0.5, 40.0]))
        method.theta.copy_(torch.tensor([[-1.0, 1.0], [1.0, -1.0], [-1.0, 1.0]]))
    method.configure_schedule(10, 10)
    method.set_progress(9)  # past the skip warm-up
    hard = method.hard_ratio()
    # the hard architecture before projection, built by hand: block 1 skipped
    from hf_vit_compress.surgery.architecture import Architecture, LayerArchitecture

    def layer(heads, v, mlp):
        return LayerArchitecture(list(range(heads)), [list(range(8))] * heads, [list(range(v))] * heads,
                                 list(range(mlp)))

    arch = Architecture([layer(3, 8, 54), LayerArchitecture([], [], [], [], keep_block=False), layer(1, 2, 24)],
                        list(range(32)))
    assert hard == pytest.approx(architecture_macs(model, arch) / method.dense_macs, rel=1e-6)


def test_decide_follows_theta_for_blocks():
    model = tiny_vit()
    method = gated(model, uvc_config(0.9))
    with torch.no_grad():
        method.theta.copy_(torch.tensor([[-1.0, 1.0], [0.3, -0.2], [-1.0, 1.0]]))
    arch = method.decide()
    assert [layer.keep_block for layer in arch.layers] == [True, False, True]
    assert arch.metadata["projection_removals"] == 0  # already under 90%: nothing else removed
    assert architecture_macs(model, arch) == pytest.approx(method.hard_ratio() * method.dense_macs, rel=1e-6)
    with torch.no_grad():  # every block would skip: the one with the largest run margin is kept
        method.theta.copy_(torch.tensor([[1.0, -1.0], [0.3, -0.2], [2.0, -1.0]]))
    assert [layer.keep_block for layer in method.decide().layers] == [False, True, False]


# -- proximal step ------------------------------------------------------------------------------------------
def test_prox_shrinks_exactly_the_least_k_groups():
    model = tiny_vit()
    method = gated(model, uvc_config(0.5, dual_lr=0.0, budget_dual_lr=0.0))
    lr, y_head, p_dim, y_mlp = 0.1, 0.7, 0.4, 0.9
    with torch.no_grad():
        method.head_counts.copy_(torch.tensor([1.0, 0.0, 0.0]))  # layer 0: 1 head
        method.vdim_counts.copy_(torch.tensor([0.0, 1.5, 0.0]))  # layer 1: 2 value dims in every head
        method.mlp_counts.copy_(torch.tensor([0.0, 0.0, 2.7]))  # layer 2: 3 MLP units
        method.head_duals.fill_(y_head)
        method.vdim_duals.fill_(p_dim)
        method.mlp_duals.fill_(y_mlp)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    blocks = method.parts.blocks
    scores0 = blocks[0].o_proj.weight.detach().pow(2).sum(0).view(4, 8)
    head = int(torch.argmin(scores0.sum(1)))
    scores1 = blocks[1].o_proj.weight.detach().pow(2).sum(0).view(4, 8)
    dims = torch.argsort(scores1, dim=1)[:, :2]  # per head
    unit_order = torch.argsort(blocks[2].fc2.weight.detach().pow(2).sum(0))
    mlp_units = unit_order[:3]

    method.after_optimizer_step(lr)

    expected = {name: value.clone() for name, value in before.items()}
    o0 = "vit.layers.0.attention.o_proj.weight"
    expected[o0][:, head * 8:(head + 1) * 8] /= 1 + 2 * lr * y_head
    o1 = "vit.layers.1.attention.o_proj.weight"
    for h in range(4):
        expected[o1][:, h * 8 + dims[h]] /= 1 + 2 * lr * p_dim
    f2 = "vit.layers.2.mlp.fc2.weight"
    expected[f2][:, mlp_units] /= 1 + 2 * lr * y_mlp
    changed = []
    for name, p in model.named_parameters():
        if name.startswith("compression."):
            continue
        torch.testing.assert_close(p.detach(), expected[name], rtol=0, atol=1e-7, msg=name)
        if not torch.equal(p.detach(), before[name]):
            changed.append(name)
    assert sorted(changed) == sorted([o0, o1, f2])
    # exactly 8 + 8 + 3 columns shrank
    assert int((model.get_parameter(o0) != before[o0]).any(0).sum()) == 8
    assert int((model.get_parameter(o1) != before[o1]).any(0).sum()) == 8
    assert int((model.get_parameter(f2) != before[f2]).any(0).sum()) == 3


# -- skip warm-up -------------------------------------------------------------------------------------------
def test_skip_gates_fixed_and_theta_frozen_during_warmup():
    model = tiny_vit()
    teacher = frozen_teacher_copy(model)
    method = gated(model, uvc_config(0.5, skip_warmup_fraction=0.5))
    theta0 = method.theta.detach().clone()
    steps = 6
    generator = torch.Generator().manual_seed(0)
    optimizer = torch.optim.SGD([p for n, p in model.named_parameters() if not n.startswith("compression.")], 1e-2)
    method.configure_schedule(steps, 2)
    model.train()
    for step in range(steps):
        method.set_progress(step)
        masks = method.compute_masks()
        warm = step < 3
        assert method.in_skip_warmup == warm
        for skip, run in masks.block_gates:
            assert skip is None  # the gate's skip weight is 1 - run (the gating computes x + run (block - x))
            skip, run = 1.0 - float(run.detach()), float(run.detach())
            if warm:
                assert float(skip) == 0.5 and float(run) == 0.5
            else:
                assert skip != 0.5 and skip + run == pytest.approx(1.0)
        pixels = torch.randn(4, 3, 16, 16, generator=generator)
        loss = distillation_loss(model(pixel_values=pixels).logits, teacher(pixel_values=pixels).logits, None, 1.0, 1.0)
        loss.backward()
        if not warm:
            assert method.theta.grad is not None and method.theta.grad.abs().sum() > 0  # KD reaches theta
        optimizer.step()
        method.after_optimizer_step(1e-2)
        optimizer.zero_grad()
        assert method.theta.grad is None
        if warm:
            assert torch.equal(method.theta.detach(), theta0)
    assert not torch.equal(method.theta.detach(), theta0)


# -- decide, projection, export, reload ---------------------------------------------------------------------
@pytest.mark.parametrize("target", [0.3, 0.6, 0.9])
def test_decide_meets_the_budget_without_search(target):
    model = tiny_vit()
    method = gated(model, uvc_config(target))
    arch = method.decide()
    macs = architecture_macs(model, arch)
    assert macs <= method.target_macs
    assert macs / method.dense_macs > target - 0.05  # the projection stops once under the budget
    assert arch.metadata["projection_removals"] > 0
    assert sum(layer.keep_block for layer in arch.layers) >= 1


def test_round_down_drops_the_lowest_units_to_a_multiple():
    heads = {0: [(5.0, 0), (4.0, 1), (3.0, 2)], 2: [(6.0, 1), (2.0, 0), (1.0, 2)]}
    mlp = sorted(((float(j), j) for j in range(11)), reverse=True)
    layer = ProjectionLayer(True, heads, mlp)
    assert layer.round_down(4) == 3  # MLP 11 -> 8; v dim 3 < 4 stays
    assert sorted(j for _, j in layer.mlp) == list(range(3, 11))
    assert layer.v_dim == 3
    assert layer.round_down(2) == 2  # v dim 3 -> 2 in both heads, each losing its own weakest; MLP 8 already even
    assert {h: sorted(c for _, c in dims) for h, dims in layer.heads.items()} == {0: [0, 1], 2: [0, 1]}
    assert layer.head_sums == {0: 9.0, 2: 8.0}
    assert layer.round_down(1) == 0


@pytest.mark.parametrize("multiple", [1, 8])
def test_decide_rounds_widths_and_stays_within_budget(multiple):
    model = tiny_vit()  # head dim 8, MLP 64
    method = gated(model, uvc_config(0.5, channel_multiple=multiple))
    with torch.no_grad():
        method.mlp_counts.copy_(torch.tensor([13.0, 29.0, 3.0]))  # widths 51, 35, 61 before rounding
    arch = method.decide()
    assert architecture_macs(model, arch) <= method.target_macs
    widths = [layer.intermediate_size for layer in arch.layers if layer.keep_block]
    if multiple == 8:
        assert all(width % 8 == 0 for width in widths)
        # the budget is used: no further block of 8 MLP units fits (the smallest growth step on this model)
        geo = method.geometry
        mlp_step = 2 * geo.tokens * geo.hidden_size * 8
        assert method.target_macs - architecture_macs(model, arch) < mlp_step
    else:
        assert arch.metadata["rounding_removals"] == 0 and any(width % 8 for width in widths)


def test_round_to_multiple_adds_back_the_best_units_within_budget():
    geo = geometry(tiny_vit())
    mlp = sorted(((float(j), j) for j in range(10)), reverse=True)  # widths 10, scores = index
    mlp_out = [(100.0 + j, 10 + j) for j in range(6)]  # 6 strong units the search masked
    layer = ProjectionLayer(True, {0: [(1.0, 0), (1.0, 1)]}, mlp, mlp_out=mlp_out)
    base = round_to_multiple([ProjectionLayer(True, {0: [(1.0, 0), (1.0, 1)]}, list(mlp))], geo, 0, 4)
    assert base == 2  # nothing fits a zero budget: only the cut 10 -> 8
    budget = stem_and_head_macs(geo, geo.hidden_size) + layer.macs(geo, mlp=12)
    assert round_to_multiple([layer], geo, budget, 4) == -2  # cut 2, then 4 came back
    assert len(layer.mlp) == 12
    # the 4 best units not kept came back (the masked 102..105), the cut ones (0, 1) did not
    assert sorted(j for _, j in layer.mlp) == [2, 3, 4, 5, 6, 7, 8, 9, 12, 13, 14, 15]


@pytest.fixture(scope="module", params=[False, True], ids=["paper_space", "default_prune_hidden"])
def searched(request):
    """A tiny 3-block ViT after a short UVC search under a 15% budget, finalized: in the paper's space and with the
    default residual-width search."""
    model = tiny_vit(layers=3)
    teacher = frozen_teacher_copy(model)
    config = uvc_config(0.15, skip_warmup_fraction=0.2, theta_budget_weight=1.0, prune_hidden=request.param)
    method = gated(model, config)
    search(model, method, teacher, steps=20)
    decided = method.decide()
    return model, method, config, decided


def test_low_budget_search_skips_blocks_and_meets_budget(searched):
    model, method, _, arch = searched
    assert float(method.budget_dual) > 1.0  # R stayed above B during the search: z grew
    assert float(method.head_counts.sum()) > 0 and float(method.mlp_counts.sum()) > 0
    assert method.metrics()["uvc/skipped_blocks"] >= 1  # theta itself learnt to skip
    assert architecture_macs(model, arch) <= method.target_macs
    assert sum(not layer.keep_block for layer in arch.layers) >= 1
    assert sum(layer.keep_block for layer in arch.layers) >= 1


def test_state_dict_round_trip_reproduces_decide(searched):
    model, method, config, arch = searched
    fresh_model = tiny_vit(layers=3, seed=123)
    fresh = gated(fresh_model, config)
    assert not fresh.decide().same_units(arch)  # different weights/counts decide differently
    fresh_model.load_state_dict(model.state_dict())
    assert fresh.decide().same_units(arch)
    for name in ("head_counts", "vdim_counts", "mlp_counts", "budget_dual", "theta", "theta_momentum"):
        assert torch.equal(getattr(fresh, name), getattr(method, name)), name


def test_export_matches_gated_model_and_reload_after_finalize(searched):
    model, method, config, _ = searched
    arch = method.finalize()
    assert method.search_finished
    pixels = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        gated_logits = model(pixel_values=pixels).logits
        small = export_compressed_model(model, arch)
        small_logits = small(pixel_values=pixels).logits
    torch.testing.assert_close(small_logits, gated_logits, rtol=0, atol=1e-5)
    assert count_macs(small) == architecture_macs(model, arch) <= method.target_macs
    small.set_attn_implementation("eager")  # FlopCounterMode misses sdpa's products on CPU
    assert measured_macs(small, pixels) == count_macs(small)  # an independent count of what really runs
    assert len(small.config.layers) == sum(layer.keep_block for layer in arch.layers) < 3

    # A reload of a finalized checkpoint gives the stored architecture even if the weights moved since.
    state = model.state_dict()
    fresh_model = tiny_vit(layers=3, seed=7)
    fresh = gated(fresh_model, config)
    fresh_model.load_state_dict(state)
    with torch.no_grad():  # weights, counts and theta move: the stored final architecture must not
        for index in range(3):
            fresh_model.get_parameter(f"vit.layers.{index}.mlp.fc2.weight").mul_(torch.rand(32, 64))
        fresh.head_counts.zero_()
        fresh.mlp_counts.zero_()
        fresh.theta.copy_(torch.tensor([[-1.0, 1.0]] * 3))
    assert fresh.search_finished and fresh.decide().same_units(arch)
    with torch.no_grad():
        assert fresh_model(pixel_values=pixels).logits.shape == gated_logits.shape
        torch.testing.assert_close(fresh.compute_masks().mlp[0], method.compute_masks().mlp[0])
    counts, fc2 = fresh.head_counts.clone(), fresh.parts.blocks[0].fc2.weight.detach().clone()
    fresh.after_optimizer_step(1e-3)  # no prox / count updates once finalized
    assert torch.equal(fresh.head_counts, counts) and torch.equal(fresh.parts.blocks[0].fc2.weight, fc2)


def test_casting_the_model_keeps_uvc_state_float32():
    model = tiny_vit(layers=2)
    method = gated(model, uvc_config(0.5))
    with torch.no_grad():
        method.mlp_counts.fill_(1.0001)
    model.to(torch.bfloat16)
    assert model.vit.layers[0].mlp.fc2.weight.dtype == torch.bfloat16
    assert method.mlp_counts.dtype == torch.float32 and float(method.mlp_counts[0]) == pytest.approx(1.0001)
    assert method.theta.dtype == torch.float32 and method.budget_dual.dtype == torch.float32


def test_build_method_returns_uvc():
    model = tiny_vit(layers=2)
    method = build_method(model, uvc_config(0.5))
    assert isinstance(method, UVCMethod) and method.name == "uvc" and method.uses_teacher_by_default


# -- DeiT with a distillation token and head ----------------------------------------------------------------
@pytest.mark.parametrize("prune_hidden", [False, True])
def test_deit_with_teacher_decide_and_export_match(prune_hidden):
    from conftest import make_deit_with_teacher, randomize_parameters

    model = randomize_parameters(make_deit_with_teacher(num_hidden_layers=3), seed=3, std=0.3)
    method = gated(model, uvc_config(0.4, prune_hidden=prune_hidden))
    with torch.no_grad():
        method.head_counts.copy_(torch.tensor([1.0, 2.0, 0.0]))
        method.vdim_counts.copy_(torch.tensor([2.0, 0.0, 5.0]))
        method.mlp_counts.copy_(torch.tensor([30.0, 3.0, 0.0]))
        method.theta.copy_(torch.tensor([[-1.0, 1.0], [-1.0, 1.0], [1.0, -1.0]]))
    arch = method.finalize()
    assert not arch.layers[2].keep_block
    assert architecture_macs(model, arch) <= method.target_macs
    pixels = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        reference = model(pixel_values=pixels)
        small = export_compressed_model(model, arch)
        exported = small(pixel_values=pixels)
    torch.testing.assert_close(exported.logits, reference.logits, rtol=0, atol=1e-5)
    cls_logits, distillation_logits = split_student_logits(exported)
    assert distillation_logits is not None
    torch.testing.assert_close(cls_logits, reference.cls_logits, rtol=0, atol=1e-5)
    assert count_macs(small) == architecture_macs(model, arch)


# -- end to end through CompressionTrainer -------------------------------------------------------------------
def test_compression_trainer_uvc_end_to_end(tmp_path):
    from transformers import TrainingArguments

    from hf_vit_compress.training.trainer import CompressionTrainer

    generator = torch.Generator().manual_seed(0)
    data = [
        {"pixel_values": torch.randn(3, 16, 16, generator=generator), "labels": int(i % NUM_LABELS)}
        for i in range(32)
    ]
    model = tiny_vit(layers=3)
    config = CompressionConfig(method="uvc", target_flops=0.4, search_fraction=1.0,
                               uvc={"skip_warmup_fraction": 0.25})
    args = TrainingArguments(
        output_dir=str(tmp_path / "run"), max_steps=8, per_device_train_batch_size=8, learning_rate=1e-3,
        logging_steps=2, save_strategy="no", report_to=[], use_cpu=True, remove_unused_columns=False,
        dataloader_num_workers=0, disable_tqdm=True,
    )
    trainer = CompressionTrainer(model=model, args=args, compression_config=config, train_dataset=data)
    method = trainer.method
    assert isinstance(method, UVCMethod) and trainer.teacher is not None
    assert method.prune_hidden  # the default searches the residual width too
    groups = [g for g in trainer.create_optimizer().param_groups if any(p is method.theta for p in g["params"])]
    assert len(groups) == 1 and groups[0]["lr"] == 0.0 and len(groups[0]["params"]) == 1  # UVC steps theta itself
    theta0 = method.theta.detach().clone()
    trainer.train()
    assert method.search_finished
    assert float(method.budget_dual) > 0.0 and float(method.mlp_counts.sum()) > 0
    assert not torch.equal(method.theta.detach(), theta0)  # stepped by UVC after the skip warm-up
    assert groups[0]["lr"] == 0.0  # the LR schedule scales 0
    small = trainer.export_compressed_model()
    assert count_macs(small) <= method.target_macs
    logged = [entry for entry in trainer.state.log_history if "uvc/ratio" in entry]
    assert logged and all(math.isfinite(entry["uvc/ratio"]) for entry in logged)
    widths = [entry["uvc/hidden_width"] for entry in trainer.state.log_history if "uvc/hidden_width" in entry]
    assert widths and all(0 < width <= 32 for width in widths)
    assert small.config.hidden_size == len(method.export_architecture().hidden_channels)
