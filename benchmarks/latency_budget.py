"""A speed budget on this device: predicted vs measured speed-up, and how many MACs it keeps against a MACs budget.

    python benchmarks/latency_budget.py                    # DeiT-T and DeiT-S shapes, 224 px, CPU fp32, batch 1 and 64
    python benchmarks/latency_budget.py --quick            # smoke run (DeiT-T, batch 1, one target, few repeats)
    python benchmarks/latency_budget.py --device cuda --dtype bfloat16 --batches 1,64,256 --name latency_budget_gpu

For every (shape, batch):

1. A latency table is built on this CPU (`build_latency_table`, `--points` widths per axis, median of `--repeats`
   calls; the seconds it took are recorded) and its prediction error measured on `--heldout` random attention and
   MLP shapes that are not grid points (|predicted - measured| / measured, each timed as the table times), their
   widths rounded to multiples of 8 as the library's exports are (`channel_multiple`); the error is reported for the
   shapes inside the grid's span (interpolated) apart from those below its narrowest points (extrapolated).
   `--heldout-only` measures only that, and the error at any width beside it (odd widths can run far slower than
   their neighbours).
2. For each target speed-up (1.5x / 2x / 3x) and method, the method is built with
   `CompressionConfig(target_speedup=x, latency={"table": ...})` and decides from a seeded random search state (no
   training: speed depends on shapes only, as in speed.py; `_common.ofb_architecture` / `uvc_architecture` describe
   the states): its architecture is at or under the target by the table, exported, and its MACs counted.
3. The same method with MACs budgets `--macs-sweep` (fractions of the dense MACs) gives the MACs-budgeted models.
4. The dense `ViTForImageClassification`, every speed-budgeted and every MACs-budgeted model are timed round-robin in
   one process (`--rounds` rounds, the order rotating; one forward of a batch per model per round, after warm-up),
   so a load spike hits them alike; a model's speed-up = median over rounds of t_dense / t_model.
5. Beside each speed-budgeted cell: the MACs budget that reaches the same measured speed-up (linear interpolation in
   the MACs sweep's measured speed-ups) and the ratio of the speed budget's MACs to it: > 1 means the speed budget
   keeps that many times the MACs (capacity) for the same measured speed.

CPU, float32, sdpa, `--threads` torch threads (default 1; see speed.py on why one thread), or `--device cuda --dtype
bfloat16` (CUDA events; benchmarks/gpu.sh runs it). Random weights.
"""

from __future__ import annotations

import argparse
import dataclasses
import random
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402
from latency_table import random_layer, relative_errors  # noqa: E402

from hf_vit_compress import CompressionConfig  # noqa: E402
from hf_vit_compress.methods import build_method  # noqa: E402
from hf_vit_compress.surgery.export import export_compressed_model  # noqa: E402
from hf_vit_compress.surgery.flops import count_macs, dense_macs  # noqa: E402
from hf_vit_compress.surgery.latency import (  # noqa: E402
    DTYPES,
    LatencyGrid,
    _AttentionPart,
    _layer,
    _MLPPart,
    _part_config,
    build_latency_table,
)
from hf_vit_compress.surgery.timing import time_calls, time_in_passes  # noqa: E402

SHAPES = ("deit-tiny", "deit-small")
TARGETS = (1.5, 2.0, 3.0)
MACS_SWEEP = (0.15, 0.25, 0.35, 0.5, 0.65, 0.8)
#: held-out shapes are rounded as the library's exports are (`channel_multiple` 8): widths a method can produce
HELDOUT_MULTIPLE = 8


#: method variants beside the library's methods: UVC's paper search space, which prunes value head dims alone (so
#: q/k and v head dims differ, and a speed budget may export them zero-padded)
VARIANTS = {"uvc-paper": ("uvc", {"uvc": {"shared_head_dims": False}})}


