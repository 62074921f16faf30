"""The export invariant: `export_compressed_model(model, arch)` computes what `apply_architecture(model, arch)` does.

Property-tested over random `Architecture`s (hypothesis) on ViT, DeiT and DeiT-with-teacher, plus hand-picked edge
cases, validation errors, hook removal and `save_atomically`.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import os
import stat
from pathlib import Path

import pytest
import torch
from conftest import (
    make_compressed_model,
    make_deit_classifier,
    make_deit_with_teacher,
    make_pixel_values,
    make_vit_classifier,
    randomize_parameters,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import hf_vit_compress.publishing.saving as saving_module
from hf_vit_compress.modeling import CompressedViTForImageClassification
from hf_vit_compress.publishing.saving import save_atomically
from hf_vit_compress.surgery.architecture import Architecture, LayerArchitecture
from hf_vit_compress.surgery.export import export_compressed_model
from hf_vit_compress.surgery.gating import apply_architecture
from hf_vit_compress.surgery.residual_width import MaskedLayerNorm

# 0-width Linears (pruned to 0 heads / 0 neurons) are legal here.
pytestmark = pytest.mark.filterwarnings("ignore:Initializing zero-element tensors:UserWarning")

ATOL = 1e-5
# The tiny dense shapes (conftest), with a third block so that removed blocks sit between kept ones.
NUM_LAYERS, NUM_HEADS, HEAD_DIM, INTERMEDIATE, HIDDEN = 3, 4, 8, 64, 32
WIDTH = NUM_HEADS * HEAD_DIM
DENSE_SCALING = HEAD_DIM**-0.5

FACTORIES = {
    "vit": make_vit_classifier,
    "deit": make_deit_classifier,
    "deit-teacher": make_deit_with_teacher,
}
MODEL_KINDS = list(FACTORIES)



@functools.cache
def dense_model(kind: str):
    """A dense tiny model with every parameter randomized (non-zero biases, so pruned-to-bias paths matter).

    Cached: nothing here mutates it (gates are removed after every `apply_architecture`), so tests share it.
    """
    model = FACTORIES[kind](seed=0, num_hidden_layers=NUM_LAYERS)
    return randomize_parameters(model, seed=1).eval()


@functools.cache
def pixel_values() -> torch.Tensor:
    return make_pixel_values(batch_size=3, seed=2)


def logits_of(model, inputs=None) -> torch.Tensor:
    with torch.no_grad():
        return model(pixel_values=pixel_values() if inputs is None else inputs).logits


def gated_logits(model, architecture: Architecture) -> torch.Tensor:
    with apply_architecture(model, architecture):
        return logits_of(model)


def _gated_logits_of(model, architecture: Architecture, inputs: torch.Tensor) -> torch.Tensor:
    with apply_architecture(model, architecture):
        return logits_of(model, inputs)


def count_params(model) -> int:
    return sum(parameter.numel() for parameter in model.parameters())


def removes_something(architecture: Architecture) -> bool:
    full = Architecture.full(NUM_LAYERS, NUM_HEADS, HEAD_DIM, INTERMEDIATE, HIDDEN)
    return not architecture.same_units(full)


def full_architecture() -> Architecture:
    return Architecture.full(NUM_LAYERS, NUM_HEADS, HEAD_DIM, INTERMEDIATE, HIDDEN)


# ----------------------------------------------------------------------------------------------------------------------
# Strategies
# ----------------------------------------------------------------------------------------------------------------------


def sorted_subsets(size: int, min_size: int = 0):
    return st.lists(st.integers(0, size - 1), unique=True, min_size=min_size, max_size=size).map(sorted)


@st.composite
def positive_scales(draw, size: int) -> torch.Tensor:
    """A `(size,)` tensor of multipliers in [0.25, 1.75) (seeded, so hypothesis can replay it)."""
    seed = draw(st.integers(0, 2**31 - 1))
    return torch.rand(size, generator=torch.Generator().manual_seed(seed)) * 1.5 + 0.25


def optional_scales(size: int):
    return st.none() | positive_scales(size)


@st.composite
def layer_architectures(draw) -> LayerArchitecture:
    # Empty lists are drawn on purpose now and then: a block with no attention heads / no MLP neurons.
    heads = draw(st.just([]) | sorted_subsets(NUM_HEADS, min_size=1) | sorted_subsets(NUM_HEADS, min_size=1))
    qk_dim = draw(st.integers(1, HEAD_DIM))
    v_dim = draw(st.integers(1, HEAD_DIM))
    # Every head draws its own channels (same count per head, different indices).
    qk_channels = [sorted(draw(st.permutations(range(HEAD_DIM)))[:qk_dim]) for _ in heads]
    v_channels = [sorted(draw(st.permutations(range(HEAD_DIM)))[:v_dim]) for _ in heads]
    return LayerArchitecture(
        heads=heads,
        qk_channels=qk_channels,
        v_channels=v_channels,
        mlp_neurons=draw(st.just([]) | sorted_subsets(INTERMEDIATE, min_size=1) | sorted_subsets(INTERMEDIATE)),
        keep_block=draw(st.sampled_from([True, True, True, False])),
        qk_scale=draw(optional_scales(WIDTH)),
        v_scale=draw(optional_scales(WIDTH)),
        mlp_scale=draw(optional_scales(INTERMEDIATE)),
        pad_head_dims=draw(st.booleans()),
    )


@st.composite
def architectures(draw) -> Architecture:
    hidden = draw(st.just(list(range(HIDDEN))) | sorted_subsets(HIDDEN, min_size=1))
    return Architecture(
        layers=[draw(layer_architectures()) for _ in range(NUM_LAYERS)],
        hidden_channels=hidden,
        hidden_scale=draw(optional_scales(HIDDEN)),
    )


PROPERTY_SETTINGS = settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def edge_case_architecture(hidden_scale: bool = True) -> Architecture:
    """Hand-picked: qk dim (3) != v dim (5) with different channels per head (v ones unsorted in head 0) and a
    0-neuron MLP in block 0, a removed block between kept ones, a 0-head block with a scaled, strided MLP."""
    generator = torch.Generator().manual_seed(3)
    return Architecture(
        layers=[
            LayerArchitecture(
                heads=[0, 2, 3],
                qk_channels=[[0, 1, 5], [2, 3, 7], [1, 4, 6]],
                v_channels=[[7, 0, 3, 5, 6], [1, 2, 3, 4, 5], [0, 2, 4, 6, 7]],
                mlp_neurons=[],  # 0 neurons
                qk_scale=torch.rand(WIDTH, generator=generator) + 0.5,
                v_scale=torch.rand(WIDTH, generator=generator) + 0.5,
            ),
            LayerArchitecture(heads=[1], qk_channels=[[0]], v_channels=[[3]], mlp_neurons=[5], keep_block=False),
            LayerArchitecture(
                heads=[],  # 0 heads
                qk_channels=[],
                v_channels=[],
                mlp_neurons=list(range(0, INTERMEDIATE, 3)),
                mlp_scale=torch.rand(INTERMEDIATE, generator=generator) + 0.5,
            ),
        ],
        hidden_channels=[0, 3, 4, 8, 9, 15, 16, 22, 30, 31],
        hidden_scale=torch.rand(HIDDEN, generator=generator) + 0.5 if hidden_scale else None,
    )


# ----------------------------------------------------------------------------------------------------------------------
# The invariant
# ----------------------------------------------------------------------------------------------------------------------


def check_export_invariant(kind: str, architecture: Architecture) -> CompressedViTForImageClassification:
    dense = dense_model(kind)
    expected = gated_logits(dense, architecture)
    compressed = export_compressed_model(dense, architecture)
    actual = logits_of(compressed)

    assert actual.dtype == torch.float32
    # the same in float64: a LayerNorm over one or two kept channels of nearly equal values is ill-conditioned, so
    # float32 rounding alone can part the two computations there; in float64 they agree whatever the architecture
    # (up to the masks' float32 scale factors, ~1e-7 relative)
    # (float32 weights are exact in float64, so the export, which builds a float32 model, loses nothing)
    dense64 = copy.deepcopy(dense).double()
    pixels = pixel_values().double()
    torch.testing.assert_close(logits_of(export_compressed_model(dense64, architecture).double(), pixels),
                               _gated_logits_of(dense64, architecture, pixels), atol=1e-6, rtol=1e-6)
    if len(architecture.hidden_channels) > 2:  # well-conditioned enough for float32
        torch.testing.assert_close(actual, expected, atol=ATOL, rtol=1e-5)

    config = compressed.config
    kept = architecture.kept_layers
    assert config.num_hidden_layers == len(kept) == len(compressed.vit.layers)
    assert config.hidden_size == len(architecture.hidden_channels)
    assert [
        (entry["num_heads"], entry["qk_head_dim"], entry["v_head_dim"], entry["intermediate_size"])
        for entry in config.layers
    ] == [(layer.num_heads, *layer.exported_head_dims, layer.intermediate_size) for layer in kept]
    hidden = len(architecture.hidden_channels)
    for block, layer in zip(compressed.vit.layers, kept):  # the modules really have those shapes
        attention = block.attention
        qk_dim, v_dim = layer.exported_head_dims
        if layer.pad_head_dims:  # padded to the wider head dim, on both
            assert qk_dim == v_dim == max(layer.qk_head_dim, layer.v_head_dim)
        assert attention.q_proj.weight.shape == (layer.num_heads * qk_dim, hidden)
        assert attention.k_proj.weight.shape == (layer.num_heads * qk_dim, hidden)
        assert attention.v_proj.weight.shape == (layer.num_heads * v_dim, hidden)
        assert attention.o_proj.weight.shape == (hidden, layer.num_heads * v_dim)
        assert block.mlp.fc1.weight.shape == (layer.intermediate_size, hidden)
        assert block.mlp.fc2.weight.shape == (hidden, layer.intermediate_size)
    assert compressed.config.use_distillation_token == (kind != "vit")
    assert compressed.config.distillation_head == (kind == "deit-teacher")

    if removes_something(architecture) and not any(layer.pad_head_dims for layer in kept):
        assert count_params(compressed) < count_params(dense)
    elif removes_something(architecture):  # zero-padding gives back at most what the narrower head dim lost
        assert count_params(compressed) <= count_params(dense)
    else:
        assert count_params(compressed) == count_params(dense)
    return compressed


@pytest.mark.parametrize("kind", MODEL_KINDS)
@PROPERTY_SETTINGS
@given(architecture=architectures())
def test_export_matches_gated_dense_model(kind, architecture):
    check_export_invariant(kind, architecture)


@pytest.mark.parametrize("kind", MODEL_KINDS)
@pytest.mark.parametrize("hidden_scale", [False, True])
def test_export_matches_gated_dense_model_edge_cases(kind, hidden_scale):
    architecture = edge_case_architecture(hidden_scale)
    compressed = check_export_invariant(kind, architecture)
    assert [entry["num_heads"] for entry in compressed.config.layers] == [3, 0]
    assert [entry["intermediate_size"] for entry in compressed.config.layers] == [0, len(range(0, INTERMEDIATE, 3))]
    assert compressed.config.layers[0]["qk_head_dim"] == 3 and compressed.config.layers[0]["v_head_dim"] == 5


@pytest.mark.parametrize("kind", MODEL_KINDS)
def test_zero_padded_head_dims_export_the_same_model_with_equal_head_dims(kind):
    architecture = edge_case_architecture()
    architecture.layers[0].pad_head_dims = True  # q/k head dim 3 padded to the value head dim 5
    compressed = check_export_invariant(kind, architecture)
    assert (compressed.config.layers[0]["qk_head_dim"], compressed.config.layers[0]["v_head_dim"]) == (5, 5)
    torch.testing.assert_close(logits_of(compressed),
                               logits_of(export_compressed_model(dense_model(kind), edge_case_architecture())))
    q_rows = compressed.vit.layers[0].attention.q_proj.weight.view(3, 5, -1)
    assert q_rows[:, 3:].abs().sum() == 0 and q_rows[:, :3].abs().sum() > 0  # each head: 3 kept rows, then zeros
    from hf_vit_compress.surgery.flops import architecture_macs, count_macs

    assert architecture_macs(dense_model(kind), architecture) == count_macs(compressed)  # padded MACs counted
    assert architecture.to_dict()["layers"][0]["pad_head_dims"] is True
    assert "pad_head_dims" not in edge_case_architecture().to_dict()["layers"][0]  # a MACs run's file, as before
    # a published folder's architecture.json agrees with its config.json (publishing.verify), padding and all, and
    # the removed block 1 is an entry that is no config layer (verify once refused every folder with one)
    from hf_vit_compress.publishing.verify import _check_architecture

    problems: list[str] = []
    _check_architecture(architecture.to_dict(), compressed.config, problems)
    assert problems == []
    _check_architecture(edge_case_architecture().to_dict(), compressed.config, problems)
    assert len(problems) == 1 and "kept block 0: widths (3, 3, 5, 0)" in problems[0]


@pytest.mark.parametrize("kind", MODEL_KINDS)
def test_export_of_everything_removed_but_one_channel(kind):
    """The smallest legal model: every block removed, a single hidden channel."""
    architecture = full_architecture()
    for layer in architecture.layers:
        layer.keep_block = False
    architecture.hidden_channels = [7]
    compressed = check_export_invariant(kind, architecture)
    assert compressed.config.layers == []


@pytest.mark.parametrize("kind", MODEL_KINDS)
def test_full_architecture_exports_the_dense_model(kind):
    dense = dense_model(kind)
    compressed = check_export_invariant(kind, full_architecture())
    torch.testing.assert_close(logits_of(compressed), logits_of(dense), atol=ATOL, rtol=1e-5)


# ----------------------------------------------------------------------------------------------------------------------
# apply_architecture leaves no trace
# ----------------------------------------------------------------------------------------------------------------------


def hook_counts(model) -> dict[str, tuple[int, int, int]]:
    return {
        name: (len(module._forward_hooks), len(module._forward_pre_hooks), len(module._forward_hooks_with_kwargs))
        for name, module in model.named_modules()
    }


@pytest.mark.parametrize("kind", MODEL_KINDS)
def test_full_architecture_gates_change_nothing_and_are_removed(kind):
    dense = dense_model(kind)
    before_logits = logits_of(dense)
    before_hooks = hook_counts(dense)
    before_modules = dict(dense.named_modules())
    before_state = {name: tensor.clone() for name, tensor in dense.state_dict().items()}

    with apply_architecture(dense, full_architecture()):
        assert any(isinstance(module, MaskedLayerNorm) for module in dense.modules())  # the gates were installed
        assert hook_counts(dense) != before_hooks
        torch.testing.assert_close(logits_of(dense), before_logits, atol=1e-6, rtol=0)

    assert not any(isinstance(module, MaskedLayerNorm) for module in dense.modules())
    assert hook_counts(dense) == before_hooks
    after_modules = dict(dense.named_modules())
    assert after_modules.keys() == before_modules.keys()
    assert all(after_modules[name] is module for name, module in before_modules.items())  # originals restored
    assert dense.state_dict().keys() == before_state.keys()
    assert all(torch.equal(dense.state_dict()[name], tensor) for name, tensor in before_state.items())
    assert torch.equal(logits_of(dense), before_logits)


@pytest.mark.parametrize("kind", MODEL_KINDS)
def test_gates_are_removed_when_the_body_raises(kind):
    dense = dense_model(kind)
    before_logits, before_hooks = logits_of(dense), hook_counts(dense)
    with pytest.raises(RuntimeError, match="boom"):
        with apply_architecture(dense, edge_case_architecture()):
            assert not torch.allclose(logits_of(dense), before_logits)  # the masks do act
            raise RuntimeError("boom")
    assert hook_counts(dense) == before_hooks
    assert not any(isinstance(module, MaskedLayerNorm) for module in dense.modules())
    assert torch.equal(logits_of(dense), before_logits)


# ----------------------------------------------------------------------------------------------------------------------
# Attention implementations and scaling
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", MODEL_KINDS)
@settings(max_examples=5, deadline=None)
@given(architecture=architectures())
def test_exported_model_sdpa_equals_eager(kind, architecture):
    compressed = export_compressed_model(dense_model(kind), architecture)
    compressed.set_attn_implementation("sdpa")
    assert compressed.config._attn_implementation == "sdpa"
    sdpa = logits_of(compressed)
    compressed.set_attn_implementation("eager")
    assert compressed.config._attn_implementation == "eager"
    torch.testing.assert_close(logits_of(compressed), sdpa, atol=ATOL, rtol=1e-5)


def test_exported_model_keeps_dense_attention_implementation():
    dense = make_vit_classifier(num_hidden_layers=NUM_LAYERS)
    dense.set_attn_implementation("eager")
    assert export_compressed_model(dense, edge_case_architecture()).config._attn_implementation == "eager"


@pytest.mark.parametrize("kind", MODEL_KINDS)
def test_exported_scaling_is_the_dense_head_dim_scale(kind):
    architecture = edge_case_architecture()  # layer 0 keeps 3 of 8 qk channels per head
    compressed = export_compressed_model(dense_model(kind), architecture)
    assert compressed.config.layers[0]["qk_head_dim"] == 3
    for entry, block in zip(compressed.config.layers, compressed.vit.layers):
        assert entry["scaling"] == pytest.approx(DENSE_SCALING, rel=1e-12)
        assert block.attention.scaling == pytest.approx(DENSE_SCALING, rel=1e-12)
        assert entry["scaling"] != pytest.approx(3**-0.5)
    # ... and it survives a save/load round trip through config.json.
    reloaded = type(compressed.config).from_dict(compressed.config.to_dict())
    assert [entry["scaling"] for entry in reloaded.layers] == pytest.approx([DENSE_SCALING] * 2)


# ----------------------------------------------------------------------------------------------------------------------
# Bad architectures
# ----------------------------------------------------------------------------------------------------------------------


def _with_layer(index: int, **changes) -> Architecture:
    architecture = full_architecture()
    layer = architecture.layers[index]
    for name, value in changes.items():
        setattr(layer, name, value)
    return architecture


def _all_channels(num_heads: int) -> list[list[int]]:
    return [list(range(HEAD_DIM))] * num_heads


BAD_ARCHITECTURES = {
    "too-few-layers": (
        lambda: Architecture(layers=full_architecture().layers[:2], hidden_channels=list(range(HIDDEN))),
        r"architecture\.layers",
    ),
    "too-many-layers": (
        lambda: Architecture(layers=full_architecture().layers * 2, hidden_channels=list(range(HIDDEN))),
        r"architecture\.layers",
    ),
    "head-out-of-range": (
        lambda: _with_layer(1, heads=[0, NUM_HEADS], qk_channels=_all_channels(2), v_channels=_all_channels(2)),
        r"layers\[1\]\.heads",
    ),
    "negative-head": (
        lambda: _with_layer(0, heads=[-1], qk_channels=_all_channels(1), v_channels=_all_channels(1)),
        r"layers\[0\]\.heads",
    ),
    "duplicate-head": (
        lambda: _with_layer(2, heads=[1, 1], qk_channels=_all_channels(2), v_channels=_all_channels(2)),
        r"layers\[2\]\.heads",
    ),
    "qk-channel-out-of-range": (
        lambda: _with_layer(0, qk_channels=[[0, HEAD_DIM]] * NUM_HEADS),
        r"layers\[0\]\.qk_channels",
    ),
    "duplicate-v-channel": (
        lambda: _with_layer(1, v_channels=[[2, 2]] * NUM_HEADS),
        r"layers\[1\]\.v_channels",
    ),
    "empty-qk-channels-of-a-kept-head": (
        lambda: _with_layer(0, qk_channels=[[]] * NUM_HEADS),
        r"layers\[0\]\.qk_channels",
    ),
    "mlp-neuron-out-of-range": (lambda: _with_layer(2, mlp_neurons=[0, INTERMEDIATE]), r"layers\[2\]\.mlp_neurons"),
    "duplicate-mlp-neuron": (lambda: _with_layer(0, mlp_neurons=[3, 4, 3]), r"layers\[0\]\.mlp_neurons"),
    "empty-hidden-channels": (
        lambda: Architecture(layers=full_architecture().layers, hidden_channels=[]),
        r"hidden_channels",
    ),
    "hidden-channel-out-of-range": (
        lambda: Architecture(layers=full_architecture().layers, hidden_channels=[0, HIDDEN]),
        r"hidden_channels",
    ),
    "duplicate-hidden-channel": (
        lambda: Architecture(layers=full_architecture().layers, hidden_channels=[5, 5, 6]),
        r"hidden_channels",
    ),
    "wrong-hidden-scale-shape": (
        lambda: Architecture(
            layers=full_architecture().layers, hidden_channels=list(range(HIDDEN)), hidden_scale=torch.ones(HIDDEN - 1)
        ),
        r"hidden_scale",
    ),
    "wrong-qk-scale-shape": (lambda: _with_layer(1, qk_scale=torch.ones(NUM_HEADS)), r"layers\[1\]\.qk_scale"),
    "wrong-v-scale-shape": (lambda: _with_layer(0, v_scale=torch.ones(WIDTH + 1)), r"layers\[0\]\.v_scale"),
    "wrong-mlp-scale-shape": (lambda: _with_layer(2, mlp_scale=torch.ones(1, INTERMEDIATE)), r"layers\[2\]\.mlp_scale"),
}


@pytest.mark.parametrize("case", list(BAD_ARCHITECTURES))
def test_bad_architecture_raises_value_error_naming_the_field(case):
    build, field_pattern = BAD_ARCHITECTURES[case]
    with pytest.raises(ValueError, match=field_pattern):
        export_compressed_model(dense_model("vit"), build())


@pytest.mark.parametrize("name", ["qk_channels", "v_channels"])
def test_layer_architecture_needs_one_channel_list_per_kept_head(name):
    channels = {"qk_channels": _all_channels(2), "v_channels": _all_channels(2), name: _all_channels(1)}
    with pytest.raises(ValueError, match=name):
        LayerArchitecture(heads=[0, 1], mlp_neurons=[], **channels)


@pytest.mark.parametrize("name", ["qk_channels", "v_channels"])
def test_layer_architecture_needs_the_same_head_dim_for_every_head(name):
    channels = {"qk_channels": _all_channels(2), "v_channels": _all_channels(2), name: [[0, 1], [0]]}
    with pytest.raises(ValueError, match=name):
        LayerArchitecture(heads=[0, 1], mlp_neurons=[], **channels)


# ----------------------------------------------------------------------------------------------------------------------
# save_atomically
# ----------------------------------------------------------------------------------------------------------------------


def folder_digest(folder: Path) -> dict[str, str]:
    return {
        str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


@pytest.fixture(name="saved")
def _saved(tmp_path):
    """A good compressed model saved at tmp_path/models/out (the only entry of tmp_path/models)."""
    model = make_compressed_model(seed=0)
    output_dir = tmp_path / "models" / "out"
    assert save_atomically(model, output_dir) == output_dir
    return model, output_dir


def assert_loads_as(output_dir: Path, model) -> None:
    loaded = CompressedViTForImageClassification.from_pretrained(output_dir).eval()
    inputs = make_pixel_values()
    torch.testing.assert_close(logits_of(loaded, inputs), logits_of(model, inputs), atol=0, rtol=0)


def test_save_atomically_writes_a_loadable_model(saved):
    model, output_dir = saved
    assert (output_dir / "config.json").is_file()
    assert (output_dir / "model.safetensors").is_file()
    assert_loads_as(output_dir, model)
    assert os.listdir(output_dir.parent) == ["out"]


def test_save_atomically_gives_the_folder_normal_permissions(saved, tmp_path):
    _, output_dir = saved
    reference = tmp_path / "models-reference"
    reference.mkdir()  # what a plain save_pretrained(...) folder gets under the current umask
    assert stat.S_IMODE(output_dir.stat().st_mode) == stat.S_IMODE(reference.stat().st_mode)


def test_save_atomically_replaces_an_existing_folder(saved):
    old_model, output_dir = saved
    new_model = make_compressed_model(seed=1)
    assert not torch.equal(logits_of(new_model, make_pixel_values()), logits_of(old_model, make_pixel_values()))

    save_atomically(new_model, output_dir)

    assert_loads_as(output_dir, new_model)
    assert os.listdir(output_dir.parent) == ["out"]  # no staging or backup folder left


@pytest.mark.parametrize("error", [RuntimeError("disk full"), KeyboardInterrupt()])
def test_save_atomically_failure_leaves_the_good_folder_untouched(saved, monkeypatch, error):
    old_model, output_dir = saved
    before = folder_digest(output_dir)
    new_model = make_compressed_model(seed=1)
    written_to = []

    def failing_save_pretrained(save_directory, **kwargs):
        save_directory = Path(save_directory)
        save_directory.mkdir(parents=True, exist_ok=True)
        (save_directory / "config.json").write_text("{half written")
        (save_directory / "model.safetensors").write_bytes(b"\0" * 10)
        written_to.append(save_directory)
        raise error

    monkeypatch.setattr(new_model, "save_pretrained", failing_save_pretrained)
    with pytest.raises(type(error)):
        save_atomically(new_model, output_dir)

    assert written_to and written_to[0] != output_dir  # it wrote somewhere else first
    assert folder_digest(output_dir) == before
    assert_loads_as(output_dir, old_model)
    assert os.listdir(output_dir.parent) == ["out"]  # no partial/temp folder left behind


def test_save_atomically_failed_swap_restores_the_good_folder(saved, monkeypatch):
    old_model, output_dir = saved
    before = folder_digest(output_dir)
    calls = []

    def exchange(first, second):
        calls.append((Path(first), Path(second)))
        raise OSError("simulated failure while swapping the new folder into place")

    monkeypatch.setattr(saving_module, "_exchange", exchange)
    with pytest.raises(OSError, match="simulated"):
        save_atomically(make_compressed_model(seed=1), output_dir)
    monkeypatch.undo()

    assert any(second == output_dir for _, second in calls)
    assert folder_digest(output_dir) == before
    assert_loads_as(output_dir, old_model)
    assert os.listdir(output_dir.parent) == ["out"]


def test_save_atomically_into_a_new_nested_folder(tmp_path):
    model = make_compressed_model(seed=2)
    output_dir = tmp_path / "a" / "b" / "model"
    save_atomically(model, str(output_dir))
    assert_loads_as(output_dir, model)
    assert os.listdir(output_dir.parent) == ["model"]
