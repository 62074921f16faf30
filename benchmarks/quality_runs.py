"""quality.py's runs: one (method, budget, seed) from the dense model to the final top-1, and what a search logs.
"""

from __future__ import annotations

import copy
import math
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml
from transformers import TrainerCallback

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402
from quality_data import accuracy, gradient_batches, train_plain, training_arguments  # noqa: E402
from quality_setup import MODES  # noqa: E402


class AccuracyAtSearchEnd(TrainerCallback):
    """Top-1 of the model with its final architecture before any fine-tuning (the other methods' "before
    fine-tuning" column): measured at the first step that begins after the method has finalized."""

    def __init__(self, eval_set):
        self.eval_set, self.accuracy = eval_set, None

    def _measure(self, model) -> None:
        if self.accuracy is None and bool(model.compression.finalized):
            with torch.random.fork_rng():  # creating the eval DataLoader draws from the global RNG: leave it as is
                self.accuracy = accuracy(model, self.eval_set)
            model.train()

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        self._measure(model)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        self._measure(model)


#: Short-search settings (150 search steps) measured on this benchmark, seeds 0-2, median top-1 at 50% / 30% MACs:
#: * UVC: the demo's count step (`apply_short_run_settings`, at most 5% of a count's range per step).
#: * OFB: none since issue 13 (its budget is held by a dual variable and its architecture lr follows the search
#:   length). Before, with the paper's fixed FLOPs weight: architecture lr 5e-2 with weight 5: 50.30 / 45.15%
#:   (results/quality_cpu.md); the demo's 1e-2 with weight 500: 47.75 / 46.65%
#:   (results/archive/quality_cpu_ofb_demo_settings.md).


