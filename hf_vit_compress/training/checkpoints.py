"""Resuming from Trainer checkpoints: pick the newest COMPLETE one, and say which file is wrong when one is not.

A run killed while the Trainer writes `checkpoint-N` leaves a folder without (or with a truncated)
`trainer_state.json`, which the Trainer writes last; truncated weights, optimizer or RNG files make safetensors,
torch and json raise errors that name no file; and a checkpoint without the method's `compression.*` tensors loads
with a mere "missing keys" warning and silently restarts the search. Here:

- `last_complete_checkpoint(output_dir)` skips incomplete checkpoint folders, with a warning naming the problem;
- `check_checkpoint(folder, model)` raises `CheckpointError` naming the file (and, for missing tensors, the
  tensors) before anything is loaded;
- `naming_files(folder, names)` turns a failure while the Trainer loads those files into a `CheckpointError` that
  names them.

Written by hand: `transformers.trainer_utils.get_last_checkpoint` only looks at folder names. The checks read
headers only (safetensors metadata, the zip directory of torch files); nothing is unpickled.
"""

from __future__ import annotations

import contextlib
import json
import re
import zipfile
from collections.abc import Iterator
from pathlib import Path

from torch import nn
from transformers.utils import logging

logger = logging.get_logger(__name__)

_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
TRAINER_STATE = "trainer_state.json"
#: torch.save files a Trainer checkpoint may hold (zip archives: a truncated one has no central directory)
TORCH_FILES = re.compile(
    r"^(optimizer\.pt|scheduler\.pt|scaler\.pt|rng_state(_\d+)?\.pth|(pytorch|adapter)_model\.bin)$"
)
ADVICE = "the file is truncated or corrupt (was the run killed while saving?); resume from an earlier checkpoint"


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed from; the message names the folder and the file or tensors."""


def _safetensors_keys(path: Path) -> list[str]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:  # reads and checks the header only
            return list(handle.keys())
    except Exception as error:  # SafetensorError, OSError
        raise CheckpointError(f"checkpoint file {path} cannot be read ({error}): {ADVICE}") from error


def checkpoint_weight_names(folder: Path) -> list[str] | None:
    """Names of the tensors in a checkpoint's weights (`model.safetensors` or its shards), headers checked. None for
    weights this cannot list without unpickling or that hold only part of the model (`pytorch_model.bin`, a PEFT
    adapter): their files are still checked for truncation."""
    single, index = folder / "model.safetensors", folder / "model.safetensors.index.json"
    if single.is_file():
        return _safetensors_keys(single)
    if (folder / "adapter_model.safetensors").is_file():
        _safetensors_keys(folder / "adapter_model.safetensors")
        return None
    if (folder / "pytorch_model.bin").is_file() or (folder / "adapter_model.bin").is_file():
        return None  # zip files: checked with the torch files below
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError, TypeError, AttributeError) as error:
            raise CheckpointError(f"checkpoint file {index} cannot be read ({error}): {ADVICE}") from error
        names = []
        for shard in shards:
            if not (folder / shard).is_file():
                raise CheckpointError(f"checkpoint {folder}: weight shard {shard} (listed in {index.name}) is "
                                      f"missing: {ADVICE}")
            names += _safetensors_keys(folder / shard)
        return names
    raise CheckpointError(f"checkpoint {folder} has no model.safetensors (nor a sharded index): {ADVICE}")


def checkpoint_problem(folder: str | Path) -> str | None:
    """Why `folder` is not a complete Trainer checkpoint, naming the file; None when it is complete."""
    folder = Path(folder)
    if not folder.is_dir():
        return f"checkpoint {folder} does not exist (or is not a folder)"
    state = folder / TRAINER_STATE
    if not state.is_file():
        return f"checkpoint {folder} has no {TRAINER_STATE} (the Trainer writes it last: the save was interrupted)"
    try:
        json.loads(state.read_text())["global_step"]
    except (ValueError, KeyError, TypeError) as error:
        return f"checkpoint file {state} cannot be read ({type(error).__name__}: {error}): {ADVICE}"
    try:
        checkpoint_weight_names(folder)
    except CheckpointError as error:
        return str(error)
    for path in sorted(folder.iterdir()):
        if TORCH_FILES.match(path.name):
            try:
                zipfile.ZipFile(path).close()
            except (zipfile.BadZipFile, OSError) as error:
                return f"checkpoint file {path} cannot be read ({error}): {ADVICE}"
    return None


def last_complete_checkpoint(output_dir: str | Path) -> str | None:
    """The newest `checkpoint-N` in `output_dir` that is complete (see `checkpoint_problem`); each newer incomplete
    one is skipped with a warning saying why. None when there is none."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return None
    found = [(int(match[1]), path) for path in output_dir.iterdir()
             if path.is_dir() and (match := _CHECKPOINT.match(path.name))]
    for _, path in sorted(found, reverse=True):
        problem = checkpoint_problem(path)
        if problem is None:
            return str(path)
        logger.warning(f"resume: skipping {path.name}: {problem}")
    return None


