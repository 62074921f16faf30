"""Console output a person can follow: progress bars named by phase, and log records that do not tear them.

transformers' `ProgressCallback` draws one unnamed tqdm bar per `train()` and prints the log dicts through
`tqdm.write` (so they never cut a bar); with `disable_tqdm` its `PrinterCallback` prints them instead. What it lacks is
a name for the bar: `describe_progress` sets one (the demo: "dense training", then "OFB search" / "fine-tuning"), and
`console_logging` shows this package's INFO records (the final architecture table) through `tqdm.write` too.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

from transformers import ProgressCallback, TrainerCallback

#: the logger every module of this package logs under (`transformers.utils.logging.get_logger(__name__)`)
PACKAGE_LOGGER = "hf_vit_compress"


def describe_progress(trainer, description: str) -> bool:
    """Name the training progress bar of `trainer` (a `transformers.Trainer`). Returns False when it has none
    (`disable_tqdm`, a non-main process, or outside `train()`)."""
    named = False
    for callback in trainer.callback_handler.callbacks:
        bar = getattr(callback, "training_bar", None) if isinstance(callback, ProgressCallback) else None
        if bar is not None:
            bar.set_description(description)
            named = True
    return named


class ProgressDescription(TrainerCallback):
    """Names the training progress bar when training begins (for a plain `Trainer`; `CompressionTrainer` names its
    own by phase).

    Args:
        trainer: the `transformers.Trainer` this callback is added to (`trainer.add_callback(...)`, after the
            Trainer's own progress callback, which draws the bar at train begin).
        description: the bar's name, e.g. "dense training".
    """

    def __init__(self, trainer, description: str):
        self.trainer = trainer
        self.description = description

    def on_train_begin(self, args, state, control, **kwargs):
        describe_progress(self.trainer, self.description)


@contextlib.contextmanager
def console_logging(level: int = logging.INFO) -> Iterator[None]:
    """Show this package's log records at `level` and above on the console while the block runs, written through
    `tqdm.write` so that they never cut a progress bar (tqdm's `logging_redirect_tqdm`). For command-line runs; in
    Python, configure `logging` as usual (e.g. `logging.getLogger("hf_vit_compress").setLevel(logging.INFO)` and
    a handler)."""
    from tqdm.contrib.logging import logging_redirect_tqdm

    package = logging.getLogger(PACKAGE_LOGGER)
    previous = package.level
    package.setLevel(level)
    try:
        with logging_redirect_tqdm(loggers=[package]):
            yield
    finally:
        package.setLevel(previous)


@contextlib.contextmanager
def progress_bars(enabled: bool) -> Iterator[None]:
    """transformers' own progress bars (e.g. "Writing model shards" when saving) on or off while the block runs
    (the Trainer's bars follow `TrainingArguments.disable_tqdm` instead)."""
    from transformers.utils import logging as transformers_logging

    was_enabled = transformers_logging.is_progress_bar_enabled()
    (transformers_logging.enable_progress_bar if enabled else transformers_logging.disable_progress_bar)()
    try:
        yield
    finally:
        (transformers_logging.enable_progress_bar if was_enabled else transformers_logging.disable_progress_bar)()
