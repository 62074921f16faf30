"""Command line (also `python -m hf_vit_compress ...`, and `accelerate launch -m hf_vit_compress ...`):

    hf-vit-compress demo [--method ofb|uvc] [--target-flops 0.5] ...       the offline end-to-end demo
    hf-vit-compress train --recipe FILE_OR_NAME [--section.key VALUE ...]  compress a ViT/DeiT with a recipe
    hf-vit-compress push DIR REPO_ID [--private] [--revision R] ...        publish a saved compressed model
    hf-vit-compress verify DIR                                             check a (downloaded) model folder
    hf-vit-compress export-onnx DIR [--output FILE] [--opset 18]           ONNX export, checked with onnxruntime
    hf-vit-compress profile-latency MODEL --output FILE [--batch-size 1]   this device's latency table

Overrides of `train`: `--compression.target_flops 0.4`, `--compression.ofb.arch_lr 5e-2`, `--training.max_steps 5`
(or just `--max_steps 5`: a bare name is looked up in the model/data/training/compression fields),
`--data.train_files a.parquet b.parquet` (lists), `--training.bf16` (a bare flag is true). Errors are one line on
stderr with exit status 2 (bad input) or 1 (training produced NaN/Inf values).
"""

from __future__ import annotations

import argparse
import json
import sys

from ..methods.registry import registered_methods
from ..training.progress import console_logging


def _demo_parser(subparsers) -> None:
    from .demo import DemoSettings

    defaults = DemoSettings()
    demo = subparsers.add_parser(
        "demo",
        help="train a tiny ViT on scikit-learn's digits, compress it, fine-tune, evaluate (no download)",
        description="Train a tiny ViT on scikit-learn's digits, compress it to a FLOPs budget, fine-tune and "
        "evaluate. Writes the compressed model, report.json and a plot of the search to --output-dir.",
    )
    demo.add_argument("--method", choices=registered_methods(), default=defaults.method)
    demo.add_argument("--target-flops", type=float, default=defaults.target_flops,
                      help="budget as a fraction of the dense MACs, in (0, 1) (default %(default)s)")
    demo.add_argument("--seed", type=int, default=defaults.seed)
    demo.add_argument("--output-dir", default=defaults.output_dir)
    demo.add_argument("--dense-epochs", type=int, default=defaults.dense_epochs)
    demo.add_argument("--search-epochs", type=int, default=defaults.search_epochs)
    demo.add_argument("--finetune-epochs", type=int, default=defaults.finetune_epochs)
    demo.add_argument("--batch-size", type=int, default=defaults.batch_size)
    demo.add_argument("--no-progress", action="store_true", help="hide progress bars")
    demo.add_argument("--threads", type=int, default=defaults.num_threads,
                      help="torch CPU threads (default %(default)s: fastest for the tiny model; 0 = torch's default)")


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
        num_threads=arguments.threads or None,
    )
    report = run_demo(settings)
    summary = {key: report[key] for key in ("method", "target_flops", "dense_accuracy", "compressed_accuracy",
                                            "compressed_macs_ratio", "dense_params", "compressed_params")}
    print(json.dumps(summary, indent=2))
    print(f"wrote {settings.output_dir}/model, report.json and the search plot")
    return 0


