"""`hf-vit-compress train`: every shipped recipe runs end to end with tiny overrides (a tiny ViT saved to a local
folder, local parquet shards read as a stream, 2 steps), and bad input exits non-zero with one clear line.

No network: the model is built from a config and saved with `save_pretrained`; the data are parquet files written
here.
"""

from __future__ import annotations

import json
import os
import runpy
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import make_pixel_values, tiny_overrides

from hf_vit_compress.cli import main
from hf_vit_compress.modeling import CompressedViTForImageClassification

REPO = Path(__file__).resolve().parents[2]
RECIPES_DIR = REPO / "hf_vit_compress" / "recipes"
RECIPES = sorted(p.stem for p in RECIPES_DIR.glob("deit_*.yaml"))
EXPECTED_RECIPES = [f"deit_{size}_{method}" for method in ("ofb", "uvc") for size in ("tiny", "small", "base")]


def _uvc_unavailable() -> str | None:
    try:
        from hf_vit_compress.methods.uvc.method import UVCMethod  # noqa: F401
    except Exception as error:  # pragma: no cover - only while methods/uvc.py is being written
        return f"methods/uvc.py is not importable yet ({type(error).__name__}: {error})"
    return None


def test_all_six_recipes_ship():
    assert RECIPES == sorted(EXPECTED_RECIPES)


@pytest.mark.parametrize("recipe", EXPECTED_RECIPES)
def test_every_recipe_runs_with_tiny_overrides(recipe, assets, tmp_path, capsys):
    if recipe.endswith("_uvc") and (reason := _uvc_unavailable()):
        pytest.skip(reason)
    output_dir = tmp_path / "out"
    steps = ["--training.max_steps", "2"]
    if recipe == "deit_small_ofb":  # a stream: epochs become steps through its size (counted in the parquet files)
        steps = ["--training.num_train_epochs", "1", "--data.max_train_samples", "8"]
    code = main(["train", "--recipe", recipe, *tiny_overrides(assets, output_dir), *steps])
    assert code == 0
    captured = capsys.readouterr()
    out = captured.out  # the Trainer's log lines, then the CLI's one-line JSON summary
    summary = json.loads(next(line for line in out.splitlines() if line.startswith('{"model"')))
    report = json.loads((output_dir / "compression_report.json").read_text())
    # the final architecture, printed once when the search ended, is the report's
    assert captured.err.count("Final architecture") == 1 and "\n".join(report["architecture_table"]) in captured.err
    assert summary["steps"] == report["steps"] == 2
    if recipe == "deit_small_ofb":
        assert report["steps_per_epoch"] == 2  # ceil(8 examples / batch 4)
    assert report["method"] == recipe.rsplit("_", 1)[1]
    assert report["recipe"]["training"]["bf16"] is True  # the recipe's bf16 ran as is, on CPU
    assert report["compressed_macs"] <= report["target_flops"] * report["dense_macs"] + 1e-6
    assert 0.0 <= report["metrics"]["eval_accuracy"] <= 1.0
    compressed = CompressedViTForImageClassification.from_pretrained(output_dir / "compressed_model").eval()
    with torch.no_grad():
        logits = compressed(pixel_values=make_pixel_values()).logits
    assert logits.shape == (2, 5) and torch.isfinite(logits).all()
    assert json.loads((output_dir / "compressed_model" / "architecture.json").read_text())


@pytest.mark.parametrize(
    "arguments, expected",
    [
        (["--compression.target_flop", "0.4"], "unknown recipe key 'compression.target_flop'"),
        (["--compression.target_flops", "1.5"], "CompressionConfig.target_flops=1.5 is invalid"),
        (["--compression.target_flops", "half"], "'compression.target_flops': expected a number"),
        (["--compression.ofb.arch_lrr", "0.1"], "unknown recipe key 'compression.ofb.arch_lrr'"),
        (["--training.max_stepz", "3"], "unknown recipe key 'training.max_stepz'"),
        (["--max_stepz", "3"], "unknown option --max_stepz (did you mean 'max_steps'?)"),
        (["--training.max_steps", "many"], "invalid int value: 'many'"),
        (["--optimizer.lr", "1"], "unknown option --optimizer.lr"),
        (["stray"], "unexpected argument 'stray'"),
    ],
)
def test_bad_input_exits_2_with_one_line(arguments, expected, capsys):
    code = main(["train", "--recipe", "deit_small_ofb", *arguments])
    captured = capsys.readouterr()
    assert code == 2
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ")
    assert expected in lines[0]


