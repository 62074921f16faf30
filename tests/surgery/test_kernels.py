"""Kernel-friendly shapes: `surgery.kernels` (sdpa backend rules, GEMM alignment), the exporter's record and
warning, and the default OFB / UVC exports of DeiT-T/S/B shapes at 70/50/30% MACs."""

from __future__ import annotations

import json
import os
import sys
import warnings
from pathlib import Path

import pytest
import torch
from conftest import layer_spec, make_compressed_config, make_vit_classifier
from transformers import AutoModelForImageClassification

from hf_vit_compress import Architecture, export_compressed_model
from hf_vit_compress.surgery.export import compressed_config
from hf_vit_compress.surgery.flops import count_macs
from hf_vit_compress.surgery.kernels import (
    _collected_messages,
    cross_check_sdpa,
    gemm_alignment,
    kernel_report,
    math_fallback_warning,
    sdpa_backend_reasons,
)
from hf_vit_compress.surgery.targets import model_parts

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import _common  # noqa: E402  (the benchmarks' seeded architectures: the same ones speed.py times)


def allowed(qk: int, v: int, dtype) -> list[str]:
    return [backend for backend, reason in sdpa_backend_reasons(qk, v, dtype).items() if reason is None]


# -- the rules ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("qk, v, dtype, expected", [
    (64, 64, torch.bfloat16, ["flash", "efficient", "cudnn", "math"]),
    (64, 64, torch.float16, ["flash", "efficient", "cudnn", "math"]),
    (64, 8, torch.bfloat16, ["efficient", "cudnn", "math"]),  # UVC: v pruned, q/k not: no flash
    (64, 21, torch.bfloat16, ["math"]),  # the measured slow case
    (21, 21, torch.bfloat16, ["flash", "math"]),  # flash pads 21 -> 24; the others need multiples of 8
    (160, 160, torch.bfloat16, ["flash", "efficient", "math"]),  # cuDNN: <= 128
    (320, 320, torch.bfloat16, ["efficient", "math"]),  # flash: <= 256
    (64, 64, torch.float32, ["efficient", "math"]),  # flash and cuDNN are 16-bit only
    (64, 4, torch.float32, ["efficient", "math"]),  # float32 alignment is 4
    (64, 6, torch.float32, ["math"]),
    (64, 4, "bfloat16", ["math"]),  # 4 is not a multiple of 8 in 16 bits
])
def test_sdpa_backend_rules(qk, v, dtype, expected):
    assert allowed(qk, v, dtype) == expected


def test_reasons_name_the_rule_and_the_shape():
    reasons = sdpa_backend_reasons(64, 21, torch.bfloat16)
    assert "64 and 21" in reasons["flash"]
    assert "multiples of 8" in reasons["efficient"] and "v 21" in reasons["efficient"]
    assert reasons["math"] is None
    assert gemm_alignment(torch.bfloat16) == 8 and gemm_alignment("float32") == 4


def test_bad_dtype_is_a_clear_error():
    with pytest.raises(ValueError, match="dtype must be a floating-point"):
        sdpa_backend_reasons(64, 64, "int8")


def test_kernel_report_per_dtype():
    config = make_compressed_config(layers=[layer_spec(2, 16, 16, 64), layer_spec(3, 16, 5, 40),
                                            layer_spec(0, 0, 0, 17)], hidden_size=24)
    report = kernel_report(config)
    bf16, fp32 = report["bfloat16"], report["float32"]
    assert bf16["sdpa_backends"] == ["math"] and bf16["math_only_layers"] == [1]
    assert [layer["index"] for layer in bf16["layers"]] == [0, 1]  # a block without heads runs no attention
    assert bf16["unaligned_widths"] == ["layers[1].v_head_dim=5", "layers[2].intermediate_size=17"]
    assert fp32["math_only_layers"] == [1] and "layers[1].v_head_dim=5" in fp32["unaligned_widths"]
    assert "layers[1].intermediate_size=40" not in fp32["unaligned_widths"]  # 40 % 4 == 0
    message = math_fallback_warning(report)
    assert "bfloat16 layer 1 (q/k head dim 16, v head dim 5)" in message and "layer 0" not in message