def decided_architecture(model, method: str, seed: int, **budget):
    """`method`'s decision from a seeded random search state under `budget` (`target_speedup` + `latency`, or
    `target_flops`), and the built method (its cost prices the architecture). `method` may be a `VARIANTS` name."""
    method, settings = VARIANTS.get(method, (method, {}))
    config = CompressionConfig(method=method, **budget, **settings)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        built = build_method(model, config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        if method == "ofb":
            for module in built.searchable_modules().values():
                module.alpha.copy_(torch.randn(module.alpha.shape, generator=generator))
        else:
            C.randomize_uvc_state(built, built.target_cost_ratio, seed)
    return C._without_scales(built.decide()), built


def _aligned(layer: dict, hidden: int, multiple: int, scaling: float) -> tuple[int, dict]:
    """`hidden` and `layer`'s widths rounded to a multiple of `multiple` (at least `multiple`), as the library's
    exports round them (`channel_multiple`, default 8)."""
    def rounded(width: int) -> int:
        return max(multiple, multiple * round(width / multiple))

    return rounded(hidden), _layer(layer["num_heads"], rounded(layer["qk_head_dim"]), rounded(layer["v_head_dim"]),
                                   rounded(layer["intermediate_size"]), scaling)


def inside_grid(grid, hidden: int, layer: dict, kind: str) -> bool:
    """Whether a shape's widths lie within the grid's span on every axis its part uses (interpolated, not
    extrapolated past the grid's narrowest or widest point)."""
    axes = [(grid.hidden, hidden)]
    if kind == "attention":
        axes += [(grid.heads, layer["num_heads"]), (grid.qk_head_dims, layer["qk_head_dim"]),
                 (grid.v_head_dims, layer["v_head_dim"])]
    else:
        axes += [(grid.mlp, layer["intermediate_size"])]
    return all(axis[0] <= width <= axis[-1] for axis, width in axes)


def error_summary(rows: list[dict]) -> dict:
    """Median / max relative error of `rows`, all of them and per part."""
    if not rows:
        return {"count": 0}
    every = relative_errors([(row["predicted_ms"], row["measured_ms"]) for row in rows])
    summary = {"count": len(rows), "median_error": C.median(every), "max_error": max(every)}
    groups = {"attention": lambda row: row["kind"] == "attention", "mlp": lambda row: row["kind"] == "mlp",
              # equal head dims run sdpa's fused kernel and are priced by the table's fused cells
              "attention_equal": lambda row: row["kind"] == "attention" and row["qk_head_dim"] == row["v_head_dim"],
              "attention_unequal": lambda row: row["kind"] == "attention" and row["qk_head_dim"] != row["v_head_dim"]}
    for name, member in groups.items():
        errors = relative_errors([(row["predicted_ms"], row["measured_ms"]) for row in rows if member(row)])
        if errors:
            summary[f"{name}_median_error"] = C.median(errors)
    return summary


def heldout_errors(config, table, batch: int, count: int, rng: random.Random, args, multiple: int = 1) -> dict:
    """The table's relative error on `count` random attention and MLP shapes off its grid, their widths rounded to
    a multiple of `multiple` (1: any width). The widths are drawn over the whole prunable range, so some fall below
    the grid's narrowest points; the summary splits the shapes inside the grid's span (interpolated: the held-out
    points of the grid) from the rest (extrapolated), and `shapes` lists every one."""
    scaling = (config.hidden_size // config.num_attention_heads) ** -0.5
    generator = torch.Generator().manual_seed(rng.randint(0, 2**31))
    device, dtype, repeats, warmup = torch.device(args.device), DTYPES[args.dtype], args.repeats, args.warmup
    grid = table.grid
    rows, cells = [], {}
    while len(rows) < 2 * count:
        hidden = rng.randint(config.hidden_size // 4, config.hidden_size)
        layer = random_layer(config, rng, scaling)
        if len(rows) % 4 == 2:  # every other shape with equal head dims, as OFB and UVC (shared dims) export them
            layer["v_head_dim"] = layer["qk_head_dim"]
        if multiple > 1:
            hidden, layer = _aligned(layer, hidden, multiple, scaling)
        on_grid = (hidden in grid.hidden and layer["intermediate_size"] in grid.mlp)
        if on_grid:
            continue
        part = _part_config(config, hidden, [], "sdpa")
        tokens = torch.randn(batch, table.key.tokens, hidden, generator=generator).to(device, dtype)
        parts = {"attention": (_AttentionPart(part, layer), table.predict_attention(
                     hidden, layer["num_heads"], layer["qk_head_dim"], layer["v_head_dim"])),
                 "mlp": (_MLPPart(part, layer), table.predict_mlp(hidden, layer["intermediate_size"]))}
        for kind, (module, predicted) in parts.items():
            cells[len(rows)] = (module.to(device, dtype).eval(), tokens)
            rows.append({"kind": kind, "hidden": hidden, **{key: layer[key] for key in (
                             "num_heads", "qk_head_dim", "v_head_dim", "intermediate_size")},
                         "inside_grid": inside_grid(grid, hidden, layer, kind), "predicted_ms": predicted})
    for index, measured in time_in_passes(cells, device, warmup, repeats).items():  # as the table times its cells
        rows[index]["measured_ms"] = measured
    return {**error_summary(rows), "inside_grid": error_summary([row for row in rows if row["inside_grid"]]),
            "outside_grid": error_summary([row for row in rows if not row["inside_grid"]]), "shapes": rows}


def time_round_robin(models: dict, batch: int, rounds: int, warmup: int, seed: int,
                     device: torch.device) -> dict[str, list[float]]:
    """ms per forward of each model, `rounds` rounds, the order rotating every round (CUDA events on a GPU)."""
    generator = torch.Generator().manual_seed(seed)
    first = next(iter(models.values()))
    size = first.config.image_size
    pixels = torch.randn(batch, 3, size, size, generator=generator).to(device, first.dtype)
    names = list(models)
    times = {name: [] for name in names}
    with torch.inference_mode():
        for name in names:
            for _ in range(warmup):
                models[name](pixel_values=pixels)
        for index in range(rounds):
            order = names[index % len(names):] + names[:index % len(names)]
            for name in order:
                times[name].append(time_calls(lambda name=name: models[name](pixel_values=pixels), device, 1))
    return times


def macs_equivalent(speedup: float, sweep: list[tuple[float, float]]) -> float | None:
    """The MACs ratio at which the MACs-budgeted models' measured speed-up equals `speedup` (linear interpolation
    between the sweep's points, sorted by MACs; None outside the sweep)."""
    points = sorted(sweep)
    for (low_macs, low_speed), (high_macs, high_speed) in zip(points, points[1:]):
        if min(low_speed, high_speed) <= speedup <= max(low_speed, high_speed) and low_speed != high_speed:
            return low_macs + (high_macs - low_macs) * (low_speed - speedup) / (low_speed - high_speed)
    return None


def measure_cell(shape: str, batch: int, args, rng: random.Random, folder: Path) -> dict:
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    dense = C.dense_vit(C.DEIT_SHAPES[shape], seed=args.seed)
    config = dense.config
    began = time.perf_counter()
    table = build_latency_table(config, batch, args.dtype, device, grid=LatencyGrid.for_model(config, args.points),
                                warmup=args.warmup, repeats=args.repeats, progress=False)
    build_seconds = time.perf_counter() - began
    path = table.save(folder / f"{shape}_{batch}.json")
    C.log(f"{shape} batch {batch}: table built in {build_seconds:.0f} s")
    errors = heldout_errors(config, table, batch, args.heldout, rng, args, multiple=HELDOUT_MULTIPLE)
    if args.heldout_only:
        any_width = heldout_errors(config, table, batch, args.heldout, rng, args)
        return {"shape": shape, "batch": batch, "build_seconds": round(build_seconds, 1),
                "table_key": table.key.__dict__, "heldout": errors, "heldout_any_width": any_width}
    models, facts = {}, {}
    full_macs = dense_macs(dense)
    for method in args.methods.split(","):
        for target in [float(t) for t in args.targets.split(",")]:
            name = f"{method}@{target:g}x"
            try:
                architecture, built = decided_architecture(dense, method, args.seed, target_speedup=target,
                                                           latency={"table": str(path), "batch_size": batch,
                                                                    "dtype": args.dtype, "device": args.device})
            except ValueError as error:  # the search space cannot reach it (e.g. OFB keeps every block)
                facts[name] = {"method": method, "target_speedup": target, "unreachable": str(error)}
                continue
            models[name] = export_compressed_model(dense, architecture).eval()
            predicted = built.architecture_cost(architecture)
            facts[name] = {"method": method, "target_speedup": target, "predicted_ms": predicted,
                           "dense_predicted_ms": built.dense_cost, "predicted_speedup": built.dense_cost / predicted,
                           "macs_ratio": count_macs(models[name]) / full_macs, "kind": "speed",
                           "padded_blocks": sum(layer.pad_head_dims for layer in architecture.kept_layers)}
            if facts[name]["padded_blocks"]:  # the same units exported as kept: what the padding bought
                unpadded = dataclasses.replace(architecture, layers=[
                    dataclasses.replace(layer, pad_head_dims=False) for layer in architecture.layers])
                models[f"{name} unpadded"] = export_compressed_model(dense, unpadded).eval()
                facts[f"{name} unpadded"] = {"method": method, "target_speedup": target, "kind": "unpadded"}
        for ratio in [float(r) for r in args.macs_sweep.split(",")]:
            name = f"{method}@{ratio:g}MACs"
            try:
                architecture, _ = decided_architecture(dense, method, args.seed, target_flops=ratio)
            except ValueError:  # under the search space's smallest model
                continue
            models[name] = export_compressed_model(dense, architecture).eval()
            facts[name] = {"method": method, "target_flops": ratio, "kind": "macs",
                           "macs_ratio": count_macs(models[name]) / full_macs}
    models = {name: model.to(device, dtype) for name, model in {"dense": dense, **models}.items()}
    C.log(f"{shape} batch {batch}: timing {len(models)} models, {args.rounds} rounds")
    times = time_round_robin(models, batch, args.rounds, args.warmup, args.seed, device)
    for name, values in times.items():
        if name == "dense":
            continue
        ratios = [d / m for d, m in zip(times["dense"], values)]
        facts[name].update(measured_ms=C.median(values), measured_speedup=C.median(ratios),
                           speedup_range=[min(ratios), max(ratios)])
    for name, fact in facts.items():
        if fact.get("kind") != "speed":
            continue
        if f"{name} unpadded" in facts:
            fact["measured_speedup_unpadded"] = facts[f"{name} unpadded"]["measured_speedup"]
        sweep = [(f["macs_ratio"], f["measured_speedup"]) for f in facts.values()
                 if f.get("kind") == "macs" and f["method"] == fact["method"]]
        equivalent = macs_equivalent(fact["measured_speedup"], sweep)
        fact["macs_equivalent"] = equivalent
        fact["macs_kept_vs_macs_budget"] = fact["macs_ratio"] / equivalent if equivalent else None
        fact["measured_over_target"] = fact["measured_speedup"] / fact["target_speedup"]
    return {"shape": shape, "batch": batch, "build_seconds": round(build_seconds, 1), "table_key": table.key.__dict__,
            "grid": table.grid.__dict__, "heldout": errors, "dense_measured_ms": C.median(times["dense"]),
            "models": facts}


def _percent(summary: dict, key: str = "median_error") -> str:
    return f"{100 * summary[key]:.1f}% ({summary['count']})" if summary.get("count") else "-"


def _by_part(summary: dict) -> list[str]:
    """Median errors of the attention parts with equal / unequal head dims and of the MLP parts."""
    return [f"{100 * summary[key]:.1f}%" if key in summary else "-"
            for key in ("attention_equal_median_error", "attention_unequal_median_error", "mlp_median_error")]


PART_COLUMNS = ["attention, equal head dims", "attention, unequal", "MLP"]


def heldout_markdown(results: dict) -> str:
    header = C.markdown_header("Latency tables: prediction error on held-out shapes", results["provenance"],
                               [f"settings: {results['settings']}"])
    rows = []
    for cell in results["cells"]:
        aligned, any_width = cell["heldout"], cell["heldout_any_width"]
        rows.append([cell["shape"], cell["batch"], cell["build_seconds"], _percent(aligned["inside_grid"]),
                     _percent(aligned["inside_grid"], "max_error"), *_by_part(aligned["inside_grid"]),
                     _percent(any_width["inside_grid"]), _percent(aligned["outside_grid"]),
                     _percent(any_width["outside_grid"])])
    return header + "\n" + C.md_table(
        ["shape", "batch", "build s", f"inside the grid, widths multiples of {HELDOUT_MULTIPLE} (exports): median "
         "error (shapes)", "max error, same", *(f"same: {column}" for column in PART_COLUMNS),
         "inside the grid, any width: median", f"below the grid's narrowest "
         f"points, multiples of {HELDOUT_MULTIPLE}: median", "below the grid, any width: median"], rows) + (
        "\n\nError = |predicted - measured| / measured per attention or MLP part; the held-out parts are timed as "
        "the table times its cells (warm-up, then one sample per pass over all of them, median of `--repeats` "
        "passes). Inside the grid: every width within the span of the table's "
        "axes (interpolated; the held-out points of the grid). Below the grid: a width under the axis' narrowest "
        "point (extrapolated linearly); the JSON lists every shape.\n")


def markdown(results: dict) -> str:
    if results["settings"].get("heldout_only"):
        return heldout_markdown(results)
    header = C.markdown_header("Speed budget: predicted vs measured speed-up, and MACs kept at equal speed",
                               results["provenance"], [f"settings: {results['settings']}"])
    rows, tables = [], []
    for cell in results["cells"]:
        heldout = cell["heldout"]
        inside = heldout.get("inside_grid", heldout)  # runs before the inside / outside split: every shape
        tables.append([cell["shape"], cell["batch"], cell["build_seconds"], f"{100 * inside['median_error']:.1f}%",
                       f"{100 * inside['max_error']:.1f}%", *_by_part(inside), f"{cell['dense_measured_ms']:.2f}"])
        for name, fact in cell["models"].items():
            if fact.get("kind") in ("macs", "unpadded"):
                continue
            if "unreachable" in fact:
                rows.append([cell["shape"], cell["batch"], fact["method"], f"{fact['target_speedup']:g}x",
                             "unreachable", "", "", "", "", ""])
                continue
            equivalent = fact["macs_equivalent"]
            rows.append([cell["shape"], cell["batch"], fact["method"], f"{fact['target_speedup']:g}x",
                         f"{fact['predicted_speedup']:.2f}x", f"{fact['measured_speedup']:.2f}x",
                         f"{fact['measured_over_target']:.2f}", f"{fact['macs_ratio']:.3f}",
                         "-" if equivalent is None else f"{equivalent:.3f}",
                         "-" if equivalent is None else f"{fact['macs_kept_vs_macs_budget']:.2f}"])
    padding_rows = [[cell["shape"], cell["batch"], fact["method"], f"{fact['target_speedup']:g}x",
                     f"{fact['padded_blocks']}", f"{fact['measured_speedup']:.2f}x",
                     f"{fact['measured_speedup_unpadded']:.2f}x"]
                    for cell in results["cells"] for fact in cell["models"].values()
                    if fact.get("measured_speedup_unpadded")]
    padding = ""
    if padding_rows:
        padding = "\n\n## Zero-padded head dims: the same units exported padded and as kept\n\n" + C.md_table(
            ["shape", "batch", "method", "target", "blocks padded", "measured speed-up, padded (exported)",
             "same units, unpadded"], padding_rows)
    sweep_rows = []
    for cell in results["cells"]:
        for name, fact in cell["models"].items():
            if fact.get("kind") == "macs":
                sweep_rows.append([cell["shape"], cell["batch"], fact["method"], f"{fact['target_flops']:g}",
                                   f"{fact['macs_ratio']:.3f}", f"{fact['measured_speedup']:.2f}x"])
    return (header + "\n## Speed-budgeted models\n\n" + C.md_table(
        ["shape", "batch", "method", "target", "predicted", "measured (median)", "measured / target",
         "MACs / dense", "MACs budget at the same measured speed", "MACs kept vs that budget"], rows)
        + "\n\n## Latency tables\n\n" + C.md_table(
            ["shape", "batch", "build s", f"held-out median error inside the grid (widths multiples of "
             f"{HELDOUT_MULTIPLE})", "held-out max error, same", *PART_COLUMNS, "dense ms (measured)"],
            tables)
        + "\n\n## MACs-budgeted models (the sweep)\n\n" + C.md_table(
            ["shape", "batch", "method", "target_flops", "MACs / dense", "measured speed-up"], sweep_rows)
        + padding + "\n")


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default=",".join(SHAPES))
    parser.add_argument("--batches", default="1,64")
    parser.add_argument("--targets", default=",".join(f"{t:g}" for t in TARGETS))
    parser.add_argument("--methods", default="uvc,ofb")
    parser.add_argument("--macs-sweep", default=",".join(f"{r:g}" for r in MACS_SWEEP))
    parser.add_argument("--points", type=int, default=3, help="table widths per axis")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per table cell and held-out shape")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=7, help="round-robin timing rounds of the whole models")
    parser.add_argument("--heldout", type=int, default=8, help="random held-out attention + MLP shapes per cell")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--heldout-only", action="store_true",
                        help="only build the tables and measure their held-out error (widths rounded as exports "
                             "round them, and any width)")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--name", default=None, help="results stem (default latency_budget, latency_budget_quick)")
    parser.add_argument("--output-dir", default=str(C.RESULTS))
    args = parser.parse_args(argv)
    if args.quick:
        args.shapes, args.batches, args.targets, args.methods = "deit-tiny", "1", "2", "uvc"
        args.macs_sweep, args.repeats, args.warmup, args.rounds, args.heldout = "0.3,0.6", 2, 1, 3, 2
    if args.threads:
        torch.set_num_threads(args.threads)
    name = args.name or ("latency_budget_quick" if args.quick else
                         "latency_budget_heldout" if args.heldout_only else "latency_budget")
    prov = C.provenance([sys.argv[0], *(sys.argv[1:] if argv is None else argv)])
    rng = random.Random(args.seed)
    with tempfile.TemporaryDirectory() as folder:
        cells = [measure_cell(shape, int(batch), args, rng, Path(folder)) for shape in args.shapes.split(",")
                 for batch in args.batches.split(",")]
    settings = {key: getattr(args, key) for key in ("targets", "methods", "macs_sweep", "points", "repeats", "warmup",
                                                    "rounds", "heldout", "threads", "device", "dtype", "seed",
                                                    "heldout_only")}
    results = {"provenance": prov, "settings": settings, "cells": cells}
    output = Path(args.output_dir)
    C.write_json(output / f"{name}.json", results, flat_lists=True)
    (output / f"{name}.md").write_text(markdown(results))
    print(markdown(results))
    return results


if __name__ == "__main__":
    main()
