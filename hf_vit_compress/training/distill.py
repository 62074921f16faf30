"""Teacher losses: soft knowledge distillation from a frozen teacher (UVC always, OFB when a teacher is given).

    loss = (1 - a) * CE(student, labels; label smoothing) + a * T^2 * KL(softmax(teacher / T) || softmax(student / T))

The KL term is averaged over the batch (`reduction="batchmean"`: summed over classes, divided by the batch size),
the usual convention. The official UVC code divided it by batch * classes, i.e. its KL term is `num_classes` times
smaller for the same `a`; we keep the standard mean so that `a` means what it means everywhere else.

The teacher is any image classifier with the same labels (a frozen copy of the dense model by default, see
`frozen_teacher_copy`); only its logits are used.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.nn import functional as F

from .fast_teacher import install_fast_forward


def distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor | None,
    labels: torch.Tensor | None,
    alpha: float,
    temperature: float,
    label_smoothing: float = 0.0,
    student_distillation_logits: torch.Tensor | None = None,
) -> torch.Tensor:
    """`(1 - alpha) * CE + alpha * T^2 * KL(teacher_T || student_T)`, computed in float32.

    Args:
        student_logits: `(batch, classes)` logits of the student's class head (the CE term always uses them).
        teacher_logits: `(batch, classes)` teacher logits (detached here); may be None when `alpha == 0`.
        labels: class indices `(batch,)` or class probabilities `(batch, classes)` (mixup/cutmix targets); may be
            None when `alpha == 1`.
        alpha: weight of the distillation term, in [0, 1].
        temperature: T > 0; the KL term is multiplied by T^2 so its gradient scale does not depend on T.
        label_smoothing: label smoothing of the CE term (docs/methods.md: 0.1).
        student_distillation_logits: logits of DeiT's distillation head, when the student has one. DeiT's
            convention is then followed: the class head learns from the labels (CE) and the distillation head
            from the teacher (KL). Without it, the class head receives both terms.

    Returns:
        A scalar float32 tensor.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"distillation alpha={alpha!r} is invalid: allowed a number in [0, 1]")
    if temperature <= 0:
        raise ValueError(f"distillation temperature={temperature!r} is invalid: allowed a number > 0")
    terms = []
    if alpha < 1.0:
        if labels is None:
            raise ValueError("distillation_loss: labels are required when alpha < 1 (the CE term is used)")
        if labels.is_floating_point() and labels.dtype != torch.float32:
            labels = labels.float()
        ce = F.cross_entropy(student_logits.float(), labels, label_smoothing=label_smoothing)
        terms.append((1.0 - alpha) * ce)
    if alpha > 0.0:
        if teacher_logits is None:
            raise ValueError("distillation_loss: teacher_logits are required when alpha > 0")
        kd_logits = student_logits if student_distillation_logits is None else student_distillation_logits
        if kd_logits.shape != teacher_logits.shape:
            raise ValueError(
                f"distillation_loss: student logits {tuple(kd_logits.shape)} and teacher logits "
                f"{tuple(teacher_logits.shape)} differ: the teacher must predict the same labels"
            )
        student_log_probs = F.log_softmax(_scaled(kd_logits.float(), temperature), dim=-1)
        teacher_logits = teacher_logits.detach() if teacher_logits.requires_grad else teacher_logits
        teacher_log_probs = F.log_softmax(_scaled(teacher_logits.float(), temperature), dim=-1)
        kl = F.kl_div(student_log_probs, teacher_log_probs, reduction="batchmean", log_target=True)
        terms.append(alpha * temperature**2 * kl)
    return terms[0] if len(terms) == 1 else terms[0] + terms[1]


def _scaled(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """logits / T (no operation at T = 1, where it changes nothing)."""
    return logits if temperature == 1.0 else logits / temperature


def split_student_logits(outputs) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(class-head logits, distillation-head logits or None) from a classifier's output.

    `DeiTForImageClassificationWithTeacher` (and the compressed model exported from it) return `cls_logits` and
    `distillation_logits` next to `logits` (their mean); other classifiers return `logits` only.
    """
    cls_logits = getattr(outputs, "cls_logits", None)
    distillation_logits = getattr(outputs, "distillation_logits", None)
    if cls_logits is not None and distillation_logits is not None:
        return cls_logits, distillation_logits
    logits = outputs["logits"] if isinstance(outputs, dict) else outputs.logits
    return logits, None


def teacher_logits_from_output(outputs) -> torch.Tensor:
    """The teacher's prediction: `logits` (for a DeiT with two heads, their mean, as at inference)."""
    return outputs["logits"] if isinstance(outputs, dict) else outputs.logits


def check_teacher(student_config, teacher_config) -> None:
    """Raise a ValueError when the teacher cannot teach the student (different number of labels)."""
    student_labels = getattr(student_config, "num_labels", None)
    teacher_labels = getattr(teacher_config, "num_labels", None)
    if student_labels is not None and teacher_labels is not None and student_labels != teacher_labels:
        raise ValueError(
            f"teacher has num_labels={teacher_labels} but the student has num_labels={student_labels}: "
            "the teacher must be an image classifier over the same labels"
        )


def frozen_teacher_copy(model: nn.Module) -> nn.Module:
    """A frozen deep copy of `model` (eval mode, no gradients) to distil from.

    Take it BEFORE compression gates are installed: gates are forward hooks and LayerNorm swaps whose closures
    point at the student's method, so a copy taken afterwards would run with the student's masks. The
    `CompressionTrainer` calls this first, then installs the gates on the student. A model that already carries
    gates is refused.

    Args:
        model: any `nn.Module` image classifier (typically the dense HF model about to be compressed).
    """
    from ..methods.base import CompressionMethod
    from ..surgery.residual_width import MaskedLayerNorm  # local import: keep distill light

    for name, module in model.named_modules():
        if isinstance(module, (MaskedLayerNorm, CompressionMethod)):
            raise ValueError(
                f"frozen_teacher_copy: the model already carries compression gates ({name}: "
                f"{type(module).__name__}); take the teacher copy before installing gates"
            )
    teacher = copy.deepcopy(model)
    teacher.eval()
    teacher.requires_grad_(False)
    install_fast_forward(teacher)  # same logits, fewer operations per step (`fast_teacher`)
    return teacher
