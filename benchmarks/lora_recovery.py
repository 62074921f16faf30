"""LoRA recovery vs full fine-tuning after the same search (`CompressionConfig.finetune="lora"` / `"full"`).

    python benchmarks/lora_recovery.py                      # accuracy: CIFAR-10 (quality.py's cpu mode), 50% MACs
    python benchmarks/lora_recovery.py --part memory --device cuda   # memory / step time: DeiT-S, DeiT-B, ViT-L shapes
    python benchmarks/lora_recovery.py --quick              # smoke run of the accuracy part (quality.py --quick data)
    python benchmarks/lora_recovery.py --report-only        # rebuild results/lora_recovery.md from its JSON

Accuracy part. quality.py's protocol and helpers (its cached dense model, data, schedule and short-search settings):
every run is `CompressionTrainer` for `--steps` optimizer steps from the dense model, searching for the first half,
seed 0. Per method (OFB, UVC) three fine-tuning variants follow the same search:

* full:      every weight trains (the library's default), lr = quality.py's lr;
* lora:      LoRA (rank 8, alpha 16, every block's q/k/v/o, fc1, fc2; heads trained in full) on the frozen weights,
             adapters at the same lr;
* lora-lr10: the same with the adapters' lr 10x (`lora.learning_rate`), since LoRA usually wants a larger one.

The search is the same (finetune="lora" bypasses the adapters while searching;
tests/training/test_peft_recovery.py checks the losses are identical), which the table shows as identical top-1
before fine-tuning and identical shapes.
Per run: top-1 of the exported model, top-1 right after the search, trainable parameters in the fine-tuning phase,
bytes of gradients (summed before the optimizer step) and of optimizer state (after it) in that phase, and the
median wall time of a fine-tuning step (the JSON also holds the kernel's per-step peak-RSS figure, which on CPU
follows the allocator more than the step's needs).

Memory part (`--part memory`, meant for a GPU): DeiT-S / DeiT-B / ViT-L shapes (224 px, 1000 labels, random
weights and synthetic images, batch `--batch-size`, bf16 autocast), OFB at 50%, `--search-steps` search steps then
`--finetune-steps` fine-tuning steps; variants full and lora as above, plus `exported-full` / `exported-lora`: a
plain `transformers.Trainer` fine-tuning the model the full run exported, every weight / peft's LoRA with the same
settings (what a separate fine-tuning run of the saved compressed model would use).
Peak memory = `torch.cuda.max_memory_allocated` over the fine-tuning steps after the first (reset at the start of
the second: the first still frees the frozen weights' optimizer state) minus the allocation before the model was
built; step time = median over the same steps (synchronised). On CPU (smoke runs) the same fields come from the
peak-RSS counter.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import TrainerCallback

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402
import quality_data as QD  # noqa: E402
import quality_runs as QR  # noqa: E402
import quality_setup as QS  # noqa: E402
from overhead import SyntheticImages  # noqa: E402

VARIANTS = ("full", "lora", "lora-lr10")
LORA = dict(rank=8, alpha=16.0)
STARTED = time.perf_counter()
SHAPES = {**C.DEIT_SHAPES, "vit-large": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                                             intermediate_size=4096)}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=("accuracy", "memory"), default="accuracy")
    parser.add_argument("--quick", action="store_true", help="smoke run")
    parser.add_argument("--methods", default="uvc,ofb")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--budget", type=float, default=0.5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=None, help="accuracy part: steps per run (quality.py's)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads on CPU (0 = torch's default)")
    parser.add_argument("--data-dir", default=None, help="quality.py's --data-dir")
    parser.add_argument("--cache-dir", default=None, help="quality.py's --cache-dir (the cached dense model)")
    parser.add_argument("--shapes", default="deit-small,deit-base,vit-large", help="memory part: model shapes")
    parser.add_argument("--batch-size", type=int, default=64, help="memory part")
    parser.add_argument("--search-steps", type=int, default=3, help="memory part")
    parser.add_argument("--finetune-steps", type=int, default=8, help="memory part")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="memory part")
    parser.add_argument("--name", default=None)
    parser.add_argument("--output-dir", default=str(C.RESULTS))
    parser.add_argument("--report-only", action="store_true", help="only rebuild the Markdown from the JSON")
    args = parser.parse_args(argv)
    unknown = set(args.variants.split(",")) - set(VARIANTS)
    if unknown:
        parser.error(f"--variants: unknown {sorted(unknown)}; allowed: {', '.join(VARIANTS)}")
    suffix = "_quick" if args.quick else ""
    args.name = args.name or ("lora_recovery" if args.part == "accuracy" else "lora_recovery_memory") + suffix
    return args


# ---------------------------------------------------------------------------------------------------------------
# Measurements inside a run
# ---------------------------------------------------------------------------------------------------------------


def _tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


class PhaseProbe(TrainerCallback):
    """Per optimizer step: wall time, the step's memory, and in the fine-tuning phase the bytes of gradients (before
    the optimizer step) and of optimizer state (after it). `measure_from`: steps (1-based) from which memory and
    time count (the memory part skips the first fine-tuning step)."""

    def __init__(self, trainer, cuda: bool):
        self.trainer, self.cuda, self.steps = trainer, cuda, []

    def _finetuning(self, state) -> bool:
        return state.global_step >= self.trainer.method.total_search_steps  # the step about to run / running

    def on_step_begin(self, args, state, control, **kwargs):
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            begin = torch.cuda.memory_allocated()
        else:
            begin = C.rss_bytes()["VmRSS"]
            C.reset_peak_rss()
        self.steps.append({"step": state.global_step + 1, "finetuning": self._finetuning(state), "begin": begin,
                           "start": time.perf_counter()})

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        model = self.trainer.accelerator.unwrap_model(self.trainer.model)
        self.steps[-1]["gradient_bytes"] = _tensor_bytes(p.grad for p in model.parameters())

    def on_optimizer_step(self, args, state, control, **kwargs):
        optimizer_state = self.trainer.optimizer.state
        self.steps[-1]["optimizer_state_bytes"] = _tensor_bytes(
            value for per_parameter in optimizer_state.values() for value in per_parameter.values())

    def on_step_end(self, args, state, control, **kwargs):
        if self.cuda:
            torch.cuda.synchronize()
        record = self.steps[-1]
        record["seconds"] = time.perf_counter() - record["start"]
        record["peak"] = torch.cuda.max_memory_allocated() if self.cuda else C.rss_bytes()["VmHWM"]


def _median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def phase_summary(steps: list[dict], skip_first_finetuning: int = 0) -> dict:
    search = [s for s in steps if not s["finetuning"]]
    finetuning = [s for s in steps if s["finetuning"]][skip_first_finetuning:]
    return {
        "search_step_seconds": _median([s["seconds"] for s in search[1:]]),
        "search_peak_mb": max((s["peak"] / 2**20 for s in search), default=None),
        "finetune_step_seconds": _median([s["seconds"] for s in finetuning]),
        "finetune_step_extra_mb": _median([(s["peak"] - s["begin"]) / 2**20 for s in finetuning]),
        "finetune_peak_mb": max((s["peak"] / 2**20 for s in finetuning), default=None),
        "finetune_gradient_mb": _median([s.get("gradient_bytes", 0) / 2**20 for s in finetuning]),
        "finetune_optimizer_state_mb": _median([s.get("optimizer_state_bytes", 0) / 2**20 for s in finetuning]),
        "finetune_steps_measured": len(finetuning),
    }


def compression_config(method: str, variant: str, budget: float, search_fraction: float, lr: float):
    from hf_vit_compress import CompressionConfig

    config = CompressionConfig(method=method, target_flops=budget, search_fraction=search_fraction)
    if variant != "full":
        config.finetune = "lora"
        config.lora.rank, config.lora.alpha = LORA["rank"], LORA["alpha"]
        config.lora.learning_rate = lr * (10 if variant == "lora-lr10" else 1)
    return config


def trainable_in_finetuning(trainer) -> int:
    """Parameters the fine-tuning phase trains (after the run: the ones with requires_grad that the optimizer holds,
    minus the frozen weights that DDP would keep requiring gradients)."""
    model = trainer.accelerator.unwrap_model(trainer.model)
    frozen = {id(p) for p in trainer.lora_recovery.frozen_parameters} if trainer.lora_recovery else set()
    method = {id(p) for p in trainer.method.parameters()}
    return sum(p.numel() for p in model.parameters() if p.requires_grad and id(p) not in frozen | method)


# ---------------------------------------------------------------------------------------------------------------
# Accuracy part
# ---------------------------------------------------------------------------------------------------------------


def quality_args(args):
    argv = ["--quick"] if args.quick else []
    for flag, value in (("--data-dir", args.data_dir), ("--cache-dir", args.cache_dir), ("--steps", args.steps)):
        if value is not None:
            argv += [flag, str(value)]
    return QS.parse_args(argv)


def accuracy_run(method: str, variant: str, qargs, args, dense, train_set, eval_set) -> dict:
    from transformers import set_seed

    from hf_vit_compress import CompressionTrainer, count_macs, count_params
    from hf_vit_compress.data import collate_images

    lr = QS.MODES[qargs.mode]["lr"]
    config = compression_config(method, variant, args.budget, qargs.search_fraction, lr)
    QR.apply_overrides(config, QR.search_overrides(qargs, method, len(train_set)))
    set_seed(args.seed)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="lora-recovery-") as tmp:
        at_search_end = QR.AccuracyAtSearchEnd(eval_set)
        trainer = CompressionTrainer(model=copy.deepcopy(dense).train(), compression_config=config,
                                     args=QD.training_arguments(qargs, tmp, qargs.steps, lr, args.seed),
                                     train_dataset=train_set, data_collator=collate_images, callbacks=[at_search_end])
        probe = PhaseProbe(trainer, cuda=False)
        trainer.add_callback(probe)
        trainer.train()
        final = trainer.export_compressed_model()
    seconds = time.perf_counter() - started
    return dict(method=method, variant=variant, budget=args.budget, seed=args.seed, lr=lr,
                adapter_lr=config.lora.learning_rate if variant != "full" else None,
                lora=dict(LORA, targets=config.lora.target_modules, train_heads=config.lora.train_heads)
                if variant != "full" else None,
                accuracy=QD.accuracy(final, eval_set), accuracy_before_finetune=at_search_end.accuracy,
                macs_ratio=count_macs(final) / count_macs(dense), params=count_params(final),
                trainable_in_finetuning=trainable_in_finetuning(trainer), steps=qargs.steps,
                search_steps=trainer.method.total_search_steps, seconds=round(seconds, 1),
                shapes=C.shapes_summary(C.shapes_of(final)), **phase_summary(probe.steps))


def accuracy_part(args, prov) -> dict:
    qargs = quality_args(args)
    make_train_set, test_set, eval_set = QD.load_data(qargs)
    dense, dense_info = QD.dense_model(qargs, make_train_set(0), test_set)
    train_size = min(qargs.train_size, len(make_train_set(0)))
    results = {"settings": {**QS.settings_of(qargs), "budget": args.budget, "seed": args.seed, "lora": LORA,
                            "search_overrides": {method: QR.search_overrides(qargs, method, train_size)
                                                 for method in args.methods.split(",")}},
               "dense": dense_info, "runs": [], "provenance": prov}
    for method in args.methods.split(","):
        for variant in args.variants.split(","):
            C.log(f"{method} {variant}: running ({qargs.steps} steps)")
            run = accuracy_run(method, variant, qargs, args, dense, make_train_set(args.seed), eval_set)
            results["runs"].append(run)
            prov["wall_seconds"] = round(time.perf_counter() - STARTED, 1)
            C.log(f"{method} {variant}: top-1 {100 * run['accuracy']:.2f}% (after the search "
                  f"{100 * run['accuracy_before_finetune']:.2f}%), fine-tuning step {run['finetune_step_seconds']:.3f}"
                  f" s, trainable {run['trainable_in_finetuning']}")
            write_accuracy_report(results, Path(args.output_dir), args.name)
    return results


def write_accuracy_report(results: dict, output_dir: Path, name: str) -> None:
    C.write_json(output_dir / f"{name}.json", results)
    settings, dense = results["settings"], results["dense"]
    lines = [C.markdown_header("LoRA recovery vs full fine-tuning after the same search (CIFAR-10)",
                               results["provenance"], [f"settings: {json.dumps(settings)}"])]
    lines.append(f"Dense model (quality.py {settings['mode']} mode): top-1 {100 * dense['accuracy']:.2f}%. Every run: "
                 f"{settings['steps']} steps from it, the first {settings['search_fraction']:.0%} searching (budget "
                 f"{settings['budget']:g} of the dense MACs), seed {settings['seed']}, batch {settings['batch_size']},"
                 f" lr {settings['lr']}. LoRA: rank {LORA['rank']}, alpha {LORA['alpha']:g}, q/k/v/o, fc1, fc2 of "
                 "every block, heads trained in full.\n")
    rows = []
    for run in results["runs"]:
        rows.append([run["method"], run["variant"], f"{100 * run['accuracy']:.2f}",
                     f"{100 * run['accuracy_before_finetune']:.2f}", f"{run['macs_ratio']:.3f}",
                     run["trainable_in_finetuning"], f"{run['finetune_gradient_mb']:.2f}",
                     f"{run['finetune_optimizer_state_mb']:.2f}", f"{1000 * run['finetune_step_seconds']:.0f}",
                     run["shapes"]])
    lines.append(C.md_table(["method", "fine-tuning", "top-1 %", "top-1 % after the search", "MACs",
                             "trainable params (fine-tuning)", "gradients MB", "optimizer state MB",
                             "step ms (median)", "shapes"], rows))
    lines.append("\nFine-tuning phase only (steps after the search). gradients / optimizer state: bytes of the "
                 "tensors, exact (the LoRA phase trains the adapters and the head; the weights and OFB's per-unit "
                 "scales are frozen). The JSON also holds a per-step peak-RSS figure (`finetune_step_extra_mb`: the "
                 "kernel's counter reset at each step's start, minus the RSS then); on CPU it follows the allocator "
                 "more than the step's needs (0 MB for some runs), so it is left out here: "
                 "lora_recovery_memory_gpu.md measures memory on a GPU.\n")
    (output_dir / f"{name}.md").write_text("\n".join(lines) + "\n")


# ---------------------------------------------------------------------------------------------------------------
# Memory part
# ---------------------------------------------------------------------------------------------------------------


def _memory_now(cuda: bool) -> int:
    gc.collect()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        return torch.cuda.memory_allocated()
    return C.rss_bytes()["VmRSS"]


def training_arguments(tmp: str, steps: int, batch: int, cuda: bool):
    from transformers import TrainingArguments

    return TrainingArguments(
        output_dir=tmp, max_steps=steps, per_device_train_batch_size=batch, learning_rate=1e-4,
        lr_scheduler_type="constant", save_strategy="no", report_to=[], logging_steps=10**6, seed=0,
        use_cpu=not cuda, bf16=True, disable_tqdm=True, dataloader_num_workers=0, remove_unused_columns=False,
    )


def memory_run(shape: str, variant: str, args, image_size: int, cuda: bool) -> tuple[dict, torch.nn.Module | None]:
    from transformers import set_seed

    from hf_vit_compress import CompressionTrainer

    baseline = _memory_now(cuda)
    model = C.dense_vit(SHAPES[shape], seed=0, image_size=image_size).train()
    set_seed(0)  # the method's initial state is drawn when the trainer is built: the same for every variant
    total = args.search_steps + args.finetune_steps
    dataset = SyntheticImages(args.batch_size * total, image_size, model.config.num_labels)
    exported = None
    with tempfile.TemporaryDirectory(prefix="lora-memory-") as tmp:
        config = compression_config("ofb", variant, args.budget, args.search_steps / total - 1e-9, 1e-4)
        trainer = CompressionTrainer(model=model, args=training_arguments(tmp, total, args.batch_size, cuda),
                                     compression_config=config, train_dataset=dataset)  # default collator
        probe = PhaseProbe(trainer, cuda)
        trainer.add_callback(probe)
        trainer.train()
        assert trainer.method.total_search_steps == args.search_steps, trainer.method.total_search_steps
        result = dict(shape=shape, variant=variant, trainable_in_finetuning=trainable_in_finetuning(trainer),
                      **phase_summary(probe.steps, skip_first_finetuning=1))
        compressed = trainer.export_compressed_model().cpu()
        result["compressed_params"] = sum(p.numel() for p in compressed.parameters())
        result["shapes"] = C.shapes_summary(C.shapes_of(compressed))
        exported = compressed if variant == "full" else None
        del trainer, model, probe
    result["baseline_mb"] = baseline / 2**20
    result["finetune_peak_above_baseline_mb"] = result["finetune_peak_mb"] - baseline / 2**20
    result["search_peak_above_baseline_mb"] = result["search_peak_mb"] - baseline / 2**20
    return result, exported


def exported_run(shape: str, exported, lora: bool, args, image_size: int, cuda: bool) -> dict:
    """Plain fine-tuning of (a copy of) the exported compressed model for the same number of steps, for comparison:
    every weight, or (`lora`) peft's LoRA on it with the same rank, alpha and targets, the head in full."""
    from transformers import Trainer

    from hf_vit_compress.config import LORA_TARGETS

    baseline = _memory_now(cuda)
    model = copy.deepcopy(exported).to("cuda" if cuda else "cpu").train()
    if lora:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=LORA["rank"], lora_alpha=LORA["alpha"],
                                                 target_modules=list(LORA_TARGETS), modules_to_save=["classifier"]))
    steps = args.finetune_steps
    dataset = SyntheticImages(args.batch_size * steps, image_size, model.config.num_labels)
    records = []

    class Probe(TrainerCallback):
        def on_step_begin(self, *_, **__):
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            else:
                C.reset_peak_rss()
            records.append({"start": time.perf_counter(), "begin": torch.cuda.memory_allocated() if cuda
                            else C.rss_bytes()["VmRSS"]})

        def on_step_end(self, *_, **__):
            if cuda:
                torch.cuda.synchronize()
            records[-1]["seconds"] = time.perf_counter() - records[-1]["start"]
            records[-1]["peak"] = torch.cuda.max_memory_allocated() if cuda else C.rss_bytes()["VmHWM"]

    with tempfile.TemporaryDirectory(prefix="lora-memory-") as tmp:
        trainer = Trainer(model=model, args=training_arguments(tmp, steps, args.batch_size, cuda),
                          train_dataset=dataset, callbacks=[Probe()])  # default collator: no `datasets` needed
        trainer.train()
        del trainer
    measured = records[1:]
    peak = max(r["peak"] for r in measured) / 2**20
    result = dict(shape=shape, variant="exported-lora" if lora else "exported-full",
                  trainable_in_finetuning=sum(p.numel() for p in model.parameters() if p.requires_grad),
                  finetune_step_seconds=_median([r["seconds"] for r in measured]), finetune_peak_mb=peak,
                  finetune_step_extra_mb=_median([(r["peak"] - r["begin"]) / 2**20 for r in measured]),
                  finetune_steps_measured=len(measured), baseline_mb=baseline / 2**20,
                  finetune_peak_above_baseline_mb=peak - baseline / 2**20)
    del model
    return result


