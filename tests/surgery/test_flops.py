"""Analytic MACs (`flops.py`) against published figures and against `torch.utils.flop_counter.FlopCounterMode`.

FlopCounterMode is run under eager attention (under sdpa on CPU it misses q @ k^T and attn @ v; see DESIGN.md).
"""

from __future__ import annotations

import random

import pytest
import torch
from conftest import (
    IMAGE_SIZE,
    make_deit_classifier,
    make_deit_with_teacher,
    make_vit_classifier,
    randomize_parameters,
)
from transformers import ViTConfig, ViTForImageClassification

from hf_vit_compress.surgery import flops
from hf_vit_compress.surgery.architecture import Architecture, LayerArchitecture
from hf_vit_compress.surgery.export import export_compressed_model

# 0-width Linears (pruned to 0 heads / 0 neurons) are legal here.
pytestmark = pytest.mark.filterwarnings("ignore:Initializing zero-element tensors:UserWarning")

NUM_LAYERS, NUM_HEADS, HEAD_DIM, INTERMEDIATE, HIDDEN = 3, 4, 8, 64, 32
FACTORIES = {"vit": make_vit_classifier, "deit": make_deit_classifier, "deit-teacher": make_deit_with_teacher}
MODEL_KINDS = list(FACTORIES)



def dense(kind: str, **overrides):
    model = FACTORIES[kind](seed=0, **{"num_hidden_layers": NUM_LAYERS, **overrides})
    model.set_attn_implementation("eager")
    return model


def eager(model):
    model.set_attn_implementation("eager")
    assert model.config._attn_implementation == "eager"
    return model


def measured(model, image_size: int | tuple[int, int] = IMAGE_SIZE) -> float:
    height, width = (image_size, image_size) if isinstance(image_size, int) else image_size
    pixel_values = torch.randn(2, 3, height, width, generator=torch.Generator().manual_seed(0))
    return flops.measured_macs(eager(model), pixel_values)


def assert_within_1_percent(analytic: int, counted: float) -> None:
    assert counted > 0
    assert analytic == pytest.approx(counted, rel=0.01), f"analytic {analytic} vs FlopCounterMode {counted}"


def random_architecture(seed: int, num_layers: int = NUM_LAYERS) -> Architecture:
    """A random architecture; block 0 always keeps no heads, and from seed 1 on block 1 is removed."""
    rng = random.Random(seed)
    layers = []
    for index in range(num_layers):
        heads = [] if index == 0 else sorted(rng.sample(range(NUM_HEADS), rng.randint(0, NUM_HEADS)))
        qk_dim, v_dim = rng.randint(1, HEAD_DIM), rng.randint(1, HEAD_DIM)
        layers.append(
            LayerArchitecture(
                heads=heads,
                qk_channels=[sorted(rng.sample(range(HEAD_DIM), qk_dim)) for _ in heads],
                v_channels=[sorted(rng.sample(range(HEAD_DIM), v_dim)) for _ in heads],
                mlp_neurons=sorted(rng.sample(range(INTERMEDIATE), rng.choice([0, rng.randint(1, INTERMEDIATE)]))),
                keep_block=not (index == 1 and seed > 0),
            )
        )
    hidden = sorted(rng.sample(range(HIDDEN), rng.randint(1, HIDDEN)))
    return Architecture(layers=layers, hidden_channels=hidden)


ARCH_SEEDS = [0, 1, 2, 3]


# ----------------------------------------------------------------------------------------------------------------------
# Published figures, from configs alone
# ----------------------------------------------------------------------------------------------------------------------


def deit_shaped_config(hidden_size: int, num_heads: int, **overrides) -> ViTConfig:
    return ViTConfig(
        **{
            "hidden_size": hidden_size,
            "num_attention_heads": num_heads,
            "num_hidden_layers": 12,
            "intermediate_size": 4 * hidden_size,
            "image_size": 224,
            "patch_size": 16,
            "num_labels": 1000,
            **overrides,
        }
    )


@pytest.mark.parametrize(
    ("hidden_size", "num_heads", "gmacs"),
    [
        pytest.param(192, 3, 1.3, id="DeiT-T"),
        pytest.param(384, 6, 4.6, id="DeiT-S"),
        pytest.param(768, 12, 17.6, id="DeiT-B"),
    ],
)
def test_published_deit_macs_from_config(hidden_size, num_heads, gmacs):
    config = deit_shaped_config(hidden_size, num_heads)
    macs = flops.count_macs(config)
    assert isinstance(macs, int)
    assert round(macs / 1e9, 1) == gmacs
    assert flops.dense_macs(config) == macs
    assert flops.architecture_macs(config, Architecture.full(12, num_heads, 64, 4 * hidden_size, hidden_size)) == macs


