"""recipes/*.yaml hold the papers' settings, the loader rejects unknown keys (naming them and the allowed ones),
overrides follow one documented scheme, and the accelerate config is one accelerate reads."""

from __future__ import annotations

from pathlib import Path

import pytest

from hf_vit_compress.cli.recipes import (
    DataArguments,
    ModelArguments,
    apply_overrides,
    build_setup,
    load_recipe,
    parse_overrides,
    parse_value,
    setup_from_args,
    validate_recipe,
)

REPO = Path(__file__).resolve().parents[2]
ON_CPU = ["--training.use_cpu", "true"]  # the recipes ask for bf16, which TrainingArguments checks for a GPU

#: recipe -> (model id, method, budget as a fraction of the dense MACs, search epochs)
PUBLISHED = {
    "deit_tiny_ofb": ("facebook/deit-tiny-patch16-224", "ofb", 0.5, 100),
    "deit_small_ofb": ("facebook/deit-small-patch16-224", "ofb", 0.37, 100),  # 1.7 G of 4.6 G
    "deit_base_ofb": ("facebook/deit-base-patch16-224", "ofb", 0.495, 100),  # 8.7 G of 17.6 G
    "deit_tiny_uvc": ("facebook/deit-tiny-patch16-224", "uvc", 0.5, 30),
    "deit_small_uvc": ("facebook/deit-small-patch16-224", "uvc", 0.504, 30),
    "deit_base_uvc": ("facebook/deit-base-patch16-224", "uvc", 0.5, 30),
}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_recipe_holds_the_papers_settings(name):
    model_id, method, budget, epochs = PUBLISHED[name]
    setup = setup_from_args(REPO / "hf_vit_compress" / "recipes" / f"{name}.yaml", ON_CPU)
    training, compression = setup.training, setup.compression
    assert setup.model.model_name_or_path == model_id
    assert (setup.data.dataset_name, setup.data.streaming) == ("ILSVRC/imagenet-1k", True)
    assert (setup.data.image_column, setup.data.label_column) == ("image", "label")
    assert (setup.data.train_split, setup.data.eval_split, setup.data.num_train_examples) == (
        "train", "validation", 1281167)
    assert compression.method == method and compression.target_flops == pytest.approx(budget)
    assert compression.search_fraction == 1.0
    assert training.num_train_epochs == epochs
    # effective batch 1024 on the 8 GPUs of recipes/accelerate_multi_gpu.yaml
    assert training.per_device_train_batch_size * training.gradient_accumulation_steps * 8 == 1024
    assert training.lr_scheduler_type.value == "cosine" and training.label_smoothing_factor == 0.1
    assert training.bf16 and not training.fp16
    assert training.ddp_find_unused_parameters is False
    assert training.remove_unused_columns is False
    assert training.accelerator_config.dispatch_batches is False
    if method == "ofb":
        ofb = compression.ofb
        assert training.learning_rate == 1e-3 and training.max_grad_norm == 0.0
        assert (ofb.arch_lr, ofb.arch_betas, ofb.arch_weight_decay, ofb.decoder_lr) == (1e-3, (0.5, 0.999), 1e-3,
                                                                                         1e-3)
        assert ofb.warmup_fraction == 0.2 and ofb.pmim and ofb.eliminations_per_epoch == 3.0
        assert ofb.budget_control == "paper"  # the paper's FLOPs loss, not the library's default projection
        assert (ofb.lambda_start, ofb.lambda_end, ofb.module_loss_weight, ofb.flops_loss_weight) == (0.99, 0.1, 0.5,
                                                                                                     5.0)
    else:
        uvc = compression.uvc
        assert (training.learning_rate, training.weight_decay, training.max_grad_norm) == (1e-4, 0.05, 1.0)
        assert uvc.skip_warmup_fraction * epochs == pytest.approx(5, abs=1e-3)  # 5 of 30 epochs
        assert training.warmup_steps * epochs == pytest.approx(5, abs=1e-3)
        assert (compression.distillation_alpha, compression.distillation_temperature) == (0.1, 1.0)
        assert (uvc.gumbel_tau, uvc.counts_lr, uvc.theta_lr, uvc.dual_lr, uvc.dual_init) == (0.5, 0.02, 0.1, 1e-4,
                                                                                                1e-3)
        assert uvc.counts_space == "fraction"
        assert uvc.prune_hidden is False  # the paper's search space, not the library's default residual-width search


def test_recipes_resolve_by_name_and_every_file_is_valid():
    names = sorted(path.stem for path in (REPO / "hf_vit_compress" / "recipes").glob("deit_*.yaml"))
    assert names == sorted(PUBLISHED)
    assert load_recipe("deit_small_ofb") == load_recipe(REPO / "hf_vit_compress" / "recipes" / "deit_small_ofb.yaml")


