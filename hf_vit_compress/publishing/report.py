"""Plots that explain a search, drawn from `CompressionTrainer.compression_history` (a list of dicts, one per recorded
step, with the keys the method's `snapshot()` gives: `step`, `expected_macs_ratio`, `lambda`, `importance/<module>`,
`sparsity/<module>`, `active_candidates/<module>` for OFB; `uvc/*`, `heads/<i>`, `v_head_dim/<i>`, `mlp_width/<i>`,
`run_probability/<i>` for UVC). Every key is optional and the history may be recorded at any interval: a missing
series leaves its panel empty rather than failing.

`search_figure(...)` returns a `matplotlib.figure.Figure` (shown inline in a notebook); `plot_search(..., path)` saves
it as PNG. The figures are built with matplotlib's object API (no pyplot state, no GUI backend needed).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from ..methods.registry import method_entry, registered_methods

#: file name of the plot per method (the demo and `hf-vit-compress train` write it beside their report)
#: the search plot's file name per built-in method (from the method registry)
PLOT_FILES = {name: method_entry(name).plot_file for name in registered_methods() if method_entry(name).plot_file}
_DECIDED = "black"


def _series(history: Sequence[Mapping], key: str, where=None) -> tuple[np.ndarray, np.ndarray]:
    """(steps, values) of `key` over the entries that have it (and satisfy `where`)."""
    points = [(entry["step"], entry[key]) for entry in history
              if key in entry and "step" in entry and (where is None or where(entry))]
    steps, values = zip(*points) if points else ((), ())
    return np.asarray(steps, dtype=float), np.asarray(values, dtype=float)


def _new_figure(width: float, height: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def _finish(figure, title: str, handles: dict) -> None:
    """Title, and one legend for the whole figure below the panels (a legend inside a panel covers curves)."""
    figure.suptitle(title)
    if handles:
        figure.legend(list(handles.values()), list(handles.keys()), loc="outside lower center",
                      ncol=min(4, len(handles)), fontsize=8, frameon=False)


def _collect(handles: dict, axis) -> None:
    for handle, label in zip(*axis.get_legend_handles_labels()):
        handles.setdefault(label, handle)


def _mark_final_ratio(axis, steps: np.ndarray, ratio: float | None) -> None:
    """The final architecture's MACs ratio as a labelled marker at the last recorded step."""
    if ratio is None or not len(steps):
        return
    axis.plot([steps.max()], [ratio], "D", color=_DECIDED, label="final architecture's MACs / dense")
    axis.annotate(f"{ratio:.3f}", (steps.max(), ratio), textcoords="offset points", xytext=(-4, -12), ha="right",
                  fontsize=8)


def _label_bottom_axes(axes: np.ndarray) -> None:
    """'optimizer step' under the lowest visible panel of every column."""
    for column in range(axes.shape[1]):
        visible = [axis for axis in axes[:, column] if axis.get_visible()]
        if visible:
            visible[-1].set_xlabel("optimizer step")


# ---------------------------------------------------------------------------------------------------------------
# OFB
# ---------------------------------------------------------------------------------------------------------------
def _ofb_modules(history: Sequence[Mapping]) -> list[str]:
    names = {key.split("/", 1)[1] for entry in history for key in entry if key.startswith(("importance/",
                                                                                          "sparsity/"))}
    return sorted(names, key=_module_order)


def _module_order(name: str):
    kind, _, index = name.partition(".")
    return (int(index) if index.isdigit() else -1, kind)


def _decided(module: str):
    """Entries where `module` has one candidate left: its width is decided and V is its 0/1 keep mask."""
    return lambda entry: entry.get(f"active_candidates/{module}") == 1


def _all_decided(modules: list[str]):
    return lambda entry: bool(modules) and all(entry.get(f"active_candidates/{m}") == 1 for m in modules)


