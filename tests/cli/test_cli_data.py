"""`hf-vit-compress train` on local data as a newcomer runs it: the epoch length comes from the data (not from the
recipe's ImageNet count), dataloader workers fit the machine, and `--help` documents every field.

Reuses test_cli.py's tiny model and parquet shards (2 train shards of 8 images, 1 validation shard of 4).
"""

from __future__ import annotations

import dataclasses
import json
import logging

import pytest
from conftest import tiny_overrides
from transformers import TrainingArguments

from hf_vit_compress.cli import main, runner
from hf_vit_compress.cli.recipe_help import docstring_arguments, nested_sections
from hf_vit_compress.cli.recipes import DataArguments, ModelArguments
from hf_vit_compress.config import CompressionConfig

TRAIN_EXAMPLES = 16  # the two train shards


def _report(output_dir):
    return json.loads((output_dir / "compression_report.json").read_text())


def test_a_local_parquet_stream_is_counted_and_the_recipes_imagenet_count_is_replaced(assets, tmp_path,  # noqa: F811
                                                                                        caplog):
    """The issue's case: deit_small_ofb streams local parquet shards but keeps `num_train_examples: 1281167`; one
    epoch must be the shards' 16 rows (4 steps of 4), not 320,292 steps, and a warning says so."""
    output_dir = tmp_path / "out"
    with caplog.at_level(logging.WARNING, logger="hf_vit_compress.cli.runner"):
        code = main(["train", "--recipe", "deit_small_ofb", *tiny_overrides(assets, output_dir),
                     "--training.num_train_epochs", "1"])
    assert code == 0
    report = _report(output_dir)
    assert report["recipe"]["data"]["num_train_examples"] == 1281167  # the recipe's value was in force ...
    assert report["num_train_examples"] == TRAIN_EXAMPLES  # ... and the data's size was used
    assert report["steps_per_epoch"] == 4 and report["steps"] == 4
    # the search plot and its numbers beside the report
    assert report["search_plot"] == str(output_dir / "bimask_evolution.png")
    assert (output_dir / "bimask_evolution.png").read_bytes()[:4] == b"\x89PNG"
    assert json.loads((output_dir / "history.json").read_text())[-1]["step"] == 4
    warnings = [r.getMessage() for r in caplog.records if "num_train_examples" in r.getMessage()]
    assert len(warnings) == 1
    assert "data.num_train_examples=1281167 disagrees" in warnings[0] and f"has {TRAIN_EXAMPLES}" in warnings[0]


def test_map_style_data_uses_its_length_and_the_worker_count_is_capped(assets, tmp_path, monkeypatch,  # noqa: F811
                                                                       caplog):
    monkeypatch.setattr(runner, "available_cpus", lambda: 1)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    output_dir = tmp_path / "out"
    with caplog.at_level(logging.WARNING, logger="hf_vit_compress.cli.runner"):
        code = main(["train", "--recipe", "deit_small_ofb", *tiny_overrides(assets, output_dir),
                     "--data.streaming", "false", "--data.num_train_examples", "1000",
                     "--training.num_train_epochs", "1", "--training.dataloader_num_workers", "8"])
    assert code == 0
    report = _report(output_dir)
    assert report["num_train_examples"] == TRAIN_EXAMPLES and report["steps"] == 4
    assert report["recipe"]["training"]["dataloader_num_workers"] == 1  # as run: capped at the one core
    messages = [r.getMessage() for r in caplog.records]
    assert any("data.num_train_examples=1000 disagrees" in m for m in messages)
    assert any("training.dataloader_num_workers=8 capped at 1" in m for m in messages)


def test_max_train_samples_caps_the_counted_length(assets):  # noqa: F811
    data = DataArguments(dataset_name="parquet", train_files=assets["train"], streaming=True, max_train_samples=5)
    assert runner.training_examples(object(), data) == 5  # object(): a stream without len() or metadata
    data.max_train_samples = None
    assert runner.training_examples(object(), data) == TRAIN_EXAMPLES
    data.train_files = ["/no/such/train-*.parquet"]
    assert runner.training_examples(object(), data) is None


@pytest.mark.parametrize("cores, local_processes, requested, expected", [
    (2, 1, 8, 2), (2, 1, 1, 1), (16, 8, 8, 2), (4, 8, 2, 0), (8, 1, 0, 0),
])
def test_dataloader_workers_are_capped_at_the_cores_of_each_local_process(monkeypatch, caplog, cores,
                                                                          local_processes, requested, expected):
    monkeypatch.setattr(runner, "available_cpus", lambda: cores)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(local_processes))
    args = TrainingArguments("unused", dataloader_num_workers=requested, use_cpu=True, report_to=[],
                             dataloader_prefetch_factor=2 if requested else None)
    with caplog.at_level(logging.WARNING, logger="hf_vit_compress.cli.runner"):
        runner.cap_dataloader_workers(args)
    assert args.dataloader_num_workers == expected
    assert (len(caplog.records) == 1) == (requested > expected)
    if expected == 0:
        assert args.dataloader_prefetch_factor is None  # DataLoader rejects a prefetch factor without workers


def _fields(cls):
    hints = __import__("typing").get_type_hints(cls)
    return [f for f in dataclasses.fields(cls) if f.init and not dataclasses.is_dataclass(hints.get(f.name))]


def test_train_help_lists_every_field_with_its_default_and_help(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--help"])
    assert exit_info.value.code == 0
    lines = capsys.readouterr().out.splitlines()
    nested = [(f"compression.{name}", cls) for name, cls in nested_sections(CompressionConfig).items()]
    assert {"compression.ofb", "compression.uvc"} <= {prefix for prefix, _ in nested}
    sections = [("model", ModelArguments), ("data", DataArguments), ("compression", CompressionConfig), *nested,
                ("training", TrainingArguments)]
    for prefix, cls in sections:
        for field in _fields(cls):
            flag = f"  --{prefix}.{field.name} (default: "
            matching = [line for line in lines if line.startswith(flag)]
            assert len(matching) == 1, f"--{prefix}.{field.name} is not listed once"
            default, _, help_text = matching[0][len(flag):].partition("): ")
            assert default and len(help_text) > 3 and help_text != "(no help)", matching[0]
    by_flag = {line.split(" (default: ")[0].strip(): line for line in lines if " (default: " in line}
    assert "(default: 0.5): the budget as a fraction" in by_flag["--compression.target_flops"]
    assert "(default: null): AdamW settings of the architecture logits alpha." in by_flag["--compression.ofb.arch_lr"]
    assert "(default: [-1, 1])" in by_flag["--compression.uvc.theta_init"]
    assert "(default: required)" in by_flag["--model.model_name_or_path"]
    assert "(default: null)" in by_flag["--data.max_eval_samples"]


def test_every_compression_field_is_documented_in_its_docstring():
    """The help of the compression fields is their `Args:` docstring: a field added without a line there fails."""
    for cls in (CompressionConfig, *nested_sections(CompressionConfig).values()):
        assert {f.name for f in dataclasses.fields(cls)} <= set(docstring_arguments(cls)), cls.__name__
