"""ONNX export of compressed models: onnxruntime's logits equal PyTorch's (float32, atol 1e-4) at several batch
sizes (dynamic batch axis), from a model object and from a saved folder through the CLI."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime
import pytest
import torch
from conftest import make_compressed_config, make_compressed_model, make_pixel_values

from hf_vit_compress.cli import main
from hf_vit_compress.modeling import CompressedViTForImageClassification
from hf_vit_compress.publishing.onnx_export import OPSET, export_onnx


def onnx_logits(path, pixel_values: torch.Tensor) -> np.ndarray:
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(["logits"], {"pixel_values": pixel_values.numpy()})[0]


def assert_matches_pytorch(path, model) -> None:
    graph = onnx.load(str(path))
    assert [opset.version for opset in graph.opset_import if opset.domain in ("", "ai.onnx")] == [OPSET]
    batch_dim = graph.graph.input[0].type.tensor_type.shape.dim[0]
    assert batch_dim.dim_param and not batch_dim.HasField("dim_value")  # a named, dynamic batch axis
    for batch_size in (1, 2, 5):
        pixel_values = make_pixel_values(batch_size, seed=batch_size)
        with torch.no_grad():
            expected = model(pixel_values=pixel_values).logits.numpy()
        np.testing.assert_allclose(onnx_logits(path, pixel_values), expected, atol=1e-4, rtol=0)


def test_deit_with_distillation_head_exports_and_matches(tmp_path):
    # Hand-picked blocks: full, q/k dim != v dim, no heads at all, no MLP at all; two heads averaged.
    config = make_compressed_config(use_distillation_token=True, distillation_head=True)
    model = make_compressed_model(config)
    result = export_onnx(model, tmp_path / "deit.onnx")
    assert result.path == tmp_path / "deit.onnx" and result.max_abs_diff <= 1e-4
    assert_matches_pytorch(result.path, model)


def test_cli_exports_a_saved_folder(tmp_path, capsys):
    model = make_compressed_model()
    model.save_pretrained(tmp_path / "model")
    assert main(["export-onnx", str(tmp_path / "model")]) == 0
    path = tmp_path / "model" / "onnx" / "model.onnx"
    assert f"wrote {path}" in capsys.readouterr().out
    assert_matches_pytorch(path, CompressedViTForImageClassification.from_pretrained(tmp_path / "model").eval())


def test_bad_input_is_refused(tmp_path, capsys):
    assert main(["export-onnx", str(tmp_path)]) == 2
    assert "holds no config.json" in capsys.readouterr().err
    with pytest.raises(ValueError, match="opset=11"):
        export_onnx(make_compressed_model(), tmp_path / "m.onnx", opset=11)
    with pytest.raises(ValueError, match="CompressedViTForImageClassification"):
        export_onnx(torch.nn.Linear(2, 2), tmp_path / "m.onnx")
