"""Results of benchmarks/quality.py: merging pieces, the Markdown tables and the plots.

Kept apart from quality.py (which runs things) so that `--report-only` / `--merge-from` need no torch training
code, and so that both files stay readable. Nothing here imports quality.py.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import _common as C

METHODS = ("ofb", "uvc", "tp-magnitude", "tp-taylor", "uniform")
SEARCH_METHODS = ("ofb", "uvc")

#: what each search method logs as its expected (differentiable) MACs ratio, and the extra line drawn for it
EXPECTED_RATIO_KEYS = {"ofb": "expected_macs_ratio", "uvc": "uvc/ratio"}
HARD_RATIO_KEYS = {"uvc": "uvc/hard_ratio"}
#: checkpoints (fractions of the search) shown in the Markdown search table
TABLE_FRACTIONS = (0.1, 0.2, 0.4, 0.6, 0.8, 1.0)


def run_key(method: str, budget: float, seed: int) -> str:
    return f"{method}|{budget:g}|{seed}"


def upgrade_settings(settings: dict) -> dict:
    """Settings of results written before the validation split and the `medium` mode existed: they were evaluated
    on the test split with the benchmark's short-search settings."""
    settings.setdefault("eval_split", "test")
    settings.setdefault("search_settings", "short")
    return settings


#: settings only OFB and UVC runs depend on: runs of the other methods merge across them
SEARCH_ONLY_SETTINGS = ("search_fraction", "search_settings")
SEARCHES = ("ofb", "uvc")


def _searches_only(command: str) -> bool:
    """Whether a recorded quality.py command ran OFB/UVC only (`--methods` naming nothing else)."""
    words = command.split()
    if "--methods" not in words or words.index("--methods") + 1 >= len(words):
        return False
    return set(words[words.index("--methods") + 1].split(",")) <= set(SEARCHES)


def merge_results(results: dict, other: dict, source: str) -> None:
    """Add `other`'s runs (newer ones win) and invocations to `results`; settings must agree, except the search's
    own (`SEARCH_ONLY_SETTINGS`): then only `other`'s runs of methods that do not search are added."""
    theirs, ours = upgrade_settings(other["settings"]), results["settings"]
    runs, invocations = other["runs"], other["invocations"]
    if theirs != ours:
        unshared = {key for key in set(theirs) | set(ours) if theirs.get(key) != ours.get(key)}
        if not unshared <= set(SEARCH_ONLY_SETTINGS):
            raise SystemExit(f"--merge-from {source}: other settings:\n  {other['settings']}\nnot\n  {ours}")
        runs = {key: run for key, run in runs.items() if run["method"] not in SEARCHES}
        invocations = [p for p in invocations if not _searches_only(p["command"])]
        print(f"--merge-from {source}: settings differ in {sorted(unshared)} (OFB/UVC only): merged its "
              f"{len(runs)} runs of the other methods")
    results["runs"].update(runs)
    results["invocations"].extend(invocations)
    results["dense"] = results["dense"] or other["dense"]


# ---------------------------------------------------------------------------------------------------------------
# Search traces (OFB / UVC): expected MACs vs target over the search
# ---------------------------------------------------------------------------------------------------------------


def _value_at(trace: dict, key: str, step: int):
    """The traced value of `key` at the last recorded step <= `step` (None if not traced)."""
    steps, values = trace.get("step", []), trace.get(key)
    if not values:
        return None
    best = None
    for s, v in zip(steps, values):
        if s <= step and v is not None:
            best = v
    return best