def test_deit_s_shaped_vit_at_224_matches_flop_counter():
    config = deit_shaped_config(384, 6, attn_implementation="eager")
    torch.manual_seed(0)
    model = ViTForImageClassification(config).eval()
    pixel_values = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    counted = flops.measured_macs(eager(model), pixel_values)
    assert_within_1_percent(flops.count_macs(model), counted)
    assert round(counted / 1e9, 1) == 4.6


def test_larger_input_costs_more_per_token_pair():
    """Sanity of the geometry: 384 px DeiT-S has 577 tokens, attention grows quadratically."""
    small, large = deit_shaped_config(384, 6), deit_shaped_config(384, 6, image_size=384)
    assert flops.geometry(large).tokens == 24 * 24 + 1
    assert flops.count_macs(large) > flops.count_macs(small) * (577 / 197)
    assert flops.count_macs(small, image_size=384) == flops.count_macs(large)


# ----------------------------------------------------------------------------------------------------------------------
# Cross-check with FlopCounterMode
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", MODEL_KINDS)
def test_dense_tiny_models_match_flop_counter(kind):
    model = dense(kind)
    assert_within_1_percent(flops.count_macs(model), measured(model))


def test_deit_with_teacher_counts_both_heads():
    model = dense("deit-teacher")
    one_head = dense("deit")
    assert flops.count_macs(model) - flops.count_macs(one_head) == HIDDEN * model.config.num_labels
    # The config alone cannot tell that there are two heads (documented: pass the model).
    assert flops.count_macs(model.config) == flops.count_macs(one_head)


def test_deit_has_one_more_token_than_vit():
    assert flops.geometry(dense("deit")).tokens == flops.geometry(dense("vit")).tokens + 1


@pytest.mark.parametrize("kind", MODEL_KINDS)
@pytest.mark.parametrize("seed", ARCH_SEEDS)
def test_exported_models_match_flop_counter(kind, seed):
    architecture = random_architecture(seed)
    compressed = export_compressed_model(randomize_parameters(dense(kind), seed=seed), architecture)
    config = compressed.config
    assert config.layers[0]["num_heads"] == 0  # a 0-head block is counted too
    assert len(config.layers) == (NUM_LAYERS if seed == 0 else NUM_LAYERS - 1)
    analytic = flops.count_macs(compressed)
    assert_within_1_percent(analytic, measured(compressed))
    assert analytic < flops.count_macs(dense(kind))


@pytest.mark.parametrize("kind", MODEL_KINDS)
@pytest.mark.parametrize("seed", ARCH_SEEDS + [10, 11, 12])
def test_architecture_macs_equal_exported_model_macs(kind, seed):
    model = dense(kind)
    architecture = random_architecture(seed)
    exported = export_compressed_model(model, architecture)
    assert flops.architecture_macs(model, architecture) == flops.count_macs(exported)
    # The Geometry form gives the same figure.
    assert flops.architecture_macs(flops.geometry(model), architecture) == flops.architecture_macs(model, architecture)


@pytest.mark.parametrize("kind", MODEL_KINDS)
def test_full_architecture_macs_equal_dense_macs(kind):
    model = dense(kind)
    full = Architecture.full(NUM_LAYERS, NUM_HEADS, HEAD_DIM, INTERMEDIATE, HIDDEN)
    assert flops.architecture_macs(model, full) == flops.count_macs(model)
    assert flops.count_macs(export_compressed_model(model, full)) == flops.count_macs(model)


@pytest.mark.parametrize("image_size", [24, (16, 28)], ids=["24px", "16x28px"])
def test_count_macs_at_another_resolution(image_size):
    model = dense("vit")  # built for 16 px
    other = dense("vit", image_size=image_size)
    analytic = flops.count_macs(model, image_size=image_size)
    assert analytic == flops.count_macs(other)
    assert analytic != flops.count_macs(model)
    assert_within_1_percent(analytic, measured(other, image_size))


@pytest.mark.parametrize("kind", ["vit", "deit-teacher"])
def test_count_macs_of_exported_model_at_another_resolution(kind):
    architecture = random_architecture(seed=2)
    compressed_16 = export_compressed_model(dense(kind), architecture)
    compressed_24 = export_compressed_model(dense(kind, image_size=24), architecture)
    analytic = flops.count_macs(compressed_16, image_size=24)
    assert analytic == flops.count_macs(compressed_24)
    assert analytic == flops.architecture_macs(dense(kind), architecture, image_size=24)
    assert_within_1_percent(analytic, measured(compressed_24, 24))


