"""Inference speed and peak memory: dense ViT vs exported compressed models vs Torch-Pruning, at the same MACs.

    python benchmarks/speed.py                 # the default run (DeiT-T/S/B shapes, 70/50/30% MACs, batch 1 and 64)
    python benchmarks/speed.py --quick         # a smoke run (DeiT-T shape, 50%, batch 1 and 4, few repeats)
    python benchmarks/speed.py --shapes deit-tiny,deit-small --budgets 0.5 --ours-variants export,qkv-fused \
        --control --no-tp --name speed_fusion     # item 4: q/k/v fusion before/after

What is measured (see benchmarks/README.md for the full method):

* Models: `ViTForImageClassification` with DeiT-T/S/B shapes (224 px, patch 16, 1000 labels), random weights
  (seeded). "ours": the `CompressedViTForImageClassification` that `export_compressed_model` builds for the
  architecture OFB's budget projection picks from a seeded random search state (`_common.ofb_architecture`).
  "tp": the same dense model pruned by Torch-Pruning's MetaPruner (its HF ViT recipe: uniform ratio, head dims,
  residual width; L1 magnitude) with the ratio chosen so its MACs are just within the same budget.
* Threads: 1 by default (`--threads`): on a shared 2-core machine two torch threads stall each other whenever
  another process takes a core, which made paired ratios swing by 5x in our runs; one thread keeps them stable.
* Throughput: one forward of a batch under `torch.inference_mode()`, float32, warm-up forwards excluded; all
  variants of one (shape, attention, batch) are timed round-robin in the same process (the order rotates every
  round), so a load spike hits them alike. speedup = median over rounds of t_dense / t_variant (paired in a round);
  ideal = dense MACs / variant MACs; the headline is speedup / ideal.
* Allocator: glibc's default by default. `--malloc no-mmap` re-runs with MALLOC_MMAP_THRESHOLD_ and
  MALLOC_TRIM_THRESHOLD_ at 4 GiB: freed activation buffers are then reused instead of being unmapped and
  page-faulted in again by the next forward (results/archive/speed_malloc_default.md, speed_malloc_no-mmap.md).
* Peak memory: a fresh subprocess per (variant, batch, attention) loads the pickled model, builds the input,
  records VmRSS, resets the kernel's peak-RSS counter (`echo 5 > /proc/self/clear_refs`), runs one forward and
  reads VmHWM: "peak extra" = VmHWM - VmRSS before the forward (activations, workspaces, caches of that forward);
  "peak RSS" = VmHWM (weights + runtime included). Without clear_refs it falls back to ru_maxrss deltas.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

DEFAULT_REPEATS = {  # timed rounds per (shape, batch); warm-up rounds are extra
    ("deit-tiny", 1): 20, ("deit-small", 1): 10, ("deit-base", 1): 5,
    ("deit-tiny", 64): 8, ("deit-small", 64): 4, ("deit-base", 64): 2,
}
DEFAULT_SKIP = ["deit-base:64:eager"]  # the slowest cell on a 2-core CPU; --no-skip includes it


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny smoke run (writes speed_quick.*)")
    parser.add_argument("--shapes", default="deit-tiny,deit-small,deit-base")
    parser.add_argument("--budgets", default="0.7,0.5,0.3", help="target MACs fractions")
    parser.add_argument("--batch-sizes", default="1,64")
    parser.add_argument("--attn", default="sdpa,eager", help="attention implementations")
    parser.add_argument("--ours-variants", default="export",
                        help="export (the model export_compressed_model returns), qkv-fused (experiment: the "
                             "same model with q/k/v in one Linear, built here, not by the library), unrounded / "
                             "rounded8 (the method with channel_multiple=1 / 8)")
    parser.add_argument("--control", action="store_true",
                        help="also time the compressed format with nothing pruned (implementation overhead vs HF ViT)")
    parser.add_argument("--methods", default="ofb", help="architectures for 'ours': ofb and/or uvc")
    parser.add_argument("--no-tp", action="store_true", help="skip Torch-Pruning")
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds for every cell (default: table)")
    parser.add_argument("--warmup", type=int, default=None, help="warm-up rounds (default: 2 at batch 1, else 1)")
    parser.add_argument("--skip", default=",".join(DEFAULT_SKIP), help="shape:batch:attn cells not run")
    parser.add_argument("--no-skip", action="store_true")
    parser.add_argument("--no-memory", action="store_true")
    parser.add_argument("--no-checks", action="store_true", help="skip MACs/logits cross-checks")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads (default 1: on a shared machine two threads that wait for each "
                             "other at every op turn load spikes into 2-6x slowdowns; 0 = torch's default)")
    parser.add_argument("--malloc", choices=("default", "no-mmap"), default="default",
                        help="no-mmap: restart with MALLOC_MMAP_THRESHOLD_/MALLOC_TRIM_THRESHOLD_ at 4 GiB so glibc "
                             "keeps freed activation buffers instead of unmapping them (no page faults per forward)")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"),
                        help="where to time (cuda: GPU, synchronised timing, memory from torch.cuda peak stats)")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                        help="weights and inputs while timing (checks always run in float32 on CPU)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--name", default=None, help="results file stem (default speed, or speed_quick)")
    parser.add_argument("--output-dir", default=str(C.RESULTS))
    # internal: one memory measurement in this (fresh) process
    parser.add_argument("--memory-worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--worker-batch", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--worker-attn", default="sdpa", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is visible to torch")
    if args.quick:
        args.shapes, args.budgets, args.batch_sizes = "deit-tiny", "0.5", "1,4"
        args.repeats = args.repeats or 3
        args.warmup = 1 if args.warmup is None else args.warmup
    args.name = args.name or ("speed_quick" if args.quick else "speed")
    return args


# ---------------------------------------------------------------------------------------------------------------
# Memory worker (runs in a fresh process)
# ---------------------------------------------------------------------------------------------------------------


def memory_worker(args) -> None:
    if args.threads:
        torch.set_num_threads(args.threads)
    import hf_vit_compress  # noqa: F401  (unpickling the compressed model imports its class)

    dtype = getattr(torch, args.dtype)
    model = torch.load(args.memory_worker, weights_only=False).eval().to(dtype)
    C.set_attention(model, args.worker_attn)
    pixel_values = torch.randn(args.worker_batch, 3, 224, 224, dtype=dtype)
    gc.collect()
    result = {}
    try:
        before = C.rss_bytes()["VmRSS"]
        C.reset_peak_rss()
        with torch.inference_mode():
            model(pixel_values=pixel_values)
        peak = C.rss_bytes()["VmHWM"]
        result.update(method="VmHWM after /proc/self/clear_refs reset", rss_before=before, peak_rss=peak)
    except OSError:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        with torch.inference_mode():
            model(pixel_values=pixel_values)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        result.update(method="ru_maxrss delta (upper bound of RSS before)", rss_before=before, peak_rss=peak)
    result["peak_extra"] = max(0, result["peak_rss"] - result["rss_before"])
    print("MEMORY_RESULT " + json.dumps(result), flush=True)


def measure_memory(model_path: Path, batch: int, attn: str, threads: int | None, dtype: str) -> dict:
    command = [sys.executable, __file__, "--memory-worker", str(model_path), "--worker-batch", str(batch),
               "--worker-attn", attn, "--dtype", dtype]
    if threads:
        command += ["--threads", str(threads)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=3600)
    for line in done.stdout.splitlines():
        if line.startswith("MEMORY_RESULT "):
            result = json.loads(line[len("MEMORY_RESULT "):])
            return {key: (value / 2**20 if isinstance(value, int) else value) for key, value in result.items()}
    raise RuntimeError(f"memory worker failed ({done.returncode}):\n{done.stderr[-3000:]}")


@torch.inference_mode()
def measure_cuda_memory(model, batch: int, attn: str, dtype: torch.dtype) -> dict:
    """Peak CUDA memory of one forward, in MiB: `peak_extra` above what was allocated before it (activations,
    workspaces) and `peak_rss` (the allocator's whole peak, weights included; named like the CPU columns)."""
    C.set_attention(model, attn)
    pixel_values = torch.randn(batch, 3, 224, 224, device="cuda", dtype=dtype)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    model(pixel_values=pixel_values)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    return {"method": "torch.cuda.max_memory_allocated after reset_peak_memory_stats", "rss_before": before / 2**20,
            "peak_rss": peak / 2**20, "peak_extra": max(0, peak - before) / 2**20}


# ---------------------------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------------------------


def build_variants(shape_name: str, args) -> tuple[torch.nn.Module, list[dict]]:
    """The dense model and every variant to time: dict(name, method, budget, model, macs, shapes, ...)."""
    from hf_vit_compress import count_macs, count_params, export_compressed_model

    dense = C.dense_vit(C.DEIT_SHAPES[shape_name], seed=args.seed)
    dense_macs = count_macs(dense)
    variants = [dict(name="dense", method="dense", budget=1.0, model=dense, macs=dense_macs)]
    if args.control:
        geo = C.geometry(dense)
        full = C.Architecture.full(geo.num_layers, geo.num_heads, geo.head_dim, geo.intermediate_size,
                                   geo.hidden_size)
        variants.append(dict(name="compressed-format@1", method="control", budget=1.0, architecture=full,
                             model=export_compressed_model(dense, full).eval(), macs=dense_macs))
    for budget in [float(b) for b in args.budgets.split(",")]:
        for method in args.methods.split(","):
            started = time.perf_counter()
            derive = {"ofb": C.ofb_architecture, "uvc": C.uvc_architecture}[method]
            architecture = derive(dense, budget, seed=args.seed)
            compressed = export_compressed_model(dense, architecture).eval()
            entry = dict(method=method, budget=budget, architecture_seconds=round(time.perf_counter() - started, 1))
            for variant in args.ours_variants.split(","):
                if variant == "export":
                    model, suffix, variant_architecture = compressed, "", architecture
                elif variant == "qkv-fused":
                    model, suffix, variant_architecture = C.fuse_qkv(copy.deepcopy(compressed)), "+qkv", architecture
                elif variant in ("unrounded", "rounded8"):
                    multiple = 1 if variant == "unrounded" else 8
                    variant_architecture = derive(dense, budget, seed=args.seed, channel_multiple=multiple)
                    model, suffix = export_compressed_model(dense, variant_architecture).eval(), f"-{variant}"
                else:
                    raise ValueError(f"--ours-variants: unknown {variant!r}; allowed: export, qkv-fused, unrounded, "
                                     "rounded8")
                variants.append(dict(entry, name=f"{method}{suffix}@{budget:g}", model=model, macs=count_macs(model),
                                     architecture=variant_architecture))
        if not args.no_tp:
            started = time.perf_counter()
            pruned, ratio, tries = C.tp_pruned_to_budget(dense, budget)
            variants.append(dict(name=f"tp@{budget:g}", method="tp", budget=budget, model=pruned.eval(),
                                 macs=C.shape_macs(dense, C.shapes_of(pruned)), tp_ratio=round(ratio, 5),
                                 tp_tries=tries, architecture_seconds=round(time.perf_counter() - started, 1)))
    for variant in variants:
        variant["params"] = count_params(variant["model"])
        variant["macs_ratio"] = variant["macs"] / dense_macs
        variant["shapes"] = C.shapes_of(variant["model"])
    return dense, variants


@torch.no_grad()
def cross_checks(dense, variants) -> None:
    """MACs: analytic == FlopCounterMode (eager attention) for every variant; ours: exported logits == the dense
    model's logits under the architecture's hard masks."""
    from hf_vit_compress import apply_architecture
    from hf_vit_compress.surgery.flops import measured_macs

    pixel_values = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    for variant in variants:
        model = variant["model"]
        C.set_attention(model, "eager")
        variant["measured_macs"] = int(round(measured_macs(model, pixel_values)))
        variant["macs_check"] = variant["measured_macs"] == variant["macs"]
        if "architecture" in variant:
            C.set_attention(dense, "eager")
            with apply_architecture(dense, variant["architecture"]):
                gated = dense(pixel_values=pixel_values).logits
            exported = model(pixel_values=pixel_values).logits
            variant["max_abs_logit_diff_vs_gated"] = float((exported - gated).abs().max())


def time_cell(variants, batch: int, attn: str, repeats: int, warmup: int, seed: int, device: str = "cpu",
              dtype: torch.dtype = torch.float32) -> dict[str, list[float]]:
    """Round-robin timing of every variant (order rotated each round); returns seconds per forward (on CUDA
    synchronised before and after each forward, so a time is the whole forward's)."""
    pixel_values = torch.randn(batch, 3, 224, 224, generator=torch.Generator().manual_seed(seed))
    pixel_values = pixel_values.to(device=device, dtype=dtype)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    for variant in variants:
        C.set_attention(variant["model"], attn)
    times = {variant["name"]: [] for variant in variants}
    with torch.inference_mode():
        for _ in range(warmup):
            for variant in variants:
                variant["model"](pixel_values=pixel_values)
        for round_index in range(repeats):
            shift = round_index % len(variants)
            for variant in variants[shift:] + variants[:shift]:
                sync()
                started = time.perf_counter()
                variant["model"](pixel_values=pixel_values)
                sync()
                times[variant["name"]].append(time.perf_counter() - started)
    return times


def summarize(times: dict[str, list[float]], variants, batch: int) -> list[dict]:
    dense_times = times["dense"]
    rows = []
    for variant in variants:
        seconds = times[variant["name"]]
        paired = sorted(d / s for d, s in zip(dense_times, seconds))
        speedup = statistics.median(paired)
        ideal = 1.0 / variant["macs_ratio"]
        rows.append(dict(
            variant=variant["name"], method=variant["method"], budget=variant["budget"],
            macs_ratio=variant["macs_ratio"], median_seconds=statistics.median(seconds),
            images_per_second=batch / statistics.median(seconds), speedup=speedup,
            speedup_q25=paired[len(paired) // 4], speedup_q75=paired[(3 * len(paired)) // 4],
            ideal=ideal, speedup_over_ideal=speedup / ideal, seconds=seconds,
        ))
    return rows


# ---------------------------------------------------------------------------------------------------------------
# Reporting
# ---------------------------------------------------------------------------------------------------------------


def _device_label(results: dict) -> str:
    settings = results["settings"]
    return f"{settings.get('dtype', 'float32')} on {settings.get('device', 'cpu').upper()}"


def write_markdown(path: Path, results: dict) -> None:
    prov = results["provenance"]
    lines = [C.markdown_header(
        "Inference speed and memory: dense vs compressed (ours) vs Torch-Pruning", prov,
        [f"settings: {results['settings']}", f"wall time: {results['wall_seconds'] / 60:.1f} min",
         f"{_device_label(results)}, `torch.inference_mode()`, random weights; speedup = median over rounds of "
         "the paired t_dense / t_variant; ideal = dense MACs / variant MACs; memory: "
         + ("torch.cuda peak allocated during one forward (peak extra = above what was allocated before it)"
            if results["settings"].get("device") == "cuda" else
            "a fresh process per cell (peak extra = VmHWM - VmRSS before the forward; see benchmarks/speed.py)")])]
    headline = results.get("headline")
    if headline:
        lines.append(f"**Headline** ({headline['cell']}): ours speedup/ideal = {headline['ours']:.2f}, "
                     f"Torch-Pruning = {headline['tp'] if headline['tp'] is None else round(headline['tp'], 2)}\n")
    header = ["shape", "batch", "attn", "variant", "MACs", "GMACs", "params M", "img/s", "speedup [q25, q75]",
              "ideal", "speedup/ideal", "peak extra MB", "peak RSS MB"]
    rows = []
    for cell in results["cells"]:
        for row in cell["rows"]:
            memory = row.get("memory") or {}
            rows.append([
                cell["shape"], cell["batch"], cell["attn"], row["variant"], f"{row['macs_ratio']:.3f}",
                f"{row['gmacs']:.3f}", f"{row['params'] / 1e6:.2f}", f"{row['images_per_second']:.2f}",
                f"{row['speedup']:.2f} [{row['speedup_q25']:.2f}, {row['speedup_q75']:.2f}]", f"{row['ideal']:.2f}",
                f"{row['speedup_over_ideal']:.2f}",
                f"{memory['peak_extra']:.0f}" if memory else None, f"{memory['peak_rss']:.0f}" if memory else None,
            ])
    lines.append(C.md_table(header, rows))
    lines.append("\nArchitectures (D = residual width; per kept block: heads/qk width/v width/MLP width):\n")
    for shape, entries in results["architectures"].items():
        for name, entry in entries.items():
            lines.append(f"- {shape} {name} (MACs {entry['macs_ratio']:.3f}): `{entry['summary']}`")
    if results.get("checks"):
        lines.append("\nCross-checks (analytic MACs == FlopCounterMode under eager; exported logits vs gated):\n")
        for check in results["checks"]:
            lines.append(f"- {check}")
    if results.get("skipped"):
        lines.append(f"\nCells not run: {', '.join(results['skipped'])} (pass --no-skip to include them).")
    path.write_text("\n".join(lines) + "\n")


def plot(path: Path, results: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = results["cells"]
    keys = sorted({(c["batch"], c["attn"]) for c in cells})
    figure, axes = plt.subplots(1, len(keys), figsize=(4.2 * len(keys), 3.6), squeeze=False, sharey=True)
    colors = {"deit-tiny": "tab:blue", "deit-small": "tab:orange", "deit-base": "tab:green"}
    styles = {"ofb": "-o", "uvc": "-s", "tp": "--^", "ofb+qkv": ":x", "uvc+qkv": ":+"}
    for axis, (batch, attn) in zip(axes[0], keys):
        for cell in (c for c in cells if c["batch"] == batch and c["attn"] == attn):
            series = {}
            for row in cell["rows"]:
                if row["method"] in ("dense", "control"):
                    continue
                label = row["variant"].split("@")[0]
                series.setdefault(label, []).append((row["budget"], row["speedup_over_ideal"]))
            for label, points in series.items():
                points.sort()
                axis.plot([p[0] for p in points], [p[1] for p in points], styles.get(label, "-"),
                          color=colors.get(cell["shape"]), label=f"{cell['shape']} {label}")
        axis.axhline(1.0, color="grey", lw=0.8)
        axis.set_title(f"batch {batch}, {attn}")
        axis.set_xlabel("MACs budget (fraction of dense)")
        axis.set_xlim(0.2, 0.8)
    axes[0][0].set_ylabel("speedup / ideal")
    axes[0][-1].legend(fontsize=7)
    figure.suptitle(f"{_device_label(results)}: measured speedup over the MACs reduction (1 = speed follows MACs)")
    C.save_figure(figure, path)


# ---------------------------------------------------------------------------------------------------------------


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.memory_worker:
        memory_worker(args)
        return {}
    if args.malloc == "no-mmap" and os.environ.get("MALLOC_MMAP_THRESHOLD_") is None:
        # glibc reads these when the process starts: re-run this command with them set (workers inherit them)
        env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=str(4 << 30), MALLOC_TRIM_THRESHOLD_=str(4 << 30))
        os.execve(sys.executable, [sys.executable, *sys.argv], env)
    if args.threads:
        torch.set_num_threads(args.threads)
    args.threads = torch.get_num_threads()
    started = time.perf_counter()
    prov = C.provenance([sys.argv[0], *(sys.argv[1:] if argv is None else argv)])
    skip = set() if args.no_skip else {s for s in args.skip.split(",") if s}
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    attns = args.attn.split(",")
    results = {"provenance": prov, "settings": {k: v for k, v in vars(args).items() if not k.startswith("worker")
                                                and k != "memory_worker"},
               "cells": [], "architectures": {}, "checks": [], "skipped": []}
    output_dir = Path(args.output_dir)
    dtype = getattr(torch, args.dtype)
    with tempfile.TemporaryDirectory(prefix="speed-bench-") as tmp:
        for shape in args.shapes.split(","):
            C.log(f"{shape}: building dense, ours and Torch-Pruning variants")
            dense, variants = build_variants(shape, args)
            if not args.no_checks:
                C.log(f"{shape}: cross-checking MACs and logits")
                cross_checks(dense, variants)
                for v in variants:
                    check = f"{shape} {v['name']}: MACs {v['macs']} analytic, {v['measured_macs']} measured"
                    if "max_abs_logit_diff_vs_gated" in v:
                        check += f"; max |logits - gated logits| = {v['max_abs_logit_diff_vs_gated']:.2e}"
                    results["checks"].append(check)
                    if not v["macs_check"]:
                        raise AssertionError(check)
            results["architectures"][shape] = {
                v["name"]: {"macs_ratio": v["macs_ratio"], "macs": v["macs"], "params": v["params"],
                            "summary": C.shapes_summary(v["shapes"]), "shapes": v["shapes"],
                            **{k: v[k] for k in ("tp_ratio", "tp_tries", "architecture_seconds") if k in v}}
                for v in variants
            }
            for v in variants:
                v["model"].to(device=args.device, dtype=dtype)
            paths = {}
            if not args.no_memory and args.device == "cpu":
                for v in variants:
                    paths[v["name"]] = Path(tmp) / f"{shape}-{v['name']}.pt"
                    torch.save(v["model"], paths[v["name"]])
            for batch in batch_sizes:
                for attn in attns:
                    cell_key = f"{shape}:{batch}:{attn}"
                    if cell_key in skip:
                        results["skipped"].append(cell_key)
                        continue
                    repeats = args.repeats or DEFAULT_REPEATS.get((shape, batch), 3)
                    warmup = args.warmup if args.warmup is not None else (2 if batch == 1 else 1)
                    C.log(f"{cell_key}: timing {len(variants)} variants, {warmup} warm-up + {repeats} rounds")
                    times = time_cell(variants, batch, attn, repeats, warmup, args.seed, args.device, dtype)
                    rows = summarize(times, variants, batch)
                    for row, v in zip(rows, variants):
                        row.update(params=v["params"], gmacs=v["macs"] / 1e9)
                        if not args.no_memory and args.device == "cuda":
                            row["memory"] = measure_cuda_memory(v["model"], batch, attn, dtype)
                        elif not args.no_memory:
                            row["memory"] = measure_memory(paths[v["name"]], batch, attn, args.threads, args.dtype)
                    results["cells"].append(dict(shape=shape, batch=batch, attn=attn, repeats=repeats,
                                                 warmup=warmup, rows=rows))
                    for row in rows:
                        memory = row.get("memory", {}).get("peak_extra")
                        C.log(f"  {row['variant']:>18}: {row['images_per_second']:8.2f} img/s, speedup "
                              f"{row['speedup']:.2f} / ideal {row['ideal']:.2f} = {row['speedup_over_ideal']:.2f}"
                              + (f", peak extra {memory:.0f} MB" if memory is not None else ""))
                    results["wall_seconds"] = time.perf_counter() - started
                    _write(results, output_dir, args.name)  # partial results survive an interrupted run
            del dense, variants
            gc.collect()
    results["wall_seconds"] = time.perf_counter() - started
    _write(results, output_dir, args.name)
    C.log(f"wrote {output_dir / args.name}.json/.md/.png in {results['wall_seconds'] / 60:.1f} min")
    return results


def _headline(results: dict) -> dict | None:
    preferred = [("deit-small", 64, "sdpa"), ("deit-small", 1, "sdpa")]
    for shape, batch, attn in preferred:
        for cell in results["cells"]:
            if (cell["shape"], cell["batch"], cell["attn"]) != (shape, batch, attn):
                continue
            ours = [r for r in cell["rows"] if r["variant"] == "ofb@0.5"]
            tp = [r for r in cell["rows"] if r["method"] == "tp" and r["budget"] == 0.5]
            if ours:
                return {"cell": f"{shape}, batch {batch}, {attn}, 50% MACs",
                        "ours": ours[0]["speedup_over_ideal"], "tp": tp[0]["speedup_over_ideal"] if tp else None}
    return None


def _write(results: dict, output_dir: Path, name: str) -> None:
    results["headline"] = _headline(results)
    C.write_json(output_dir / f"{name}.json", results)
    write_markdown(output_dir / f"{name}.md", results)
    if results["cells"]:
        plot(output_dir / f"{name}.png", results)


if __name__ == "__main__":
    main()
