"""Tests for the distillation loss and the frozen teacher (`hf_vit_compress.training.distill`)."""

from __future__ import annotations

import pytest
import torch
from conftest import (
    NUM_LABELS,
    gated,
    make_deit_classifier,
    make_deit_with_teacher,
    make_pixel_values,
    make_vit_classifier,
    tiny_vit,
    uvc_config,
)
from torch.nn import functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from hf_vit_compress.training.distill import distillation_loss, frozen_teacher_copy, split_student_logits


def _logits(seed: int, shape=(6, NUM_LABELS)) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * 2


def test_distillation_alpha_zero_is_cross_entropy():
    student, teacher = _logits(0), _logits(1)
    labels = torch.tensor([0, 1, 2, 3, 4, 0])
    loss = distillation_loss(student, teacher, labels, alpha=0.0, temperature=3.0, label_smoothing=0.1)
    torch.testing.assert_close(loss, F.cross_entropy(student, labels, label_smoothing=0.1))
    plain = distillation_loss(student, teacher, labels, alpha=0.0, temperature=3.0)
    assert abs(loss.item() - plain.item()) > 1e-3  # smoothing is used
    torch.testing.assert_close(plain, F.cross_entropy(student, labels))


def test_distillation_kl_term_is_zero_for_identical_logits_and_scales_with_temperature():
    student, teacher = _logits(0), _logits(1)
    labels = torch.tensor([0, 1, 2, 3, 4, 0])
    assert distillation_loss(student, student.clone(), labels, alpha=1.0, temperature=2.0).item() == pytest.approx(
        0.0, abs=1e-6)
    for temperature in (1.0, 4.0):
        expected = temperature**2 * (
            F.softmax(teacher / temperature, -1)
            * (F.log_softmax(teacher / temperature, -1) - F.log_softmax(student / temperature, -1))
        ).sum(-1).mean()
        kd = distillation_loss(student, teacher, labels, alpha=1.0, temperature=temperature)
        torch.testing.assert_close(kd, expected)
    mixed = distillation_loss(student, teacher, labels, alpha=0.25, temperature=2.0)
    ce = F.cross_entropy(student, labels)
    kd = distillation_loss(student, teacher, None, alpha=1.0, temperature=2.0)
    torch.testing.assert_close(mixed, 0.75 * ce + 0.25 * kd)


def test_distillation_uses_deit_distillation_head_for_kl():
    cls_logits, dist_logits, teacher = _logits(0), _logits(2), _logits(1)
    labels = torch.tensor([0, 1, 2, 3, 4, 0])
    loss = distillation_loss(cls_logits, teacher, labels, alpha=0.5, temperature=1.0,
                             student_distillation_logits=dist_logits)
    expected = 0.5 * F.cross_entropy(cls_logits, labels) + 0.5 * distillation_loss(dist_logits, teacher, None, 1.0, 1.0)
    torch.testing.assert_close(loss, expected)
    # soft (mixup) labels work too
    soft = F.one_hot(labels, NUM_LABELS).float()
    torch.testing.assert_close(distillation_loss(cls_logits, None, soft, 0.0, 1.0), F.cross_entropy(cls_logits, labels))


def test_frozen_teacher_copy_is_frozen_and_refuses_gated_models():
    model = tiny_vit(layers=2)
    teacher = frozen_teacher_copy(model)
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    assert all(p.requires_grad for p in model.parameters())
    assert teacher.vit.layers[0].mlp.fc1.weight.data_ptr() != model.vit.layers[0].mlp.fc1.weight.data_ptr()
    gated(model, uvc_config(0.5))
    with pytest.raises(ValueError, match="before installing gates"):
        frozen_teacher_copy(model)
    out = model(pixel_values=torch.randn(2, 3, 16, 16))
    logits, distillation = split_student_logits(out)
    assert distillation is None and logits.shape == (2, NUM_LABELS)


class _OpCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("builder", [make_vit_classifier, make_deit_classifier, make_deit_with_teacher],
                         ids=["vit", "deit", "deit-teacher"])
def test_frozen_teacher_gives_transformers_logits_in_fewer_operations(builder):
    model = builder(seed=3).eval()
    teacher = frozen_teacher_copy(model)
    pixels = make_pixel_values(3)
    with torch.no_grad():
        with _OpCounter() as dense_ops:
            expected = model(pixel_values=pixels).logits
        with _OpCounter() as teacher_ops:
            got = teacher(pixel_values=pixels).logits
    torch.testing.assert_close(got, expected)
    assert teacher_ops.count < dense_ops.count
    attention = next(m for m in teacher.modules() if hasattr(m, "fused_qkv_weight"))
    assert attention.fused_qkv_weight.shape[0] == 3 * attention.q_proj.out_features
    assert not any("fused_qkv" in key for key in teacher.state_dict())  # not saved with the teacher
    assert teacher.state_dict().keys() == model.state_dict().keys()


def test_frozen_teacher_runs_transformers_forward_for_what_the_fast_one_does_not_cover():
    model = make_vit_classifier(seed=4).eval()
    teacher = frozen_teacher_copy(model)
    pixels = make_pixel_values(2)
    labels = torch.tensor([0, 1])
    with torch.no_grad():
        out = teacher(pixel_values=pixels, labels=labels)  # labels: transformers' forward computes the loss
        expected = model(pixel_values=pixels, labels=labels)
        torch.testing.assert_close(out.loss, expected.loss)
        with pytest.raises(ValueError, match="doesn't match model"):  # transformers' own error for another size
            teacher(pixel_values=make_pixel_values(2, image_size=24))
