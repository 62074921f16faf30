"""Tests of the exported model format: `CompressedViTConfig` / `CompressedViTForImageClassification`."""

from __future__ import annotations

import ast
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import (
    NUM_LABELS,
    NUM_PATCHES,
    heterogeneous_layers,
    layer_spec,
    make_compressed_config,
    make_compressed_model,
    make_deit_with_teacher,
    make_pixel_values,
    make_vit_classifier,
    random_compressed_config,
    randomize_parameters,
)
from transformers import AutoConfig, AutoModelForImageClassification

import hf_vit_compress.modeling.modeling_compressed_vit as modeling_module
from hf_vit_compress.modeling import CompressedViTConfig, CompressedViTForImageClassification

ATOL = 1e-5
HEAD_VARIANTS = [
    pytest.param(False, False, id="class-token"),
    pytest.param(True, False, id="distillation-token-one-head"),
    pytest.param(True, True, id="distillation-token-two-heads"),
]


def logits_of(model, pixel_values) -> torch.Tensor:
    with torch.no_grad():
        return model(pixel_values=pixel_values).logits


# ----------------------------------------------------------------------------------------------------------------------
# 1. heterogeneous layers run
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("use_distillation_token", "distillation_head"), HEAD_VARIANTS)
def test_heterogeneous_layers_forward(use_distillation_token, distillation_head):
    layers = heterogeneous_layers()
    config = make_compressed_config(
        layers=layers, use_distillation_token=use_distillation_token, distillation_head=distillation_head
    )
    model = make_compressed_model(config)
    pixel_values = make_pixel_values(batch_size=3)

    # Every block was built with its own shapes.
    assert len(model.vit.layers) == len(layers)
    for block, spec in zip(model.vit.layers, layers):
        attention = block.attention
        assert attention.q_proj.weight.shape == (spec["num_heads"] * spec["qk_head_dim"], 24)
        assert attention.k_proj.weight.shape == (spec["num_heads"] * spec["qk_head_dim"], 24)
        assert attention.v_proj.weight.shape == (spec["num_heads"] * spec["v_head_dim"], 24)
        assert attention.o_proj.weight.shape == (24, spec["num_heads"] * spec["v_head_dim"])
        assert block.mlp.fc1.weight.shape == (spec["intermediate_size"], 24)
        assert attention.scaling == pytest.approx(spec["scaling"])

    with torch.no_grad():
        output = model(pixel_values=pixel_values, output_hidden_states=True)
    assert output.logits.shape == (3, NUM_LABELS)
    assert torch.isfinite(output.logits).all()
    num_tokens = NUM_PATCHES + (2 if use_distillation_token else 1)
    assert len(output.hidden_states) == len(layers) + 1
    assert all(state.shape == (3, num_tokens, 24) for state in output.hidden_states)
    if distillation_head:
        assert output.cls_logits.shape == output.distillation_logits.shape == (3, NUM_LABELS)
        torch.testing.assert_close(output.logits, (output.cls_logits + output.distillation_logits) / 2)
        assert not torch.allclose(output.cls_logits, output.distillation_logits)
    else:
        assert output.cls_logits is None and output.distillation_logits is None
    # Different images give different predictions (the network is not degenerate).
    assert not torch.allclose(output.logits[0], output.logits[1])

    # A block with 0 heads adds only the attention output bias; one with 0 MLP width adds only fc2's bias.
    states = torch.randn(3, num_tokens, 24)
    no_heads, no_mlp = model.vit.layers[2], model.vit.layers[3]
    with torch.no_grad():
        torch.testing.assert_close(no_heads.attention(states), no_heads.attention.o_proj.bias.expand_as(states))
        torch.testing.assert_close(no_mlp.mlp(states), no_mlp.mlp.fc2.bias.expand_as(states))
    assert no_heads.attention.o_proj.bias.abs().sum() > 0 and no_mlp.mlp.fc2.bias.abs().sum() > 0


