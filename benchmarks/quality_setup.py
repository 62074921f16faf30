"""quality.py's modes (model shape and schedule of each), its command line and the settings a results file is for.

Kept apart from the runners (quality_runs.py) and the data / dense model (quality_data.py) so that each can be read
alone; quality.py is the entry point that joins them.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402
import quality_report as R  # noqa: E402

METHODS = R.METHODS

_CPU = dict(model=dict(hidden_size=96, num_hidden_layers=4, num_attention_heads=3, intermediate_size=384),
            patch_size=4, train_size=20000, eval_size=2000, validation_size=2000, batch_size=64, dense_steps=5000,
            steps=300, dense_lr=2e-3, lr=5e-4, budgets="0.7,0.5,0.3", search_settings="short", search_fraction=0.5,
            logs_per_run=10)

#: model shape + schedule of each mode. "cpu" is what fits on a 2-core CPU in about an hour for one seed of the
#: whole grid (see README); "medium" is the same model, data and dense model with runs 5x as long (1500 steps, long
#: enough to judge a search) and the library's OFB/UVC defaults; "full" is the DeiT-T-like setting for a GPU;
#: "quick" only checks that everything runs. `dense_cache` names the mode whose cached dense model is used.
MODES = {
    "cpu": _CPU,
    "medium": dict(_CPU, steps=1500, budgets="0.5,0.3", search_settings="library", search_fraction=None,
                   logs_per_run=50, dense_cache="cpu"),
    "full": dict(model=dict(hidden_size=192, num_hidden_layers=12, num_attention_heads=3, intermediate_size=768),
                 patch_size=4, train_size=50000, eval_size=10000, validation_size=5000, batch_size=128,
                 dense_steps=39000, steps=7800, dense_lr=1e-3, lr=5e-4, budgets="0.7,0.5,0.3",
                 search_settings="short", search_fraction=0.5, logs_per_run=10),
    # a converged dense model (benchmarks/train_dense.py: 45,000 training images, the next 5,000 its validation
    # split) compressed with the medium schedule, evaluated on the whole test set
    "converged": dict(_CPU, train_size=45000, eval_size=10000, validation_size=5000, steps=1500, budgets="0.7,0.5,0.3",
                      search_settings="library", search_fraction=None, logs_per_run=50,
                      dense_from=str(C.REPO / "benchmarks" / "dense" / "cifar10_medium")),
    "quick": dict(model=dict(hidden_size=48, num_hidden_layers=2, num_attention_heads=3, intermediate_size=96),
                  patch_size=4, train_size=512, eval_size=256, validation_size=256, batch_size=32, dense_steps=20,
                  steps=8, dense_lr=2e-3, lr=5e-4, budgets="0.7,0.5,0.3", search_settings="short", search_fraction=0.5,
                  logs_per_run=10),
}


def parse_args(argv=None, description: str | None = None):
    """quality.py's arguments, the mode's preset filled in where a flag was not given."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--medium", action="store_true",
                       help="CPU-mode model and data, 1500 steps per run, budgets 0.5,0.3, library OFB/UVC defaults")
    group.add_argument("--converged", action="store_true",
                       help="start from the converged dense model (--dense-from; benchmarks/train_dense.py), 1500 "
                            "steps per run, budgets 0.7,0.5,0.3, the full 10,000-image test set")
    group.add_argument("--full", action="store_true", help="DeiT-T-like model, long schedule (for a GPU)")
    group.add_argument("--quick", action="store_true", help="smoke run")
    parser.add_argument("--methods", default=",".join(METHODS), help=f"subset of {','.join(METHODS)}")
    parser.add_argument("--budgets", default=None, help="target MACs fractions (default: 0.7,0.5,0.3; medium 0.5,0.3)")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--data-dir", default=str(C.REPO.parent / "shared" / "data" / "cifar10"),
                        help="folder with CIFAR-10 parquet shards train-*.parquet, test-*.parquet")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps per method run (search + fine-tune)")
    parser.add_argument("--dense-steps", type=int, default=None)
    parser.add_argument("--dense-from", default=None,
                        help="a saved dense ViT folder with provenance.json (train_dense.py's output) to compress "
                             "instead of training one (default in --converged mode: benchmarks/dense/cifar10_medium)")
    parser.add_argument("--train-size", type=int, default=None, help="training images used (fixed subsample)")
    parser.add_argument("--eval-size", type=int, default=None, help="test images evaluated (fixed subsample)")
    parser.add_argument("--eval-on", choices=("test", "validation"), default="test",
                        help="split the runs are evaluated on: the test subset (final tables) or a validation set of "
                             "training images outside the training subsample (tuning)")
    parser.add_argument("--validation-size", type=int, default=None,
                        help="validation images (fixed, seeded; default 2000, quick 256, full 5000)")
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--search-fraction", type=float, default=None,
                        help="OFB/UVC: share of the steps searching (default: the library's, 0.2, in medium mode; "
                             "0.5 in the cpu, quick and full modes)")
    parser.add_argument("--search-settings", choices=("library", "short"), default=None,
                        help="OFB/UVC settings: the library's defaults (medium mode's default) or the benchmark's "
                             "short-search constants (default of the cpu, quick and full modes)")
    parser.add_argument("--ofb-head-choices", default=None,
                        help="OFB: candidate head counts, comma-separated (OFBConfig.head_choices; default: the "
                             "library's)")
    parser.add_argument("--ofb-elimination-rounds", type=int, default=0,
                        help="OFB: N elimination rounds (dual budget control: ofb.elimination_rounds, after warm-up; "
                             "paper: every search_steps / N steps); 0: the library default")
    parser.add_argument("--ofb-budget-control", choices=("dual", "paper"), default=None,
                        help="OFB budget control (default: the library's, dual)")
    parser.add_argument("--ofb-arch-lr", type=float, default=None,
                        help="OFB architecture-logit lr (default: the library's rule, arch_travel / search steps)")
    parser.add_argument("--ofb-arch-travel", type=float, default=None, help="OFB: the arch lr rule's logit travel")
    parser.add_argument("--ofb-flops-weight", type=float, default=None,
                        help="OFB FLOPs-loss weight (paper budget control only)")
    parser.add_argument("--uvc-counts-lr", type=float, default=None, help="UVC count lr (short: the demo's)")
    parser.add_argument("--uvc-counts-space", choices=("fraction", "units"), default=None,
                        help="UVC count step space (default: the library's)")
    parser.add_argument("--uvc-channel-multiple", type=int, default=None,
                        help="UVC: round final widths to multiples of this (default: the library's, 8)")
    parser.add_argument("--uvc-prune-hidden", choices=("on", "off"), default=None,
                        help="UVC: search the residual width too (UVCConfig.prune_hidden; default: the library's)")
    parser.add_argument("--uvc-shared-head-dims", choices=("on", "off"), default=None,
                        help="UVC: head-dim counts remove q/k dims with the value dims (UVCConfig.shared_head_dims; "
                             "default: the library's)")
    parser.add_argument("--uvc-budget-control", choices=("dual", "projection"), default=None,
                        help="UVC: how the counts meet the budget (UVCConfig.budget_control; 'dual' is the paper's; "
                             "default: the library's)")
    parser.add_argument("--uvc-budget-dual-update", choices=("log", "additive"), default=None,
                        help="UVC: ascent of the budget dual (UVCConfig.budget_dual_update; 'additive' is the "
                             "paper's; default: the library's, 'log')")
    parser.add_argument("--ofb-distill", action="store_true",
                        help="OFB distils from a frozen copy of the dense model (UVC always does)")
    parser.add_argument("--budget-unit", choices=("macs", "speedup"), default="macs",
                        help="--budgets as MACs fractions (default) or, for ofb/uvc, target speed-ups on this CPU "
                             "(CompressionConfig.target_speedup) priced by --latency-table")
    parser.add_argument("--latency-table", default=None,
                        help="--budget-unit speedup: the latency table (built and saved there when missing)")
    parser.add_argument("--latency-batch", type=int, default=64, help="--budget-unit speedup: the batch it is for")
    parser.add_argument("--set", action="append", default=[], metavar="METHOD.FIELD=VALUE", dest="set_fields",
                        help="any other OFBConfig / UVCConfig field for the search methods, e.g. "
                             "ofb.embed_min_ratio=1.0 (value parsed as YAML; repeatable)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads on CPU (0 = torch's default)")
    parser.add_argument("--cache-dir", default=str(C.REPO / "benchmarks" / ".cache"))
    parser.add_argument("--name", default=None,
                        help="results stem (default quality_<mode>, quality_<mode>_val with --eval-on validation)")
    parser.add_argument("--output-dir", default=str(C.RESULTS))
    parser.add_argument("--rerun", action="store_true", help="run again runs already in the JSON")
    parser.add_argument("--report-only", action="store_true", help="only rebuild the Markdown and plot")
    parser.add_argument("--merge-from", default=None,
                        help="add the runs of another results JSON with the same settings (pieces run in parallel "
                             "under other --name), then rebuild the report")
    args = parser.parse_args(argv)
    args.mode = ("medium" if args.medium else "converged" if args.converged else "full" if args.full
                 else "quick" if args.quick else "cpu")
    preset = MODES[args.mode]
    args.dense_from = args.dense_from or preset.get("dense_from")
    for key in ("steps", "dense_steps", "train_size", "eval_size", "validation_size", "batch_size", "budgets",
                "search_settings"):
        if getattr(args, key) is None:
            setattr(args, key, preset[key])
    if args.search_fraction is None:  # None in a preset: the library's default
        from hf_vit_compress import CompressionConfig

        args.search_fraction = preset["search_fraction"] or CompressionConfig().search_fraction
    args.name = args.name or f"quality_{args.mode}{'_val' if args.eval_on == 'validation' else ''}"
    unknown = set(args.methods.split(",")) - set(METHODS)
    if unknown:
        parser.error(f"--methods: unknown {sorted(unknown)}; allowed: {', '.join(METHODS)}")
    return args


def settings_of(args) -> dict:
    """Everything that changes the numbers; pieces are only merged when these agree."""
    preset = MODES[args.mode]
    eval_size = args.validation_size if args.eval_on == "validation" else args.eval_size
    if args.dense_from:  # the dense model's own schedule is in its provenance; these name it
        provenance = json.loads((Path(args.dense_from) / "provenance.json").read_text())
        dense = dict(dense_from=Path(args.dense_from).name, dense_commit=provenance.get("git_commit"),
                     dense_schedule=provenance["schedule"], dense_lr=provenance["schedule"]["lr"],
                     dense_steps=provenance["schedule"]["steps"])
    else:
        dense = dict(dense_steps=args.dense_steps, dense_lr=preset["dense_lr"])
    return dict(mode=args.mode, model=preset["model"], patch_size=preset["patch_size"], image_size=32,
                train_size=args.train_size, eval_split=args.eval_on, eval_size=eval_size, batch_size=args.batch_size,
                **dense, steps=args.steps, lr=preset["lr"],
                search_fraction=args.search_fraction, search_settings=args.search_settings, weight_decay=0.05,
                schedule="cosine, 5% warm-up",
                augmentation="random resized crop scale (0.6, 1) + horizontal flip", data=Path(args.data_dir).name)
