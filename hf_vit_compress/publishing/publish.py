"""Save and publish a compressed model: one set of files, one way to the Hub.

Every path that writes or uploads a compressed model goes through here: `CompressionTrainer.save_model()` and
`.push_to_hub()`, the CLI (`train` with `--training.push_to_hub`, `push DIR REPO_ID`), the demo and
`push_compressed_folder` for Python users. A published folder holds, at its root:

- the compressed model: `model.safetensors`, `config.json` (`model_type: compressed_vit`, `auto_map`) and the two
  modeling files, so `from_pretrained(..., trust_remote_code=True)` works without this package;
- its image processor (`preprocessor_config.json`), so `pipeline("image-classification", ...)` works;
- `architecture.json` (kept units), `compression_config.json` (the method's settings) and
  `compression_report.json` (the run's measured figures);
- `README.md`, the model card built from that report (`card.build_model_card`).

Uploads use `huggingface_hub.HfApi` (`create_repo`, `upload_folder`) on a folder staged in a temporary directory,
never on a training output directory (whose gated dense model and checkpoints must not reach the Hub).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from enum import Enum
from pathlib import Path
from typing import Any

from huggingface_hub import HfApi
from transformers.utils import logging

from ..surgery.flops import count_macs, count_params
from .card import build_model_card
from .record import CompressionRecord, as_record
from .report import architecture_table
from .saving import save_atomically
from .verify import FolderCheck, UnsafeFolderError, verify_compressed_folder

logger = logging.get_logger(__name__)

ARCHITECTURE_FILE = "architecture.json"
COMPRESSION_CONFIG_FILE = "compression_config.json"
REPORT_FILE = "compression_report.json"
CARD_FILE = "README.md"
PROCESSOR_FILE = "preprocessor_config.json"
MODELING_FILES = ("configuration_compressed_vit.py", "modeling_compressed_vit.py")
#: what a folder must hold to be published
REQUIRED_FILES = ("config.json", *MODELING_FILES, PROCESSOR_FILE, ARCHITECTURE_FILE, COMPRESSION_CONFIG_FILE, CARD_FILE)
#: card facts a caller may add to a trainer's report (`CompressionTrainer.model_card_info`, `push_to_hub(**kwargs)`)
CARD_INFO_KEYS = ("base_model", "license", "datasets", "tags", "eval_dataset", "model_name", "speed", "recipe")
_CARD_INFO_ALIASES = {"finetuned_from": "base_model", "dataset_tags": "datasets"}  # Trainer.push_to_hub's names
#: evaluation bookkeeping that is not a metric of the model
_NOT_METRICS = ("loss", "runtime", "samples_per_second", "steps_per_second", "epoch", "model_preparation_time",
                "jit_compilation_time")


# ---------------------------------------------------------------------------------------------------------------
# Facts
# ---------------------------------------------------------------------------------------------------------------
def _is_repo_id(name: str | None, slashes: tuple[int, ...]) -> bool:
    if not name or os.path.exists(name) or name.startswith((".", "/", "~")) or name.count("/") not in slashes:
        return False
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def is_hub_model_id(name: str | None) -> bool:
    """True when `name` reads as a Hub model id (`owner/name`) and is not a local path."""
    return _is_repo_id(name, slashes=(1,))


def is_hub_dataset_id(name: str | None) -> bool:
    """True when `name` reads as a Hub dataset id (`owner/name`, or a legacy bare name such as `cifar10`): not a
    local path and not one of `datasets`' file builders (`parquet`, `imagefolder`, ...)."""
    try:
        from datasets.packaged_modules import _PACKAGED_DATASETS_MODULES as builders
    except ImportError:  # a private name: fall back to the common builders
        builders = ("csv", "json", "parquet", "arrow", "text", "imagefolder", "webdataset", "pandas")
    return _is_repo_id(name, slashes=(0, 1)) and name not in builders


