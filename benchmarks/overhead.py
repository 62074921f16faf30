"""Search overhead: one OFB / UVC search step vs one plain fine-tuning step of the same model and batch, plus the
wall time of the demo.

    python benchmarks/overhead.py                      # demo-sized ViT + DeiT-S shape, OFB and UVC, and the demo
    python benchmarks/overhead.py --demo-report demo_out/report.json    # take the demo's timings from its report
    python benchmarks/overhead.py --quick              # smoke run (demo-sized model only, few steps, no demo)

Method:

* Each (model, kind) runs in a FRESH process (kind = plain: `transformers.Trainer` on the dense model; ofb / uvc:
  `CompressionTrainer` with `search_fraction=1.0`, so every step is a search step), with the same model, batch,
  optimizer (AdamW) and synthetic in-memory data (data loading is outside the timed region either way). Processes
  alternate plain, ofb, uvc, plain, ofb, uvc, ... for `--rounds` rounds so load changes hit all kinds alike.
* Step time: from the first `on_step_begin` callback to the last `on_step_end` callback of each optimizer step
  (forward, method losses, backward, optimizer, the method's proximal/dual updates, elimination, history); the
  first `--warmup` steps are excluded; median over the remaining steps of all rounds. ratio = median search step /
  median plain step.
* Peak memory (CPU): the kernel's peak-RSS counter is reset at every step begin (`/proc/self/clear_refs`) and read at
  step end; "training memory" = that peak minus the process's RSS after imports and before the model was built
  (weights, gradients, optimizer state, gates, teacher, activations, allocator caches); median over steps. On a GPU:
  `torch.cuda.max_memory_allocated` per step (minus the allocation before the model) instead.
* Demo: `hf_vit_compress.cli.demo.run_demo(DemoSettings())` (default settings) in a fresh process, or the timings of an
  existing demo `report.json` (`--demo-report`).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

MODELS = ("demo-tiny", "deit-small")
DEFAULT_BATCH = {"demo-tiny": None, "deit-small": 8}  # None: the demo's batch size


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--methods", default="ofb,uvc")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps per process (warm-up included)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=None, help="override every model's batch size")
    parser.add_argument("--target-flops", type=float, default=0.5)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0 = torch's default)")
    parser.add_argument("--bf16", action="store_true", help="bf16 mixed precision (TrainingArguments(bf16=True))")
    parser.add_argument("--demo-report", default=None, help="read the demo timings from this report.json")
    parser.add_argument("--no-demo", action="store_true")
    parser.add_argument("--name", default=None)
    parser.add_argument("--output-dir", default=str(C.RESULTS))
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--worker-model", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--demo-worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.models = "demo-tiny"
        args.steps = args.steps or 6
        args.warmup, args.rounds = 2, 1
        args.no_demo = args.no_demo or args.demo_report is None
    args.steps = args.steps or 12
    args.name = args.name or ("overhead_quick" if args.quick else "overhead")
    return args


# ---------------------------------------------------------------------------------------------------------------
# Worker: one Trainer run in this process
# ---------------------------------------------------------------------------------------------------------------


class SyntheticImages(torch.utils.data.Dataset):
    def __init__(self, size: int, image_size: int, num_labels: int):
        generator = torch.Generator().manual_seed(0)
        self.pixels = torch.randn(min(size, 64), 3, image_size, image_size, generator=generator)
        self.labels = torch.randint(0, num_labels, (size,), generator=generator)

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, index):
        return {"pixel_values": self.pixels[index % len(self.pixels)], "labels": int(self.labels[index])}


def build_model(name: str):
    if name == "demo-tiny":
        from transformers import ViTForImageClassification

        from hf_vit_compress.cli.demo import DemoSettings, tiny_vit_config

        torch.manual_seed(0)
        return ViTForImageClassification(tiny_vit_config()), DemoSettings().batch_size
    return C.dense_vit(C.DEIT_SHAPES["deit-small"], seed=0).train(), DEFAULT_BATCH[name]


def worker(args) -> None:
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from hf_vit_compress import CompressionConfig, CompressionTrainer
    from hf_vit_compress.data import collate_images

    if args.threads:
        torch.set_num_threads(args.threads)
    kind = args.worker
    import gc

    gc.collect()
    baseline = torch.cuda.memory_allocated() if torch.cuda.is_available() else C.rss_bytes()["VmRSS"]
    model, batch = build_model(args.worker_model)
    batch = args.batch_size or batch
    dataset = SyntheticImages(batch * args.steps, model.config.image_size, model.config.num_labels)
    cuda = torch.cuda.is_available()
    records: list[dict] = []

    class Begin(TrainerCallback):
        def on_step_begin(self, *_, **__):
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                records.append({"rss_begin": torch.cuda.memory_allocated()})
            else:
                records.append({"rss_begin": C.rss_bytes()["VmRSS"]})
                C.reset_peak_rss()
            records[-1]["start"] = time.perf_counter()

    class End(TrainerCallback):
        def on_step_end(self, *_, **__):
            if cuda:
                torch.cuda.synchronize()
            record = records[-1]
            record["seconds"] = time.perf_counter() - record["start"]
            record["peak"] = torch.cuda.max_memory_allocated() if cuda else C.rss_bytes()["VmHWM"]

    with tempfile.TemporaryDirectory(prefix="overhead-") as tmp:
        training_args = TrainingArguments(
            output_dir=tmp, max_steps=args.steps, per_device_train_batch_size=batch, learning_rate=1e-4,
            lr_scheduler_type="constant", save_strategy="no", report_to=[], logging_steps=10**6, seed=0,
            use_cpu=not cuda, disable_tqdm=True, dataloader_num_workers=0, remove_unused_columns=False,
            bf16=args.bf16,
        )
        if kind == "plain":
            trainer = Trainer(model=model, args=training_args, train_dataset=dataset, data_collator=collate_images)
        else:
            config = CompressionConfig(method=kind, target_flops=args.target_flops, search_fraction=1.0)
            trainer = CompressionTrainer(model=model, args=training_args, compression_config=config,
                                         train_dataset=dataset, data_collator=collate_images)
        trainer.callback_handler.callbacks.insert(0, Begin())
        trainer.add_callback(End())
        trainer.train()
    steps = [r for r in records if "seconds" in r][args.warmup:]
    result = {"kind": kind, "model": args.worker_model, "batch": batch, "bf16": args.bf16,
              "device": torch.cuda.get_device_name(0) if cuda else "cpu",
              "seconds": [r["seconds"] for r in steps],
              "peak_mb": [r["peak"] / 2**20 for r in steps],
              "baseline_mb": baseline / 2**20,
              "above_baseline_mb": [(r["peak"] - baseline) / 2**20 for r in steps],
              "extra_mb": [max(0, r["peak"] - r["rss_begin"]) / 2**20 for r in steps],
              "memory": "cuda max_memory_allocated" if cuda else "VmHWM reset per step"}
    print("OVERHEAD_RESULT " + json.dumps(result), flush=True)


def run_worker(args, kind: str, model: str) -> dict:
    command = [sys.executable, __file__, "--worker", kind, "--worker-model", model, "--steps", str(args.steps),
               "--warmup", str(args.warmup), "--threads", str(args.threads), "--target-flops", str(args.target_flops)]
    if args.batch_size:
        command += ["--batch-size", str(args.batch_size)]
    if args.bf16:
        command.append("--bf16")
    done = subprocess.run(command, capture_output=True, text=True, timeout=3600)
    for line in done.stdout.splitlines():
        if line.startswith("OVERHEAD_RESULT "):
            return json.loads(line[len("OVERHEAD_RESULT "):])
    raise RuntimeError(f"{kind} on {model} failed ({done.returncode}):\n{done.stderr[-4000:]}")


def demo_worker(output_dir: str, threads: int) -> None:
    if threads:
        torch.set_num_threads(threads)
    from hf_vit_compress.cli.demo import DemoSettings, run_demo

    started = time.perf_counter()
    report = run_demo(DemoSettings(output_dir=output_dir, progress=False))
    report["total_seconds"] = round(time.perf_counter() - started, 1)
    print("DEMO_RESULT " + json.dumps(report), flush=True)


def demo_timings(args) -> dict | None:
    if args.demo_report:
        try:
            report = json.loads(Path(args.demo_report).read_text())
        except (OSError, ValueError) as error:
            raise SystemExit(f"--demo-report {args.demo_report}: not a readable demo report.json ({error})")
        source = f"read from {args.demo_report}"
    elif args.no_demo:
        return None
    else:
        C.log("running the demo with default settings")
        with tempfile.TemporaryDirectory(prefix="overhead-demo-") as tmp:
            command = [sys.executable, __file__, "--demo-worker", tmp, "--threads", str(args.threads)]
            done = subprocess.run(command, capture_output=True, text=True, timeout=7200)
            lines = [line for line in done.stdout.splitlines() if line.startswith("DEMO_RESULT ")]
            if not lines:
                raise RuntimeError(f"demo failed ({done.returncode}):\n{done.stderr[-4000:]}")
            report = json.loads(lines[-1][len("DEMO_RESULT "):])
        source = "run_demo(DemoSettings()) in a fresh process"
    settings = report.get("settings", {})
    keep = ("method", "target_flops", "dense_accuracy", "compressed_accuracy", "compressed_macs_ratio",
            "dense_training_seconds", "compression_seconds", "total_seconds")
    timings = {key: report[key] for key in keep if key in report}
    timings["settings"] = settings
    timings["source"] = source
    search = settings.get("search_epochs")
    finetune = settings.get("finetune_epochs")
    if search is not None and finetune is not None and "compression_seconds" in report:
        timings["search_epochs"], timings["finetune_epochs"] = search, finetune
    return timings


# ---------------------------------------------------------------------------------------------------------------


def summarize(records: list[dict]) -> list[dict]:
    rows = []
    for model in dict.fromkeys(r["model"] for r in records):
        plain = [r for r in records if r["model"] == model and r["kind"] == "plain"]
        plain_seconds = statistics.median(s for r in plain for s in r["seconds"])
        plain_peak = statistics.median(p for r in plain for p in r["peak_mb"])
        plain_extra = statistics.median(p for r in plain for p in r["extra_mb"])
        plain_above = statistics.median(p for r in plain for p in r["above_baseline_mb"])
        for kind in dict.fromkeys(r["kind"] for r in records if r["model"] == model):
            runs = [r for r in records if r["model"] == model and r["kind"] == kind]
            seconds = statistics.median(s for r in runs for s in r["seconds"])
            peak = statistics.median(p for r in runs for p in r["peak_mb"])
            extra = statistics.median(p for r in runs for p in r["extra_mb"])
            above = statistics.median(p for r in runs for p in r["above_baseline_mb"])
            paired = [statistics.median(r["seconds"]) / statistics.median(p["seconds"]) for r, p in zip(runs, plain)]
            rows.append(dict(model=model, kind=kind, batch=runs[0]["batch"], steps=sum(len(r["seconds"]) for r in runs),
                             median_step_seconds=seconds, time_ratio=seconds / plain_seconds,
                             time_ratio_per_round=paired, median_peak_rss_mb=peak, peak_ratio=peak / plain_peak,
                             median_training_mb=above, training_memory_ratio=above / plain_above,
                             median_step_extra_mb=extra, extra_ratio=extra / plain_extra if plain_extra else None))
    return rows


def write_report(results: dict, output_dir: Path, name: str) -> None:
    C.write_json(output_dir / f"{name}.json", results)
    prov = results["provenance"]
    lines = [C.markdown_header("Search overhead: search step vs plain fine-tuning step", prov,
                               [f"settings: {results['settings']}",
                                f"wall time: {results.get('wall_seconds', 0) / 60:.1f} min",
                                f"precision: {'bf16 mixed precision' if results['settings'].get('bf16') else 'float32'}"
                                f" on {results['records'][0].get('device', 'cpu') if results['records'] else 'n/a'}"
                                f"; memory columns: {results['records'][0]['memory'] if results['records'] else 'n/a'}",
                                "step = on_step_begin .. on_step_end of one optimizer step (forward, losses, "
                                "backward, optimizer, method updates); warm-up steps excluded; fresh process per "
                                "(model, kind), kinds alternated over rounds; peak RSS per step via "
                                "/proc/self/clear_refs + VmHWM; training memory = peak RSS of the step minus the "
                                "process's RSS after imports, before the model was built (weights, gradients, "
                                "optimizer state, gates, teacher, activations)"])]
    header = ["model", "batch", "step", "steps timed", "median s/step", "time ratio (per round)",
              "training memory MB", "memory ratio", "peak RSS MB", "peak RSS ratio"]
    rows = [[r["model"], r["batch"], r["kind"], r["steps"], f"{r['median_step_seconds']:.3f}",
             f"{r['time_ratio']:.2f} ({', '.join(f'{x:.2f}' for x in r['time_ratio_per_round'])})",
             f"{r['median_training_mb']:.0f}", f"{r['training_memory_ratio']:.2f}",
             f"{r['median_peak_rss_mb']:.0f}", f"{r['peak_ratio']:.2f}"] for r in results["summary"]]
    lines.append(C.md_table(header, rows))
    demo = results.get("demo")
    if demo:
        lines.append(f"\nDemo ({demo['source']}; method {demo.get('method')}, target {demo.get('target_flops')}): "
                     f"dense training {demo.get('dense_training_seconds')} s, compression (search "
                     f"{demo.get('search_epochs')} epochs + fine-tune {demo.get('finetune_epochs')} epochs) "
                     f"{demo.get('compression_seconds')} s, total {demo.get('total_seconds', 'n/a')} s; dense "
                     f"accuracy {demo.get('dense_accuracy')}, compressed {demo.get('compressed_accuracy')} at "
                     f"{demo.get('compressed_macs_ratio')} of the MACs.")
        if demo.get("search_seconds_estimate") is not None:
            lines.append(f"Search part of it, estimated from the epochs and the demo-tiny OFB step ratio: "
                         f"{demo['search_seconds_estimate']:.1f} s.")
    (output_dir / f"{name}.md").write_text("\n".join(lines) + "\n")


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.worker:
        worker(args)
        return {}
    if args.demo_worker:
        demo_worker(args.demo_worker, args.threads)
        return {}
    started = time.perf_counter()
    prov = C.provenance([sys.argv[0], *(sys.argv[1:] if argv is None else argv)])
    if args.threads:
        prov["machine"]["torch_threads"] = args.threads
    demo = demo_timings(args) if args.demo_report else None  # a bad path fails before the long part
    kinds = ["plain", *args.methods.split(",")]
    records = []
    for model in args.models.split(","):
        for round_index in range(args.rounds):
            for kind in kinds:
                C.log(f"{model}: {kind} (round {round_index + 1}/{args.rounds}, {args.steps} steps)")
                record = run_worker(args, kind, model)
                record["round"] = round_index
                records.append(record)
                C.log(f"  median {statistics.median(record['seconds']):.3f} s/step, peak RSS "
                      f"{statistics.median(record['peak_mb']):.0f} MB")
    results = {"provenance": prov, "settings": {k: v for k, v in vars(args).items()
                                                if not k.startswith(("worker", "demo_worker"))},
               "records": records, "summary": summarize(records)}
    if demo is None:
        demo = demo_timings(args)
    if demo is not None:
        ofb = [r for r in results["summary"] if r["model"] == "demo-tiny" and r["kind"] == demo.get("method")]
        if ofb and demo.get("search_epochs") is not None:
            ratio = ofb[0]["time_ratio"]
            share = demo["search_epochs"] * ratio / (demo["search_epochs"] * ratio + demo["finetune_epochs"])
            demo["search_seconds_estimate"] = demo["compression_seconds"] * share
        results["demo"] = demo
    results["wall_seconds"] = time.perf_counter() - started
    output_dir = Path(args.output_dir)
    write_report(results, output_dir, args.name)
    C.log(f"wrote {output_dir / args.name}.json/.md")
    return results


if __name__ == "__main__":
    main()
