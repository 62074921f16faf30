"""Command line: `hf-vit-compress demo ...` (also `python -m hf_vit_compress demo ...`)."""

from __future__ import annotations

import argparse
import json
import sys

from .config import METHODS


def _demo_parser(subparsers) -> None:
    from .demo import DemoSettings

    defaults = DemoSettings()
    demo = subparsers.add_parser(
        "demo",
        help="train a tiny ViT on scikit-learn's digits, compress it, fine-tune, evaluate (no download)",
        description="Train a tiny ViT on scikit-learn's digits, compress it to a FLOPs budget, fine-tune and "
        "evaluate. Writes the compressed model, report.json and a plot of the search to --output-dir.",
    )
    demo.add_argument("--method", choices=METHODS, default=defaults.method)
    demo.add_argument("--target-flops", type=float, default=defaults.target_flops,
                      help="budget as a fraction of the dense MACs, in (0, 1) (default %(default)s)")
    demo.add_argument("--seed", type=int, default=defaults.seed)
    demo.add_argument("--output-dir", default=defaults.output_dir)
    demo.add_argument("--dense-epochs", type=int, default=defaults.dense_epochs)
    demo.add_argument("--search-epochs", type=int, default=defaults.search_epochs)
    demo.add_argument("--finetune-epochs", type=int, default=defaults.finetune_epochs)
    demo.add_argument("--batch-size", type=int, default=defaults.batch_size)
    demo.add_argument("--no-progress", action="store_true", help="hide progress bars")


def _run_demo(arguments: argparse.Namespace) -> int:
    from .demo import DemoSettings, run_demo

    for name in ("dense_epochs", "search_epochs", "finetune_epochs", "batch_size"):
        if getattr(arguments, name) < (0 if name == "finetune_epochs" else 1):
            raise SystemExit(f"--{name.replace('_', '-')} must be >= {0 if name == 'finetune_epochs' else 1}")
    settings = DemoSettings(
        method=arguments.method,
        target_flops=arguments.target_flops,
        seed=arguments.seed,
        output_dir=arguments.output_dir,
        dense_epochs=arguments.dense_epochs,
        search_epochs=arguments.search_epochs,
        finetune_epochs=arguments.finetune_epochs,
        batch_size=arguments.batch_size,
        progress=not arguments.no_progress,
    )
    report = run_demo(settings)
    summary = {key: report[key] for key in ("method", "target_flops", "dense_accuracy", "compressed_accuracy",
                                            "compressed_macs_ratio", "dense_params", "compressed_params")}
    print(json.dumps(summary, indent=2))
    print(f"wrote {settings.output_dir}/model, report.json and the search plot")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hf-vit-compress", description=__doc__)
    subparsers = parser.add_subparsers(dest="command", required=True)
    _demo_parser(subparsers)
    arguments = parser.parse_args(argv)
    try:
        if arguments.command == "demo":
            return _run_demo(arguments)
    except ValueError as error:  # configuration errors: one clear line, no traceback
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 1


if __name__ == "__main__":
    sys.exit(main())