def memory_part(args, prov) -> dict:
    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no GPU visible")
    image_size = 224
    results = {"settings": {"shapes": {s: SHAPES[s] for s in args.shapes.split(",")}, "image_size": image_size,
                            "batch_size": args.batch_size, "search_steps": args.search_steps,
                            "finetune_steps": args.finetune_steps, "method": "ofb", "budget": args.budget,
                            "precision": "bf16 autocast, fp32 weights", "optimizer": "AdamW", "lora": LORA,
                            "device": args.device},
               "runs": [], "provenance": prov}
    for shape in args.shapes.split(","):
        exported = None
        for variant in ("full", "lora"):
            C.log(f"{shape} {variant}")
            run, from_full = memory_run(shape, variant, args, image_size, cuda)
            exported = exported if from_full is None else from_full
            results["runs"].append(run)
            C.log(f"{shape} {variant}: {run['finetune_peak_above_baseline_mb']:.0f} MB, "
                  f"{1000 * run['finetune_step_seconds']:.1f} ms/step")
        for lora in (False, True):
            run = exported_run(shape, exported, lora, args, image_size, cuda)
            results["runs"].append(run)
            C.log(f"{shape} {run['variant']}: {run['finetune_peak_above_baseline_mb']:.0f} MB, "
                  f"{1000 * run['finetune_step_seconds']:.1f} ms/step")
        del exported
        prov["wall_seconds"] = round(time.perf_counter() - STARTED, 1)
        write_memory_report(results, Path(args.output_dir), args.name)
    return results


