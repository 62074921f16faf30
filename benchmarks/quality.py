"""Accuracy vs MACs on CIFAR-10: OFB, UVC, Torch-Pruning (magnitude, Taylor) and uniform width scaling.

    python benchmarks/quality.py                          # CPU mode: every method, budgets 0.7/0.5/0.3, seeds 0-2
    python benchmarks/quality.py --methods ofb,uvc --budgets 0.5 --seeds 0     # one piece; merged into the JSON
    python benchmarks/quality.py --medium                 # CPU-mode model and data, 1500 steps, budgets 0.5/0.3
    python benchmarks/quality.py --medium --eval-on validation    # tuning: a split carved from the training images
    python benchmarks/quality.py --full                   # the DeiT-T-like shape and a long schedule (GPU)
    python benchmarks/quality.py --quick                  # smoke run (tiny steps; writes quality_quick.*)

Protocol (identical for every method; see benchmarks/README.md):

1. A dense ViT for 32 px CIFAR-10 is trained from scratch once (seed 0) and cached (`--cache-dir`); its accuracy is
   reported. CPU and medium modes share a reduced shape (below) and the same dense model; `--full` uses the
   DeiT-T-like one (patch 4, hidden 192, 3 heads, 12 blocks, MLP 768).
2. Every (method, budget, seed) run starts from that dense model and gets the same number of optimizer steps
   (`--steps`), batch size and learning-rate schedule (AdamW, cosine, 5% warm-up):
   * ofb / uvc: `CompressionTrainer` (search for `search_fraction` of the steps, then fine-tune the fixed
     architecture), then `export_compressed_model`. UVC distils from a frozen copy of the dense model (its recipe).
     `--search-settings library` (the medium mode's default) uses the library's defaults (`CompressionConfig()`);
     `short` (cpu, quick and full modes) the benchmark's short-search constants (UVC: the demo's count step; OFB
     has none since its defaults follow the search length). `--ofb-budget-control`, `--ofb-arch-lr`,
     `--ofb-arch-travel`, `--ofb-flops-weight`, `--ofb-head-choices`, `--ofb-elimination-rounds`, `--uvc-counts-lr`,
     `--uvc-counts-space`, `--uvc-channel-multiple`, `--uvc-prune-hidden`, `--uvc-shared-head-dims`,
     `--uvc-budget-control`, `--uvc-budget-dual-update` override either; every run records its full method
     config. Their accuracy right after the search (final architecture, no fine-tuning yet) is recorded as "before
     fine-tuning", and their logged scalars (expected MACs ratio, OFB's active candidates per module, UVC's hard
     ratio, ...) about every 1% of the search as `search_trace` (plot: <name>_search.png).
   * tp-magnitude / tp-taylor: Torch-Pruning's MetaPruner (uniform ratio, head dims + residual width, classifier
     kept) pruned once at step 0 to just within the budget (Taylor importance from the loss gradients of 8 training
     batches, no weight update), then plain fine-tuning for all the steps.
   * uniform: every block keeps the same number of heads (round(budget * H)) and the same MLP width (largest
     multiple of 8 within budget), top units by weight magnitude, residual width and all blocks kept; exported with
     `export_compressed_model`, then plain fine-tuning for all the steps.
3. Top-1 accuracy of the final (exported / pruned) model on the evaluation split: the test subset (default), or
   with `--eval-on validation` a fixed, seeded set of training images outside the training subsample (for any
   tuning; the test split is kept for the final table). MACs counted exactly.

Results are merged into benchmarks/results/<name>.json (default quality_<mode>, plus _val on the validation split;
a run already there is skipped unless --rerun), so the grid can be filled in pieces; pieces run in parallel under
another --name join with --merge-from. The Markdown tables and the plots are rebuilt from the JSON every time
(quality_report.py). Every run seeds its own augmentation stream, so a run gives the same numbers whether it runs
alone or inside the grid.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402
import quality_report as R  # noqa: E402
from quality_data import accuracy, dense_model, load_data  # noqa: E402
from quality_runs import run_one  # noqa: E402
from quality_setup import parse_args, settings_of  # noqa: E402


def main(argv=None) -> dict:
    args = parse_args(argv, description=__doc__)
    if args.threads:
        torch.set_num_threads(args.threads)
    output_dir = Path(args.output_dir)
    path = output_dir / f"{args.name}.json"
    settings = settings_of(args)
    results = json.loads(path.read_text()) if path.exists() else {"settings": settings, "invocations": [],
                                                                   "dense": None, "runs": {}}
    R.upgrade_settings(results["settings"])
    if results["settings"] != settings:
        raise SystemExit(f"{path} holds results for other settings:\n  {results['settings']}\nnot\n  {settings}\n"
                         "use --name for a separate results file")
    prov = C.provenance([sys.argv[0], *(sys.argv[1:] if argv is None else argv)])
    started = time.perf_counter()
    if args.merge_from:
        R.merge_results(results, json.loads(Path(args.merge_from).read_text()), args.merge_from)
    if args.report_only or args.merge_from:
        R.write_report(results, output_dir, args.name)
        return results
    results["invocations"].append(prov)
    make_train_set, test_set, eval_set = load_data(args)
    dense, dense_info = dense_model(args, make_train_set(0), test_set)
    # Torch-Pruning traces with CPU example inputs: keep the dense model (trained on a GPU if there is one) on the
    # CPU; every run copies it and its trainer moves the copy where it trains.
    dense = dense.cpu()
    if args.eval_on == "validation":
        dense_info = {**dense_info, "accuracy": accuracy(dense, eval_set), "test_accuracy": dense_info["accuracy"]}
    results["dense"] = dense_info
    methods = args.methods.split(",")
    budgets = [float(b) for b in args.budgets.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    for seed in seeds:
        for budget in budgets:
            for method in methods:
                key = R.run_key(method, budget, seed)
                if key in results["runs"] and not args.rerun:
                    C.log(f"{key}: already in {path.name}, skipped")
                    continue
                C.log(f"{key}: running ({args.steps} steps)")
                result = run_one(method, budget, seed, dense, args, make_train_set(seed), eval_set)
                result["date"] = C.provenance()["date"]
                results["runs"][key] = result
                C.log(f"{key}: top-1 {100 * result['accuracy']:.2f}% at {result['macs_ratio']:.3f} MACs "
                      f"({result['seconds'] / 60:.1f} min)")
                prov["wall_seconds"] = time.perf_counter() - started
                R.write_report(results, output_dir, args.name)
    prov["wall_seconds"] = time.perf_counter() - started
    R.write_report(results, output_dir, args.name)
    C.log(f"wrote {output_dir / args.name}.json/.md/.png")
    return results


if __name__ == "__main__":
    main()