def base_model_license(repo_id: str, token: str | bool | None = None) -> str | None:
    """The license in the base model's Hub card metadata, or None when unknown or the Hub is unreachable."""
    if not is_hub_model_id(repo_id) or os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        return None
    try:
        card_data = HfApi().model_info(repo_id, token=token).card_data
    except Exception as error:  # noqa: BLE001 - a card without a license is fine; say why and go on
        logger.info(f"no license read from {repo_id} ({type(error).__name__}: {error}); the card omits it")
        return None
    license_name = getattr(card_data, "license", None) if card_data is not None else None
    return license_name if isinstance(license_name, str) else None


def metric_values(metrics: Mapping[str, Any], prefix: str) -> dict[str, float]:
    """`{"eval_accuracy": .9, "eval_loss": .3, "eval_runtime": 2}` -> `{"accuracy": .9}` (metrics only)."""
    start = f"{prefix}_"
    return {key[len(start):]: value for key, value in metrics.items()
            if key.startswith(start) and key[len(start):] not in _NOT_METRICS}


def normalized_card_info(info: Mapping[str, Any] | None, where: str) -> dict[str, Any]:
    """Card facts with Trainer's aliases resolved; unknown keys are errors naming the allowed ones."""
    result = {}
    for key, value in (info or {}).items():
        key = _CARD_INFO_ALIASES.get(key, key)
        if key not in CARD_INFO_KEYS:
            raise ValueError(f"{where}: unknown model card field {key!r}; allowed: "
                             f"{sorted(CARD_INFO_KEYS + tuple(_CARD_INFO_ALIASES))}")
        if key in ("datasets", "tags") and isinstance(value, str):
            value = [value]
        result[key] = value
    return result


def _jsonable(value):
    if isinstance(value, Enum):  # TrainingArguments' enums (str subclasses that print as "SchedulerType.COSINE")
        return value.value
    return value if isinstance(value, (int, float, str, bool, type(None))) else str(value)


def training_summary(args, steps: int) -> dict[str, Any]:
    """The TrainingArguments a reader needs to reproduce the run (plus the optimizer steps taken)."""
    precision = "bf16" if args.bf16 else "fp16" if args.fp16 else "fp32"
    summary = {
        "optimizer_steps": steps,
        "learning_rate": args.learning_rate,
        "lr_scheduler_type": _jsonable(args.lr_scheduler_type),
        "warmup_steps": args.warmup_steps,
        "weight_decay": args.weight_decay,
        "optim": _jsonable(args.optim),
        "per_device_train_batch_size": args.per_device_train_batch_size,
        "gradient_accumulation_steps": args.gradient_accumulation_steps,
        "processes": args.world_size,
        "label_smoothing_factor": args.label_smoothing_factor,
        "mixed_precision": precision,
        "seed": args.seed,
    }
    return {key: _jsonable(value) for key, value in summary.items()}


def _evaluation(record: CompressionRecord, kind: str) -> dict[str, float] | None:
    """The metrics of the run's last evaluation of `kind` ("dense", or "compressed": on the final weights)."""
    for entry in reversed(record.evaluations):
        if entry["kind"] != kind:
            continue
        if kind == "compressed" and entry["step"] != record.steps:
            return None  # measured on earlier weights than the ones saved: not this model's figure
        return metric_values(entry["metrics"], entry["prefix"]) or None
    return None