def _final_width_label(module: str, architecture: Mapping | None) -> str | None:
    """'3 heads x 10', '224 units', '40 channels' from an `Architecture.summary()` (None without one)."""
    if not architecture:
        return None
    kind, _, index = module.partition(".")
    if kind == "embed":
        return f"{architecture['hidden_size']} channels"
    layers = architecture.get("layers") or []
    if not index.isdigit() or int(index) >= len(layers):
        return None
    layer = layers[int(index)]
    if not layer.get("keep_block", True):
        return "block removed"
    if kind == "attn":
        return f"{layer['num_heads']} heads x {layer['qk_head_dim']}"
    return f"{layer['intermediate_size']} units"


def _plot_ofb_module(axis, history, module: str, architecture: Mapping | None) -> None:
    decided = _decided(module)
    searching = lambda entry: not decided(entry)  # noqa: E731
    axis.plot(*_series(history, f"sparsity/{module}", searching), color="C1",
              label="V (mean): expected kept fraction under p = softmax(alpha)")
    axis.plot(*_series(history, f"importance/{module}"), color="C0", linewidth=1,
              label="S (mean): importance score; it ranks units, its mean moves little")
    steps, kept = _series(history, f"sparsity/{module}", decided)
    if len(steps):
        axis.plot(steps, kept, color=_DECIDED, drawstyle="steps-post", marker="D", markersize=4, markevery=[-1],
                  label="decided width: kept fraction (V is now the 0/1 keep mask)")
        axis.annotate(f"{kept[-1]:.0%}", (steps[-1], kept[-1]), textcoords="offset points", xytext=(-4, 6),
                      ha="right", fontsize=8)
    width = _final_width_label(module, architecture)
    axis.set_title(f"{module} -> {width}" if width else module, fontsize=9)
    axis.set_ylim(-0.02, 1.08)


def ofb_figure(history: Sequence[Mapping], target_ratio: float | None = None, architecture: Mapping | None = None,
               final_macs_ratio: float | None = None, title: str = "OFB search"):
    """OFB's search in one figure.

    Top row: expected MACs (of the bi-masks' expected widths) against the budget, with the decided architecture's
    MACs; the schedules (lambda, the weight of S in the mask m = lambda S + (1 - lambda) V, and PMIM's mask ratio);
    the candidates still in play per module (elimination); the embedding width. Then one panel per attention / MLP
    module, two blocks per row: mean sparsity V (the expected kept fraction) and mean importance S until the width
    is decided, then the kept fraction, marked and labelled with the final width.

    Args:
        history: `CompressionTrainer.compression_history` of an OFB run (or `history.json`).
        target_ratio: the budget as a fraction of the dense MACs (`config.target_ratio(dense_macs)`), or of the dense
            predicted ms under a speed budget; drawn when given.
        architecture: `Architecture.summary()` of the result (the report's `architecture`); names the final widths
            in the panel titles when given.
        final_macs_ratio: the exported model's MACs / dense MACs (the report's `compressed_macs_ratio`); default:
            the decided architecture's expected MACs, when the history recorded it (after the search).
        title: the figure's title.

    Returns:
        `matplotlib.figure.Figure`.
    """
    modules = _ofb_modules(history)
    blocks = [m for m in modules if m != "embed"]
    block_rows = (len(blocks) + 3) // 4
    figure = _new_figure(14, 2.7 * (1 + block_rows))
    axes = np.atleast_2d(figure.subplots(1 + block_rows, 4, sharex=True, squeeze=False))
    handles: dict = {}

    macs = axes[0, 0]
    everything_decided = _all_decided(modules)
    # a speed budget logs its ratio in predicted ms (`expected_latency_ratio`)
    latency = any("expected_latency_ratio" in entry for entry in history)
    key, unit = ("expected_latency_ratio", "latency") if latency else ("expected_macs_ratio", "MACs")
    macs.plot(*_series(history, key, lambda e: not everything_decided(e)), color="C2",
              label=f"expected {unit} / dense (search)")
    steps, decided = _series(history, key, everything_decided)
    if final_macs_ratio is None and len(decided):
        final_macs_ratio = decided[-1]
    _mark_final_ratio(macs, _series(history, key)[0], final_macs_ratio)
    if target_ratio is not None:
        macs.axhline(target_ratio, color="grey", linestyle="--", label=f"target ({target_ratio:.3g} of dense)")
    macs.set_title(f"{unit} vs target", fontsize=9)
    macs.set_ylabel(f"fraction of dense {'predicted ms' if latency else 'MACs'}")

    schedule = axes[0, 1]
    schedule.plot(*_series(history, "lambda"), ":", color="grey", label="lambda: weight of S in the mask")
    schedule.plot(*_series(history, "pmim_mask_ratio", lambda e: not everything_decided(e)), color="C4",
                  label="PMIM: share of patches masked")
    schedule.set_title("schedules", fontsize=9)
    schedule.set_ylabel("value")
    schedule.set_ylim(-0.02, 1.02)

    candidates = axes[0, 2]
    for kind, label, color in (("attn", "attention", "tab:cyan"), ("mlp", "MLP", "tab:pink"),
                               ("embed", "embedding", "tab:olive")):
        names = [m for m in modules if m.split(".")[0] == kind]
        per_module = [_series(history, f"active_candidates/{m}") for m in names]
        if per_module and all(len(steps) == len(per_module[0][0]) for steps, _ in per_module):
            candidates.plot(per_module[0][0], np.mean([values for _, values in per_module], axis=0),
                            label=f"{label} (mean per module)", drawstyle="steps-post", color=color)
    candidates.set_title("candidates left (elimination)", fontsize=9)
    candidates.set_ylabel("active candidates")
    _collect(handles, candidates)
    for axis in (macs, schedule):
        _collect(handles, axis)

    if "embed" in modules:
        _plot_ofb_module(axes[0, 3], history, "embed", architecture)
        axes[0, 3].set_ylabel("fraction of channels")
        _collect(handles, axes[0, 3])
    else:
        axes[0, 3].set_visible(False)
    for index, axis in enumerate(axes[1:].flat):
        if index >= len(blocks):
            axis.set_visible(False)
            continue
        _plot_ofb_module(axis, history, blocks[index], architecture)
        axis.set_ylabel("fraction of units")
        _collect(handles, axis)
    _label_bottom_axes(axes)
    _finish(figure, title, handles)
    return figure


