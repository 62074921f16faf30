"""ONNX export of a compressed model, checked against PyTorch with onnxruntime.

torch.onnx's exporter (`dynamo=True`, the one torch maintains; it needs `onnxscript`) at opset 18, one input
`pixel_values` `(batch, channels, height, width)` float32 and one output `logits` `(batch, num_labels)`, with a
dynamic batch axis. Needs the `[onnx]` extra: `pip install "hf_vit_compress[onnx]"`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..modeling import CompressedViTForImageClassification

#: ONNX opset of the export (torch's exporter supports 18 and up)
OPSET = 18
#: largest |ONNX - PyTorch| logit difference accepted by the check (float32)
ATOL = 1e-4
# One protobuf file holds at most 2 GB: larger weights go to `<name>.onnx.data` beside it.
_EXTERNAL_DATA_BYTES = 1_500_000_000


@dataclass
class OnnxExport:
    """Where the model went and how far onnxruntime's logits were from PyTorch's (None when not checked)."""

    path: Path
    max_abs_diff: float | None


class _Logits(nn.Module):
    """The classifier with one tensor output, so the graph's output is just the logits."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=pixel_values).logits


def _example(config, batch_size: int, seed: int) -> torch.Tensor:
    size = config.image_size if isinstance(config.image_size, (list, tuple)) else (config.image_size,) * 2
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch_size, config.num_channels, *size, generator=generator)


def check_onnx(path: str | os.PathLike, model: nn.Module, batch_sizes: tuple[int, ...] = (1, 3),
               atol: float = ATOL) -> float:
    """Run the ONNX file with onnxruntime (CPU) on random batches of each size and compare with `model`'s logits.

    Returns the largest absolute difference; raises a ValueError above `atol`.
    """
    try:
        import onnxruntime
    except ImportError as error:
        raise ImportError("checking the ONNX export needs onnxruntime: pip install 'hf_vit_compress[onnx]' "
                          "(or skip the check)") from error
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    worst = 0.0
    for seed, batch_size in enumerate(batch_sizes):
        pixel_values = _example(model.config, batch_size, seed)
        with torch.no_grad():
            expected = model(pixel_values=pixel_values).logits.numpy()
        (logits,) = session.run(["logits"], {"pixel_values": pixel_values.numpy()})
        if logits.shape != expected.shape:
            raise ValueError(f"ONNX logits have shape {logits.shape} for batch {batch_size}, PyTorch {expected.shape}")
        worst = max(worst, float(abs(logits - expected).max()))
    if worst > atol:
        raise ValueError(f"ONNX export of {path}: logits differ from PyTorch's by {worst:.3g} > atol {atol}")
    return worst


def export_onnx(model: CompressedViTForImageClassification | str | os.PathLike,
                output_path: str | os.PathLike | None = None, opset: int = OPSET, check: bool = True,
                atol: float = ATOL) -> OnnxExport:
    """Export a compressed model to ONNX (dynamic batch axis) and, by default, check it with onnxruntime.

    Args:
        model: a `CompressedViTForImageClassification`, or a folder holding one (`save_model`'s output).
        output_path: the `.onnx` file; default `<folder>/onnx/model.onnx` for a folder, else required.
        opset: ONNX opset (>= 18).
        check: compare onnxruntime's logits with PyTorch's on batches of 1 and 3 (raises above `atol`).
        atol: largest accepted absolute logit difference.

    Returns:
        `OnnxExport(path, max_abs_diff)`.
    """
    if opset < OPSET:
        raise ValueError(f"export_onnx: opset={opset} is not supported: allowed >= {OPSET} (torch's exporter)")
    if isinstance(model, (str, os.PathLike)):
        folder = Path(model)
        if not (folder / "config.json").is_file():
            raise ValueError(f"export_onnx: {folder} holds no config.json; allowed a saved compressed model folder")
        output_path = output_path or folder / "onnx" / "model.onnx"
        from .verify import load_compressed_model

        model = load_compressed_model(folder)  # verified first: no code or pickle from the folder runs
    if not isinstance(model, CompressedViTForImageClassification):
        raise ValueError(f"export_onnx: got {type(model).__name__}; allowed a CompressedViTForImageClassification "
                         "(trainer.export_compressed_model()) or its saved folder")
    if output_path is None:
        raise ValueError("export_onnx: output_path is required when exporting a model object")
    output_path = Path(output_path)
    output_path.parent.mkdir(parents=True, exist_ok=True)
    model = model.float().eval()
    weight_bytes = sum(parameter.numel() * 4 for parameter in model.parameters())
    with torch.no_grad():
        torch.onnx.export(
            _Logits(model), (_example(model.config, 2, seed=0),), str(output_path), dynamo=True,
            input_names=["pixel_values"], output_names=["logits"], opset_version=opset,
            dynamic_shapes={"pixel_values": {0: torch.export.Dim("batch")}},
            external_data=weight_bytes > _EXTERNAL_DATA_BYTES, verbose=False,
        )
    return OnnxExport(output_path, check_onnx(output_path, model, atol=atol) if check else None)


__all__ = ["ATOL", "OPSET", "OnnxExport", "check_onnx", "export_onnx"]