def write_memory_report(results: dict, output_dir: Path, name: str) -> None:
    C.write_json(output_dir / f"{name}.json", results)
    settings = results["settings"]
    lines = [C.markdown_header("Fine-tuning after the search: LoRA vs full, memory and step time",
                               results["provenance"], [f"settings: {json.dumps(settings)}"])]
    rows = []
    for run in results["runs"]:
        full = next(r for r in results["runs"] if r["shape"] == run["shape"] and r["variant"] == "full")
        search_peak = run.get("search_peak_above_baseline_mb")
        rows.append([run["shape"], run["variant"], run["trainable_in_finetuning"],
                     f"{run['finetune_peak_above_baseline_mb']:.0f}",
                     f"{run['finetune_peak_above_baseline_mb'] / full['finetune_peak_above_baseline_mb']:.2f}",
                     f"{1000 * run['finetune_step_seconds']:.1f}",
                     f"{run['finetune_step_seconds'] / full['finetune_step_seconds']:.2f}",
                     None if search_peak is None else f"{search_peak:.0f}", run.get("compressed_params")])
    lines.append(C.md_table(["shape", "fine-tuning", "trainable params", "peak memory MB", "vs full",
                             "step ms (median)", "vs full", "search peak MB (same run)",
                             "exported params"], rows))
    lines.append(f"\nOFB at {settings['budget']:g} of the MACs, {settings['search_steps']} search steps, then "
                 f"{settings['finetune_steps']} fine-tuning steps (the first not measured), batch "
                 f"{settings['batch_size']}, {settings['precision']}. full / lora: `CompressionTrainer` fine-tuning "
                 "the gated dense model (`finetune=\"full\"` / `\"lora\"`); exported-full / exported-lora: a plain "
                 "Trainer fine-tuning the model the full run exported (every weight / peft LoRA, same settings). "
                 "Peak memory: allocated above what was allocated "
                 "before the model was built.\n")
    (output_dir / f"{name}.md").write_text("\n".join(lines) + "\n")


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads and args.device == "cpu":
        torch.set_num_threads(args.threads)
    prov = C.provenance([sys.argv[0], *(sys.argv[1:] if argv is None else argv)])
    if args.report_only:
        results = json.loads((Path(args.output_dir) / f"{args.name}.json").read_text())
        (write_accuracy_report if args.part == "accuracy" else write_memory_report)(results, Path(args.output_dir),
                                                                                      args.name)
        return results
    results = accuracy_part(args, prov) if args.part == "accuracy" else memory_part(args, prov)
    C.log(f"wrote {Path(args.output_dir) / args.name}.json/.md")
    return results


if __name__ == "__main__":
    main()
