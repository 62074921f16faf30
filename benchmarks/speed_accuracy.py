"""Accuracy at equal measured speed (issue 23, item 5): does a speed budget keep more accuracy than a MACs budget?

    python benchmarks/speed_accuracy.py targets     # 1. the CPU speed-up the converged grid's 50%-MACs models reach
    python benchmarks/quality.py --converged --methods ofb --budget-unit speedup --budgets X --seeds 0,1,2 \
        --latency-table benchmarks/results/latency_tables/cifar10_medium_cpu_b64.json --name speed_accuracy_ofb
    python benchmarks/speed_accuracy.py report      # 3. both budgets side by side (speed_accuracy.md)

1. `targets` builds (or loads) the latency table of the converged CIFAR-10 model's shape (benchmarks/dense/
   cifar10_medium: 32 px, patch 4, hidden 96, 4 blocks, 3 heads, MLP 384) on this CPU at batch 64, fp32, one
   thread, then rebuilds every OFB and UVC model of results/quality_converged.json at 50% MACs from its recorded
   shapes (random weights: speed depends on shapes only), times each round-robin against the dense model, and
   prints per method the median measured speed-up and the median speed-up the table predicts for them. The latter
   is the target of that method's speed-budgeted runs (`table_target`): targeting the table's own figure for the
   MACs models puts both budgets under the same bias, so their measured speeds come out comparable (the version-2
   table predicts 1.74-1.96 for them where 1.62-1.86 was measured; the version-1 table, 1.43-1.62 for 1.73-1.85).
2. quality.py's `--budget-unit speedup` runs OFB / UVC from the same converged model with the same steps and seeds,
   budgeted in time by that table (the trainer measures the result against the dense model at the end).
3. `report` puts each method's speed-budgeted runs beside its MACs-budgeted ones: top-1 (median of 3 seeds, full
   test set), MACs kept, and the measured speed-up of every model of both sides, rebuilt from its shapes and timed
   round-robin against the dense model in one process (`--rounds`); speed_accuracy.png plots top-1 against it.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

DENSE = C.REPO / "benchmarks" / "dense" / "cifar10_medium"
TABLE = C.RESULTS / "latency_tables" / "cifar10_medium_cpu_b64.json"
BATCH = 64


def dense_model():
    from transformers import ViTForImageClassification

    return ViTForImageClassification.from_pretrained(DENSE).eval()


def compressed_from_shapes(dense, shapes: str):
    """A random-weight compressed model with the per-block shapes of a results file's `shapes` string
    (`D=<hidden>; <heads>h/<q/k width>/<v width>/<mlp> ...`, widths summed over heads)."""
    from hf_vit_compress.modeling import CompressedViTForImageClassification
    from hf_vit_compress.surgery.latency import _layer, _part_config

    hidden = int(re.match(r"D=(\d+);", shapes).group(1))
    scaling = (dense.config.hidden_size // dense.config.num_attention_heads) ** -0.5
    layers = []
    for heads, qk, v, mlp in re.findall(r"(\d+)h/(\d+)/(\d+)/(\d+)", shapes):
        heads, qk, v, mlp = int(heads), int(qk), int(v), int(mlp)
        layers.append(_layer(heads, qk // heads if heads else 0, v // heads if heads else 0, mlp, scaling))
    return CompressedViTForImageClassification(_part_config(dense.config, hidden, layers, "sdpa")).eval()


def targets(args) -> dict:
    from latency_budget import time_round_robin

    from hf_vit_compress.config import LatencyBudgetConfig
    from hf_vit_compress.surgery.cost import load_or_build_table

    torch.set_num_threads(1)
    dense = dense_model()
    table = load_or_build_table(dense.config, LatencyBudgetConfig(batch_size=BATCH, table=str(TABLE)))
    runs = json.loads((C.RESULTS / "quality_converged.json").read_text())["runs"]
    chosen = {key: run for key, run in runs.items() if run["budget"] == 0.5 and run["method"] in ("ofb", "uvc")}
    models = {"dense": dense, **{key: compressed_from_shapes(dense, run["shapes"]) for key, run in chosen.items()}}
    times = time_round_robin(models, BATCH, args.rounds, 2, 0, torch.device("cpu"))
    speedups = {key: C.median([d / m for d, m in zip(times["dense"], times[key])]) for key in chosen}
    predicted = {key: table.predict_config(dense.config) / table.predict_config(models[key].config) for key in chosen}
    result = {"batch": BATCH, "table": str(TABLE.relative_to(C.REPO)), "dense_ms": C.median(times["dense"]),
              "measured_speedup": speedups, "predicted_speedup": predicted,
              "target": {method: round(C.median([v for k, v in speedups.items() if k.startswith(method + "|")]), 2)
                         for method in ("ofb", "uvc")},
              "table_target": {method: round(C.median([v for k, v in predicted.items()
                                                       if k.startswith(method + "|")]), 2)
                               for method in ("ofb", "uvc")}}
    C.write_json(C.RESULTS / "speed_accuracy_targets.json", {"provenance": C.provenance(), **result})
    print(json.dumps(result, indent=1))
    return result


def time_side_by_side(macs_runs: dict, speed_runs: dict, rounds: int) -> dict[str, float]:
    """Median speed-up over the dense model of every run's model, rebuilt from its recorded shapes (random weights:
    speed depends on shapes only) and timed round-robin in one process at batch 64, so that both budgets' models
    are measured under the same conditions, by run key."""
    from latency_budget import time_round_robin

    torch.set_num_threads(1)
    dense = dense_model()
    runs = {**{f"macs:{key}": run for key, run in macs_runs.items()},
            **{f"speed:{key}": run for key, run in speed_runs.items()}}
    models = {"dense": dense, **{key: compressed_from_shapes(dense, run["shapes"]) for key, run in runs.items()}}
    times = time_round_robin(models, BATCH, rounds, 2, 0, torch.device("cpu"))
    return {key: C.median([d / m for d, m in zip(times["dense"], times[key])]) for key in runs}


def report(args) -> str:
    macs_runs = json.loads((C.RESULTS / "quality_converged.json").read_text())["runs"]
    target_file = json.loads((C.RESULTS / "speed_accuracy_targets.json").read_text())
    rows, readings, points = [], [], []
    chosen_macs, chosen_speed = {}, {}
    for method in ("ofb", "uvc"):
        path = C.RESULTS / f"speed_accuracy_{method}.json"
        if path.exists():
            chosen_macs.update({key: run for key, run in macs_runs.items()
                                if run["method"] == method and run["budget"] == 0.5})
            chosen_speed.update({f"{method}:{key}": run for key, run in json.loads(path.read_text())["runs"].items()})
    timed = time_side_by_side(chosen_macs, chosen_speed, args.rounds)
    for method in ("ofb", "uvc"):
        macs = {key: run for key, run in chosen_macs.items() if run["method"] == method}
        speed_runs = {key: run for key, run in chosen_speed.items() if key.startswith(f"{method}:")}
        if not speed_runs:
            continue
        measured_macs = [timed[f"macs:{key}"] for key in macs]
        macs = list(macs.values())
        rows.append([method, "50% MACs", _spread([100 * r["accuracy"] for r in macs]),
                     f"{C.median([r['macs_ratio'] for r in macs]):.3f}", f"{C.median(measured_macs):.2f}x", ""])
        measured = [timed[f"speed:{key}"] for key in speed_runs]
        speed = list(speed_runs.values())
        facts = [run.get("speed_budget") or {} for run in speed]
        in_run = [f["measured_speedup"] for f in facts if f.get("measured_speedup")]
        predicted = [f["predicted_speedup"] for f in facts if f.get("predicted_speedup")]
        rows.append([method, f"{speed[0]['budget']:g}x speed", _spread([100 * r["accuracy"] for r in speed]),
                     f"{C.median([r['macs_ratio'] for r in speed]):.3f}", f"{C.median(measured):.2f}x",
                     (f"predicted {C.median(predicted):.2f}x" if predicted else "")
                     + (f"; {C.median(in_run):.2f}x measured at the end of its run" if in_run else "")])
        points.append((method, "MACs budget", measured_macs, [100 * r["accuracy"] for r in macs]))
        points.append((method, "speed budget", measured, [100 * r["accuracy"] for r in speed]))
        delta = C.median([100 * r["accuracy"] for r in speed]) - C.median([100 * r["accuracy"] for r in macs])
        readings.append(f"- {method}: the speed budget measured {C.median(measured):.2f}x against the MACs budget's "
                        f"{C.median(measured_macs):.2f}x, kept {C.median([r['macs_ratio'] for r in speed]):.3f} "
                        f"of the MACs against {C.median([r['macs_ratio'] for r in macs]):.3f}, and scored "
                        f"{delta:+.2f} points (median top-1).")
    header = C.markdown_header("Accuracy at equal measured speed: speed budget vs MACs budget (CIFAR-10, converged)",
                               C.provenance(),
                               [f"the 50%-MACs models' median speed-up, measured: {target_file['target']}, by the "
                                f"table: {target_file['table_target']} (the speed runs' targets; "
                                "speed_accuracy_targets.json)"])
    text = header + "\n" + C.md_table(["method", "budget", "top-1 % median [min, max] (3 seeds)", "MACs / dense",
                                       "measured speed-up (CPU, batch 64, median of 3 seeds)", "note"], rows) \
        + "\n\nEvery model is rebuilt from its recorded shapes and timed against the dense one round-robin in one " \
        f"process ({args.rounds} rounds, one thread), both budgets' models together.\n\n" \
        + "\n".join(readings) + "\n"
    (C.RESULTS / "speed_accuracy.md").write_text(text)
    plot_speed_accuracy(points, C.RESULTS / "speed_accuracy.png")
    print(text)
    return text


def plot_speed_accuracy(points: list[tuple[str, str, list[float], list[float]]], path: Path) -> None:
    """Top-1 against *measured* speed-up (median, min-max bars over seeds), one colour per method, one marker per
    budget unit: the question of item 5 is accuracy at equal speed, so speed is the x axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(6.4, 4.2))
    colours, markers = {"ofb": "tab:orange", "uvc": "tab:blue"}, {"MACs budget": "o", "speed budget": "^"}
    for method, unit, speedups, accuracies in points:
        x, y = C.median(speedups), C.median(accuracies)
        axes.errorbar([x], [y], xerr=[[x - min(speedups)], [max(speedups) - x]],
                      yerr=[[y - min(accuracies)], [max(accuracies) - y]], fmt=markers[unit],
                      color=colours[method], capsize=3, label=f"{method}, {unit}")
    axes.set_xlabel("measured speed-up over dense (CPU fp32, batch 64)")
    axes.set_ylabel("top-1 accuracy (%), test split")
    axes.set_title("CIFAR-10, converged: accuracy at equal measured speed (3 seeds)", fontsize=9)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    C.save_figure(figure, path)


def _spread(values: list[float]) -> str:
    return f"{C.median(values):.2f} [{min(values):.2f}, {max(values):.2f}]"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("step", choices=("targets", "report"))
    parser.add_argument("--rounds", type=int, default=9)
    args = parser.parse_args(argv)
    return targets(args) if args.step == "targets" else report(args)


if __name__ == "__main__":
    main()