def test_random_config_has_differing_layers_and_runs(compressed_config):
    keys = ("num_heads", "qk_head_dim", "v_head_dim", "intermediate_size")
    shapes = {tuple(layer[key] for key in keys) for layer in compressed_config.layers}
    assert len(shapes) == compressed_config.num_hidden_layers == 4
    logits = logits_of(make_compressed_model(compressed_config), make_pixel_values())
    assert logits.shape == (2, NUM_LABELS) and torch.isfinite(logits).all()


def test_labels_give_a_loss(compressed_model, pixel_values):
    output = compressed_model(pixel_values=pixel_values, labels=torch.tensor([0, 3]))
    expected = torch.nn.functional.cross_entropy(output.logits, torch.tensor([0, 3]))
    torch.testing.assert_close(output.loss, expected)


def test_wrong_image_size_is_a_clear_error(compressed_model):
    with pytest.raises(ValueError, match=r"pixel_values must have shape \(batch, 3, 16, 16\)"):
        compressed_model(pixel_values=torch.zeros(1, 3, 32, 32))


def _dense_state_dict_as_compressed(model) -> dict[str, torch.Tensor]:
    backbone = model.base_model_prefix
    renamed = {}
    for key, value in model.state_dict().items():
        key = key.replace(f"{backbone}.", "vit.", 1)
        renamed[key.replace("embeddings.patch_embeddings.projection", "embeddings.projection")] = value
    return renamed


@pytest.mark.parametrize(
    ("make_dense", "use_distillation_token"),
    [pytest.param(make_vit_classifier, False, id="vit"), pytest.param(make_deit_with_teacher, True, id="deit-teacher")],
)
def test_unpruned_compressed_model_equals_the_dense_model(make_dense, use_distillation_token):
    """Same weights, uniform layers -> exactly the dense ViT/DeiT computation (pre-norm blocks, heads, tokens)."""
    dense = randomize_parameters(make_dense(), seed=1)
    config = make_compressed_config(
        layers=[layer_spec(4, 8, 8, 64)] * 2,
        hidden_size=32,
        use_distillation_token=use_distillation_token,
        distillation_head=use_distillation_token,
    )
    compressed = CompressedViTForImageClassification(config).eval()
    compressed.load_state_dict(_dense_state_dict_as_compressed(dense), strict=True)
    pixel_values = make_pixel_values()
    torch.testing.assert_close(logits_of(compressed, pixel_values), logits_of(dense, pixel_values), atol=ATOL, rtol=0)


# ----------------------------------------------------------------------------------------------------------------------
# 2. sdpa == eager
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("use_distillation_token", "distillation_head"), HEAD_VARIANTS)
def test_sdpa_matches_eager(monkeypatch, use_distillation_token, distillation_head):
    config = random_compressed_config(
        seed=3, use_distillation_token=use_distillation_token, distillation_head=distillation_head
    )
    config.layers[0] = layer_spec(3, 5, 9, 20)  # make sure one block has qk_head_dim != v_head_dim
    model = make_compressed_model(CompressedViTConfig(**config.to_dict()), seed=3)
    pixel_values = make_pixel_values(batch_size=3, seed=3)
    assert model.config._attn_implementation == "sdpa"  # the default on torch >= 2.1

    eager_calls = []
    original = modeling_module.eager_attention_forward

    def counting_eager(*args, **kwargs):
        eager_calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(modeling_module, "eager_attention_forward", counting_eager)
    sdpa_logits = logits_of(model, pixel_values)
    assert eager_calls == []

    model.set_attn_implementation("eager")
    assert model.config._attn_implementation == "eager"  # the switch must really happen, not just warn
    eager_logits = logits_of(model, pixel_values)
    assert len(eager_calls) == sum(layer["num_heads"] > 0 for layer in model.config.layers) > 0

    assert sdpa_logits.dtype == eager_logits.dtype == torch.float32
    torch.testing.assert_close(sdpa_logits, eager_logits, atol=ATOL, rtol=0)

    # The same through the constructor with the implementation set on the config.
    eager_config = CompressedViTConfig(**model.config.to_dict())
    eager_config._attn_implementation = "eager"
    rebuilt = CompressedViTForImageClassification(eager_config).eval()
    assert rebuilt.config._attn_implementation == "eager"
    rebuilt.load_state_dict(model.state_dict())
    torch.testing.assert_close(logits_of(rebuilt, pixel_values), sdpa_logits, atol=ATOL, rtol=0)


