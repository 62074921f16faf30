"""GPU inference speed of the exported models, eager and `torch.compile`, with the sdpa backend each one ran.

    python benchmarks/gpu_speed.py --modes eager --output-dir OUT            # what benchmarks/gpu.sh runs first
    python benchmarks/gpu_speed.py --modes compile --time-budget 120 --output-dir OUT --name speed_gpu_compile
    python benchmarks/gpu_speed.py --device cpu --quick --output-dir /tmp/q    # the same code paths, tiny, on CPU

What is measured (bfloat16 by default, `torch.inference_mode()`, random weights):

* Models: dense `ViTForImageClassification` with DeiT-S/B shapes (224 px, patch 16, 1000 labels); "ofb"/"uvc": the
  `CompressedViTForImageClassification` that `export_compressed_model` builds for the architecture each method's
  `decide()` picks from a seeded random search state (`_common.ofb_architecture`, `_common.uvc_architecture`,
  library defaults: kernel-friendly widths); "tp": Torch-Pruning at the same MACs (eager only; skipped if
  torch_pruning is missing). `--methods ofb-unrounded,uvc-unrounded` add the methods with `channel_multiple=1`.
* Timing: per (shape, batch, mode) every variant is timed round-robin with the order rotated each round, each forward
  synchronised before and after; speedup = median over rounds of the paired t_dense / t_variant (the dense model in
  the same mode), ideal = dense MACs / variant MACs.
* `torch.compile` (default mode): every model is compiled once with a dynamic batch dimension (first call at the
  largest batch, `torch._dynamo.maybe_mark_dynamic`), then timed at every batch >= 2; batch 1 (a separate
  specialisation, one more compile per model) comes last. Compile groups (a shape's dense model plus the variants
  of one budget) run in the order of `--compile-budgets` while `--time-budget` allows: the first one whenever time
  is left, each later one if its cost, estimated from the compiles so far, fits; one that would overrun is listed
  as not run.
* sdpa backend: "predicted" from the shapes (`surgery.kernels`, every backend each layer allows); on CUDA
  "torch" is `torch.backends.cuda.can_use_*` for the same shapes; "ran" is what one profiled forward dispatched
  (aten sdpa op names, per layer call; "decomposed" when torch.compile turned the math path into plain kernels).
* Memory (CUDA, eager): `torch.cuda.max_memory_allocated` during one forward above what was allocated before it.
"""

from __future__ import annotations

import argparse
import collections
import gc
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

from hf_vit_compress.surgery.kernels import BACKENDS, FUSED_BACKENDS, cross_check_shapes, sdpa_backend_reasons  # noqa: E402

SHAPES = {name: dict(model=shape, image_size=224, patch_size=16) for name, shape in C.DEIT_SHAPES.items()}
# --quick: head dim 64 and MLP 512, so the kernel-friendly rounding applies as on DeiT, at 64 px (17 tokens)
SHAPES["quick"] = dict(model=dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=2, intermediate_size=512),
                       image_size=64, patch_size=16)