# ---------------------------------------------------------------------------------------------------------------
# UVC
# ---------------------------------------------------------------------------------------------------------------
def _moving_average(steps: np.ndarray, values: np.ndarray, window: float) -> np.ndarray:
    """Mean of the values recorded within +- window / 2 steps of each point (any recording interval)."""
    if len(values) == 0 or window <= 0:
        return values
    cumulative = np.concatenate([[0.0], np.cumsum(values)])
    low = np.searchsorted(steps, steps - window / 2, side="left")
    high = np.searchsorted(steps, steps + window / 2, side="right")
    return (cumulative[high] - cumulative[low]) / (high - low)


def _uvc_blocks(history: Sequence[Mapping]) -> list[int]:
    return sorted({int(key.split("/")[1]) for entry in history for key in entry
                   if key.split("/")[0] in ("heads", "v_head_dim", "mlp_width", "run_probability")
                   and key.split("/")[-1].isdigit()})


def _skip_warmup_end(history: Sequence[Mapping]) -> float | None:
    steps, warm = _series(history, "uvc/skip_warmup")
    in_warmup = steps[warm > 0.5]
    return float(in_warmup.max()) if len(in_warmup) else None


def uvc_figure(history: Sequence[Mapping], architecture: Mapping | None = None,
               final_macs_ratio: float | None = None, smoothing: float = 0.05, title: str = "UVC search"):
    """UVC's search in one figure: the MACs ratio R (expected, and of the rounded counts) against the budget B; the
    budget dual z; per block the kept heads, value head dim and MLP width; and each block's skip probability.

    The widths are ceilings of continuous counts, so a count that hovers at an integer flips between two widths
    from one step to the next: they are drawn as a moving average over `smoothing` of the recorded steps (2.4 heads
    = 2 or 3, mostly 2), with the exported widths marked at the end when `architecture` is given. A block's skip
    probability (1 - its run probability) is fixed at 0.5 during the skip-gate warm-up (shaded), then drawn on a log
    scale so that blocks far from removal (0.01 vs 0.001) stay apart; a block whose skip probability ends above 0.5
    is removed.

    Args:
        history: `CompressionTrainer.compression_history` of a UVC run (or `history.json`).
        architecture: `Architecture.summary()` of the result (the report's `architecture`): the exported widths,
            after the final projection onto the budget.
        final_macs_ratio: the exported model's MACs / dense MACs (the report's `compressed_macs_ratio`), marked
            at the last step when given.
        smoothing: moving-average window as a fraction of the recorded steps (0: raw values).
        title: the figure's title.

    Returns:
        `matplotlib.figure.Figure`.
    """
    # Long on purpose: one panel after another, each a few plotting calls.
    blocks = _uvc_blocks(history)
    figure = _new_figure(14, 7)
    axes = figure.subplots(2, 3, sharex=True, squeeze=False)
    handles: dict = {}
    all_steps = np.asarray([entry["step"] for entry in history if "step" in entry], dtype=float)
    window = smoothing * (all_steps.max() - all_steps.min()) if len(all_steps) else 0.0

    ratio = axes[0, 0]
    ratio.plot(*_series(history, "uvc/ratio"), color="black", label="R: expected MACs / dense (gate probabilities)")
    ratio.plot(*_series(history, "uvc/hard_ratio"), color="grey", linewidth=0.8, label="R with the counts rounded")
    ratio.plot(*_series(history, "uvc/budget"), "--", color="tab:purple", label="budget B")
    _mark_final_ratio(ratio, all_steps, final_macs_ratio)
    ratio.set_title("MACs ratio vs budget", fontsize=9)
    ratio.set_ylabel("fraction of dense MACs")
    dual = axes[0, 1]
    dual.plot(*_series(history, "uvc/budget_dual"), color="black", linestyle="-.",
              label="z: budget dual (grows while R > B)")
    dual.set_title("budget dual z", fontsize=9)
    dual.set_ylabel("z")
    for axis in (ratio, dual):
        _collect(handles, axis)

    exported = {"heads": "num_heads", "v_head_dim": "v_head_dim", "mlp_width": "intermediate_size"}
    panels = [("heads", axes[0, 2], "kept heads"), ("v_head_dim", axes[1, 0], "kept value dims per head"),
              ("mlp_width", axes[1, 1], "kept MLP units")]
    layers = (architecture or {}).get("layers") or []
    for prefix, axis, ylabel in panels:
        for block in blocks:
            steps, values = _series(history, f"{prefix}/{block}")
            line, = axis.plot(steps, _moving_average(steps, values, window), linewidth=1.2, color=f"C{block % 10}",
                              label=f"block {block}")
            if block < len(layers) and len(steps):
                layer = layers[block]
                final = layer[exported[prefix]] if layer.get("keep_block", True) else 0
                axis.plot([steps[-1]], [final], "D", color=line.get_color(), markersize=5, markeredgecolor="black")
        smoothed = f" (mean over {window:.0f} steps)" if window >= 2 else ""
        axis.set_title(f"{ylabel} per block{smoothed}", fontsize=9)
        axis.set_ylabel(ylabel)
        _collect(handles, axis)
    if layers:
        from matplotlib.lines import Line2D

        handles["exported width (after the final projection)"] = Line2D(
            [], [], marker="D", linestyle="none", color="white", markeredgecolor="black")

    skip = axes[1, 2]
    lowest = 1.0
    for block in blocks:
        steps, run_probability = _series(history, f"run_probability/{block}")
        skip_probability = np.clip(1.0 - run_probability, 1e-6, 1.0)  # log scale: a block at 0.99 is still visible
        lowest = min([lowest, *skip_probability])
        skip.plot(steps, skip_probability, linewidth=1.2, color=f"C{block % 10}", label=f"block {block}")
    skip.axhline(0.5, color="grey", linestyle=":", label="0.5: a block whose skip probability ends above is removed")
    warmup_end = _skip_warmup_end(history)
    if warmup_end is not None and len(all_steps):
        skip.axvspan(all_steps.min(), warmup_end, color="grey", alpha=0.15,
                     label="skip-gate warm-up: theta frozen, every gate at 0.5 in the forward")
    skip.set_yscale("log")
    skip.set_ylim(max(lowest / 2, 1e-6), 1.5)
    skip.set_title("skip probability per block (log scale)", fontsize=9)
    skip.set_ylabel("P(block skipped)")
    _collect(handles, skip)
    _label_bottom_axes(axes)
    _finish(figure, title, handles)
    return figure