def summarize_search(run: dict) -> dict:
    """What the trace says about budget holding: expected ratio after warm-up (min, max, largest distance to the
    target), the last expected ratio before the final projection and how far the projection moved the MACs, and
    (OFB) the step at which each module was down to one candidate."""
    trace, method = run["search_trace"], run["method"]
    key = EXPECTED_RATIO_KEYS.get(method)
    steps = trace.get("step", [])
    expected = trace.get(key) or []
    warmup_end = run["search_warmup_steps"]
    after = [v for s, v in zip(steps, expected) if s >= warmup_end and v is not None]
    last = expected[-1] if expected else None
    summary = {
        "expected_ratio_key": key,
        "last_expected_ratio": last,
        "projection_shift": None if last is None else run["macs_ratio"] - last,
        "min_expected_after_warmup": min(after) if after else None,
        "max_expected_after_warmup": max(after) if after else None,
        "max_gap_after_warmup": max(abs(v - run["budget"]) for v in after) if after else None,
    }
    finalised = {}
    for name, values in trace.items():
        if name.startswith("active_candidates/"):
            first = next((s for s, v in zip(steps, values) if v is not None and v <= 1), None)
            finalised[name.split("/", 1)[1]] = first
    if finalised:
        summary["module_single_candidate_step"] = finalised
        summary["modules_single_before_warmup_end"] = sum(1 for s in finalised.values()
                                                           if s is not None and s < warmup_end)
        done = list(finalised.values())
        summary["all_single_candidate_step"] = max(done) if all(s is not None for s in done) else None
    hard = HARD_RATIO_KEYS.get(method)
    if hard and trace.get(hard):
        summary["last_hard_ratio"] = trace[hard][-1]
    return summary


