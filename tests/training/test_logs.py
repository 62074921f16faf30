"""Logs a person can read: the method's weighted loss terms add up to the logged `loss`, what stopped changing with
the search is not logged again after it, the final architecture is logged once as a table (the same one the
report holds), and the progress bar is named by phase."""

from __future__ import annotations

import logging

import pytest
import torch
from conftest import NUM_LABELS, make_vit_classifier
from transformers import ProgressCallback, TrainerCallback, TrainingArguments

from hf_vit_compress.config import CompressionConfig
from hf_vit_compress.publishing.publish import architecture_facts, compression_report
from hf_vit_compress.publishing.report import architecture_table
from hf_vit_compress.surgery.flops import count_macs, count_params
from hf_vit_compress.training.progress import PACKAGE_LOGGER, console_logging
from hf_vit_compress.training.trainer import CompressionTrainer

SEARCH_STEPS, MAX_STEPS, LOGGING_STEPS = 8, 15, 3  # logs at 3, 6 (search), 9 (the search ends at 8), 12, 15
TRAINER_KEYS = {"loss", "grad_norm", "learning_rate", "epoch", "step", "task_loss"}


class Records(logging.Handler):
    """Keeps every record of the package's loggers."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


class BarNames(TrainerCallback):
    """The training bar's name at the start of every step (transformers' ProgressCallback draws the bar)."""

    def __init__(self):
        self.trainer = None
        self.names: dict[int, str] = {}

    def on_step_begin(self, args, state, control, **kwargs):
        bars = [callback.training_bar for callback in self.trainer.callback_handler.callbacks
                if isinstance(callback, ProgressCallback) and callback.training_bar is not None]
        self.names[state.global_step + 1] = bars[0].desc if bars else None


def _dataset(size: int = 32) -> list[dict]:
    generator = torch.Generator().manual_seed(0)
    return [{"pixel_values": torch.randn(3, 16, 16, generator=generator), "labels": i % NUM_LABELS}
            for i in range(size)]


def _run(method: str, output_dir, search_macs_ratio: float | None = None, **config) -> tuple:
    """A 15-step run of the tiny ViT (search: the first 8) with its progress bar on; the package's log records.
    `search_macs_ratio`: pretend the search ended there (for the projection warning)."""
    args = TrainingArguments(str(output_dir), max_steps=MAX_STEPS, per_device_train_batch_size=8,
                             learning_rate=1e-3, logging_steps=LOGGING_STEPS, save_strategy="no", report_to=[],
                             use_cpu=True, remove_unused_columns=False, disable_tqdm=False, seed=0)
    compression = CompressionConfig(method=method, target_flops=0.5, search_fraction=SEARCH_STEPS / MAX_STEPS,
                                    **config)
    bar_names = BarNames()
    trainer = CompressionTrainer(model=make_vit_classifier(), args=args, compression_config=compression,
                                 train_dataset=_dataset(), callbacks=[bar_names])
    bar_names.trainer = trainer
    if search_macs_ratio is not None:
        trainer.method.__dict__["search_macs_ratio"] = lambda: search_macs_ratio
    records, package = Records(), logging.getLogger(PACKAGE_LOGGER)
    level = package.level
    package.addHandler(records)
    package.setLevel(logging.INFO)
    try:
        trainer.train()
    finally:
        package.removeHandler(records)
        package.setLevel(level)
    return trainer, records.records, bar_names.names


@pytest.fixture(scope="module", params=["ofb", "uvc"])
def run(request, tmp_path_factory):
    return _run(request.param, tmp_path_factory.mktemp(request.param))


def _training_logs(trainer) -> dict[int, dict]:
    return {entry["step"]: entry for entry in trainer.state.log_history if "loss" in entry}


# ---------------------------------------------------------------------------------------------------------------
# loss = task_loss + loss/*
# ---------------------------------------------------------------------------------------------------------------
def test_the_logged_loss_is_the_task_loss_plus_the_weighted_terms(run):
    trainer, _, _ = run
    logs = _training_logs(trainer)
    assert sorted(logs) == [3, 6, 9, 12, 15]
    for step, entry in logs.items():
        terms = {key: value for key, value in entry.items() if key.startswith("loss/")}
        assert entry["loss"] == pytest.approx(entry["task_loss"] + sum(terms.values()), rel=1e-5, abs=1e-6), step
        if trainer.compression_config.method == "uvc" or step > 9:
            assert not terms, step  # UVC's loss is its distillation loss; after the search the task loss alone
    if trainer.compression_config.method == "ofb":
        settings = trainer.compression_config.ofb
        search = logs[6]  # every step of this window searched: the terms are the per-step means, weighted
        # the FLOPs loss is the paper's budget control; the default holds the budget by projection, without a loss
        flops = {"loss/flops"} if settings.budget_control == "paper" else set()
        assert set(k for k in search if k.startswith("loss/")) == {"loss/pmim", "loss/one_hot"} | flops
        assert search["loss/one_hot"] == pytest.approx(settings.module_loss_weight * search["module_loss"], rel=1e-5)
        if flops:
            assert search["loss/flops"] == pytest.approx(settings.flops_loss_weight * search["flops_loss"], rel=1e-5)
        assert search["loss/pmim"] == pytest.approx(search["task_loss"], rel=1e-5)  # weight CE / L_rec
        straddling = logs[9]  # steps 7-9: two searched, one fine-tuned, so each term counts 0 on step 9
        assert straddling["loss/one_hot"] == pytest.approx(
            settings.module_loss_weight * straddling["module_loss"] * 2 / 3, rel=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# After the search
# ---------------------------------------------------------------------------------------------------------------
def test_values_that_stopped_changing_are_not_logged_after_the_search(run):
    trainer, _, _ = run
    method = trainer.method
    logs = _training_logs(trainer)
    searched = set(logs[6]) - TRAINER_KEYS
    assert any(key.startswith(("uvc/", "active_candidates/")) for key in searched)
    assert method.search_finished and method.metrics() == {}
    for step in (12, 15):  # fine-tuning windows: the Trainer's own values and the task loss, nothing stale
        assert set(logs[step]) <= TRAINER_KEYS, (step, set(logs[step]) - TRAINER_KEYS)
    # the final architecture's MACs ratio instead, once, in the first log after the search
    logged = {step: entry["compressed_macs_ratio"] for step, entry in logs.items() if "compressed_macs_ratio" in entry}
    assert list(logged) == [9]
    assert logged[9] == pytest.approx(count_macs(trainer.export_compressed_model()) / method.dense_macs)
    # the window that ended the search: the means of its searched steps' loss terms, but no schedule or state
    per_step_terms = {"uvc/ratio", "uvc/budget_dual", "expected_macs_ratio"}  # what `loss()` logs on each step
    assert not set(method.snapshot()) - per_step_terms & set(logs[9])


def test_the_final_architecture_is_logged_once_as_the_reports_table(run):
    trainer, records, _ = run
    tables = [record for record in records if "Final architecture" in record.getMessage()]
    assert len(tables) == 1 and tables[0].levelno == logging.INFO
    message = tables[0].getMessage()
    table = trainer.architecture_table
    assert table and table in message and f"Search finished at step {SEARCH_STEPS}" in message
    report = compression_report(trainer)
    assert architecture_table(report) == table  # counted without exporting = measured on the exported model
    assert report["architecture_table"] == table.splitlines()
    compressed = trainer.export_compressed_model()
    facts = architecture_facts(trainer)
    assert facts["compressed_macs"] == report["compressed_macs"] == count_macs(compressed)
    assert facts["compressed_params"] == report["compressed_params"] == count_params(compressed)
    # what it says: one row per block, the widths kept of the dense ones, MACs before/after the projection
    lines = table.splitlines()
    method = trainer.compression_config.method
    assert lines[0].startswith(f"Final architecture ({method.upper()}): ")
    assert f"residual width {compressed.config.hidden_size}/32" in lines[0]
    rows = [line.split() for line in lines[2:4]]
    for index, (row, layer) in enumerate(zip(rows, compressed.config.layers)):
        assert row[:2] == [str(index), "kept"]
        assert row[2:] == [f"{layer['num_heads']}/4", f"{layer['qk_head_dim']}/8", f"{layer['v_head_dim']}/8",
                           f"{layer['intermediate_size']}/64"]
    search = trainer.search_macs_ratio
    assert search is not None and report["search_macs_ratio"] == search
    end_of_search, final = (next(line for line in lines if line.strip().startswith(name))
                            for name in ("end of search", "final "))
    assert f"{search:.3f}" in end_of_search and "before the final projection" in end_of_search
    ratio = report["compressed_macs_ratio"]
    assert f"{ratio:.3f}" in final and f"moved it by {ratio - search:+.3f}" in final
    assert lines[-2].split()[-2:] == ["0.500", "met"] and lines[-1].startswith("params: ")


def test_the_progress_bar_is_named_by_phase(run):
    trainer, _, names = run
    search = f"{trainer.compression_config.method.upper()} search: "
    assert [names[step] for step in range(1, SEARCH_STEPS + 1)] == [search] * SEARCH_STEPS
    assert [names[step] for step in range(SEARCH_STEPS + 1, MAX_STEPS + 1)] == ["fine-tuning: "] * 7


def test_a_search_that_ended_far_from_the_budget_is_a_warning(tmp_path):
    _, records, _ = _run("ofb", tmp_path, search_macs_ratio=0.9)
    warnings = [record.getMessage() for record in records if record.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert (f"The search ended (end of search, step {SEARCH_STEPS}) at 0.900 of the dense MACs for a budget of "
            "0.500") in warnings[0]
    assert "removed" in warnings[0] and "ofb.flops_loss_weight" in warnings[0]


# ---------------------------------------------------------------------------------------------------------------
# The table and the console, by hand
# ---------------------------------------------------------------------------------------------------------------
FACTS = {
    "method": "uvc",
    "architecture": {"hidden_size": 64, "layers": [
        {"keep_block": True, "num_heads": 3, "qk_head_dim": 16, "v_head_dim": 8, "intermediate_size": 96},
        {"keep_block": False, "num_heads": 0, "qk_head_dim": 0, "v_head_dim": 0, "intermediate_size": 0},
        {"keep_block": True, "num_heads": 0, "qk_head_dim": 0, "v_head_dim": 0, "intermediate_size": 256},
    ]},
    "dense_architecture": {"hidden_size": 64, "num_hidden_layers": 3, "num_attention_heads": 4, "head_dim": 16,
                           "intermediate_size": 256},
    "dense_macs": 3_540_000, "compressed_macs": 1_800_000, "target_flops": 0.5, "search_macs_ratio": 0.52,
    "dense_params": 205_002, "compressed_params": 103_000,
}


def test_architecture_table_by_hand():
    lines = architecture_table(FACTS).splitlines()
    assert lines[0] == "Final architecture (UVC): 2 of 3 blocks kept, residual width 64/64"
    assert [line.split() for line in lines[1:5]] == [
        ["block", "status", "heads", "q/k", "head", "dim", "v", "head", "dim", "MLP", "width"],
        ["0", "kept", "3/4", "16/16", "8/16", "96/256"],
        ["1", "removed", "-", "-", "-", "-"],
        ["2", "kept", "0/4", "-", "-", "256/256"],
    ]
    assert lines[6].split()[:4] == ["dense", "3.54", "M", "1.000"]
    assert lines[7].split()[:5] == ["end", "of", "search", "1.84", "M"]
    assert "0.520" in lines[7]
    assert lines[8].split()[:4] == ["final", "1.80", "M", "0.508"] and "moved it by -0.012" in lines[8]
    assert lines[9].split() == ["target", "1.77", "M", "0.500", "EXCEEDED"]  # 1.80 M > 1.77 M
    assert lines[10] == "params: 103 k of 205 k (0.502 of dense)"
    without = {key: value for key, value in FACTS.items() if key not in ("search_macs_ratio", "dense_params")}
    text = architecture_table(without)
    assert "end of search" not in text and "moved it" not in text and "params" not in text


def test_architecture_table_names_missing_facts():
    with pytest.raises(ValueError, match=r"missing \['dense_macs', 'compressed_macs'\]"):
        architecture_table({"architecture": FACTS["architecture"],
                            "dense_architecture": FACTS["dense_architecture"]})


def test_console_logging_shows_the_package_info_records_only_inside(capsys):
    package_logger = logging.getLogger(f"{PACKAGE_LOGGER}.trainer")
    level = logging.getLogger(PACKAGE_LOGGER).level
    package_logger.info("before")
    with console_logging():
        package_logger.info("the table")
        logging.getLogger("someone.else").info("not ours")
    package_logger.info("after")
    err = capsys.readouterr().err
    assert "the table" in err and "before" not in err and "after" not in err and "not ours" not in err
    assert logging.getLogger(PACKAGE_LOGGER).level == level