def test_unknown_recipe_and_bad_recipe_file(tmp_path, capsys):
    assert main(["train", "--recipe", "deit_huge_ofb"]) == 2
    assert "recipe 'deit_huge_ofb' not found" in capsys.readouterr().err
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: {model_name_or_path: x}\noptimiser: {lr: 1}\n")
    assert main(["train", "--recipe", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "unknown recipe key 'optimiser'" in err and "allowed top-level keys" in err


def test_budget_out_of_the_search_space_is_one_line(assets, tmp_path, capsys):
    code = main(["train", "--recipe", "deit_small_ofb", *tiny_overrides(assets, tmp_path), "--max_steps", "1",
                 "--compression.target_flops", "0.01"])
    assert code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error")]
    assert len(errors) == 1 and "below the smallest model in the OFB search space" in errors[0]


def test_stream_without_length_or_steps_is_an_error(assets, tmp_path, capsys):
    """A stream whose size nothing tells (here a dataset folder, whose files the CLI does not count; on the Hub, a
    dataset without split metadata) needs a step count or an example count."""
    folder = Path(assets["train"][0]).parent
    code = main(["train", "--recipe", "deit_small_ofb", *tiny_overrides(assets, tmp_path),
                 "--data.dataset_name", str(folder), "--data.train_files", "null", "--data.eval_files", "null",
                 "--data.num_train_examples", "null"])
    assert code == 2
    assert "needs training.max_steps > 0 or data.num_train_examples" in capsys.readouterr().err


def test_demo_subcommand_keeps_its_flags(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["demo", "--help"])
    assert exit_info.value.code == 0
    help_text = capsys.readouterr().out
    for flag in ("--method", "--target-flops", "--seed", "--output-dir", "--dense-epochs", "--search-epochs",
                 "--finetune-epochs", "--batch-size", "--no-progress"):
        assert flag in help_text
    with pytest.raises(SystemExit) as exit_info:
        main(["demo", "--compression.target_flops", "0.4"])  # train-style overrides are not demo flags
    assert exit_info.value.code == 2


def test_python_dash_m_entry_point_reports_bad_input(monkeypatch, capsys):
    """`python -m hf_vit_compress train ...` (what `accelerate launch -m hf_vit_compress` runs on every rank), run
    in-process through runpy (a subprocess would pay the transformers import again)."""
    monkeypatch.setattr(sys, "argv", ["hf_vit_compress", "train", "--recipe", str(RECIPES_DIR / "deit_small_uvc.yaml"),
                                      "--compression.uvc.dual_lrr", "1e-3"])
    sys.modules.pop("hf_vit_compress.__main__", None)
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_module("hf_vit_compress", run_name="__main__")
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: unknown recipe key 'compression.uvc.dual_lrr'")
    assert "'dual_lr'" in err[0]  # the allowed keys are listed


@pytest.mark.slow
def test_accelerate_launch_two_processes(assets, tmp_path):
    """The README's multi-process command, on 2 CPU processes: `accelerate launch --multi_gpu` starts them with
    torchrun (its `--cpu` flag alone starts only one without MPI); `--use_cpu true` makes them gloo CPU ranks."""
    output_dir = tmp_path / "out"
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "-m", "hf_vit_compress", "train", "--recipe", "deit_small_ofb", *tiny_overrides(assets, output_dir),
               "--training.num_train_epochs", "2", "--data.max_train_samples", "8"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((output_dir / "compression_report.json").read_text())
    assert report["steps_per_epoch"] == 1  # ceil(8 examples / (2 processes x batch 4)): both ranks took part
    assert report["steps"] == 2 and report["compressed_macs"] <= report["target_flops"] * report["dense_macs"]
    assert CompressedViTForImageClassification.from_pretrained(output_dir / "compressed_model") is not None


def test_train_takes_a_speed_budget_and_reports_predicted_and_measured_speedup(assets, tmp_path, capsys):
    from conftest import make_vit_classifier, synthetic_latency_table

    table = synthetic_latency_table(make_vit_classifier().config).save(tmp_path / "latency.json")
    output_dir = tmp_path / "out"
    code = main(["train", "--recipe", "deit_tiny_uvc", *tiny_overrides(assets, output_dir), "--training.max_steps",
                 "4", "--compression.target_speedup", "1.2", "--compression.latency.table", str(table),
                 "--compression.latency.repeats", "2"])
    assert code == 0
    summary = json.loads(next(line for line in capsys.readouterr().out.splitlines() if line.startswith('{"model"')))
    report = json.loads((output_dir / "compression_report.json").read_text())
    assert summary["target_speedup"] == pytest.approx(1.2) and summary["target_flops"] is None
    assert summary["predicted_speedup"] >= 1.2 * (1 - 1e-9) and summary["measured_speedup"] > 0
    assert report["speed_budget"]["predicted_ms"] <= report["speed_budget"]["target_ms"] * (1 + 1e-9)
    assert "### Speed budget" in (output_dir / "compressed_model" / "README.md").read_text()