# ---------------------------------------------------------------------------------------------------------------
# Entry points
# ---------------------------------------------------------------------------------------------------------------
def search_figure(history: Sequence[Mapping], method: str, target_ratio: float | None = None,
                  architecture: Mapping | None = None, final_macs_ratio: float | None = None,
                  title: str | None = None):
    """`ofb_figure` or `uvc_figure` by method name (UVC's history carries its own budget: `target_ratio` is OFB's)."""
    if method == "ofb":
        return ofb_figure(history, target_ratio, architecture, final_macs_ratio, title=title or "OFB search")
    if method == "uvc":
        return uvc_figure(history, architecture, final_macs_ratio, title=title or "UVC search")
    raise ValueError(f"method={method!r}: allowed one of {sorted(PLOT_FILES)}")


def save_figure(figure, path: str | Path, dpi: int = 110) -> Path:
    figure.savefig(path, dpi=dpi)
    return Path(path)


def plot_search(history: Sequence[Mapping], method: str, path: str | Path, target_ratio: float | None = None,
                architecture: Mapping | None = None, final_macs_ratio: float | None = None) -> Path:
    """Draw `search_figure(...)` and save it as `path` (PNG)."""
    return save_figure(search_figure(history, method, target_ratio, architecture, final_macs_ratio), path)