# ----------------------------------------------------------------------------------------------------------------------
# 3-6. save / load
# ----------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A saved two-head model with heterogeneous layers, its input and its logits."""
    model = make_compressed_model(make_compressed_config(use_distillation_token=True, distillation_head=True), seed=7)
    directory = tmp_path_factory.mktemp("saved") / "compressed"
    model.save_pretrained(directory)
    pixel_values = make_pixel_values(batch_size=2, seed=7)
    return directory, pixel_values, logits_of(model, pixel_values)


def test_save_pretrained_files(saved):
    directory, _, _ = saved
    names = {path.name for path in directory.iterdir()}
    assert "model.safetensors" in names
    assert "pytorch_model.bin" not in names
    assert {"config.json", "configuration_compressed_vit.py", "modeling_compressed_vit.py"} <= names

    config = json.loads((directory / "config.json").read_text())
    assert config["model_type"] == "compressed_vit"
    assert config["auto_map"] == {
        "AutoConfig": "configuration_compressed_vit.CompressedViTConfig",
        "AutoModelForImageClassification": "modeling_compressed_vit.CompressedViTForImageClassification",
    }
    assert config["layers"] == heterogeneous_layers()
    assert config["use_distillation_token"] is True and config["distillation_head"] is True

    # The shipped files are the package's current sources...
    package_dir = Path(modeling_module.__file__).parent
    for name in ("configuration_compressed_vit.py", "modeling_compressed_vit.py"):
        assert (directory / name).read_text() == (package_dir / name).read_text()
    # ...and import nothing but the standard library, torch, transformers and each other.
    for name in ("configuration_compressed_vit.py", "modeling_compressed_vit.py"):
        roots = set()
        for node in ast.walk(ast.parse((directory / name).read_text())):
            if isinstance(node, ast.Import):
                roots |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                roots.add(node.module.split(".")[0])
        assert roots - set(sys.stdlib_module_names) <= {"torch", "transformers"}, (name, roots)


_CHILD = textwrap.dedent(
    """
    import importlib.abc
    import sys


    class BlockHfVitCompress(importlib.abc.MetaPathFinder):
        # The package is pip-installed (editable): only a finder in front of all others keeps it out.
        def find_spec(self, name, path=None, target=None):
            if name == "hf_vit_compress" or name.startswith("hf_vit_compress."):
                raise ModuleNotFoundError(f"blocked by the test: {name}", name=name)
            return None


    sys.meta_path.insert(0, BlockHfVitCompress())
    try:
        import hf_vit_compress  # noqa: F401
    except ImportError:
        pass
    else:
        raise SystemExit("hf_vit_compress is importable in the child")

    import numpy as np
    import torch
    from transformers import AutoModelForImageClassification

    model_dir, input_path, output_path = sys.argv[1:4]
    model = AutoModelForImageClassification.from_pretrained(model_dir, trust_remote_code=True).eval()
    with torch.no_grad():
        logits = model(pixel_values=torch.from_numpy(np.load(input_path))).logits
    np.save(output_path, logits.numpy())
    loaded = sorted(name for name in sys.modules if name.split(".")[0] == "hf_vit_compress")
    print("MODEL_CLASS", type(model).__module__, type(model).__name__)
    print("CONFIG_CLASS", type(model.config).__module__, type(model.config).__name__)
    print("LOADED_PACKAGE_MODULES", loaded)
    """
)