def compression_report(run, compressed=None, dense_metrics: Mapping[str, float] | None = None,
                       compressed_metrics: Mapping[str, float] | None = None, **card_info) -> dict[str, Any]:
    """The measured facts of a compression run: what the card shows and the CLI writes to
    `compression_report.json`.

    Args:
        run: a `CompressionRecord`, or a `CompressionTrainer` whose search has finished (its record is taken).
        compressed: its exported model (exported here when not given).
        dense_metrics, compressed_metrics: metrics measured outside the trainer (the demo does); by default the
            run's own: its last `evaluate_dense()` and its last `evaluate()` on the final weights.
        **card_info: facts only the caller knows (`CARD_INFO_KEYS`), over the record's `card_info`.

    Returns:
        A JSON-ready dict: `method`, `target_flops`, `dense_macs`, `compressed_macs`, `compressed_macs_ratio`,
        `dense_params`, `compressed_params`, `image_size`, `dense_architecture`, `architecture`, `steps`,
        `compression_config`, `training`, `speed_budget` under a speed budget (`target_flops` is then None), and
        when measured `dense_metrics` / `compressed_metrics` (with
        `dense_accuracy`, `compressed_accuracy` and the top-5 ones flat), plus the card facts given.
    """
    record = as_record(run)
    info = normalized_card_info({**record.card_info, **card_info}, "compression_report")
    compressed = compressed if compressed is not None else record.export()
    config = record.dense_config
    source = getattr(config, "_name_or_path", None) or None
    compressed_macs = count_macs(compressed)
    report: dict[str, Any] = {
        "model": source,
        "base_model": source if is_hub_model_id(source) else None,
        "source_model_type": config.model_type,
        "method": record.compression_config.method,
        "target_flops": _target_flops(record),
        "dense_macs": int(record.dense_macs),
        "compressed_macs": compressed_macs,
        "compressed_macs_ratio": compressed_macs / record.dense_macs,
        "dense_params": record.dense_params,
        "compressed_params": count_params(compressed),
        "image_size": config.image_size,
        "dense_architecture": dense_architecture(config),
        "architecture": record.architecture.summary(),
        # the search's own MACs ratio when it ended, before the final projection (None: not seen by this trainer)
        "search_macs_ratio": record.search_macs_ratio,
        "steps": record.steps,
    }
    if record.speed_budget is not None:  # a speed budget: its target, predicted and measured speed-up
        report["speed_budget"] = dict(record.speed_budget)
    report["architecture_table"] = architecture_table(report).splitlines()  # lines: readable in the JSON
    measured = {"dense": dense_metrics or _evaluation(record, "dense"),
                "compressed": compressed_metrics or _evaluation(record, "compressed")}
    eval_dataset = dict(info.pop("eval_dataset", None) or {})
    if any(measured.values()):
        size = record.eval_dataset_size
        if size is not None and dense_metrics is None and compressed_metrics is None:
            eval_dataset.setdefault("num_examples", size)
        if eval_dataset:
            report["eval_dataset"] = eval_dataset
    for which, values in measured.items():
        if values:
            report[f"{which}_metrics"] = {key: _jsonable(value) for key, value in values.items()}
            for key in ("accuracy", "top5_accuracy"):
                if key in values:
                    report[f"{which}_{key}"] = values[key]
    report["compression_config"] = record.compression_config.to_dict()
    report["training"] = training_summary(record.training_args, record.steps)
    if report["base_model"] and "license" not in info:  # looked up once per run (cached in its card_info)
        info["license"] = record.card_info["license"] = base_model_license(
            report["base_model"], token=getattr(record.training_args, "hub_token", None))
    report.update({key: value for key, value in info.items() if value is not None})
    return report


def _target_flops(record: CompressionRecord) -> float | None:
    """The MACs budget as a fraction of the dense MACs; None under a speed budget (its target is in `speed_budget`)."""
    if record.compression_config.budget_unit != "macs":
        return None
    return record.compression_config.target_ratio(record.dense_macs)


def dense_architecture(config) -> dict[str, int]:
    """The dense ViT/DeiT shapes from its config, as `compression_report` writes them."""
    return {
        "hidden_size": config.hidden_size,
        "num_hidden_layers": config.num_hidden_layers,
        "num_attention_heads": config.num_attention_heads,
        "head_dim": config.hidden_size // config.num_attention_heads,
        "intermediate_size": config.intermediate_size,
    }


def architecture_facts(run) -> dict[str, Any]:
    """What `report.architecture_table` shows, counted from the run's final architecture without exporting it
    (the same figures `compression_report` measures on the exported model): `method`, `architecture`,
    `dense_architecture`, `dense_macs`, `compressed_macs`, `target_flops`, `search_macs_ratio`, `dense_params`,
    `compressed_params`. `run`: a `CompressionRecord` or a `CompressionTrainer` (whose search it ends if it has not
    ended)."""
    record = as_record(run)
    return {
        "method": record.compression_config.method,
        "architecture": record.architecture.summary(),
        "dense_architecture": dense_architecture(record.dense_config),
        "dense_macs": int(record.dense_macs),
        "compressed_macs": record.compressed_macs,
        "target_flops": _target_flops(record),
        "search_macs_ratio": record.search_macs_ratio,
        "speed_budget": record.speed_budget,
        "dense_params": record.dense_params,
        "compressed_params": record.compressed_params,
    }