# ---------------------------------------------------------------------------------------------------------------
# The final architecture as text
# ---------------------------------------------------------------------------------------------------------------
#: keys of `architecture_table`'s facts that it cannot do without (the rest are optional)
TABLE_KEYS = ("architecture", "dense_architecture", "dense_macs", "compressed_macs")


def _count(value: float) -> str:
    """3.54 M, 205 k, 17.6 G."""
    for limit, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= limit:
            return f"{value / limit:#.3g}".rstrip(".") + f" {suffix}"
    return f"{value:.0f}"


def _columns(rows: list[list[str]], align: str) -> list[str]:
    """Rows of cells as lines, two spaces apart; `align` has one letter per column: l(eft) or r(ight)."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(align))]
    return ["  ".join(cell.ljust(width) if side == "l" else cell.rjust(width)
                      for cell, width, side in zip(row, widths, align)).rstrip() for row in rows]


def _block_rows(layers: Sequence[Mapping], dense: Mapping) -> list[list[str]]:
    rows = [["block", "status", "heads", "q/k head dim", "v head dim", "MLP width"]]
    for index, layer in enumerate(layers):
        if not layer.get("keep_block", True):
            rows.append([str(index), "removed", "-", "-", "-", "-"])
            continue
        heads = layer["num_heads"]
        rows.append([
            str(index), "kept",
            f"{heads}/{dense['num_attention_heads']}",
            f"{layer['qk_head_dim']}/{dense['head_dim']}" if heads else "-",
            f"{layer['v_head_dim']}/{dense['head_dim']}" if heads else "-",
            f"{layer['intermediate_size']}/{dense['intermediate_size']}",
        ])
    return rows


def _macs_rows(facts: Mapping) -> list[list[str]]:
    dense = facts["dense_macs"]
    final = facts["compressed_macs"]
    rows = [["MACs", "", "of dense", ""], ["  dense", _count(dense), "1.000", ""]]
    search = facts.get("search_macs_ratio")
    if search is not None:
        rows.append(["  end of search", _count(search * dense), f"{search:.3f}",
                     "the search's own (expected) MACs, before the final projection"])
    moved = f"the final projection moved it by {final / dense - search:+.3f}; " if search is not None else ""
    rows.append(["  final", _count(final), f"{final / dense:.3f}", f"{moved}what the exported model runs"])
    target = facts.get("target_flops")
    if target is not None:
        rows.append(["  target", _count(target * dense), f"{target:.3f}",
                     "met" if final <= target * dense * (1 + 1e-9) else "EXCEEDED"])
    return rows


def _speed_rows(speed: Mapping) -> list[list[str]]:
    """A speed budget's rows: predicted ms (dense, final, target) by the latency table, and the measured ones."""
    dense = speed["dense_predicted_ms"]
    where = f"{speed.get('device')}, {speed.get('dtype')}, batch {speed.get('batch_size')}"
    rows = [["ms per forward", "", "speed-up", where], ["  dense", f"{dense:.4g}", "1.00x", "predicted"]]
    final, target = speed["predicted_ms"], speed["target_ms"]
    rows.append(["  final", f"{final:.4g}", f"{dense / final:.2f}x", "predicted by the latency table"])
    rows.append(["  target", f"{target:.4g}", f"{speed['target_speedup']:.2f}x",
                 "met" if final <= target * (1 + 1e-9) else "EXCEEDED"])
    if speed.get("measured_speedup") is not None:
        rows.append(["  measured", f"{speed['measured_ms']:.4g}", f"{speed['measured_speedup']:.2f}x",
                     f"timed against the dense model ({speed['dense_measured_ms']:.4g} ms), interleaved"])
    return rows