REPEATS = {1: 30, 64: 20, 256: 10, 1024: 5}  # timed rounds per batch size; warm-up rounds are extra
SDPA_OPS = {
    "aten::_scaled_dot_product_flash_attention": "flash",
    "aten::_scaled_dot_product_efficient_attention": "efficient",
    "aten::_scaled_dot_product_cudnn_attention": "cudnn",
    "aten::_scaled_dot_product_attention_math": "math",
    "aten::_scaled_dot_product_flash_attention_for_cpu": "flash-cpu",
    "aten::_scaled_dot_product_fused_attention_overrideable": "overrideable",
}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny shape, budget 0.5, batch 1 and 4, few repeats")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=("cuda", "cpu"))
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    parser.add_argument("--shapes", default=None, help="default deit-small,deit-base (--quick: quick)")
    parser.add_argument("--budgets", default=None, help="default 0.7,0.5,0.3 (--quick: 0.5)")
    parser.add_argument("--batch-sizes", default=None, help="default 1,64,256,1024 (--quick: 1,4)")
    parser.add_argument("--methods", default="ofb,uvc", help="ofb, uvc, ofb-unrounded, uvc-unrounded")
    parser.add_argument("--no-tp", action="store_true", help="leave Torch-Pruning out")
    parser.add_argument("--modes", default="eager,compile", help="eager and/or compile")
    parser.add_argument("--compile-budgets", default=None,
                        help="budgets compiled, in priority order (default 0.5,0.7,0.3; --quick: 0.5)")
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds for every cell (default: by batch)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--time-budget", type=float, default=None,
                        help="seconds from start after which no further compile group or batch-1 compile starts")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--name", default=None, help="results stem (default speed_gpu, speed_gpu_quick)")
    parser.add_argument("--output-dir", default=str(C.RESULTS))
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is visible to torch")
    preset = dict(shapes="quick", budgets="0.5", batch_sizes="1,4", compile_budgets="0.5") if args.quick else \
        dict(shapes="deit-small,deit-base", budgets="0.7,0.5,0.3", batch_sizes="1,64,256,1024",
             compile_budgets="0.5,0.7,0.3")
    for key, value in preset.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.quick:
        args.repeats = args.repeats or 3
        args.warmup = 1
    args.name = args.name or ("speed_gpu_quick" if args.quick else "speed_gpu")
    allowed = {"--modes": {"eager", "compile"}, "--shapes": set(SHAPES),
               "--methods": {"ofb", "uvc", "ofb-unrounded", "uvc-unrounded"}}
    for option, values in (("--modes", args.modes), ("--shapes", args.shapes), ("--methods", args.methods)):
        unknown = set(values.split(",")) - allowed[option]
        if unknown:
            parser.error(f"{option}: unknown {sorted(unknown)}; allowed: {', '.join(sorted(allowed[option]))}")
    return args


# ---------------------------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------------------------


def _derive(method: str):
    base, _, suffix = method.partition("-")
    derive = {"ofb": C.ofb_architecture, "uvc": C.uvc_architecture}.get(base)
    if derive is None or suffix not in ("", "unrounded"):
        raise ValueError(f"--methods: unknown {method!r}; allowed: ofb, uvc, ofb-unrounded, uvc-unrounded")
    multiple = 1 if suffix else None
    return lambda dense, budget, seed: derive(dense, budget, seed=seed, channel_multiple=multiple)


def build_variants(shape: str, args, log_error) -> list[dict]:
    """dense + every (method, budget) export + Torch-Pruning: dicts with name, method, budget, model, macs, ..."""
    from hf_vit_compress import count_macs, count_params, export_compressed_model

    spec = SHAPES[shape]
    dense = C.dense_vit(spec["model"], seed=args.seed, image_size=spec["image_size"], patch_size=spec["patch_size"])
    variants = [dict(name="dense", method="dense", budget=1.0, model=dense, macs=count_macs(dense))]
    for budget in [float(b) for b in args.budgets.split(",")]:
        for method in args.methods.split(","):
            architecture = _derive(method)(dense, budget, args.seed)
            model = export_compressed_model(dense, architecture).eval()
            variants.append(dict(name=f"{method}@{budget:g}", method=method, budget=budget, model=model,
                                 macs=count_macs(model)))
        if not args.no_tp:
            try:
                pruned, ratio, _ = C.tp_pruned_to_budget(dense, budget)
                variants.append(dict(name=f"tp@{budget:g}", method="tp", budget=budget, model=pruned.eval(),
                                     macs=C.shape_macs(dense, C.shapes_of(pruned)), tp_ratio=round(ratio, 5)))
            except ImportError as error:
                log_error(f"{shape}: Torch-Pruning left out ({error})")
                args.no_tp = True
    for variant in variants:
        variant["params"] = count_params(variant["model"])
        variant["macs_ratio"] = variant["macs"] / variants[0]["macs"]
        variant["shapes"] = C.shapes_of(variant["model"])
    return variants


