"""Dispatched operators and host-device synchronisations per optimizer step: plain fine-tuning step vs OFB / UVC
search step of the same model, measurable on any machine (no GPU needed).

    python benchmarks/dispatch.py                 # DeiT-S shape + the demo's tiny ViT, every kind of step
    python benchmarks/dispatch.py --quick         # smoke run (demo's tiny ViT, few steps)
    python benchmarks/dispatch.py --device cuda --bf16   # on a GPU: also counts the syncs CUDA itself reports

Method:

* One `transformers.Trainer` run per (model, kind): plain (`Trainer` on the dense model), ofb / uvc
  (`CompressionTrainer` searching), ofb-late (OFB with its widest embedding candidate already eliminated, as later in
  a search: every LayerNorm then normalises the kept channels only), uvc (UVC in the paper's search space,
  `prune_hidden=False`, `shared_head_dims=False`), uvc-default (the library's defaults: the residual width searched,
  q/k dims pruned with the value dims), uvc-projection (paper space, `budget_control="projection"`), ofb-finetune /
  uvc-finetune (the steps after the search: fixed architecture, OFB's learnable scales). Same model, batch, AdamW
  (the Trainer's default, fused: one op on CPU and CUDA alike; gradient clipping uses foreach kernels on both),
  synthetic in-memory data, `logging_steps`. The run is configured for a `--search-steps`-step search (default
  4000, so the search history is recorded every 20 steps as in a long search) and stopped after `--steps` steps. Op
  counts do not depend on the batch size, so a small batch (2) is used.
* Every aten operator that reaches the dispatcher's Python key is counted by a
  `torch.utils._python_dispatch.TorchDispatchMode` (forward, backward, optimizer, the method's updates, the
  Trainer's own bookkeeping), and attributed to the optimizer step in progress: a step runs from its `on_step_begin`
  to the next one's (so a step's logging and the fetch of the next batch belong to it). Ops run inside another op
  (a composite's decomposition, a foreach kernel's per-tensor loop) are not counted again. Views (`is_view` ops:
  view, transpose, expand, detach, ...) launch no kernel on a GPU; they are counted, and also reported apart.
* Host-device synchronisations: on a CPU there is none, so the operations that synchronise on CUDA are counted:
  `_local_scalar_dense` (`.item()`, `float()`, `int()`, `bool()` of a tensor, `if tensor:`), `nonzero`,
  `masked_select`, indexing or index assignment with a boolean mask, `unique*`, `repeat_interleave` without
  `output_size`, `equal`, `is_nonzero`, copies that cross devices; and, patched in Python for the count,
  `Tensor.tolist()`, `.numpy()`, `.cpu()`, `.to("cpu")` (spelled as a string: on a CPU run the training device
  is "cpu" too, and `.to(training_device)` copies nothing on a GPU), and `torch.tensor(data, device=...)`
  / `torch.as_tensor(data, device=...)` from host data (a blocking host-to-device copy on CUDA). Each is recorded
  with its call site (the innermost frame outside torch). With `--device cuda`, `torch.cuda.set_sync_debug_mode`
  additionally counts the syncs CUDA reports (`cuda_reported_syncs`). The Trainer moving each batch to the device
  is not counted (it is the same for every kind, and `accelerator_config={"non_blocking": True}` with pinned
  memory makes it asynchronous).
* Steps: the first `--warmup` are excluded (optimizer state creation); the others are classified as logging steps
  (the Trainer logged during them), OFB elimination steps (every `--eliminations-every` steps here; one read of
  the device there is allowed), history steps (the search history is recorded; its values stay on the device) and
  steady steps. The headline is the median op count of steady steps, its ratio to the plain Trainer's, and the
  largest number of syncs in any steady step. UVC's steady steps are summarised per phase (skip warm-up, whose
  block gates are fixed at 0.5 for the first `--uvc-warmup` steps here, then Gumbel gates).
* Region of each op: the Trainer phase it ran in (forward+loss, backward, grad norm, optimizer, callbacks with the
  method's updates, log/save, data, other); for forward ops issued directly from this package (the innermost frame
  outside torch), the function that issued them; for backward ops, the autograd node that ran them.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import functools
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

aten = torch.ops.aten
MODELS = ("deit-small", "demo-tiny")
KINDS = ("plain", "ofb", "ofb-late", "uvc", "uvc-default", "uvc-projection", "ofb-finetune", "uvc-finetune")
PACKAGE_DIR = os.sep + "hf_vit_compress" + os.sep
TORCH_DIR = os.path.dirname(torch.__file__)
THIS_FILE = os.path.abspath(__file__)

#: aten ops that always synchronise the host with a CUDA device (they need a value or a size from the device)
SYNC_OPS = {
    aten._local_scalar_dense.default: "item/float/int/bool of a tensor",
    aten.is_nonzero.default: "is_nonzero",
    aten.equal.default: "torch.equal",
    aten.nonzero.default: "nonzero",
    aten.nonzero.out: "nonzero",
    aten.masked_select.default: "masked_select",
    aten._unique.default: "unique",
    aten._unique2.default: "unique",
    aten.unique_dim.default: "unique",
    aten.unique_consecutive.default: "unique",
}
#: index ops that synchronise when an index is a boolean mask (it is turned into positions with nonzero)
INDEX_OPS = {aten.index.Tensor, aten.index_put.default, aten.index_put_.default, aten._index_put_impl_.default}
#: repeat_interleave with a tensor of repeats needs their sum (the output size) unless output_size is given
REPEAT_OPS = {aten.repeat_interleave.Tensor, aten.repeat_interleave.self_Tensor}
COPY_OPS = {aten._to_copy.default, aten.copy_.default}
#: step flags that take a step out of the steady-state statistics
NOT_STEADY = {"warm-up", "logging", "elimination", "history", "search end", "train end"}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smoke run: the demo's tiny ViT, 10 steps")
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--kinds", default=",".join(KINDS))
    parser.add_argument("--steps", type=int, default=24, help="optimizer steps run (warm-up included)")
    parser.add_argument("--search-steps", type=int, default=4000, help="length of the search the run is set up for")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--logging-steps", type=int, default=6)
    parser.add_argument("--eliminations-every", type=int, default=7, help="OFB eliminates every this many steps")
    parser.add_argument("--uvc-warmup", type=int, default=8, help="steps of UVC's skip warm-up (fixed block gates)")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--target-flops", type=float, default=0.5)
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast (TrainingArguments(bf16=True))")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0 = torch's default)")
    parser.add_argument("--name", default=None)
    parser.add_argument("--output-dir", default=str(C.RESULTS))
    args = parser.parse_args(argv)
    if args.quick:
        args.models, args.steps, args.logging_steps, args.eliminations_every, args.uvc_warmup = "demo-tiny", 10, 4, 3, 4
    args.name = args.name or ("dispatch_quick" if args.quick else "dispatch")
    for value in args.kinds.split(","):
        if value not in KINDS:
            parser.error(f"--kinds {value!r}: allowed {', '.join(KINDS)} (comma-separated)")
    for value in args.models.split(","):
        if value not in MODELS:
            parser.error(f"--models {value!r}: allowed {', '.join(MODELS)} (comma-separated)")
    if not 0 < args.uvc_warmup < args.search_steps:
        parser.error(f"--uvc-warmup {args.uvc_warmup}: allowed 1 .. --search-steps - 1")
    return args


# ---------------------------------------------------------------------------------------------------------------
# Counting
# ---------------------------------------------------------------------------------------------------------------
def _outer_frame():
    """The innermost frame outside torch and this script (where the op was asked for)."""
    frame = sys._getframe(2)
    while frame is not None:
        filename = frame.f_code.co_filename
        if not filename.startswith(TORCH_DIR) and os.path.abspath(filename) != THIS_FILE:
            return frame
        frame = frame.f_back
    return None


def _short(filename: str) -> str:
    for marker in (PACKAGE_DIR, os.sep + "transformers" + os.sep, os.sep + "accelerate" + os.sep):
        if marker in filename:
            return marker.strip(os.sep) + "/" + filename.split(marker, 1)[1]
    return os.path.basename(filename)


def _call_site() -> str:
    frame = _outer_frame()
    if frame is None:
        return "?"
    return f"{_short(frame.f_code.co_filename)}:{frame.f_lineno} {frame.f_code.co_name}"


class StepCounter(TorchDispatchMode):
    """Counts dispatched aten ops and the sync-prone ones, per step and per region."""

    def __init__(self):
        super().__init__()
        self.steps: list[dict] = []
        self.current = self._new_step(-1)
        self.regions: list[str] = []
        self.paused = 0

    @staticmethod
    def _new_step(index: int) -> dict:
        return {"index": index, "ops": 0, "views": 0, "op_names": collections.Counter(),
                "regions": collections.Counter(), "package_functions": collections.Counter(),
                "backward_nodes": collections.Counter(), "syncs": 0,
                "sync_sites": collections.Counter(), "cuda_syncs": 0, "cuda_sync_sites": collections.Counter(),
                "flags": set()}

    def begin_step(self, index: int) -> None:
        self.current = self._new_step(index)
        self.steps.append(self.current)

    def record_sync(self, what: str) -> None:
        if self.paused:
            return
        self.current["syncs"] += 1
        self.current["sync_sites"][f"{what} @ {_call_site()}"] += 1

    def record_cuda_sync(self) -> None:
        """A synchronisation CUDA itself reported (`torch.cuda.set_sync_debug_mode("warn")`)."""
        if self.paused:
            return
        self.current["cuda_syncs"] += 1
        self.current["cuda_sync_sites"][_call_site()] += 1

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not self.paused:
            step = self.current
            step["ops"] += 1
            step["views"] += bool(func.is_view)
            step["op_names"][str(func.overloadpacket.__name__)] += 1
            step["regions"][self.regions[-1] if self.regions else "other"] += 1
            node = torch._C._current_autograd_node()  # in backward: the autograd node whose ops these are
            if node is not None:
                step["backward_nodes"][node.name()] += 1
            else:
                frame = _outer_frame()
                if frame is not None and PACKAGE_DIR in frame.f_code.co_filename:
                    step["package_functions"][f"{_short(frame.f_code.co_filename)}:{frame.f_code.co_name}"] += 1
            reason = self._sync_reason(func, args, kwargs)
            if reason is not None:
                self.record_sync(reason)
        return func(*args, **kwargs)

    @staticmethod
    def _sync_reason(func, args, kwargs) -> str | None:
        if func in SYNC_OPS:
            return SYNC_OPS[func]
        if func in INDEX_OPS:
            indices = args[1] if len(args) > 1 else kwargs.get("indices", ())
            if any(t is not None and t.dtype in (torch.bool, torch.uint8) for t in indices):
                return "boolean-mask indexing"
        if func in REPEAT_OPS and kwargs.get("output_size") is None:
            return "repeat_interleave without output_size"
        if func in COPY_OPS:
            source = args[1] if func is aten.copy_.default else args[0]
            target = args[0].device if func is aten.copy_.default else kwargs.get("device")
            if target is not None and isinstance(source, torch.Tensor) and torch.device(target) != source.device:
                return f"copy {source.device.type}->{torch.device(target).type}"
        return None


@contextlib.contextmanager
def patched_python_syncs(counter: StepCounter):
    """Count the Python-side reads that sync on CUDA but dispatch nothing on a CPU."""
    originals = {}

    def wrap(owner, name, reason_of):
        original = getattr(owner, name)
        originals[(owner, name)] = original

        @functools.wraps(original)
        def wrapper(*args, **kwargs):
            reason = reason_of(*args, **kwargs)
            if reason is not None:
                counter.record_sync(reason)
            return original(*args, **kwargs)

        setattr(owner, name, wrapper)

    def to_reason(tensor, *args, **kwargs):
        # Only a literal "cpu" string: on this CPU run the training device is a torch.device("cpu") too, and
        # `.to(training_device)` is no copy on a GPU.
        target = kwargs.get("device", args[0] if args else None)
        if isinstance(target, str) and torch.device(target).type == "cpu":
            return 'Tensor.to("cpu")'
        return None

    def new_tensor_reason(data, *args, **kwargs):
        if kwargs.get("device") is not None and not isinstance(data, torch.Tensor):
            return "torch.tensor(host data, device=...)"
        return None

    wrap(torch.Tensor, "tolist", lambda *a, **k: "Tensor.tolist")
    wrap(torch.Tensor, "numpy", lambda *a, **k: "Tensor.numpy")
    wrap(torch.Tensor, "cpu", lambda *a, **k: "Tensor.cpu")
    wrap(torch.Tensor, "to", to_reason)
    wrap(torch, "tensor", new_tensor_reason)
    wrap(torch, "as_tensor", new_tensor_reason)
    try:
        yield
    finally:
        for (owner, name), original in originals.items():
            setattr(owner, name, original)


def in_region(counter: StepCounter, name: str, function):
    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        counter.regions.append(name)
        try:
            return function(*args, **kwargs)
        finally:
            counter.regions.pop()

    return wrapper


# ---------------------------------------------------------------------------------------------------------------
# One run
# ---------------------------------------------------------------------------------------------------------------
def build_model(name: str):
    if name == "demo-tiny":
        from transformers import ViTForImageClassification

        from hf_vit_compress.cli.demo import tiny_vit_config

        torch.manual_seed(0)
        return ViTForImageClassification(tiny_vit_config())
    return C.dense_vit(C.DEIT_SHAPES["deit-small"], seed=0)


class SyntheticImages(torch.utils.data.Dataset):
    def __init__(self, size: int, image_size: int, num_labels: int):
        generator = torch.Generator().manual_seed(0)
        self.pixels = torch.randn(min(size, 16), 3, image_size, image_size, generator=generator)
        self.labels = torch.randint(0, num_labels, (size,), generator=generator).tolist()  # host data: no reads

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, index):
        return {"pixel_values": self.pixels[index % len(self.pixels)], "labels": self.labels[index]}


def build_trainer(args, model, kind: str, output_dir: str, callbacks: list):
    from transformers import Trainer, TrainingArguments

    from hf_vit_compress import CompressionConfig, CompressionTrainer
    from hf_vit_compress.data import collate_images

    training_args = TrainingArguments(
        output_dir=output_dir, max_steps=args.search_steps, per_device_train_batch_size=args.batch_size,
        learning_rate=1e-4, lr_scheduler_type="constant", save_strategy="no", report_to=[],
        logging_steps=args.logging_steps, seed=0, use_cpu=args.device == "cpu", bf16=args.bf16, disable_tqdm=True,
        dataloader_num_workers=0, remove_unused_columns=False,
    )
    dataset = SyntheticImages(args.batch_size * args.search_steps, model.config.image_size, model.config.num_labels)
    if kind == "plain":
        return Trainer(model=model, args=training_args, train_dataset=dataset, data_collator=collate_images,
                       callbacks=callbacks)
    method = kind.split("-")[0]
    finetune = kind.endswith("-finetune")
    config = CompressionConfig(method=method, target_flops=args.target_flops,
                               search_fraction=1 / args.search_steps if finetune else 1.0,
                               uvc={"skip_warmup_fraction": args.uvc_warmup / args.search_steps,
                                    # the paper's space but for uvc-default (uvc-finetune: the library's defaults)
                                    **({"prune_hidden": False, "shared_head_dims": False}
                                       if kind in ("uvc", "uvc-projection") else {}),
                                    **({"budget_control": "projection"} if kind == "uvc-projection" else {})},
                               # OFB eliminates only after its warm-up: the excluded first steps here, then every
                               # --eliminations-every steps
                               ofb={"warmup_fraction": args.warmup / args.search_steps,
                                    "elimination_rounds": max(1, (args.search_steps - args.warmup)
                                                              // args.eliminations_every)})
    trainer = CompressionTrainer(model=model, args=training_args, compression_config=config, train_dataset=dataset,
                                 data_collator=collate_images, steps_per_epoch=3 * args.eliminations_every,
                                 callbacks=callbacks)
    if kind == "ofb-late":  # later in a search: the widest embedding width has been eliminated
        embed = trainer.method.embed
        with torch.no_grad():
            embed.active[int(embed.widths.argmax())] = False
        if hasattr(embed, "state_changed"):  # the method keeps a host copy of what this changes
            embed.state_changed()
    return trainer


def run_one(args, model_name: str, kind: str) -> dict:
    from transformers import TrainerCallback

    torch.manual_seed(0)
    model = build_model(model_name).to(args.device).train()
    counter = StepCounter()
    cuda_syncs = collections.Counter()
    trainer = None

    class Count(TrainerCallback):
        """First in the callback list: opens a step before the method's own on_step_begin runs."""

        def on_step_begin(self, _args, state, control, **kwargs):
            counter.begin_step(state.global_step)
            method = getattr(trainer, "method", None) if kind != "plain" else None
            if method is None:
                return
            counter.paused += 1  # reading the method's state here is the benchmark's bookkeeping
            try:
                if not method.search_finished:
                    step = state.global_step
                    if kind.startswith("ofb") and method.is_elimination_step(step):
                        counter.current["flags"].add("elimination")
                    if (step + 1) % max(1, method.total_search_steps // 200) == 0:
                        counter.current["flags"].add("history")
                    if step + 1 >= method.total_search_steps:
                        counter.current["flags"].add("search end")
                    # this step's phase (the method sets its own progress after this)
                    if kind in ("uvc", "uvc-default", "uvc-projection"):
                        counter.current["phase"] = "skip warm-up" if step < method.warmup_steps else "gumbel gates"
            finally:
                counter.paused -= 1

        def on_log(self, _args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                counter.current["flags"].add("logging")

        def on_step_end(self, _args, state, control, **kwargs):
            if state.global_step >= args.steps:
                control.should_training_stop = True
                counter.current["flags"].add("train end")  # its tail: the end of training (finalize, ...)

    with tempfile.TemporaryDirectory(prefix="dispatch-") as tmp:
        trainer = build_trainer(args, model, kind, tmp, [])
        trainer.callback_handler.callbacks.insert(0, Count())
        # regions: the Trainer's phases (instance attributes shadow the class's methods)
        trainer.compute_loss = in_region(counter, "forward+loss", trainer.compute_loss)
        trainer.accelerator.backward = in_region(counter, "backward", trainer.accelerator.backward)
        trainer._clip_grad_norm = in_region(counter, "grad norm", trainer._clip_grad_norm)
        trainer._get_grad_norm = in_region(counter, "grad norm", trainer._get_grad_norm)
        trainer._maybe_log_save_evaluate = in_region(counter, "log/save", trainer._maybe_log_save_evaluate)
        trainer.get_batch_samples = in_region(counter, "data", trainer.get_batch_samples)
        handler = trainer.callback_handler
        handler.call_event = lambda event, *a, **k: in_region(counter, f"callback {event}",
                                                              type(handler).call_event)(handler, event, *a, **k)
        from torch.optim import optimizer as optimizer_module

        hooks = [
            optimizer_module.register_optimizer_step_pre_hook(lambda *a: counter.regions.append("optimizer")),
            optimizer_module.register_optimizer_step_post_hook(lambda *a: counter.regions.pop()),
        ]
        sync_debug = args.device == "cuda"
        show_warning = warnings.showwarning

        def count_cuda_syncs(message, category, filename, lineno, file=None, line=None):
            if "synchroniz" in str(message):  # attributed to the step (and call site) that caused it
                counter.record_cuda_sync()
                cuda_syncs[f"{Path(filename).name}:{lineno}"] += 1
            else:
                show_warning(message, category, filename, lineno, file, line)

        started = time.perf_counter()
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("always")
                warnings.showwarning = count_cuda_syncs
                if sync_debug:
                    torch.cuda.set_sync_debug_mode("warn")
                with patched_python_syncs(counter), counter:
                    trainer.train()
        finally:
            if sync_debug:
                torch.cuda.set_sync_debug_mode(0)
            for hook in hooks:
                hook.remove()
        seconds = time.perf_counter() - started
    steps = []
    for record in counter.steps:
        flags = set(record["flags"])
        if record["index"] < args.warmup:
            flags.add("warm-up")
        steps.append({
            "index": record["index"], "flags": sorted(flags), "phase": record.get("phase"), "ops": record["ops"],
            "views": record["views"], "syncs": record["syncs"],
            "regions": dict(record["regions"].most_common()),
            "package_functions": dict(record["package_functions"].most_common()),
            "backward_nodes": dict(record["backward_nodes"].most_common()),
            "op_names": dict(record["op_names"].most_common()),
            "sync_sites": dict(record["sync_sites"].most_common()),
            "cuda_syncs": record["cuda_syncs"] if sync_debug else None,
            "cuda_sync_sites": dict(record["cuda_sync_sites"].most_common()),
        })
    return {"model": model_name, "kind": kind, "batch": args.batch_size, "bf16": args.bf16, "device": args.device,
            "seconds": seconds, "steps": steps, "cuda_reported_syncs": dict(cuda_syncs) if sync_debug else None}


# ---------------------------------------------------------------------------------------------------------------
# Summary and report
# ---------------------------------------------------------------------------------------------------------------
def _steady(run: dict) -> dict[str | None, list[dict]]:
    """Steady steps of a run by phase."""
    phases: dict[str | None, list[dict]] = {}
    for step in run["steps"]:
        if not NOT_STEADY & set(step["flags"]):
            phases.setdefault(step.get("phase"), []).append(step)
    return phases


def _per_step(steps: list[dict], key: str, top: int | None = None) -> dict[str, float]:
    total = collections.Counter()
    for step in steps:
        total.update(step[key])
    return {name: count / max(1, len(steps)) for name, count in total.most_common(top)}


def summarize(runs: list[dict]) -> list[dict]:
    rows = []
    for run in runs:
        plain = next((r for r in runs if r["kind"] == "plain" and r["model"] == run["model"]), None)
        plain_steps = [s for steps in _steady(plain).values() for s in steps] if plain else []
        plain_ops = statistics.median(s["ops"] for s in plain_steps) if plain_steps else None
        plain_kernels = statistics.median(s["ops"] - s["views"] for s in plain_steps) if plain_steps else None
        logging_steps = [s for s in run["steps"] if "logging" in s["flags"]
                         and not {"warm-up", "train end"} & set(s["flags"])]
        for phase, steady in _steady(run).items():
            ops = [s["ops"] for s in steady]
            kernels = [s["ops"] - s["views"] for s in steady]
            rows.append({
                "model": run["model"], "kind": run["kind"] + (f" ({phase})" if phase else ""),
                "steady_steps": len(steady),
                "ops_median": statistics.median(ops), "ops_min": min(ops), "ops_max": max(ops),
                "ops_ratio_to_plain": statistics.median(ops) / plain_ops if plain_ops else None,
                "non_view_ops_median": statistics.median(kernels),
                "non_view_ratio_to_plain": statistics.median(kernels) / plain_kernels if plain_kernels else None,
                "syncs_max_steady": max(s["syncs"] for s in steady),
                "ops_median_logging": statistics.median(s["ops"] for s in logging_steps) if logging_steps else None,
                "syncs_max_logging": max((s["syncs"] for s in logging_steps), default=None),
                "syncs_elimination": [s["syncs"] for s in run["steps"] if "elimination" in s["flags"]],
                "syncs_history": [s["syncs"] for s in run["steps"] if "history" in s["flags"]
                                  and not {"logging", "warm-up", "search end", "train end"} & set(s["flags"])],
                "cuda_syncs_max_steady": max((s["cuda_syncs"] or 0 for s in steady), default=None)
                if run.get("cuda_reported_syncs") is not None else None,
                "cuda_sync_sites_per_steady_step": _per_step(steady, "cuda_sync_sites", 20),
                "regions_per_steady_step": _per_step(steady, "regions"),
                "package_functions_per_steady_step": _per_step(steady, "package_functions", 25),
                "backward_nodes_per_steady_step": _per_step(steady, "backward_nodes", 25),
                "op_names_per_steady_step": _per_step(steady, "op_names", 25),
                "sync_sites_per_steady_step": _per_step(steady, "sync_sites", 30),
                "sync_sites_per_logging_step": _per_step(logging_steps, "sync_sites", 30),
                "cuda_reported_syncs": run.get("cuda_reported_syncs"),
                "seconds": run["seconds"],
            })
    return rows


def _fmt(value, pattern="{:.0f}"):
    return None if value is None else pattern.format(value)


def write_report(results: dict, output_dir: Path, name: str) -> None:
    C.write_json(output_dir / f"{name}.json", results)
    prov = results["provenance"]
    lines = [C.markdown_header(
        "Dispatched operators and host syncs per optimizer step: search step vs plain step", prov,
        [f"settings: {results['settings']}",
         f"wall time: {results['wall_seconds'] / 60:.1f} min",
         "ops = aten operators dispatched per optimizer step (TorchDispatchMode: forward, backward, optimizer, the "
         "method's updates, the Trainer's bookkeeping), views included; non-view ops = ops that are not views (what "
         "launches kernels on a GPU); steady = not warm-up, logging, OFB elimination or history-recording steps; "
         "syncs = operations that synchronise host and device on CUDA (see benchmarks/dispatch.py)"])]
    header = ["model", "step", "ops/step (steady, median [min, max])", "ratio to plain", "non-view ops/step",
              "non-view ratio", "syncs/step (steady, max)", "ops/step (logging)", "syncs/step (logging, max)",
              "syncs (elimination steps)", "syncs (history steps)"]
    rows = []
    for r in results["summary"]:
        rows.append([r["model"], r["kind"], f"{r['ops_median']:.0f} [{r['ops_min']}, {r['ops_max']}]",
                     _fmt(r["ops_ratio_to_plain"], "{:.2f}"), _fmt(r["non_view_ops_median"]),
                     _fmt(r["non_view_ratio_to_plain"], "{:.2f}"), r["syncs_max_steady"],
                     _fmt(r["ops_median_logging"]), r["syncs_max_logging"],
                     ", ".join(map(str, r["syncs_elimination"])) or "-",
                     ", ".join(map(str, r["syncs_history"])) or "-"])
    lines.append(C.md_table(header, rows))
    for r in results["summary"]:
        lines.append(f"\n## {r['model']}, {r['kind']}\n")
        lines.append("Ops per steady step by Trainer phase: " + ", ".join(
            f"{k} {v:.0f}" for k, v in r["regions_per_steady_step"].items()) + "\n")
        lines.append("Most frequent ops per steady step: " + ", ".join(
            f"{k} {v:.0f}" for k, v in list(r["op_names_per_steady_step"].items())[:12]) + "\n")
        if r["package_functions_per_steady_step"]:
            lines.append("Forward ops per steady step issued directly from this package: " + ", ".join(
                f"`{k}` {v:.0f}" for k, v in list(r["package_functions_per_steady_step"].items())[:12]) + "\n")
        lines.append("Backward ops per steady step by autograd node: " + ", ".join(
            f"{k} {v:.0f}" for k, v in list(r["backward_nodes_per_steady_step"].items())[:12]) + "\n")
        if r["sync_sites_per_steady_step"]:
            lines.append("Syncs per steady step:\n")
            lines += [f"- {v:g} x {k}" for k, v in r["sync_sites_per_steady_step"].items()]
            lines.append("")
        if r["sync_sites_per_logging_step"]:
            lines.append("Syncs per logging step:\n")
            lines += [f"- {v:g} x {k}" for k, v in list(r["sync_sites_per_logging_step"].items())[:15]]
            lines.append("")
        if r["cuda_reported_syncs"] is not None:
            lines.append(f"CUDA-reported syncs per steady step (max): {r['cuda_syncs_max_steady']}; per steady "
                         f"step by call site: {r['cuda_sync_sites_per_steady_step']}; over the whole run (all steps, "
                         f"by warning site): {r['cuda_reported_syncs']}\n")
    (output_dir / f"{name}.md").write_text("\n".join(lines) + "\n")


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    prov = C.provenance([sys.argv[0], *(sys.argv[1:] if argv is None else argv)])
    prov["machine"]["torch_threads"] = torch.get_num_threads()
    runs = []
    for model in args.models.split(","):
        for kind in args.kinds.split(","):
            C.log(f"{model}: {kind} ({args.steps} steps)")
            run = run_one(args, model, kind)
            runs.append(run)
            for phase, steady in _steady(run).items():
                C.log(f"  {run['seconds']:.1f} s; steady ops/step{f' ({phase})' if phase else ''} "
                      f"{[s['ops'] for s in steady]}, syncs/step {[s['syncs'] for s in steady]}")
    results = {"provenance": prov, "settings": dict(vars(args)), "runs": runs, "summary": summarize(runs),
               "wall_seconds": time.perf_counter() - started}
    output_dir = Path(args.output_dir)
    write_report(results, output_dir, args.name)
    C.log(f"wrote {output_dir / args.name}.json/.md")
    return results


if __name__ == "__main__":
    main()