def _train_parser(subparsers) -> None:
    from .recipe_help import recipe_help

    train = subparsers.add_parser(
        "train",
        help="compress a ViT/DeiT with a recipe (a YAML file or a shipped one's name) and --section.key overrides",
        description="Load a recipe, apply overrides, run CompressionTrainer (search + fine-tune), evaluate, and save "
        "the compressed model to <output_dir>/compressed_model. Multi-GPU: accelerate launch --config_file "
        "hf_vit_compress/recipes/accelerate_multi_gpu.yaml -m hf_vit_compress train --recipe ...",
        epilog="overrides (after --recipe): --section.key VALUE, sections model, data, training, compression "
        "(nested: --compression.ofb.arch_lr 0.05); a bare --key is a field of one of them (--max_steps 5).\n\n"
        + recipe_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    train.add_argument("--recipe", required=True, help="recipe YAML file, or a shipped recipe's name (deit_small_ofb)")


def _run_train(arguments: argparse.Namespace, overrides: list[str]) -> int:
    from .recipes import setup_from_args
    from .runner import run_recipe

    setup = setup_from_args(arguments.recipe, overrides)
    report = run_recipe(setup)
    if setup.training.process_index == 0:
        summary = {key: report[key] for key in ("model", "method", "target_flops", "compressed_macs_ratio", "steps")}
        speed = report.get("speed_budget") or {}
        summary.update({key: speed[key] for key in ("target_speedup", "predicted_speedup", "measured_speedup")
                        if speed.get(key) is not None})
        summary["eval_accuracy"] = report["metrics"].get("eval_accuracy")
        summary.update({key: report[key] for key in ("dense_accuracy", "compressed_accuracy") if key in report})
        print(json.dumps(summary))
        print(f"wrote {report['compressed_model']}, {setup.training.output_dir}/compression_report.json and the "
              f"search plot {report.get('search_plot')}")
    return 0


def _push_parser(subparsers) -> None:
    push = subparsers.add_parser(
        "push",
        help="publish a saved compressed model folder to the Hugging Face Hub (with its card and image processor)",
        description="Check DIR (a compressed model with its image processor, architecture.json, "
        "compression_config.json and README.md card, as CompressionTrainer.save_model / train write it), rebuild "
        "the card from its compression_report.json for REPO_ID, and upload it to the root of REPO_ID (created if "
        "missing). Log in first (hf auth login) or pass --token.",
    )
    push.add_argument("folder", metavar="DIR", help="e.g. <output_dir>/compressed_model")
    push.add_argument("repo_id", metavar="REPO_ID", help="owner/name on the Hub")
    push.add_argument("--token", default=None, help="Hub token (default: the logged-in one)")
    push.add_argument("--private", action="store_true", help="create the repo private (if it does not exist)")
    push.add_argument("--revision", default=None, help="branch to commit to (created if missing)")
    push.add_argument("--commit-message", default="Upload compressed model")
    push.add_argument("--create-pr", action="store_true", help="open a pull request instead of committing")
    push.add_argument("--keep-card", action="store_true", help="upload DIR's README.md as it is")
    push.add_argument("--skip-unknown", action="store_true",
                      help="leave out (and name) links, hidden entries, other folders and unknown files instead of "
                      "refusing DIR; pickle-capable files and changed modeling code are refused either way")


def _run_push(arguments: argparse.Namespace) -> int:
    from ..publishing.publish import push_compressed_folder

    commit = push_compressed_folder(
        arguments.folder, arguments.repo_id, token=arguments.token, private=arguments.private or None,
        revision=arguments.revision, commit_message=arguments.commit_message, create_pr=arguments.create_pr,
        keep_card=arguments.keep_card, skip_unknown=arguments.skip_unknown,
    )
    print(f"pushed {arguments.folder} to {getattr(commit, 'commit_url', None) or arguments.repo_id}")
    return 0


def _verify_parser(subparsers) -> None:
    verify = subparsers.add_parser(
        "verify",
        help="check a compressed model folder (e.g. a downloaded Hub repo) before loading or publishing it",
        description="Exit 0 when DIR holds only the files a compressed model has, its modeling code is this "
        "package's own (what trust_remote_code=True would run), config.json's auto_map names only it, no file can "
        "unpickle, and the weights and architecture.json match config.json; else print one line naming every "
        "problem and exit 2.",
    )
    verify.add_argument("folder", metavar="DIR", help="a compressed model folder")


def _run_verify(arguments: argparse.Namespace) -> int:
    from ..publishing.verify import verify_compressed_folder

    check = verify_compressed_folder(arguments.folder)
    print(f"{arguments.folder}: verified ({len(check.files)} files: {', '.join(check.files)})")
    return 0


def _export_onnx_parser(subparsers) -> None:
    from ..publishing.onnx_export import OPSET

    export = subparsers.add_parser(
        "export-onnx",
        help="export a saved compressed model to ONNX (dynamic batch), checked against PyTorch with onnxruntime",
        description="Export DIR's compressed model to ONNX (input pixel_values, output logits, dynamic batch axis) "
        "and compare onnxruntime's logits with PyTorch's (float32, atol 1e-4). Needs pip install "
        "'hf_vit_compress[onnx]'.",
    )
    export.add_argument("folder", metavar="DIR", help="a saved compressed model folder")
    export.add_argument("--output", default=None, help="the .onnx file (default DIR/onnx/model.onnx)")
    export.add_argument("--opset", type=int, default=OPSET, help="ONNX opset (default %(default)s)")
    export.add_argument("--no-check", action="store_true", help="skip the onnxruntime comparison")


def _run_export_onnx(arguments: argparse.Namespace) -> int:
    from ..publishing.onnx_export import export_onnx

    result = export_onnx(arguments.folder, arguments.output, opset=arguments.opset, check=not arguments.no_check)
    checked = "not checked" if result.max_abs_diff is None else f"max |onnx - torch| logit {result.max_abs_diff:.2e}"
    print(f"wrote {result.path} ({checked})")
    return 0


def _profile_latency_parser(subparsers) -> None:
    profile = subparsers.add_parser(
        "profile-latency",
        help="time the parts of a compressed model on this device and save the latency table (JSON)",
        description="Time the stem and head, one attention sub-block and one MLP sub-block over a grid of widths "
        "(this package's modeling code, at the batch size, dtype, attention implementation, device and thread count "
        "given) and save the table, keyed by all of them (hf_vit_compress.surgery.latency).",
    )
    profile.add_argument("model", metavar="MODEL", help="a dense ViT/DeiT: a local folder or a Hub id (its config)")
    profile.add_argument("--output", required=True, help="the table's JSON file")
    profile.add_argument("--batch-size", type=int, default=1)
    profile.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    profile.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default %(default)s)")
    profile.add_argument("--attn-implementation", default="sdpa", choices=("sdpa", "eager"))
    profile.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    profile.add_argument("--points", type=int, default=3, help="widths per axis (default %(default)s)")
    profile.add_argument("--repeats", type=int, default=7,
                         help="passes over the grid, one timed sample per cell each; the median is kept")
    profile.add_argument("--warmup", type=int, default=3)
    profile.add_argument("--no-progress", action="store_true")