def check_checkpoint(folder: str | Path, model: nn.Module) -> None:
    """Raise `CheckpointError` if `model` cannot resume from `folder`: an incomplete or unreadable file (named), or
    model tensors the checkpoint lacks (named; the method's `compression.*` search state among them)."""
    problem = checkpoint_problem(folder)
    if problem is not None:
        raise CheckpointError(problem)
    names = checkpoint_weight_names(Path(folder))
    if names is None:
        return
    stored = set(names)
    missing = [name for name in model.state_dict() if name not in stored]
    if missing:
        search = [name for name in missing if name.startswith("compression.")]
        what = (f"the compression search state ({len(search)} tensors, e.g. {search[:3]})" if search else "")
        others = [name for name in missing if not name.startswith("compression.")]
        if others:
            what += (" and " if what else "") + f"{len(others)} model tensors, e.g. {others[:3]}"
        raise CheckpointError(
            f"checkpoint {folder} lacks {what}: resuming from it would restart them from their initial values "
            "mid-schedule. Resume from a checkpoint written by CompressionTrainer with the same model and "
            "CompressionConfig (or start a new run without resume_from_checkpoint)."
        )


@contextlib.contextmanager
def naming_files(folder: str | Path | None, names: str) -> Iterator[None]:
    """Re-raise a failure while loading `names` (e.g. "optimizer.pt / scheduler.pt") of checkpoint `folder` as a
    `CheckpointError` naming them (torch and safetensors errors name no file)."""
    try:
        yield
    except (RuntimeError, OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile) as error:
        if folder is None or isinstance(error, CheckpointError):
            raise
        raise CheckpointError(f"checkpoint {folder}: loading {names} failed ({type(error).__name__}: {error}): "
                              f"{ADVICE}") from error


class RunAlreadyComplete(Exception):
    """Raised at train begin when the resumed checkpoint is the run's last step (caught by `ResumeChecks.train`)."""


class ResumeChecks:
    """`transformers.Trainer` mixin: resume only from complete checkpoints, with errors that name the file.

    - `train(resume_from_checkpoint=True)` takes the newest COMPLETE checkpoint (the Trainer's takes the newest
      folder, even one whose save was interrupted);
    - a checkpoint is checked before anything is loaded (`check_checkpoint`), and loading errors name the files;
    - resuming from the checkpoint of a run's last step trains no further step (the Trainer ran one extra step when
      that step was not at the end of an epoch): the trainer raises `RunAlreadyComplete` at train begin, after the
      checkpoint is loaded, and `train` returns.
    """

    def train(self, resume_from_checkpoint: str | bool | None = None, *args, **kwargs):
        if resume_from_checkpoint is True:
            resume_from_checkpoint = last_complete_checkpoint(self.args.output_dir)
            if resume_from_checkpoint is None:
                raise CheckpointError(f"resume_from_checkpoint=True: no complete checkpoint-* folder in "
                                      f"{self.args.output_dir}")
        if resume_from_checkpoint not in (None, False):
            check_checkpoint(resume_from_checkpoint, self.accelerator.unwrap_model(self.model))
        try:
            return super().train(resume_from_checkpoint, *args, **kwargs)
        except RunAlreadyComplete:
            from transformers.trainer_utils import TrainOutput

            logger.warning(f"resume: {resume_from_checkpoint} is the last step ({self.state.global_step}) of the run: "
                           "nothing left to train")
            self.control = self.callback_handler.on_train_end(self.args, self.state, self.control)
            self.is_in_train = False
            return TrainOutput(self.state.global_step, 0.0, {"train_steps_run": 0})

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        with naming_files(resume_from_checkpoint, "the model weights (model.safetensors)"):
            return super()._load_from_checkpoint(resume_from_checkpoint, model)

    def _load_optimizer_and_scheduler(self, checkpoint):
        with naming_files(checkpoint, "optimizer.pt / scheduler.pt"):
            return super()._load_optimizer_and_scheduler(checkpoint)

    def _load_rng_state(self, checkpoint):
        with naming_files(checkpoint, "rng_state.pth"):
            return super()._load_rng_state(checkpoint)


__all__ = [
    "CheckpointError",
    "ResumeChecks",
    "RunAlreadyComplete",
    "check_checkpoint",
    "checkpoint_problem",
    "last_complete_checkpoint",
    "naming_files",
]