# ---------------------------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------------------------
def processor_files(processor) -> dict[str, str]:
    """The text files `processor.save_pretrained` writes (an image processor: `preprocessor_config.json`)."""
    with tempfile.TemporaryDirectory() as folder:
        processor.save_pretrained(folder)
        return {path.name: path.read_text() for path in sorted(Path(folder).iterdir()) if path.is_file()}


def publication_files(report: Mapping[str, Any], architecture: Mapping[str, Any], processor=None,
                      repo_id: str | None = None, model_name: str | None = None) -> dict[str, str]:
    """Name -> text of every file published beside the compressed model's weights, config and modeling files.

    Args:
        report: the run's facts (`compression_report`); its `compression_config` becomes `compression_config.json`.
        architecture: `Architecture.to_dict()` of the kept units.
        processor: the image processor to ship (None: none is written, and `pipeline()` will not work).
        repo_id, model_name: for the card (see `card.build_model_card`).
    """
    files = {
        ARCHITECTURE_FILE: json.dumps(architecture) + "\n",
        COMPRESSION_CONFIG_FILE: json.dumps(report["compression_config"], indent=2, sort_keys=True) + "\n",
        REPORT_FILE: json.dumps(report, indent=2) + "\n",
        CARD_FILE: str(build_model_card(report, repo_id=repo_id, model_name=model_name)),
    }
    if processor is not None:
        files.update(processor_files(processor))
    return files


def save_compressed_model(model, output_dir: str | os.PathLike, report: Mapping[str, Any],
                          architecture: Mapping[str, Any], processor=None, repo_id: str | None = None) -> Path:
    """Write the compressed model and everything published with it (see the module docstring) to `output_dir`,
    atomically (`export.save_atomically`). Returns the folder."""
    output_dir = Path(output_dir)
    files = publication_files(report, architecture, processor, repo_id=repo_id, model_name=output_dir.name)
    return save_atomically(model, output_dir, extra_files=files)


def check_publishable(folder: str | os.PathLike, *, skip_unknown: bool = False) -> FolderCheck:
    """Check that `folder` is a complete compressed model holding nothing else (`verify.verify_compressed_folder`
    with the processor, sidecars and card required: only allow-listed regular files, the package's own modeling
    code, safetensors weights matching config.json, no pickle-capable file).

    Returns:
        The `FolderCheck` (its `files` are what may be uploaded).

    Raises:
        UnsafeFolderError: one line naming every problem, with a hint when `folder` is a training output folder.
    """
    folder = Path(folder)
    try:
        return verify_compressed_folder(folder, skip_unknown=skip_unknown, required=REQUIRED_FILES)
    except UnsafeFolderError as error:
        hint = f" (did you mean {folder / 'compressed_model'}?)" if (folder / "compressed_model").is_dir() else ""
        raise UnsafeFolderError(folder, error.problems, verdict=f"cannot be published{hint}") from None


# ---------------------------------------------------------------------------------------------------------------
# Upload
# ---------------------------------------------------------------------------------------------------------------
def upload_folder(folder: str | os.PathLike, repo_id: str, *, token: str | bool | None = None,
                  private: bool | None = None, revision: str | None = None, commit_message: str | None = None,
                  create_pr: bool = False, run_as_future: bool = False, create_repo: bool = True,
                  cleanup: str | os.PathLike | None = None):
    """Check `folder`, create the repo (and branch `revision`) if needed, upload the folder to the repo's root.

    `cleanup` is a temporary folder removed once the upload has finished (also when it runs as a future).
    Returns what `HfApi.upload_folder` returns (a `CommitInfo`, or a `Future` of one).
    """
    api = HfApi()
    try:
        files = check_publishable(folder).files
        if create_repo:
            repo_id = api.create_repo(repo_id, token=token, private=private, exist_ok=True).repo_id
        if revision not in (None, "main"):
            api.create_branch(repo_id, branch=revision, token=token, exist_ok=True)
        result = api.upload_folder(repo_id=repo_id, folder_path=str(folder), commit_message=commit_message,
                                   token=token, revision=revision, create_pr=create_pr, run_as_future=run_as_future,
                                   allow_patterns=files)  # exactly the checked files (not the save's bookkeeping)
    except BaseException:
        if cleanup is not None:
            shutil.rmtree(cleanup, ignore_errors=True)
        raise
    if cleanup is not None:
        if hasattr(result, "add_done_callback"):
            result.add_done_callback(lambda _: shutil.rmtree(cleanup, ignore_errors=True))
        else:
            shutil.rmtree(cleanup, ignore_errors=True)
    return result


