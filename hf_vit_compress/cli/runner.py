"""Run a recipe end to end: load the model and data it names, compress with `CompressionTrainer`, evaluate, save.

`hf-vit-compress train` calls `run_recipe(setup_from_args(recipe, overrides))`; the recipe format, its validation and
the overrides live in `recipes.py`.
"""

from __future__ import annotations

import glob
import json
import math
import os
from pathlib import Path

from transformers.utils import logging

from .recipes import DataArguments, TrainSetup

logger = logging.get_logger(__name__)


def _resample(processor):
    from PIL import Image

    value = getattr(processor, "resample", None)
    try:
        return Image.Resampling(int(value))
    except (TypeError, ValueError):
        return Image.Resampling.BILINEAR


def _load_model(name_or_path: str, field: str, **kwargs):
    """`AutoModelForImageClassification.from_pretrained`, with a one-line error naming the recipe field when the
    model cannot be found (a missing local folder is otherwise looked up on the Hub: a traceback)."""
    from transformers import AutoModelForImageClassification

    try:
        return AutoModelForImageClassification.from_pretrained(name_or_path, **kwargs)
    except OSError as error:
        path = Path(name_or_path).expanduser()
        local = path.exists() or name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1
        reason = ("no such local folder" if not path.exists() else str(error).splitlines()[0]) if local else (
            f"not a local folder, and the Hub gave: {str(error).splitlines()[0]}")
        raise ValueError(f"{field}={name_or_path!r} cannot be loaded: {reason}") from None


def _skipped_images(dataset, trainer) -> int:
    """Images skipped as undecodable by a prepared dataset, summed over the processes (0 when none skipped)."""
    import torch

    from ..data.prepared import PreparedImageDataset, augmentation_keys

    if isinstance(dataset, PreparedImageDataset):
        count = dataset.skipped_images
    else:
        keys = augmentation_keys(dataset)
        count = keys.skipped if keys is not None else 0
    return int(trainer.accelerator.reduce(torch.tensor(count, device=trainer.args.device), reduction="sum"))


def describe_data(data: DataArguments, files) -> str:
    """The data files (or the dataset) a split comes from, for error messages."""
    return f"data files {list(files)}" if files else f"data.dataset_name={data.dataset_name!r}"


def _load_split(data: DataArguments, split: str, files, streaming: bool):
    """One split; an empty one (an empty file, a split with no rows) is a `ValueError` naming its files."""
    from ..data.loading import load_image_dataset

    kwargs = {}
    if data.dataset_config_name is not None:
        kwargs["name"] = data.dataset_config_name
    data_files = {split: list(files)} if files else None
    try:
        dataset = load_image_dataset(data.dataset_name, split, streaming=streaming, data_files=data_files, **kwargs)
    except ValueError as error:
        if "corresponds to no data" not in str(error):  # datasets' words for a split without a row
            raise
        dataset = None
    if dataset is None or (not streaming and len(dataset) == 0):
        raise ValueError(f"split {split!r} has no examples ({describe_data(data, files)}): an empty file?")
    return dataset


def check_parquet_stream_labels(files, label_column: str, num_labels: int) -> None:
    """Range-check the label column of local parquet files up front, naming the file and row of a bad label.

    A stream is checked example by example as it is read, after shuffling, where a position names no file; local
    parquet files can be read column-wise first (one column, no image decoded). Remote or missing files are left
    to the per-example check.
    """
    import numpy as np
    import pyarrow.parquet as parquet

    for pattern in files:
        for path in sorted(glob.glob(os.path.expanduser(str(pattern)))):
            try:
                labels = parquet.read_table(path, columns=[label_column]).column(label_column)
            except (OSError, ValueError, KeyError):  # unreadable here, or no such column: the stream names it
                continue
            values = labels.to_numpy(zero_copy_only=False)
            if not np.issubdtype(values.dtype, np.integer):
                continue  # non-integer labels get their own message from the per-example check
            bad = np.flatnonzero((values < 0) | (values >= num_labels))
            if bad.size:
                raise ValueError(
                    f"Label {int(values[bad[0]])} in column {label_column!r} at row {int(bad[0])} of {path} is "
                    f"outside the valid range [0, {num_labels}) (num_labels={num_labels}; {bad.size} such rows "
                    "in this file)"
                )