def _fmt(value, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def search_table(results: dict, name: str) -> str:
    """One row per OFB/UVC run: expected MACs ratio at fixed fractions of the search, its range after warm-up, and
    the final projection's move."""
    runs = [r for r in sorted(results["runs"].values(), key=lambda r: (METHODS.index(r["method"]), -r["budget"],
                                                                         r["seed"]))
            if r.get("search_trace")]
    if not runs:
        return ""
    header = (["method", "budget", "seed", "warm-up ends (step)"]
              + [f"E[MACs] at {f:.0%}" for f in TABLE_FRACTIONS]
              + ["min / max after warm-up", "last E -> final MACs (shift)", "OFB: modules at 1 candidate before "
                 "warm-up end; step all at 1 / UVC: hard ratio at end"])
    rows = []
    for run in runs:
        search = summarize_search(run)
        key, total = search["expected_ratio_key"], run["search_steps"]
        row = [run["method"], run["budget"], run["seed"], run["search_warmup_steps"]]
        row += [_fmt(_value_at(run["search_trace"], key, round(f * total))) for f in TABLE_FRACTIONS]
        row.append(f"{_fmt(search['min_expected_after_warmup'])} / {_fmt(search['max_expected_after_warmup'])}")
        shift = search["projection_shift"]
        row.append(f"{_fmt(search['last_expected_ratio'])} -> {run['macs_ratio']:.3f} "
                   f"({'-' if shift is None else f'{shift:+.3f}'})")
        if "module_single_candidate_step" in search:
            modules = len(search["module_single_candidate_step"])
            row.append(f"{search['modules_single_before_warmup_end']} of {modules}; "
                       f"{search['all_single_candidate_step'] or 'never'}")
        else:
            row.append(_fmt(search.get("last_hard_ratio")))
        rows.append(row)
    return ("\nSearch (OFB, UVC): expected MACs ratio E[MACs] (OFB: `expected_macs_ratio`, UVC: `uvc/ratio`) at "
            "fractions of the search steps, recorded after each optimizer step about every 1% of the search "
            f"(`search_trace` in the JSON; plot: `{name}_search.png`). 'last E' is the last value "
            "before the final projection; 'final MACs' the exported model's.\n\n" + C.md_table(header, rows))


def plot_search(results: dict, path: Path) -> bool:
    """Expected MACs ratio vs search progress for OFB and UVC: one panel per (method, budget), one line per seed,
    target dashed, the exported model's ratio as a marker at 100%, warm-up end dotted. Returns False if no run has
    a trace."""
    runs = [r for r in results["runs"].values() if r.get("search_trace")]
    if not runs:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = [m for m in SEARCH_METHODS if any(r["method"] == m for r in runs)]
    budgets = sorted({r["budget"] for r in runs}, reverse=True)
    figure, axes = plt.subplots(len(methods), len(budgets), figsize=(4.2 * len(budgets), 3.2 * len(methods)),
                                squeeze=False, sharex=True)
    for row, method in enumerate(methods):
        for column, budget in enumerate(budgets):
            axis = axes[row][column]
            selected = sorted((r for r in runs if r["method"] == method and r["budget"] == budget),
                              key=lambda r: r["seed"])
            for index, run in enumerate(selected):
                color = f"C{index}"
                trace, total = run["search_trace"], run["search_steps"]
                x = [100 * s / total for s in trace["step"]]
                key = EXPECTED_RATIO_KEYS[method]
                if trace.get(key):
                    axis.plot(x, trace[key], color=color, label=f"seed {run['seed']} expected")
                hard = HARD_RATIO_KEYS.get(method)
                if hard and trace.get(hard):
                    axis.plot(x, trace[hard], color=color, linestyle=":", linewidth=1,
                              label=f"seed {run['seed']} hard")
                axis.plot([100], [run["macs_ratio"]], marker="o", color=color, markersize=5)
                axis.axvline(100 * run["search_warmup_steps"] / total, color="grey", linestyle=":", linewidth=1)
            axis.axhline(budget, color="black", linestyle="--", linewidth=1, label="target")
            axis.set_title(f"{method}, target {budget:g} (dot: exported model)", fontsize=9)
            axis.set_ylim(0, 1.05)
            axis.grid(alpha=0.3)
            if row == len(methods) - 1:
                axis.set_xlabel("% of the search steps (grey dotted: warm-up end)")
            if column == 0:
                axis.set_ylabel("MACs / dense MACs")
            axis.legend(fontsize=7)
    C.save_figure(figure, path)
    return True


# ---------------------------------------------------------------------------------------------------------------
# Accuracy table and plot
# ---------------------------------------------------------------------------------------------------------------


def summarize(results: dict) -> list[dict]:
    groups = {}
    for run in results["runs"].values():
        groups.setdefault((run["method"], run["budget"]), []).append(run)
    rows = []
    for (method, budget), runs in sorted(groups.items(), key=lambda item: (METHODS.index(item[0][0]), -item[0][1])):
        accuracies = [r["accuracy"] for r in runs]
        rows.append(dict(method=method, budget=budget, seeds=sorted(r["seed"] for r in runs),
                         median_accuracy=statistics.median(accuracies), min_accuracy=min(accuracies),
                         max_accuracy=max(accuracies),
                         median_macs_ratio=statistics.median(r["macs_ratio"] for r in runs),
                         median_seconds=statistics.median(r["seconds"] for r in runs)))
    return rows


def _split_words(settings: dict) -> str:
    if settings["eval_split"] == "validation":
        return "validation images (training images outside the training subsample)"
    return "test images"


def write_report(results: dict, output_dir: Path, name: str) -> None:
    results["summary"] = summarize(results)
    for run in results["runs"].values():
        if run.get("search_trace"):
            run["search_summary"] = summarize_search(run)
    C.write_json(output_dir / f"{name}.json", results, flat_lists=True)
    settings = results["settings"]
    dense = results.get("dense") or {}
    invocations = results["invocations"]
    extra = [f"invocation {i + 1}: `{p['command']}` on {p['date']} (load average at start "
             f"{p['machine']['load_average_at_start']}, {p.get('wall_seconds', 0) / 60:.1f} min)"
             for i, p in enumerate(invocations)]
    extra.append(f"settings: {json.dumps(settings)}")
    lines = [C.markdown_header("CIFAR-10 accuracy vs MACs", invocations[-1], extra)]
    if dense:
        lines.append(f"Dense model: {json.dumps(settings['model'])}, patch {settings['patch_size']}, 32 px; "
                     f"{dense['macs'] / 1e6:.1f} MMACs, {dense['params'] / 1e6:.3f} M params, trained "
                     f"{settings['dense_steps']} steps (batch {_dense_batch(settings)}"
                     f"{', ' + settings['dense_from'] if settings.get('dense_from') else ''}) on "
                     f"{settings['train_size']} "
                     f"training images: **top-1 {100 * dense['accuracy']:.2f}%** on {settings['eval_size']} "
                     f"{_split_words(settings)}.\n")
    lines.append(accuracy_table(results))
    lines.append(f"\nEvery run: {settings['steps']} optimizer steps from the dense model (OFB/UVC: "
                 f"{settings['search_fraction']:.0%} searching, {_search_settings_words(settings)}), batch "
                 f"{settings['batch_size']}, lr {settings['lr']}. Top-1 on the {settings['eval_split']} split. MACs "
                 "column: exact MACs of the final model / dense MACs.\n")
    lines.append("Runs:\n")
    run_rows = [[r["method"], r["budget"], r["seed"], f"{100 * r['accuracy']:.2f}",
                 f"{100 * r['accuracy_before_finetune']:.2f}" if r.get("accuracy_before_finetune") is not None
                 else None, f"{r['macs_ratio']:.3f}", f"{r['seconds'] / 60:.1f}", r["shapes"]]
                for r in sorted(results["runs"].values(), key=lambda r: (METHODS.index(r["method"]), -r["budget"],
                                                                         r["seed"]))]
    lines.append(C.md_table(["method", "budget", "seed", "top-1 %", "top-1 % before fine-tuning", "MACs",
                             "minutes", "shapes (D; heads/qk/v/MLP per block)"], run_rows))
    search = search_table(results, name)
    if search:
        lines.append(search)
    for note in results.get("notes", []):
        lines.append(f"\nNote: {note}")
    if results.get("unavailable"):
        lines.append("\nNot run: " + "; ".join(f"{k}: {v}" for k, v in results["unavailable"].items()))
    (output_dir / f"{name}.md").write_text("\n".join(lines) + "\n")
    if results["summary"]:
        plot(results, output_dir / f"{name}.png")
    plot_search(results, output_dir / f"{name}_search.png")


def _dense_batch(settings: dict) -> int:
    """The dense model's batch size: its own schedule's when it was loaded (--dense-from), else the runs'."""
    return settings.get("dense_schedule", {}).get("batch_size", settings["batch_size"])


def _search_settings_words(settings: dict) -> str:
    if settings["search_settings"] == "library":
        return "the library's default OFB/UVC settings; each run's full method config is in the JSON"
    return "the benchmark's short-search settings, recorded per run in the JSON"


def accuracy_table(results: dict) -> str:
    """Median [min, max] top-1 per method and budget, with the median's change from the dense model's top-1."""
    dense = (results.get("dense") or {}).get("accuracy")
    budgets = sorted({row["budget"] for row in results["summary"]}, reverse=True)
    methods = [m for m in METHODS if any(row["method"] == m for row in results["summary"])]
    header = ["method"] + [f"{b:g} MACs: top-1 % median [min, max] (seeds)" for b in budgets]
    table = []
    for method in methods:
        row = [method]
        for budget in budgets:
            match = [r for r in results["summary"] if r["method"] == method and r["budget"] == budget]
            if match:
                r = match[0]
                drop = f", {100 * (r['median_accuracy'] - dense):+.2f} vs dense" if dense is not None else ""
                row.append(f"{100 * r['median_accuracy']:.2f} [{100 * r['min_accuracy']:.2f}, "
                           f"{100 * r['max_accuracy']:.2f}] ({len(r['seeds'])}{drop}); MACs "
                           f"{r['median_macs_ratio']:.3f}")
            else:
                row.append(None)
        table.append(row)
    return C.md_table(header, table)


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6.4, 4.4))
    markers = {"ofb": "o", "uvc": "s", "tp-magnitude": "^", "tp-taylor": "v", "uniform": "D"}
    for method in METHODS:
        rows = sorted((r for r in results["summary"] if r["method"] == method), key=lambda r: r["median_macs_ratio"])
        if not rows:
            continue
        x = [r["median_macs_ratio"] for r in rows]
        y = [100 * r["median_accuracy"] for r in rows]
        low = [100 * (r["median_accuracy"] - r["min_accuracy"]) for r in rows]
        high = [100 * (r["max_accuracy"] - r["median_accuracy"]) for r in rows]
        axis.errorbar(x, y, yerr=[low, high], marker=markers[method], capsize=3, label=method)
    dense = results.get("dense")
    if dense:
        axis.plot([1.0], [100 * dense["accuracy"]], "k*", markersize=12, label="dense")
    settings = results["settings"]
    axis.set_xlabel("MACs / dense MACs")
    axis.set_ylabel(f"top-1 accuracy (%), {settings['eval_split']} split")
    axis.set_title(f"CIFAR-10, {settings['mode']} mode: {settings['steps']} steps per run "
                   "(median, min-max over seeds)", fontsize=9)
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    C.save_figure(figure, path)