def test_trust_remote_code_round_trip_without_the_package(saved, tmp_path):
    directory, pixel_values, expected = saved
    input_path, output_path = tmp_path / "pixel_values.npy", tmp_path / "logits.npy"
    np.save(input_path, pixel_values.numpy())
    env = {
        key: value
        for key, value in os.environ.items()
        if key not in ("PYTHONPATH", "PYTHONSTARTUP", "PYTHONHOME") and not key.startswith("HF_")
    }
    env.update(
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        HF_HOME=str(tmp_path / "hf_home"),
        HF_MODULES_CACHE=str(tmp_path / "hf_modules"),
    )
    result = subprocess.run(
        [sys.executable, "-c", _CHILD, str(directory), str(input_path), str(output_path)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    lines = dict(line.split(" ", 1) for line in result.stdout.splitlines() if " " in line)
    model_module, model_class = lines["MODEL_CLASS"].split()
    assert model_module.startswith("transformers_modules.") and model_module.endswith("modeling_compressed_vit")
    assert model_class == "CompressedViTForImageClassification"
    assert lines["CONFIG_CLASS"].split()[0].startswith("transformers_modules.")
    assert lines["LOADED_PACKAGE_MODULES"] == "[]"
    np.testing.assert_allclose(np.load(output_path), expected.numpy(), atol=ATOL, rtol=0)


def test_auto_model_loads_in_process_without_trust_remote_code(saved):
    directory, pixel_values, expected = saved
    config = AutoConfig.from_pretrained(directory)
    assert type(config) is CompressedViTConfig
    model = AutoModelForImageClassification.from_pretrained(directory)
    assert type(model) is CompressedViTForImageClassification  # the registered local class, not a dynamic module
    assert not model.training
    assert model.config.layers == heterogeneous_layers()
    torch.testing.assert_close(logits_of(model, pixel_values), expected, atol=ATOL, rtol=0)

    eager = AutoModelForImageClassification.from_pretrained(directory, attn_implementation="eager")
    assert eager.config._attn_implementation == "eager"
    torch.testing.assert_close(logits_of(eager, pixel_values), expected, atol=ATOL, rtol=0)


def _copy_with_config(saved_dir: Path, destination: Path, edit) -> Path:
    shutil.copytree(saved_dir, destination)
    config = json.loads((destination / "config.json").read_text())
    edit(config)
    (destination / "config.json").write_text(json.dumps(config))
    return destination


def _set(layer_index, key, value):
    return lambda config: config["layers"][layer_index].update({key: value})


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        pytest.param(
            _set(0, "intermediate_size", 20), ["vit.layers.0.mlp.fc1.weight", "(64, 24)", "(20, 24)"], id="mlp-width"
        ),
        pytest.param(
            _set(1, "num_heads", 2), ["vit.layers.1.attention.q_proj.weight", "(15, 24)", "(10, 24)"], id="num-heads"
        ),
        pytest.param(
            _set(1, "v_head_dim", 6), ["vit.layers.1.attention.o_proj.weight", "(24, 21)", "(24, 18)"], id="v-head-dim"
        ),
        pytest.param(
            lambda config: config["layers"][2].update(num_heads=1, qk_head_dim=2, v_head_dim=2),
            ["vit.layers.2.attention.q_proj.weight", "(0, 24)", "(2, 24)"],
            id="heads-0-to-1",
        ),
        pytest.param(
            lambda config: config["layers"].append(layer_spec(1, 2, 2, 3)),
            ["vit.layers.4.mlp.fc1.weight", "missing"],
            id="extra-layer",
        ),
        pytest.param(
            lambda config: config["layers"].pop(), ["vit.layers.3.mlp.fc2.bias", "unexpected"], id="dropped-layer"
        ),
    ],
)
def test_config_disagreeing_with_weights_fails_clearly(saved, tmp_path, edit, expected):
    directory = _copy_with_config(saved[0], tmp_path / "edited", edit)
    with pytest.raises(RuntimeError) as error:
        AutoModelForImageClassification.from_pretrained(directory)
    message = str(error.value)
    assert "config.json does not match the weights" in message
    for fragment in expected:
        assert fragment in message, message