def test_yaml_floats_in_exponent_notation_are_floats():
    assert parse_value("1e-3") == 0.001 and isinstance(parse_value("5E4"), float)
    assert parse_value("5") == 5 and parse_value("true") is True and parse_value("null") is None
    assert parse_value("[0.25, 0.5]") == [0.25, 0.5] and parse_value("cosine") == "cosine"


@pytest.mark.parametrize(
    "recipe, message",
    [
        ({"optimizer": {}}, "unknown recipe key 'optimizer'"),
        ({"model": {"name": "x"}}, "unknown recipe key 'model.name'"),
        ({"data": {"dataset": "x"}}, "unknown recipe key 'data.dataset' (did you mean 'dataset_name'?)"),
        ({"compression": {"target": 0.5}}, "unknown recipe key 'compression.target'"),
        ({"compression": {"ofb": {"alpha_lr": 1}}}, "unknown recipe key 'compression.ofb.alpha_lr'"),
        ({"training": {"epochs": 3}}, "unknown recipe key 'training.epochs'"),
        ({"compression": {"target_flops": "half"}}, "'compression.target_flops': expected a number"),
        ({"compression": {"ofb": {"pmim": "yes"}}}, "'compression.ofb.pmim': expected true or false"),
        ({"compression": {"ofb": {"arch_betas": [0.5]}}}, "'compression.ofb.arch_betas': expected 2 values"),
        ({"compression": []}, "recipe section 'compression' must be a mapping"),
        (["model"], "a recipe is a YAML mapping"),
    ],
)
def test_bad_recipes_name_the_key_and_the_allowed_ones(recipe, message):
    with pytest.raises(ValueError) as error:
        validate_recipe(recipe)
    assert message in str(error.value)
    if "unknown recipe key" in message and "training" not in message:
        assert "allowed" in str(error.value)


def test_unknown_key_in_a_recipe_file_names_the_file(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("compression:\n  method: ofb\n  ofb:\n    arch_lrr: 0.1\n")
    with pytest.raises(ValueError, match=r"r\.yaml: unknown recipe key 'compression\.ofb\.arch_lrr'.*'arch_lr'"):
        load_recipe(path)


def test_override_scheme():
    tokens = ["--compression.target_flops", "0.4", "--compression.ofb.arch_betas", "0.6", "0.99",
              "--training.max_steps=5", "--max-grad-norm", "0.5", "--data.train_files", "a.parquet", "b.parquet",
              "--bf16", "--data.eval_split", "null", "--target_gmacs", "2.5"]
    overrides = parse_overrides(tokens)
    assert overrides[0] == ("compression.target_flops", ["0.4"])
    assert overrides[2] == ("training.max_steps", ["5"])
    assert overrides[3] == ("max_grad_norm", ["0.5"])
    assert overrides[5] == ("bf16", [])
    recipe = apply_overrides(load_recipe("deit_small_ofb"), overrides)
    setup = build_setup(apply_overrides(recipe, parse_overrides(ON_CPU)))
    assert setup.compression.target_flops == 0.4 and setup.compression.target_gmacs == 2.5
    assert setup.compression.ofb.arch_betas == (0.6, 0.99)
    assert setup.compression.ofb.arch_lr == 1e-3  # untouched recipe values stay
    assert setup.training.max_steps == 5 and setup.training.max_grad_norm == 0.5 and setup.training.bf16
    assert setup.data.train_files == ["a.parquet", "b.parquet"] and setup.data.eval_split is None
    assert setup.training.learning_rate == 1e-3  # from the recipe's "1.0e-3", typed by HfArgumentParser


def test_argument_dataclasses_share_no_field_names_with_training_arguments():
    """Bare --name overrides are looked up across sections: the names must be unambiguous."""
    from dataclasses import fields

    from transformers import TrainingArguments

    from hf_vit_compress import CompressionConfig

    groups = [{f.name for f in fields(cls)} for cls in (ModelArguments, DataArguments, TrainingArguments,
                                                        CompressionConfig)]
    for i, first in enumerate(groups):
        for second in groups[i + 1:]:
            assert not first & second


def test_accelerate_config_is_what_accelerate_reads():
    from accelerate.commands.config.config_args import ClusterConfig

    config = ClusterConfig.from_yaml_file(str(REPO / "hf_vit_compress" / "recipes" / "accelerate_multi_gpu.yaml"))
    assert config.num_processes == 8 and config.num_machines == 1
    assert str(config.distributed_type).endswith("MULTI_GPU") and str(config.mixed_precision) == "bf16"
    assert config.use_cpu is False