def _run_profile_latency(arguments: argparse.Namespace) -> int:
    import torch
    from transformers import AutoConfig

    from ..surgery.latency import LatencyGrid, build_latency_table

    if arguments.threads:
        torch.set_num_threads(arguments.threads)
    if arguments.points < 2:
        raise ValueError(f"--points={arguments.points} is invalid: allowed an integer >= 2")
    try:
        config = AutoConfig.from_pretrained(arguments.model)
    except OSError as error:
        raise ValueError(f"MODEL {arguments.model!r}: no model config found ({error})") from None
    table = build_latency_table(config, arguments.batch_size, arguments.dtype, arguments.device,
                                arguments.attn_implementation, LatencyGrid.for_model(config, arguments.points),
                                warmup=arguments.warmup, repeats=arguments.repeats, progress=not arguments.no_progress)
    path = table.save(arguments.output)
    print(f"wrote {path}: {table.meta['seconds']} s on {table.key.device}, dense model predicted "
          f"{table.predict_config(config):.3f} ms per batch of {arguments.batch_size}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hf-vit-compress", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    subparsers = parser.add_subparsers(dest="command", required=True)
    _demo_parser(subparsers)
    _train_parser(subparsers)
    _push_parser(subparsers)
    _verify_parser(subparsers)
    _export_onnx_parser(subparsers)
    _profile_latency_parser(subparsers)
    arguments, extra = parser.parse_known_args(argv)
    commands = {"demo": _run_demo, "push": _run_push, "verify": _run_verify, "export-onnx": _run_export_onnx,
                "profile-latency": _run_profile_latency}
    try:
        if arguments.command != "train" and extra:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        with console_logging():  # this package's INFO records (the final architecture table), clear of the bars
            if arguments.command == "train":
                return _run_train(arguments, extra)
            return commands[arguments.command](arguments)
    except ValueError as error:  # configuration errors: one clear line, no traceback
        message = " ".join(str(error).split())
        print(f"error: {message}", file=sys.stderr)
        return 2
    except FloatingPointError as error:  # health.NonFiniteError: the run diverged; one line naming step and term
        message = " ".join(str(error).split())
        print(f"error: {message}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