def architecture_table(facts: Mapping) -> str:
    """The final architecture as a plain-text table: per block whether it is kept, its heads, q/k and v head dims
    and MLP width (each of the dense value), the residual width, the MACs before and after the final projection
    against the target, and the parameters. The trainer logs it when the search ends; the demo and
    `hf-vit-compress train` print it.

    Args:
        facts: a `compression_report` (or `compression_report.json`), or the same keys: `architecture`
            (`Architecture.summary()`), `dense_architecture`, `dense_macs`, `compressed_macs`; optionally `method`,
            `target_flops` (a fraction of the dense MACs), `search_macs_ratio` (the search's own MACs ratio when
            it ended), `dense_params`, `compressed_params`, `speed_budget` (a speed budget's predicted and measured
            milliseconds).

    Returns:
        The table, lines separated by newlines (no trailing newline).
    """
    missing = [key for key in TABLE_KEYS if facts.get(key) is None]
    if missing:
        raise ValueError(f"architecture_table: facts need {list(TABLE_KEYS)}; missing {missing}")
    architecture, dense = facts["architecture"], facts["dense_architecture"]
    layers = architecture["layers"]
    kept = sum(1 for layer in layers if layer.get("keep_block", True))
    method = f" ({facts['method'].upper()})" if facts.get("method") else ""
    lines = [f"Final architecture{method}: {kept} of {len(layers)} blocks kept, residual width "
             f"{architecture['hidden_size']}/{dense['hidden_size']}"]
    lines += _columns(_block_rows(layers, dense), "rlrrrr")
    lines += _columns(_macs_rows(facts), "lrrl")
    if facts.get("speed_budget"):
        lines += _columns(_speed_rows(facts["speed_budget"]), "lrrl")
    if facts.get("compressed_params") is not None and facts.get("dense_params"):
        compressed, total = facts["compressed_params"], facts["dense_params"]
        lines.append(f"params: {_count(compressed)} of {_count(total)} ({compressed / total:.3f} of dense)")
    return "\n".join(lines)


__all__ = ["PLOT_FILES", "architecture_table", "ofb_figure", "plot_search", "save_figure", "search_figure",
           "uvc_figure"]
