"""The search plots (`publishing.report`): drawn from real short runs of both methods, inspected as matplotlib
figures (panels, axis labels, legends, final widths), and tolerant of sparse or partial histories."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import NUM_LABELS, make_vit_classifier
from matplotlib.figure import Figure
from transformers import TrainingArguments

from hf_vit_compress.config import CompressionConfig
from hf_vit_compress.publishing.report import PLOT_FILES, plot_search, search_figure
from hf_vit_compress.training.trainer import CompressionTrainer


def _dataset(size: int = 32) -> list[dict]:
    generator = torch.Generator().manual_seed(0)
    return [{"pixel_values": torch.randn(3, 16, 16, generator=generator), "labels": i % NUM_LABELS}
            for i in range(size)]


def _short_run(method: str, output_dir) -> tuple:
    """A 24-step run (search for the first 16) of the tiny ViT (2 blocks): history, target, final architecture."""
    args = TrainingArguments(str(output_dir), max_steps=24, per_device_train_batch_size=8, learning_rate=1e-3,
                             save_strategy="no", report_to=[], use_cpu=True, remove_unused_columns=False,
                             disable_tqdm=True, seed=0, logging_steps=50)
    config = CompressionConfig(method=method, target_flops=0.5, search_fraction=16 / 24)
    trainer = CompressionTrainer(model=make_vit_classifier(), args=args, compression_config=config,
                                 train_dataset=_dataset())
    trainer.train()
    architecture = trainer.method.export_architecture().summary()
    return method, trainer.compression_history, config.target_ratio(trainer.method.dense_macs), architecture


@pytest.fixture(scope="module")
def ofb_run(tmp_path_factory):
    return _short_run("ofb", tmp_path_factory.mktemp("ofb"))


@pytest.fixture(scope="module")
def uvc_run(tmp_path_factory):
    return _short_run("uvc", tmp_path_factory.mktemp("uvc"))


@pytest.fixture(params=["ofb", "uvc"])
def run(request):
    return request.getfixturevalue(f"{request.param}_run")


def _visible(figure: Figure):
    return [axis for axis in figure.axes if axis.get_visible()]


def _titles(figure: Figure) -> list[str]:
    return [axis.get_title() for axis in _visible(figure)]


def test_every_panel_is_labelled_and_no_legend_covers_a_curve(run):
    method, history, target, architecture = run
    figure = search_figure(history, method, target_ratio=target, architecture=architecture)
    assert isinstance(figure, Figure)
    panels = _visible(figure)
    # OFB: MACs, schedules, candidates, embedding + one panel per attention / MLP module (2 blocks); UVC: 2 x 3.
    assert len(panels) == (4 + 2 * 2 if method == "ofb" else 6)
    for axis in panels:
        assert axis.get_ylabel(), f"panel {axis.get_title()!r} has no y label"
        assert axis.get_title()
        assert axis.get_legend() is None  # one legend for the figure, outside the panels
        assert axis.lines, f"panel {axis.get_title()!r} is empty"
    assert sum(axis.get_xlabel() == "optimizer step" for axis in panels) == 4 if method == "ofb" else 3
    assert len(figure.legends) == 1 and figure.legends[0].get_texts()
    assert figure.get_suptitle()


def test_ofb_plot_shows_macs_against_the_target_and_marks_the_final_widths(ofb_run):
    method, history, target, architecture = ofb_run
    figure = search_figure(history, method, target_ratio=target, architecture=architecture)
    macs = next(axis for axis in _visible(figure) if axis.get_title() == "MACs vs target")
    assert macs.get_ylabel() == "fraction of dense MACs"
    target_lines = [line for line in macs.lines if np.allclose(line.get_ydata(), target)]
    assert target_lines, "no target line"
    # The final widths are named in the titles (from the architecture) ...
    layer = architecture["layers"][0]
    assert f"attn.0 -> {layer['num_heads']} heads x {layer['qk_head_dim']}" in _titles(figure)
    assert f"mlp.1 -> {architecture['layers'][1]['intermediate_size']} units" in _titles(figure)
    assert f"embed -> {architecture['hidden_size']} channels" in _titles(figure)
    # ... and marked: the decided kept fraction is its own series, not a jump at the end of V's line.
    labels = {label for axis in _visible(figure) for label in axis.get_legend_handles_labels()[1]}
    assert any(label.startswith("decided width") for label in labels)
    for axis in _visible(figure):
        if axis.get_title().startswith("mlp.0"):
            v_line = next(line for line in axis.lines if line.get_label().startswith("V (mean)"))
            decided = next(line for line in axis.lines if line.get_label().startswith("decided width"))
            recorded = sum("sparsity/mlp.0" in entry for entry in history)
            assert len(v_line.get_xdata()) + len(decided.get_xdata()) == recorded  # each point on one of the two
            assert len(decided.get_xdata()) >= 1
            assert decided.get_ydata()[-1] == pytest.approx(architecture["layers"][0]["intermediate_size"] / 64)


def test_uvc_plot_smooths_the_widths_and_shows_the_skip_probabilities(uvc_run):
    method, history, _, architecture = uvc_run
    figure = search_figure(history, method, architecture=architecture)
    heads = next(axis for axis in _visible(figure) if axis.get_title().startswith("kept heads per block"))
    raw = np.array([entry["heads/0"] for entry in history if "heads/0" in entry])
    smoothed = heads.lines[0].get_ydata()
    assert len(smoothed) == len(raw) and smoothed.min() >= raw.min() and smoothed.max() <= raw.max()
    exported = [line for line in heads.lines if line.get_marker() == "D"]
    assert [line.get_ydata()[0] for line in exported] == [layer["num_heads"] for layer in architecture["layers"]]
    skip = next(axis for axis in _visible(figure) if axis.get_title().startswith("skip probability"))
    assert skip.get_yscale() == "log"
    low, high = skip.get_ylim()
    curves = [line for line in skip.lines if line.get_label().startswith("block")]
    assert len(curves) == 2 and all(low <= line.get_ydata().min() and line.get_ydata().max() <= high
                                    for line in curves)


def test_the_plot_is_saved_as_a_png(run, tmp_path):
    method, history, target, architecture = run
    path = plot_search(history, method, tmp_path / PLOT_FILES[method], target_ratio=target, architecture=architecture)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 20_000


def test_sparse_partial_and_empty_histories_still_plot(run):
    """Recorded every 7th step, without some keys, or not at all: the figure is drawn, missing series left out."""
    method, history, target, _ = run
    sparse = [entry for index, entry in enumerate(history) if index % 7 == 0]
    partial = [{key: value for key, value in entry.items() if not key.startswith(("importance/", "heads/"))}
               for entry in sparse]
    for variant in (sparse, partial, []):
        figure = search_figure(variant, method, target_ratio=target)
        assert isinstance(figure, Figure) and figure.get_suptitle()


def test_an_unknown_method_is_an_error():
    with pytest.raises(ValueError, match="method='abc'"):
        search_figure([], "abc")