def test_measured_macs_leaves_parameters_trainable():
    model = dense("vit")
    model.classifier.weight.requires_grad_(False)
    flags = {name: parameter.requires_grad for name, parameter in model.named_parameters()}
    measured(model)
    assert {name: parameter.requires_grad for name, parameter in model.named_parameters()} == flags


# ----------------------------------------------------------------------------------------------------------------------
# The differentiable form
# ----------------------------------------------------------------------------------------------------------------------


def test_macs_from_widths_gradient_is_the_analytic_coefficient():
    geo = flops.geometry(dense("vit"))
    tokens = geo.tokens
    as_leaf = lambda value: torch.tensor(float(value), dtype=torch.float64, requires_grad=True)  # noqa: E731
    hidden = as_leaf(20)
    qk = [as_leaf(w) for w in (12, 0, 32)]
    v = [as_leaf(w) for w in (6, 0, 9)]
    mlp = [as_leaf(w) for w in (40, 7, 0)]
    run = [as_leaf(r) for r in (1.0, 0.25, 0.5)]

    total = flops.macs_from_widths(geo, hidden, qk, v, mlp, run_weights=run)
    assert isinstance(total, torch.Tensor) and total.requires_grad
    total.backward()

    D = 20.0
    for i in range(3):
        r = run[i].item()
        assert mlp[i].grad.item() == pytest.approx(r * 2 * tokens * D)
        assert qk[i].grad.item() == pytest.approx(r * (2 * tokens * D + tokens**2))
        assert v[i].grad.item() == pytest.approx(r * (2 * tokens * D + tokens**2))
        block = flops.block_macs(tokens, D, qk[i].item(), v[i].item(), mlp[i].item())
        assert run[i].grad.item() == pytest.approx(block)
    per_block_hidden = [
        tokens * (2 * qk[i].item() + v[i].item()) + tokens * v[i].item() + 2 * tokens * mlp[i].item() for i in range(3)
    ]
    expected_hidden = (
        geo.num_patches * geo.patch_dim
        + geo.num_heads_out * geo.num_labels
        + sum(run[i].item() * per_block_hidden[i] for i in range(3))
    )
    assert hidden.grad.item() == pytest.approx(expected_hidden)


def test_macs_from_widths_passes_gradcheck():
    geo = flops.geometry(dense("deit-teacher"))

    def total(hidden, widths, runs):
        qk, v, mlp = widths.reshape(3, NUM_LAYERS)
        return flops.macs_from_widths(geo, hidden, list(qk), list(v), list(mlp), run_weights=list(runs)) / 1e4

    generator = torch.Generator().manual_seed(0)
    inputs = (
        torch.tensor(17.5, dtype=torch.float64, requires_grad=True),
        (torch.rand(3 * NUM_LAYERS, generator=generator, dtype=torch.float64) * 30).requires_grad_(),
        torch.rand(NUM_LAYERS, generator=generator, dtype=torch.float64).requires_grad_(),
    )
    assert torch.autograd.gradcheck(total, inputs)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.int64])
@pytest.mark.parametrize("kind", MODEL_KINDS)
@pytest.mark.parametrize("seed", [0, 1, 3])
def test_macs_from_integer_valued_tensors_equal_the_int_figure(dtype, kind, seed):
    model = dense(kind)
    architecture = random_architecture(seed)
    geo = flops.geometry(model)
    kept = architecture.kept_layers
    as_tensor = lambda values: [torch.tensor(value, dtype=dtype) for value in values]  # noqa: E731
    result = flops.macs_from_widths(
        geo,
        torch.tensor(len(architecture.hidden_channels), dtype=dtype),
        as_tensor([layer.num_heads * layer.qk_head_dim for layer in kept]),
        as_tensor([layer.num_heads * layer.v_head_dim for layer in kept]),
        as_tensor([layer.intermediate_size for layer in kept]),
    )
    assert isinstance(result, torch.Tensor)
    assert result.item() == flops.architecture_macs(model, architecture)

    # Removed blocks as run weights 0 (what block skipping's expected MACs do) give the same figure.
    all_layers = architecture.layers
    with_runs = flops.macs_from_widths(
        geo,
        torch.tensor(len(architecture.hidden_channels), dtype=dtype),
        as_tensor([len(layer.heads) * len(layer.qk_channels[0]) if layer.heads else 0 for layer in all_layers]),
        as_tensor([len(layer.heads) * len(layer.v_channels[0]) if layer.heads else 0 for layer in all_layers]),
        as_tensor([len(layer.mlp_neurons) for layer in all_layers]),
        run_weights=as_tensor([int(layer.keep_block) for layer in all_layers]),
    )
    assert with_runs.item() == flops.architecture_macs(model, architecture)