def _take(dataset, count: int | None):
    if count is None:
        return dataset
    from datasets import IterableDataset

    if isinstance(dataset, IterableDataset):
        return dataset.take(count)
    return dataset.select(range(min(count, len(dataset))))


def _parquet_rows(files) -> int | None:
    """Rows in local parquet files (globs expanded), read from their footers without decoding anything; None when
    a file is remote or missing."""
    import pyarrow.parquet as parquet

    paths = []
    for pattern in files:
        matches = sorted(glob.glob(os.path.expanduser(str(pattern))))
        if not matches:
            return None
        paths += matches
    try:
        return sum(parquet.read_metadata(path).num_rows for path in paths)
    except (OSError, ValueError):
        return None


def training_examples(dataset, data: DataArguments) -> int | None:
    """How many examples one epoch of the training data has, when that is known without reading it: `len()` of
    map-style data; for a stream, the split size in the dataset's metadata or the row counts of local parquet
    files; capped by `data.max_train_samples`. None when unknown (a remote stream without metadata)."""
    try:
        count = len(dataset)
    except TypeError:  # a stream
        splits = getattr(getattr(dataset, "info", None), "splits", None) or {}
        split = splits.get(data.train_split) if hasattr(splits, "get") else None
        count = getattr(split, "num_examples", None) or None
        if count is None and data.train_files and data.dataset_name == "parquet":
            count = _parquet_rows(data.train_files)
    if count is not None and data.max_train_samples is not None:
        count = min(count, data.max_train_samples)
    return count


def _examples_per_epoch(train_raw, data: DataArguments) -> int | None:
    """The training set's size when known (warning when `data.num_train_examples` says otherwise), else the count
    the recipe gives (`num_train_examples`, or `max_train_samples` for a stream)."""
    known = training_examples(train_raw, data)
    if known is not None:
        if data.num_train_examples is not None and data.num_train_examples != known:
            logger.warning(f"data.num_train_examples={data.num_train_examples} disagrees with the training data, "
                           f"which has {known} examples: epochs and per-epoch schedules use {known}")
        return known
    if data.num_train_examples is not None:
        return data.num_train_examples
    return data.max_train_samples if data.streaming else None