def test_invalid_config_json_fails_before_touching_weights(saved, tmp_path):
    # Heads without head dims: the config's own validation rejects it while loading.
    directory = _copy_with_config(saved[0], tmp_path / "edited", _set(2, "num_heads", 1))
    with pytest.raises(ValueError, match=r"layers\[2\].*qk_head_dim >= 1"):
        AutoModelForImageClassification.from_pretrained(directory)


def test_ignore_mismatched_sizes_still_allows_re_heading(saved):
    model = AutoModelForImageClassification.from_pretrained(saved[0], num_labels=3, ignore_mismatched_sizes=True)
    assert model.cls_classifier.weight.shape == (3, 24)
    assert logits_of(model, saved[1]).shape == (2, 3)


# ----------------------------------------------------------------------------------------------------------------------
# 6b. invalid configs
# ----------------------------------------------------------------------------------------------------------------------


def _without(key):
    return {k: v for k, v in layer_spec(2, 4, 4, 8).items() if k != key}


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        pytest.param({"layers": [layer_spec(2, 4, 4, 8), _without("scaling")]}, r"layers\[1\].*missing: \['scaling'\]",
                     id="missing-scaling"),
        pytest.param({"layers": [_without("v_head_dim")]}, r"layers\[0\].*missing: \['v_head_dim'\]",
                     id="missing-v-head-dim"),
        pytest.param({"layers": [{**layer_spec(2, 4, 4, 8), "head_dim": 4}]}, r"layers\[0\].*unknown: \['head_dim'\]",
                     id="unknown-key"),
        pytest.param({"layers": [layer_spec(2, 4, 4, -1)]}, r"layers\[0\]\.intermediate_size", id="negative-mlp"),
        pytest.param({"layers": [layer_spec(-2, 4, 4, 8)]}, r"layers\[0\]\.num_heads", id="negative-heads"),
        pytest.param({"layers": [layer_spec(1, 4, 4, 8), layer_spec(2, 4, -4, 8)]}, r"layers\[1\]\.v_head_dim",
                     id="negative-v-head-dim"),
        pytest.param({"layers": [layer_spec(2, 0, 4, 8)]}, r"layers\[0\].*qk_head_dim >= 1", id="heads-without-dims"),
        pytest.param({"layers": [layer_spec(2, 4, 4, 8, scaling=0.0)]}, r"layers\[0\]\.scaling", id="zero-scaling"),
        pytest.param({"hidden_size": 0}, r"hidden_size", id="zero-hidden"),
        pytest.param({"hidden_size": -8}, r"hidden_size", id="negative-hidden"),
        pytest.param({"distillation_head": True}, r"distillation_head.*use_distillation_token",
                     id="head-without-token"),
    ],
)
def test_invalid_config_raises_value_error_naming_the_field(kwargs, pattern):
    kwargs = {"layers": [layer_spec(2, 4, 4, 8)], **kwargs}
    with pytest.raises(ValueError, match=pattern):
        CompressedViTConfig(**kwargs)


def test_valid_config_round_trips_and_derives_counts():
    config = make_compressed_config(use_distillation_token=True)
    assert config.num_hidden_layers == 4 and config.num_prefix_tokens == 2
    assert make_compressed_config().num_prefix_tokens == 1
    restored = CompressedViTConfig.from_dict(config.to_dict())
    assert restored.layers == config.layers and restored.hidden_size == 24 and restored.use_distillation_token
    assert all(isinstance(layer["scaling"], float) for layer in restored.layers)