def search_overrides(args, method: str, train_size: int) -> dict:
    """The `CompressionConfig` fields ("ofb.arch_lr", ...) a run of `method` sets away from the library's defaults:
    with `--search-settings short` the short-search constants above, with `library` none; command-line overrides
    on top of either."""
    from hf_vit_compress import CompressionConfig
    from hf_vit_compress.cli.demo import apply_short_run_settings

    overrides = {}
    if args.search_settings == "short":
        short = apply_short_run_settings(CompressionConfig())
        overrides = {"uvc.counts_lr": short.uvc.counts_lr}
    flags = {"ofb.budget_control": args.ofb_budget_control, "ofb.arch_lr": args.ofb_arch_lr,
             "ofb.arch_travel": args.ofb_arch_travel, "ofb.flops_loss_weight": args.ofb_flops_weight,
             "ofb.head_choices": None if args.ofb_head_choices is None else [
                 int(count) for count in args.ofb_head_choices.split(",")],
             "uvc.counts_lr": args.uvc_counts_lr, "uvc.counts_space": args.uvc_counts_space,
             "uvc.channel_multiple": args.uvc_channel_multiple,
             "uvc.prune_hidden": None if args.uvc_prune_hidden is None else args.uvc_prune_hidden == "on",
             "uvc.shared_head_dims": None if args.uvc_shared_head_dims is None else args.uvc_shared_head_dims == "on",
             "uvc.budget_control": args.uvc_budget_control, "uvc.budget_dual_update": args.uvc_budget_dual_update}
    overrides.update({key: value for key, value in flags.items() if value is not None})
    for item in args.set_fields:
        key, equals, raw = item.partition("=")
        if not equals or key.count(".") != 1 or key.split(".")[0] not in ("ofb", "uvc"):
            raise SystemExit(f"--set {item!r}: expected ofb.FIELD=VALUE or uvc.FIELD=VALUE")
        overrides[key] = yaml.safe_load(raw)
    if args.ofb_elimination_rounds and overrides.get("ofb.budget_control") != "paper":
        overrides["ofb.elimination_rounds"] = args.ofb_elimination_rounds
    elif args.ofb_elimination_rounds:
        # Eliminate every search_steps / N steps instead of the paper's 3 rounds per epoch. With N = 30 modules
        # were finalised early and budget 0.3 ended at 0.14-0.20 of the MACs
        # (results/archive/quality_cpu_ofb_30rounds.json).
        steps_per_epoch = math.ceil(train_size / args.batch_size)
        search_steps = max(1, math.ceil(args.search_fraction * args.steps))
        interval = max(1, search_steps // args.ofb_elimination_rounds)
        overrides["ofb.eliminations_per_epoch"] = steps_per_epoch / interval
    return {key: value for key, value in overrides.items() if key.startswith(method + ".")}


def search_config(method: str, budget: float, args, train_size: int):
    """(the run's CompressionConfig, what it sets away from the library's defaults)."""
    from hf_vit_compress import CompressionConfig

    if args.budget_unit == "speedup":  # a speed budget on this CPU (fp32, --threads), measured after the run
        config = CompressionConfig(method=method, target_speedup=budget, search_fraction=args.search_fraction,
                                   latency={"table": args.latency_table, "batch_size": args.latency_batch,
                                            "repeats": 7})
    else:
        config = CompressionConfig(method=method, target_flops=budget, search_fraction=args.search_fraction)
    overrides = search_overrides(args, method, train_size)
    apply_overrides(config, overrides)
    return config, overrides


def apply_overrides(config, overrides: dict) -> None:
    """Set `overrides` ("ofb.arch_lr": value, ...) on `config` and validate the sections they touch."""
    for key, value in overrides.items():
        section, name = key.split(".")
        setattr(getattr(config, section), name, value)
    for section in {key.split(".")[0] for key in overrides}:
        getattr(config, section).validate()


class SearchTrace(TrainerCallback):
    """The method's logged scalars (`metrics()`: expected MACs ratio, OFB's active candidates per module, UVC's hard
    ratio and budget dual, ...) before the first step, after an optimizer step about every 1% of the search, and
    after the search's last step. Passed to the trainer's constructor, it runs before the trainer's own callback,
    so its last point is the search's state BEFORE the final projection (and before that step's elimination)."""

    def __init__(self, points: int = 100):
        self.points, self.rows = points, []

    def _record(self, step: int, method) -> None:
        self.rows.append({"step": step, **{k: round(float(v), 5) for k, v in method.metrics().items()}})

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        if state.global_step == 0 and not self.rows:
            self._record(0, model.compression)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        method = model.compression
        if method.search_finished:
            return
        every = max(1, method.total_search_steps // self.points)
        if state.global_step % every == 0 or state.global_step >= method.total_search_steps:
            self._record(state.global_step, method)

    def columns(self) -> dict[str, list]:
        keys = list(dict.fromkeys(key for row in self.rows for key in row))
        return {key: [row.get(key) for row in self.rows] for key in keys}


def loss_log(trainer, traced: set[str]) -> dict[str, list]:
    """The trainer's training logs (averaged loss terms, lr, grad norm) as columns, without what the trace holds."""
    rows = [{k: round(v, 5) if isinstance(v, float) else v for k, v in entry.items() if k not in traced}
            for entry in trainer.state.log_history if "loss" in entry]
    keys = list(dict.fromkeys(key for row in rows for key in row))
    return {key: [row.get(key) for row in rows] for key in keys}


def search_warmup_steps(config, search_steps: int) -> int:
    """End of the method's warm-up in search steps: OFB's lambda/PMIM ramp, UVC's skip-gate warm-up."""
    fraction = config.ofb.warmup_fraction if config.method == "ofb" else config.uvc.skip_warmup_fraction
    return round(fraction * search_steps)


def run_one(method: str, budget: float, seed: int, dense, args, train_set, eval_set) -> dict:
    from transformers import set_seed

    from hf_vit_compress import count_macs, count_params, export_compressed_model
    from hf_vit_compress.data import collate_images

    preset = MODES[args.mode]
    dense_macs = count_macs(dense)
    set_seed(seed)
    started = time.perf_counter()
    extra = {}
    if method in ("ofb", "uvc"):
        from hf_vit_compress import CompressionTrainer

        config, overrides = search_config(method, budget, args, len(train_set))
        model = copy.deepcopy(dense).train()
        with tempfile.TemporaryDirectory(prefix="quality-") as tmp:
            at_search_end, trace = AccuracyAtSearchEnd(eval_set), SearchTrace()
            # --ofb-distill: OFB distils from a frozen copy of the dense model as UVC always does (its recipe)
            teacher = copy.deepcopy(dense).eval().requires_grad_(False) if (
                method == "ofb" and args.ofb_distill) else None
            trainer = CompressionTrainer(model=model,
                                         args=training_arguments(args, tmp, args.steps, preset["lr"], seed),
                                         compression_config=config, train_dataset=train_set, teacher=teacher,
                                         data_collator=collate_images, callbacks=[at_search_end, trace])
            trainer.train()
            final = trainer.export_compressed_model()
        search_steps = trainer.method.total_search_steps
        method_config = {k: v for k, v in config.to_dict().items() if k != ("uvc" if method == "ofb" else "ofb")}
        extra.update(accuracy_before_finetune=at_search_end.accuracy, search_steps=search_steps,
                     distilled=trainer.teacher is not None,
                     search_warmup_steps=search_warmup_steps(config, search_steps),
                     steps_per_epoch=trainer.method.steps_per_epoch,
                     search_settings={"source": "library defaults" if args.search_settings == "library"
                                      else "benchmark short-search constants", "overrides": overrides},
                     method_config=method_config, search_trace=trace.columns(),
                     loss_log=loss_log(trainer, set(trace.columns()) - {"step"}))
        if config.budget_unit == "latency":
            extra["speed_budget"] = trainer.speed_budget_facts(trainer.method.final_architecture)
        macs = count_macs(final)
    elif method.startswith("tp-"):
        importance = method.split("-", 1)[1]
        batches = (lambda: gradient_batches(train_set, args.batch_size, seed)) if importance == "taylor" else None
        final, ratio, tries = C.tp_pruned_to_budget(dense, budget, importance=importance, gradient_batches=batches)
        extra.update(tp_ratio=round(ratio, 5), tp_tries=tries)
        macs = C.shape_macs(dense, C.shapes_of(final))
        extra["accuracy_before_finetune"] = accuracy(final, eval_set)
        train_plain(final.train(), args, train_set, args.steps, preset["lr"], seed)
    elif method == "uniform":
        architecture = C.uniform_architecture(dense, budget)
        final = export_compressed_model(dense, architecture)
        macs = count_macs(final)
        extra["accuracy_before_finetune"] = accuracy(final, eval_set)
        train_plain(final.train(), args, train_set, args.steps, preset["lr"], seed)
    else:
        raise ValueError(method)
    seconds = time.perf_counter() - started
    result = dict(method=method, budget=budget, seed=seed, accuracy=accuracy(final, eval_set), macs=macs,
                  macs_ratio=macs / dense_macs, params=count_params(final), steps=args.steps,
                  seconds=round(seconds, 1), shapes=C.shapes_summary(C.shapes_of(final)), **extra)
    if args.budget_unit == "macs" and result["macs_ratio"] > budget + 1e-9:
        raise AssertionError(f"{method}@{budget}: {result['macs_ratio']:.4f} of the dense MACs is over budget")
    return result