def attention_shapes(shapes: dict) -> list[tuple[int, int, int]]:
    """(num_heads, qk head dim, v head dim) of every block with heads, from `_common.shapes_of`."""
    return [(layer["heads"], layer["qk"] // layer["heads"], layer["v"] // layer["heads"])
            for layer in shapes["layers"] if layer["heads"]]


def predicted_backends(shapes: dict, dtype: torch.dtype) -> dict:
    """Backends every attention block allows, and the blocks only the math path takes (surgery.kernels)."""
    allowed, math_only = set(BACKENDS), []
    for index, (_, qk, v) in enumerate(attention_shapes(shapes)):
        reasons = sdpa_backend_reasons(qk, v, dtype)
        allowed &= {backend for backend, reason in reasons.items() if reason is None}
        if all(reasons[backend] is not None for backend in FUSED_BACKENDS):
            math_only.append(index)
    return {"backends": [b for b in BACKENDS if b in allowed], "math_only_blocks": math_only}


# ---------------------------------------------------------------------------------------------------------------
# Measuring
# ---------------------------------------------------------------------------------------------------------------


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def pixels(shape: str, batch: int, device: str, dtype: torch.dtype, seed: int) -> torch.Tensor:
    size = SHAPES[shape]["image_size"]
    values = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))
    return values.to(device=device, dtype=dtype)


@torch.inference_mode()
def time_round_robin(models: dict, pixel_values: torch.Tensor, repeats: int, warmup: int, device: str) -> dict:
    """Seconds per forward of every model, round-robin with the order rotated each round."""
    names = list(models)
    times = {name: [] for name in names}
    for _ in range(warmup):
        for name in names:
            models[name](pixel_values=pixel_values)
    for round_index in range(repeats):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            _sync(device)
            started = time.perf_counter()
            models[name](pixel_values=pixel_values)
            _sync(device)
            times[name].append(time.perf_counter() - started)
    return times