# -- the exporter -------------------------------------------------------------------------------------------------
def _layer(heads, qk, v, mlp) -> dict:
    channels = list(range(qk)), list(range(v))
    return dict(heads=heads, qk_channels=[channels[0]] * len(heads), v_channels=[channels[1]] * len(heads),
                mlp_neurons=list(range(mlp)))


def test_export_records_backends_in_the_config_and_the_saved_folder(tmp_path):
    from hf_vit_compress import LayerArchitecture

    model = make_vit_classifier(hidden_size=64, num_attention_heads=4, intermediate_size=64)  # head dim 16
    architecture = Architecture(
        layers=[LayerArchitecture(**_layer([0, 2], 16, 8, 64)), LayerArchitecture(**_layer([1], 16, 16, 48))],
        hidden_channels=list(range(64)),
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # aligned shapes: no warning
        compressed = export_compressed_model(model, architecture)
    support = compressed.config.kernel_support
    assert support["bfloat16"]["sdpa_backends"] == ["efficient", "cudnn", "math"]  # layer 0: v 8 != q/k 16
    assert support["bfloat16"]["math_only_layers"] == [] and support["float32"]["unaligned_widths"] == []
    assert [layer["sdpa"]["flash"] is None for layer in compressed.kernel_report["bfloat16"]["layers"]] == [False,
                                                                                                             True]
    compressed.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["kernel_support"] == support
    reloaded = AutoModelForImageClassification.from_pretrained(tmp_path, trust_remote_code=True)
    assert reloaded.config.kernel_support == support


def test_export_warns_when_a_shape_forces_the_math_fallback():
    from hf_vit_compress import LayerArchitecture

    model = make_vit_classifier()  # head dim 8
    architecture = Architecture(
        layers=[LayerArchitecture(**_layer([0, 1], 8, 3, 64)), LayerArchitecture(**_layer([2], 8, 8, 64))],
        hidden_channels=list(range(32)),
    )
    with pytest.warns(UserWarning, match=r"math fallback(.|\n)*bfloat16 layer 0 \(q/k head dim 8, v head dim 3\)"):
        compressed = export_compressed_model(model, architecture)
    assert compressed.config.kernel_support["bfloat16"]["math_only_layers"] == [0]


# -- torch's own checks (a CUDA device makes them meaningful; on CPU the plumbing still runs) ---------------------
def test_collected_messages_catch_python_warnings_and_native_stderr():
    with _collected_messages() as messages:
        warnings.warn("from python", UserWarning)
        os.write(2, b"from native code\n")
    assert messages == ["from python", "from native code"]


def test_cross_check_reports_torch_verdicts_per_shape():
    config = make_compressed_config(layers=[layer_spec(2, 8, 8, 16), layer_spec(2, 8, 8, 24),
                                            layer_spec(1, 8, 3, 16)])
    device = "cuda" if torch.cuda.is_available() else "cpu"
    result = cross_check_sdpa(config, torch.bfloat16, device)
    assert result["tokens"] == 17 and result["dtype"] == "bfloat16"
    assert [(s["num_heads"], s["qk_head_dim"], s["v_head_dim"]) for s in result["shapes"]] == [(1, 8, 3), (2, 8, 8)]
    for shape in result["shapes"]:
        assert set(shape["torch"]) >= {"flash", "efficient", "cudnn"}
        assert all(isinstance(v["allowed"], bool) or v["allowed"] is None
                   for k, v in shape["torch"].items() if k != "selected")
    if device == "cuda":
        assert result["mismatches"] == []
    else:  # torch rejects every fused CUDA backend for CPU tensors, so each predicted one is reported
        assert result["mismatches"] and all("torch False" in line for line in result["mismatches"])


# -- the default exports of both methods --------------------------------------------------------------------------
def _uvc_architecture(model, budget: float) -> Architecture:
    return _common.uvc_architecture(model, budget, seed=0)  # library defaults (channel_multiple 8)


METHODS = {"ofb": _common.ofb_architecture, "uvc": _uvc_architecture}


@pytest.fixture(scope="module", params=list(_common.DEIT_SHAPES))
def deit(request):
    return request.param, _common.dense_vit(_common.DEIT_SHAPES[request.param], seed=0)


@pytest.mark.parametrize("method", list(METHODS))
def test_default_exports_are_kernel_friendly_and_within_budget(deit, method):
    shape, dense = deit
    dense_macs = count_macs(dense)
    for budget in (0.7, 0.5, 0.3):
        architecture = METHODS[method](dense, budget)
        config = compressed_config(dense.config, architecture, model_parts(dense))  # what the exporter builds
        where = f"{method} on {shape} at {budget}"
        assert count_macs(config) <= budget * dense_macs, where
        widths = [config.hidden_size] + [
            width for layer in config.layers
            for width in ((layer["qk_head_dim"], layer["v_head_dim"]) if layer["num_heads"] else ())
            + (layer["intermediate_size"],)
        ]
        assert all(width % 8 == 0 and width > 0 for width in widths), (where, widths)
        report = kernel_report(config)["bfloat16"]
        assert report["math_only_layers"] == [] and report["unaligned_widths"] == [], (where, report)
        expected = ["flash", "efficient", "cudnn", "math"]
        if method == "uvc" and any(layer["qk_head_dim"] != layer["v_head_dim"] for layer in config.layers):
            expected.remove("flash")  # UVC prunes value dims only: flash needs equal head dims
        assert report["sdpa_backends"] == expected, where


# -- UVC's floors (hf_vit_compress.methods.uvc.projection) --------------------------------------------------------
def test_uvc_floors_apply_to_dimensions_of_at_least_eight_multiples():
    from hf_vit_compress.methods.uvc.projection import unit_floors
    from hf_vit_compress.surgery.flops import geometry

    wide = make_vit_classifier(hidden_size=128, num_attention_heads=2, intermediate_size=512)  # head dim 64
    assert unit_floors(geometry(wide), 8) == {"mlp": 8, "vdim": 8, "hidden": 8}
    assert unit_floors(geometry(wide), 1) == {"mlp": 1, "vdim": 1, "hidden": 1}
    # head dim 8, MLP 64, residual width 32
    assert unit_floors(geometry(make_vit_classifier()), 8) == {"mlp": 8, "vdim": 1, "hidden": 1}


def test_uvc_projection_raises_value_dims_to_the_floor_and_never_cuts_below_it():
    from hf_vit_compress.methods.uvc.projection import ProjectionLayer, project_and_round
    from hf_vit_compress.surgery.flops import geometry, stem_and_head_macs

    geo = geometry(make_vit_classifier(hidden_size=128, num_attention_heads=2, intermediate_size=512))

    def layer():  # the search left 3 value dims per head (of 64) and 40 MLP units (of 512)
        heads = {h: sorted(((10.0 - c, c) for c in range(3)), reverse=True) for h in (0, 1)}
        dims_out = {h: [(5.0 - c / 100, c) for c in range(3, 64)] for h in (0, 1)}
        mlp = sorted(((1.0, j) for j in range(40)), reverse=True)
        mlp_out = [(0.5, j) for j in range(40, 512)]
        return ProjectionLayer(True, heads, mlp, dims_out, mlp_out)

    exact = stem_and_head_macs(geo, geo.hidden_size) + 2 * layer().macs(geo, v_dim=8, mlp=40)
    layers = [layer(), layer()]
    project_and_round(layers, geo, exact, 8)
    for kept in layers:
        assert kept.v_dim == 8 and len(kept.mlp) == 40  # raised to 8 with the best dims not kept; 40 is a multiple
        assert {c for _, c in kept.heads[0]} == set(range(8))  # dims 3..7 score highest among those not kept
    layers = [layer(), layer()]  # with room for more, the rounding adds back whole blocks of 8 value dims
    project_and_round(layers, geo, exact + 2 * (layer().macs(geo, v_dim=16, mlp=40) - layer().macs(geo, v_dim=8,
                                                                                                  mlp=40)), 8)
    assert [kept.v_dim for kept in layers] == [16, 16]
    # a budget that the floors cannot meet with both blocks' value dims: a head or a block goes, never a dim below 8
    tight = stem_and_head_macs(geo, geo.hidden_size) + layer().macs(geo, v_dim=8, mlp=40) + 1
    layers = [layer(), layer()]
    project_and_round(layers, geo, tight, 8)
    assert all(kept.v_dim >= 8 and kept.v_dim % 8 == 0 for kept in layers if kept.keep)
    assert stem_and_head_macs(geo, geo.hidden_size) + sum(kept.macs(geo) for kept in layers) <= tight