def _stage_copy(folder: Path, files: list[str], staging: Path) -> Path:
    """Copy the checked `files` of `folder` into `staging/<folder name>`: weights as hard links where the file
    system allows (they can be large), everything else copied; a file replaced by a link since the check is refused
    (opened with O_NOFOLLOW), so the staged folder holds regular files only."""
    target = staging / folder.name
    for name in files:
        source, destination = folder / name, target / name
        destination.parent.mkdir(parents=True, exist_ok=True)
        if name.endswith(".safetensors") and not source.is_symlink():
            try:
                os.link(source, destination, follow_symlinks=False)
                continue
            except OSError:
                pass
        descriptor = os.open(source, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
        with os.fdopen(descriptor, "rb") as reader, open(destination, "wb") as writer:
            shutil.copyfileobj(reader, writer)
    return target


def push_compressed_folder(folder: str | os.PathLike, repo_id: str, *, token: str | bool | None = None,
                           private: bool | None = None, revision: str | None = None,
                           commit_message: str | None = "Upload compressed model", create_pr: bool = False,
                           keep_card: bool = False, blocking: bool = True, skip_unknown: bool = False):
    """Publish a saved compressed model folder to the Hub (what `hf-vit-compress push DIR REPO_ID` runs).

    The folder is checked (`check_publishable`: the compressed model, not a dense or gated one; image processor,
    sidecars and card present; only allow-listed regular files and the package's own modeling code), its checked
    files are copied to a temporary folder, checked again there, and uploaded from there. Unless `keep_card`, the card
    is rebuilt there from the folder's `compression_report.json` so its loading code names `repo_id` (your folder
    keeps its README.md either way).

    Args:
        folder: a folder written by `CompressionTrainer.save_model` / `hf-vit-compress train` (`compressed_model/`)
            / the demo (`model/`).
        repo_id: `owner/name` on the Hub (created if missing).
        token, private, revision, commit_message, create_pr: as in `huggingface_hub.HfApi.upload_folder` /
            `create_repo` (`private` only applies when the repo is created).
        keep_card: upload the folder's README.md as it is.
        skip_unknown: leave out (with a warning naming them) links, hidden entries, other folders and unknown
            files instead of refusing the folder; pickle-capable files and tampered code are refused either way.
        blocking: False returns a `Future` (the temporary copy is removed when it is done).

    Returns:
        The `CommitInfo` (or its `Future`).
    """
    folder = Path(folder)
    files = check_publishable(folder, skip_unknown=skip_unknown).files
    staging = Path(tempfile.mkdtemp(prefix="hf_vit_compress-push-"))
    try:
        staged = _stage_copy(folder, files, staging)
        report_path = staged / REPORT_FILE
        if not keep_card and report_path.is_file():
            card = build_model_card(json.loads(report_path.read_text()), repo_id=repo_id)
            (staged / CARD_FILE).unlink()  # a hard link to the user's card: replace it, never write through it
            (staged / CARD_FILE).write_text(str(card))
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return upload_folder(staged, repo_id, token=token, private=private, revision=revision,
                         commit_message=commit_message, create_pr=create_pr, run_as_future=not blocking,
                         cleanup=staging)


__all__ = [
    "CARD_INFO_KEYS",
    "architecture_facts",
    "base_model_license",
    "check_publishable",
    "compression_report",
    "is_hub_dataset_id",
    "is_hub_model_id",
    "publication_files",
    "push_compressed_folder",
    "save_compressed_model",
    "upload_folder",
]