@torch.inference_mode()
def observed_sdpa(model, pixel_values: torch.Tensor, device: str) -> dict:
    """The sdpa backends one forward dispatched (aten op names, counted per call) and its attention kernels."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=activities) as profiler:
        model(pixel_values=pixel_values)
        _sync(device)
    events = profiler.events()
    counts = collections.Counter(SDPA_OPS[event.name] for event in events if event.name in SDPA_OPS)
    kernels = sorted({event.name[:90] for event in events if device == "cuda"
                      and getattr(event, "device_type", None) == torch.autograd.DeviceType.CUDA
                      and any(key in event.name.lower() for key in ("flash", "fmha", "attention", "sdpa", "cudnn"))})
    ran = "+".join(f"{name}x{count}" for name, count in sorted(counts.items())) or "decomposed (no sdpa op)"
    return {"ran": ran, "counts": dict(counts), "attention_kernels": kernels[:6]}


@torch.inference_mode()
def cuda_peak_extra_mb(model, pixel_values: torch.Tensor) -> float:
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    model(pixel_values=pixel_values)
    torch.cuda.synchronize()
    return max(0, torch.cuda.max_memory_allocated() - before) / 2**20


def summarize_cell(times: dict, variants: list[dict], batch: int) -> list[dict]:
    dense = times["dense"]
    rows = []
    for variant in variants:
        seconds = times[variant["name"]]
        paired = sorted(d / s for d, s in zip(dense, seconds))
        speedup, ideal = statistics.median(paired), 1.0 / variant["macs_ratio"]
        rows.append(dict(variant=variant["name"], method=variant["method"], budget=variant["budget"],
                         macs_ratio=variant["macs_ratio"], median_seconds=statistics.median(seconds),
                         images_per_second=batch / statistics.median(seconds), speedup=speedup,
                         speedup_q25=paired[len(paired) // 4], speedup_q75=paired[(3 * len(paired)) // 4],
                         ideal=ideal, speedup_over_ideal=speedup / ideal, seconds=seconds))
    return rows


class Run:
    """One benchmark run: the variants per shape, the cells measured, and the bookkeeping of time and errors."""

    def __init__(self, args):
        self.args = args
        self.dtype = getattr(torch, args.dtype)
        self.started = time.perf_counter()
        self.compile_seconds: list[float] = []
        self.results = {"provenance": C.provenance(), "settings": vars(args).copy(), "cells": [], "variants": {},
                        "compile": {}, "skipped": [], "errors": []}

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def fits(self, seconds: float) -> bool:
        budget = self.args.time_budget
        return budget is None or self.elapsed() + seconds <= budget

    def error(self, message: str) -> None:
        C.log(f"ERROR {message}")
        self.results["errors"].append(message)

    def skip(self, message: str) -> None:
        C.log(f"skipped: {message}")
        self.results["skipped"].append(message)

    def write(self) -> None:
        self.results["wall_seconds"] = self.elapsed()
        output_dir = Path(self.args.output_dir)
        C.write_json(output_dir / f"{self.args.name}.json", self.results)
        write_markdown(output_dir / f"{self.args.name}.md", self.results)

    # -- variants ----------------------------------------------------------------------------------------------
    def prepare(self, shape: str) -> list[dict]:
        args = self.args
        C.log(f"{shape}: building dense, {args.methods}{'' if args.no_tp else ' and Torch-Pruning'} variants")
        variants = build_variants(shape, args, self.error)
        spec = SHAPES[shape]
        tokens = (spec["image_size"] // spec["patch_size"]) ** 2 + 1
        described = {}
        for variant in variants:
            entry = {key: variant[key] for key in ("method", "budget", "macs", "macs_ratio", "params")}
            entry["summary"] = C.shapes_summary(variant["shapes"])
            entry["predicted_sdpa"] = predicted_backends(variant["shapes"], self.dtype)
            if args.device == "cuda":
                check = cross_check_shapes(attention_shapes(variant["shapes"]), tokens, self.dtype, "cuda")
                entry["torch_sdpa"] = {f"{s['num_heads']}h/{s['qk_head_dim']}/{s['v_head_dim']}": s["torch"]
                                       for s in check["shapes"]}
                entry["sdpa_mismatches"] = check["mismatches"]
                for mismatch in check["mismatches"]:
                    self.error(f"{shape} {variant['name']}: kernels.py vs torch: {mismatch}")
            described[variant["name"]] = entry
            variant["model"].to(device=args.device, dtype=self.dtype)
        self.results["variants"][shape] = described
        return variants

    # -- cells -------------------------------------------------------------------------------------------------
    def measure(self, shape: str, mode: str, group: str, variants: list[dict], models: dict, batch: int) -> None:
        args = self.args
        repeats = args.repeats or REPEATS.get(batch, 10)
        pixel_values = pixels(shape, batch, args.device, self.dtype, args.seed)
        warmup = max(args.warmup, 3) if mode == "compile" else args.warmup  # a compiled model's first calls are slow
        C.log(f"{shape} {mode} {group} batch {batch}: {len(models)} variants, {warmup} warm-up + {repeats} rounds")
        frames = _compiled_frames()
        times = time_round_robin(models, pixel_values, repeats, warmup, args.device)
        recompiles = _compiled_frames() - frames  # > 0: dynamo compiled again inside the timed loop
        rows = summarize_cell(times, variants, batch)
        for row, variant in zip(rows, variants):
            row["sdpa"] = observed_sdpa(models[variant["name"]], pixel_values, args.device)
            if args.device == "cuda" and mode == "eager":
                row["peak_extra_mb"] = cuda_peak_extra_mb(models[variant["name"]], pixel_values)
            C.log(f"  {row['variant']:>18}: {row['images_per_second']:9.1f} img/s, speedup {row['speedup']:.2f} / "
                  f"ideal {row['ideal']:.2f} = {row['speedup_over_ideal']:.2f}, sdpa {row['sdpa']['ran']}")
        if recompiles:
            self.error(f"{shape} {mode} {group} batch {batch}: dynamo compiled {recompiles} frame(s) during warm-up "
                       "or timing (the first rounds may include compile time)")
        self.results["cells"].append(dict(shape=shape, batch=batch, mode=mode, group=group, repeats=repeats,
                                          warmup=warmup, recompiles_while_timing=recompiles, rows=rows))
        self.write()

    def eager(self, shape: str, variants: list[dict], batches: list[int]) -> None:
        models = {variant["name"]: variant["model"] for variant in variants}
        for batch in batches:
            try:
                self.measure(shape, "eager", "all", variants, models, batch)
            except Exception:  # noqa: BLE001  (one failing cell must not lose the others)
                self.error(f"{shape} eager batch {batch}: {traceback.format_exc(limit=3)}")
            _free(self.args.device)

    # -- torch.compile -----------------------------------------------------------------------------------------
    def compile_models(self, shape: str, variants: list[dict], compiled: dict, batch: int) -> None:
        """Compile (first call at `batch`, batch dim dynamic for batch >= 2) every variant not compiled yet."""
        pixel_values = pixels(shape, batch, self.args.device, self.dtype, self.args.seed)
        if batch > 1:  # "maybe": a model whose code needs a static batch is specialised instead of failing
            torch._dynamo.maybe_mark_dynamic(pixel_values, 0)
        for variant in variants:
            key = (variant["name"], batch > 1)
            if key in compiled:
                continue
            model = compiled.get((variant["name"], True))  # batch 1: the same module, one more specialisation
            model = torch.compile(variant["model"]) if model is None else model
            started = time.perf_counter()
            with torch.inference_mode():
                model(pixel_values=pixel_values)
            _sync(self.args.device)
            seconds = time.perf_counter() - started
            self.compile_seconds.append(seconds)
            compiled[key] = model
            record = self.results["compile"].setdefault(shape, {}).setdefault(variant["name"], {})
            record["first_call_seconds" if batch > 1 else "batch1_first_call_seconds"] = round(seconds, 1)
            C.log(f"  compiled {variant['name']} ({'dynamic batch' if batch > 1 else 'batch 1'}) in {seconds:.1f} s")

    def compiled_group(self, shape: str, group: list[dict], compiled: dict, batches: list[int], label: str) -> None:
        pending = sum((v["name"], min(batches) > 1) not in compiled for v in group)
        # the first group runs whenever time is left (nothing measured yet); later ones on the measured compile time
        guess = statistics.mean(self.compile_seconds) if self.compile_seconds else 0.0
        if not self.fits(pending * guess * 1.2 + 5.0 * len(batches) * bool(self.compile_seconds)):
            cost = f"{pending} compiles of ~{guess:.0f} s would pass" if guess else "no time left in"
            self.skip(f"{shape} compile {label} batch {','.join(map(str, batches))}: {cost} --time-budget "
                      f"{self.args.time_budget} s (elapsed {self.elapsed():.0f} s)")
            return
        try:
            self.compile_models(shape, group, compiled, max(batches))
            models = {v["name"]: compiled[(v["name"], max(batches) > 1)] for v in group}
            for batch in sorted(batches, key=lambda b: (b != 256, -b)):  # the headline batch first
                self.measure(shape, "compile", label, group, models, batch)
        except Exception:  # noqa: BLE001
            self.error(f"{shape} compile {label}: {traceback.format_exc(limit=3)}")
        _free(self.args.device)


def _compiled_frames() -> int:
    return int(torch._dynamo.utils.counters["frames"]["ok"])


def _free(device: str) -> None:
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    run = Run(args)
    modes = args.modes.split(",")
    batches = [int(b) for b in args.batch_sizes.split(",")]
    shapes = args.shapes.split(",")
    prepared: dict[str, list[dict]] = {}
    for shape in shapes:
        try:
            prepared[shape] = run.prepare(shape)
        except Exception:  # noqa: BLE001
            run.error(f"{shape}: building the variants failed: {traceback.format_exc(limit=4)}")
        run.write()
    if "eager" in modes:
        for shape, variants in prepared.items():
            run.eager(shape, variants, batches)
    if "compile" in modes:
        compiled = {shape: {} for shape in prepared}
        large = [b for b in batches if b > 1]
        groups = [(float(budget), shape) for budget in args.compile_budgets.split(",") for shape in prepared]
        for budget, shape in groups:  # every batch >= 2 of every group first, then batch 1
            group = [v for v in prepared[shape] if v["method"] == "dense"
                     or (v["budget"] == budget and v["method"] != "tp")]
            if large:
                run.compiled_group(shape, group, compiled[shape], large, f"{budget:g}")
        if 1 in batches:
            for budget, shape in groups:
                group = [v for v in prepared[shape] if v["method"] == "dense"
                         or (v["budget"] == budget and v["method"] != "tp")]
                run.compiled_group(shape, group, compiled[shape], [1], f"{budget:g}")
    run.write()
    C.log(f"wrote {Path(args.output_dir) / args.name}.json/.md in {run.elapsed() / 60:.1f} min "
          f"({len(run.results['errors'])} errors, {len(run.results['skipped'])} skipped)")
    return run.results


# ---------------------------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------------------------


def write_markdown(path: Path, results: dict) -> None:
    settings = results["settings"]
    lines = [C.markdown_header(
        f"GPU speed ({settings['dtype']}, {settings['modes']}): dense vs exported compressed models",
        results["provenance"],
        [f"settings: {settings}", f"wall time: {results.get('wall_seconds', 0) / 60:.1f} min",
         "speedup = median over rounds of the paired t_dense / t_variant (dense in the same mode); ideal = dense MACs "
         "/ variant MACs; sdpa ran = the aten sdpa op of each attention call in one profiled forward; predicted = "
         "backends every block's head dims allow (hf_vit_compress.surgery.kernels)"])]
    headline = [r for c in results["cells"] if c["batch"] == 256 for r in c["rows"] if r["budget"] == 0.5]
    if headline:
        lines.append("**Batch 256, 50% MACs, speedup/ideal**: " + "; ".join(
            f"{c['shape']} {c['mode']} {r['variant']} {r['speedup_over_ideal']:.2f}"
            for c in results["cells"] if c["batch"] == 256 for r in c["rows"] if r["budget"] == 0.5) + "\n")
    header = ["shape", "batch", "mode", "variant", "MACs", "img/s", "speedup [q25, q75]", "ideal", "speedup/ideal",
              "sdpa ran", "peak extra MB"]
    rows = [[c["shape"], c["batch"], c["mode"], r["variant"], f"{r['macs_ratio']:.3f}",
             f"{r['images_per_second']:.1f}", f"{r['speedup']:.2f} [{r['speedup_q25']:.2f}, {r['speedup_q75']:.2f}]",
             f"{r['ideal']:.2f}", f"{r['speedup_over_ideal']:.2f}", r["sdpa"]["ran"],
             f"{r['peak_extra_mb']:.0f}" if "peak_extra_mb" in r else None]
            for c in results["cells"] for r in c["rows"]]
    lines.append(C.md_table(header, rows))
    lines.append("\nVariants (D = residual width; per kept block heads/qk width/v width/MLP width), the sdpa backends "
                 "their shapes allow, and torch's verdicts where it disagreed:\n")
    for shape, entries in results["variants"].items():
        for name, entry in entries.items():
            predicted = entry["predicted_sdpa"]
            math_only = f", math-only blocks {predicted['math_only_blocks']}" if predicted["math_only_blocks"] else ""
            mismatch = f"; torch disagrees: {entry['sdpa_mismatches']}" if entry.get("sdpa_mismatches") else ""
            lines.append(f"- {shape} {name} (MACs {entry['macs_ratio']:.3f}): predicted sdpa "
                         f"{'/'.join(predicted['backends'])}{math_only}{mismatch}; `{entry['summary']}`")
    if results["compile"]:
        lines.append("\ntorch.compile first-call seconds (compile + one forward): " + "; ".join(
            f"{shape} {name} {record}" for shape, names in results["compile"].items()
            for name, record in names.items()))
    for key, title in (("skipped", "Not run"), ("errors", "Errors")):
        if results[key]:
            lines.append(f"\n{title}:\n")
            lines += [f"- {item}" for item in results[key]]
    path.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