def available_cpus() -> int:
    """CPU cores this process may run on (its affinity mask where the OS has one, else the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def cap_dataloader_workers(args) -> None:
    """Lower `args.dataloader_num_workers` to the cores each local process gets (cores // processes on this
    machine), with a log line: more workers than cores only time-slice the same cores (8 workers made a 6-step CPU
    run 14 times slower on 2 cores)."""
    local_processes = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    cores = available_cpus()
    limit = cores // local_processes
    if args.dataloader_num_workers > limit:
        logger.warning(f"training.dataloader_num_workers={args.dataloader_num_workers} capped at {limit}: this "
                       f"machine gives {cores} CPU cores to {local_processes} local process(es)")
        args.dataloader_num_workers = limit
        if limit == 0:  # DataLoader rejects these without worker processes
            args.dataloader_prefetch_factor = None
            args.dataloader_persistent_workers = False


def _eval_dataset_card(data: DataArguments, count: int | None) -> dict:
    """How the card names the evaluation data: a Hub dataset by its id (also in the model-index), local files by
    their builder (no model-index entry: they have no id to point to)."""
    from ..publishing.publish import is_hub_dataset_id

    if is_hub_dataset_id(data.dataset_name):
        info = {"name": data.dataset_name, "type": data.dataset_name, "split": data.eval_split}
    else:
        info = {"name": f"local {data.dataset_name} files", "split": data.eval_split}
    if data.dataset_config_name:
        info["config"] = data.dataset_config_name
    if count is not None:
        info["num_examples"] = count
    return info


def _recipe_as_run(setup: TrainSetup) -> dict:
    """The merged recipe with each value as it was parsed and used (typed; `max_steps` as derived for a stream)."""
    def as_run(section: str, arguments) -> dict:
        return {key: getattr(arguments, key) for key in setup.recipe.get(section) or {} if hasattr(arguments, key)}

    recipe = {key: setup.recipe[key] for key in ("description",) if key in setup.recipe}
    recipe.update(model=as_run("model", setup.model), data=as_run("data", setup.data),
                  training=as_run("training", setup.training), compression=setup.recipe.get("compression") or {})
    return json.loads(json.dumps(recipe, default=_plain_value))


def _plain_value(value):
    from dataclasses import asdict, is_dataclass
    from enum import Enum

    if isinstance(value, Enum):
        return value.value
    return asdict(value) if is_dataclass(value) else str(value)


def run_recipe(setup: TrainSetup) -> dict:
    """Load the model and data, evaluate the dense model, search (+ fine-tune) with `CompressionTrainer`, evaluate,
    and save the compressed model with its image processor and model card to `<output_dir>/compressed_model` (plus
    `compression_report.json` and the Trainer's metrics files in `output_dir`); with `training.push_to_hub`, push
    it (`CompressionTrainer.save_model`). Every process of a multi-process launch runs this; only the main one
    writes. Returns the report.
    """
    from transformers import set_seed

    from ..training.callback import NoTrainingSteps

    d, t = setup.data, setup.training
    set_seed(t.seed)
    cap_dataloader_workers(t)
    # data first: the label count decides the classifier head
    train_raw, eval_raw, label_feature = _load_raw_splits(d)
    model, teacher, processor = _load_models(setup.model, label_feature)
    num_labels = model.config.num_labels  # every label must index the classifier (plain int columns included)
    train, evaluation, eval_transform = _prepare_splits(d, t.seed, train_raw, eval_raw, processor,
                                                        d.image_size or model.config.image_size, num_labels)
    examples, steps_per_epoch = _steps_per_epoch(d, t, train_raw)
    trainer = _build_trainer(setup, model, teacher, processor, eval_transform, train, evaluation, steps_per_epoch)
    if evaluation is not None:
        trainer.evaluate_dense()  # the source model, before any step (also when resuming: weights load in train())
    try:
        train_result = trainer.train(resume_from_checkpoint=_resume_path(t))
    except NoTrainingSteps as error:  # nothing is saved: name the data that gave no batch
        raise ValueError(f"{error} ({describe_data(d, d.train_files)})") from None
    metrics = dict(train_result.metrics)
    if evaluation is not None:
        metrics.update(trainer.evaluate())
    output_dir = Path(t.output_dir) / "compressed_model"
    # Every rank calls it (it synchronises); only the main process writes (and pushes, with training.push_to_hub).
    trainer.save_model(str(output_dir))
    return _write_run_report(setup, trainer, metrics, examples, output_dir, train, evaluation)


def _load_raw_splits(d: DataArguments):
    """(train split, eval split or None, the label column's feature): the eval split only where one is named and,
    for local files, given."""
    train_raw = _load_split(d, d.train_split, d.train_files, d.streaming)
    with_eval = d.eval_split is not None and (d.train_files is None or d.eval_files is not None)
    eval_raw = _load_split(d, d.eval_split, d.eval_files, d.streaming) if with_eval else None
    return train_raw, eval_raw, (train_raw.features or {}).get(d.label_column)


def _load_models(m, label_feature):
    """(model with a classifier for the data's labels, frozen teacher or None, image processor or None)."""
    from datasets import ClassLabel
    from transformers import AutoImageProcessor

    num_labels = label_feature.num_classes if isinstance(label_feature, ClassLabel) else None
    load = dict(revision=m.model_revision, trust_remote_code=m.trust_remote_code, cache_dir=m.cache_dir)
    if m.attn_implementation is not None:
        load["attn_implementation"] = m.attn_implementation
    model = _load_model(m.model_name_or_path, "model.model_name_or_path", **load)
    if num_labels is not None and num_labels != model.config.num_labels:
        names = label_feature.names
        model = _load_model(
            m.model_name_or_path, "model.model_name_or_path", num_labels=num_labels, id2label=dict(enumerate(names)),
            label2id={name: i for i, name in enumerate(names)}, ignore_mismatched_sizes=True, **load,
        )
    teacher = None
    if m.teacher_name_or_path is not None:
        teacher = _load_model(m.teacher_name_or_path, "model.teacher_name_or_path", **load).eval()
        teacher.requires_grad_(False)
    try:
        processor = AutoImageProcessor.from_pretrained(m.model_name_or_path, revision=m.model_revision,
                                                       cache_dir=m.cache_dir)
    except (OSError, ValueError):  # no preprocessor_config.json (e.g. a model built from a config): defaults
        processor = None
    return model, teacher, processor


def _prepare_splits(d: DataArguments, seed: int, train_raw, eval_raw, processor, image_size: int, num_labels: int):
    """(train dataset, eval dataset or None, the eval transform): labels checked, streams shuffled, transforms
    from the model's image processor."""
    from ..data.loading import prepare_dataset, shuffle_stream, transforms_from_image_processor

    train_transform, eval_transform = transforms_from_image_processor(
        processor, image_size, scale=(d.random_crop_min_scale, 1.0), hflip_prob=d.hflip_prob,
        resample=_resample(processor), seed=seed,
    )
    if d.streaming and d.dataset_name == "parquet":
        for files in (d.train_files, d.eval_files if eval_raw is not None else None):
            if files:
                check_parquet_stream_labels(files, d.label_column, num_labels)
    train = _take(train_raw, d.max_train_samples)
    if d.streaming:
        train = shuffle_stream(train, seed=seed, buffer_size=d.shuffle_buffer_size,
                               max_buffer_input_shards=d.shuffle_buffer_input_shards)
    train = prepare_dataset(train, train_transform, d.image_column, d.label_column, num_labels,
                            skip_undecodable_images=d.skip_undecodable_images)
    evaluation = None
    if eval_raw is not None:
        evaluation = prepare_dataset(_take(eval_raw, d.max_eval_samples), eval_transform, d.image_column,
                                     d.label_column, num_labels, skip_undecodable_images=d.skip_undecodable_images)
    return train, evaluation, eval_transform


def _steps_per_epoch(d: DataArguments, t, train_raw) -> tuple[int | None, int | None]:
    """(examples per epoch, optimizer steps per epoch): a stream has no length, so epochs become steps through the
    example count (map-style data: the Trainer counts its batches itself; steps None). Sets `t.max_steps` for a
    stream run by epochs."""
    steps_per_epoch = None
    examples = _examples_per_epoch(train_raw, d)
    if examples == 0:
        raise ValueError(f"the training split {d.train_split!r} has no examples ({describe_data(d, d.train_files)}"
                         "): an empty file?")
    if d.streaming and examples is not None:
        global_batch = t.per_device_train_batch_size * t.world_size * t.gradient_accumulation_steps
        steps_per_epoch = max(1, math.ceil(examples / global_batch))
    if d.streaming and t.max_steps <= 0:
        if steps_per_epoch is None:
            raise ValueError("data.streaming=true needs training.max_steps > 0 or data.num_train_examples (a "
                             "stream has no length to count epochs with)")
        t.max_steps = max(1, math.ceil(t.num_train_epochs * steps_per_epoch))
    return examples, steps_per_epoch


def _build_trainer(setup: TrainSetup, model, teacher, processor, eval_transform, train, evaluation,
                   steps_per_epoch):
    from ..data.loading import collate_images
    from ..data.transforms import image_processor_for_transform
    from ..publishing.metrics import ImageClassificationMetrics
    from ..publishing.publish import is_hub_dataset_id
    from ..training.trainer import CompressionTrainer

    d = setup.data
    # Published with the model so pipeline() preprocesses like the evaluation did: the source model's processor,
    # or one built from the evaluation transform when the source has none.
    published_processor = processor if processor is not None else image_processor_for_transform(eval_transform)
    metrics_fn = ImageClassificationMetrics(metrics=d.eval_metrics or ())
    trainer = CompressionTrainer(
        model=model, args=setup.training, compression_config=setup.compression, teacher=teacher,
        train_dataset=train, eval_dataset=evaluation, data_collator=collate_images, compute_metrics=metrics_fn,
        steps_per_epoch=steps_per_epoch, preprocess_logits_for_metrics=metrics_fn.preprocess_logits_for_metrics,
        processing_class=published_processor,
    )
    trainer.model_card_info["recipe"] = _recipe_as_run(setup)
    if is_hub_dataset_id(d.dataset_name):
        trainer.model_card_info["datasets"] = [d.dataset_name]
    if evaluation is not None:
        count = None if d.streaming else len(evaluation)
        trainer.model_card_info["eval_dataset"] = _eval_dataset_card(d, count if count is not None
                                                                     else d.max_eval_samples)
    return trainer


def _resume_path(t):
    """`training.resume_from_checkpoint` as a path: `last` / `true` -> the newest complete checkpoint."""
    from ..training.checkpoints import last_complete_checkpoint

    resume = t.resume_from_checkpoint
    if resume is not None and str(resume).lower() in ("last", "true"):
        resume = last_complete_checkpoint(t.output_dir)  # skips (with a warning) checkpoints cut short by a kill
        if resume is None:
            raise ValueError(f"training.resume_from_checkpoint={t.resume_from_checkpoint!r}: no complete "
                             f"checkpoint-* folder in {t.output_dir}")
    return resume


def _write_run_report(setup: TrainSetup, trainer, metrics: dict, examples: int | None, output_dir: Path, train,
                      evaluation) -> dict:
    """The same facts as the card's (compressed_model/compression_report.json), plus the run's bookkeeping;
    written (with the metrics files and the search plot) by the main process only."""
    from ..publishing.publish import compression_report

    t = setup.training
    skipped = {"train": _skipped_images(train, trainer)}
    if evaluation is not None:
        skipped["eval"] = _skipped_images(evaluation, trainer)
    report = {
        **compression_report(trainer),
        "model": setup.model.model_name_or_path,
        "steps_per_epoch": int(trainer.method.steps_per_epoch),
        "num_train_examples": examples,  # per epoch, as used (None: a stream of unknown size run by max_steps)
        "metrics": metrics,
        "skipped_images": skipped,  # undecodable images skipped (data.skip_undecodable_images), summed over processes
        "compressed_model": str(output_dir),
    }
    if trainer.is_world_process_zero():
        trainer.save_metrics("all", metrics)
        plot = _write_search_plot(trainer.compression_history, report, Path(t.output_dir))
        report["search_plot"] = str(plot) if plot is not None else None
        (Path(t.output_dir) / "compression_report.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def _write_search_plot(history: list[dict], report: dict, output_dir: Path) -> Path | None:
    """The search's history (`history.json`) and its plot (`report.PLOT_FILES`), beside compression_report.json;
    no plot for a registered method that has none."""
    from ..publishing.report import PLOT_FILES, plot_search

    (output_dir / "history.json").write_text(json.dumps(history) + "\n")
    if report["method"] not in PLOT_FILES:
        return None
    target, final = report["target_flops"], report["compressed_macs_ratio"]
    speed = report.get("speed_budget")
    if speed:  # a speed budget: the search's ratios are of predicted ms
        target = speed["target_ms"] / speed["dense_predicted_ms"]
        final = speed["predicted_ms"] / speed["dense_predicted_ms"]
    return plot_search(history, report["method"], output_dir / PLOT_FILES[report["method"]], target_ratio=target,
                       architecture=report["architecture"], final_macs_ratio=final)


__all__ = ["run_recipe"]
