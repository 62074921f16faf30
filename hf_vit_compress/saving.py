"""Save a model folder so that an interruption never loses the previous model or anything else in the folder.

`save_atomically(model, output_dir, extra_files)` writes the model (`save_pretrained`) and `extra_files` into a
hidden staging folder next to `output_dir`, then puts them in place in one of two ways:

- **dedicated folder** (missing, empty, or holding only files that this save or the previous one wrote): the
  staging folder and `output_dir` are swapped in one atomic `renameat2(RENAME_EXCHANGE)` (Linux), so the path
  always holds the old or the new complete model; the old one is then deleted. Without that system call: two
  renames, and a save interrupted between them is put back by the next save.
- **shared folder** (checkpoints, notes, anything this package did not write): only the model's own files are
  replaced, one `os.replace` each (weights first, `config.json` last), under a journal
  (`.hf_vit_compress/journal.json`) written before the first replacement. An exception completes the moves at
  once; after a kill, the next save into the folder completes them first. Files of OUR previous save that this
  save does not write (stale weight shards) are removed; nothing else is.

`.hf_vit_compress/manifest.json` in the folder lists the files the last save wrote: that, not the file names, is
what makes a file "ours". Leftover staging folders of interrupted saves (of processes that are no longer running)
are removed by the next save into the same path.

Written by hand: `save_pretrained` and huggingface_hub write in place, and no library does the folder swap.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import re
import shutil
import uuid
from pathlib import Path

CONTROL_DIR = ".hf_vit_compress"
MANIFEST = "manifest.json"
JOURNAL = "journal.json"
_SIBLING = re.compile(r"^\.(?P<name>.+)\.(?:hf_vit_compress-(?P<kind>staging|old)|(?P<legacy>partial|old))-"
                      r"(?P<pid>\d+)-[0-9a-f]+$")
#: files a model save writes under these names are the model's, whoever wrote them before (a folder saved by
#: `save_pretrained` or an earlier version of this package has no manifest)
_MODEL_FILE = re.compile(r"^(config\.json|generation_config\.json|model(-\d+-of-\d+)?\.safetensors|"
                         r"model\.safetensors\.index\.json|(modeling|configuration)_compressed_vit\.py|"
                         r"architecture\.json|compression_config\.json|preprocessor_config\.json)$")


class SaveError(ValueError):
    """A save that was refused before anything was written (the message says why and what to do)."""


# -- the file-system steps (one function each: the fault-injection tests interrupt them one at a time) ---------------
def _replace(source: Path, target: Path) -> None:
    os.replace(source, target)


def _remove_tree(path: Path) -> None:
    shutil.rmtree(path)


def _remove_file(path: Path) -> None:
    path.unlink(missing_ok=True)


def _write_text(path: Path, text: str) -> None:
    with open(path, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())


def _exchange(first: Path, second: Path) -> bool:
    """Swap two paths atomically (Linux renameat2 RENAME_EXCHANGE). False where the system cannot."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(first), at_fdcwd, os.fsencode(second), rename_exchange) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False
    raise OSError(code, os.strerror(code), str(first), None, str(second))


def _abandon(output_dir: Path, staging: Path) -> None:
    """After an exception: complete a save whose journal is written, or drop the staging folder (best effort; the
    next save does the same). A kill skips this, which the tests simulate by replacing it."""
    try:
        if (output_dir / CONTROL_DIR / JOURNAL).is_file():
            _finish_journal(output_dir)
        elif staging.exists():
            _remove_tree(staging)
    except OSError:
        pass


# -- public ------------------------------------------------------------------------------------------------------
def save_atomically(
    model, output_dir: str | os.PathLike, extra_files: dict[str, str] | None = None, **save_kwargs
) -> Path:
    """`model.save_pretrained(output_dir, **save_kwargs)` plus `extra_files` (name -> text) that never loses the
    previous model nor anything else in `output_dir` (see the module docstring for how).

    Raises:
        SaveError: `output_dir` is a file; the save would overwrite a file that no model save wrote (e.g. your own
            README.md); or it would leave a `model.safetensors` that no model save wrote in place of new shards.
        NonFiniteError: the model has NaN/Inf weights (named); nothing is written.
    """
    from .health import assert_finite, model_tensors

    output_dir = Path(output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise SaveError(f"cannot save the model to {str(output_dir)!r}: it is a file, not a folder (nothing was "
                        "written); pass a folder path")
    assert_finite(model_tensors(model), f"the model to save to {output_dir}", "Nothing was written.")
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    recover_interrupted_save(output_dir)
    staging = _sibling(output_dir, "staging")
    staging.mkdir()
    try:
        model.save_pretrained(staging, **save_kwargs)
        for name, text in (extra_files or {}).items():
            _write_text(staging / name, text)
        names = sorted(entry.name for entry in staging.iterdir() if entry.name != CONTROL_DIR)
        (staging / CONTROL_DIR).mkdir(exist_ok=True)
        _write_text(staging / CONTROL_DIR / MANIFEST, json.dumps({"files": names}, indent=1) + "\n")
        _sync_folder(staging)
        if not output_dir.exists():
            _replace(staging, output_dir)  # one rename: the new complete folder appears at once
        elif _is_dedicated(output_dir, names):
            _swap_in(staging, output_dir)
        else:
            _replace_files(staging, output_dir, names)
    except BaseException:
        _abandon(output_dir, staging)
        raise
    return output_dir


def recover_interrupted_save(output_dir: str | os.PathLike) -> None:
    """Complete or clean up what an interrupted save into `output_dir` left behind: finish a journalled file
    replacement, put back a folder that a two-rename swap had moved aside, remove staging folders of processes
    that are no longer running. `save_atomically` calls it first; call it yourself to repair a folder without
    saving."""
    output_dir = Path(output_dir)
    if output_dir.is_dir() and (output_dir / CONTROL_DIR / JOURNAL).is_file():
        _finish_journal(output_dir, skip_if_running=True)
    if not output_dir.parent.is_dir():
        return
    for entry in sorted(output_dir.parent.iterdir()):
        match = _SIBLING.match(entry.name)
        if not match or match["name"] != output_dir.name or not entry.is_dir():
            continue
        pid = int(match["pid"])
        if pid != os.getpid() and _process_alive(pid):
            continue  # another process's save in progress
        if (match["kind"] or match["legacy"]) == "old" and not output_dir.exists():
            _replace(entry, output_dir)  # a two-rename swap was interrupted: this is the good copy
        else:
            _remove_tree(entry)


# -- helpers ------------------------------------------------------------------------------------------------------
def _sibling(output_dir: Path, kind: str) -> Path:
    return output_dir.with_name(f".{output_dir.name}.hf_vit_compress-{kind}-{os.getpid()}-{uuid.uuid4().hex[:8]}")


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _sync_folder(folder: Path) -> None:
    """fsync every file under `folder` and the folders themselves, so a rename never publishes unwritten data."""
    for root, _, files in os.walk(folder):
        for name in files:
            with open(os.path.join(root, name), "rb") as handle:
                os.fsync(handle.fileno())
        descriptor = os.open(root, os.O_RDONLY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)


def _previous_files(output_dir: Path) -> set[str]:
    path = output_dir / CONTROL_DIR / MANIFEST
    try:
        return set(json.loads(path.read_text())["files"])
    except (OSError, ValueError, KeyError, TypeError):
        return set()


def _is_dedicated(output_dir: Path, names: list[str]) -> bool:
    """True when `output_dir` holds nothing but files this save writes or the previous one wrote (so the whole
    folder may be swapped); raises `SaveError` when the save would overwrite or be shadowed by a foreign file."""
    ours = _previous_files(output_dir)
    present = {entry.name for entry in output_dir.iterdir() if entry.name != CONTROL_DIR}
    overwritten = sorted(name for name in names if name in present and name not in ours and not _MODEL_FILE.match(name))
    if overwritten:
        raise SaveError(f"saving the model to {str(output_dir)!r} would overwrite {overwritten}, which no model save "
                        "wrote there (nothing was written); move them or save to another folder")
    if "model.safetensors" in present and "model.safetensors" not in names and "model.safetensors" not in ours:
        raise SaveError(f"{str(output_dir)!r} holds a model.safetensors that this save would not replace (it writes "
                        "shards) and that transformers would load instead (nothing was written); remove it or save "
                        "to another folder")
    return not output_dir.is_symlink() and present <= ours | set(names)


def _swap_in(staging: Path, output_dir: Path) -> None:
    """Put the complete new folder at `output_dir` and delete the old one (now at the staging path)."""
    if _exchange(staging, output_dir):
        _remove_tree(staging)
        return
    backup = _sibling(output_dir, "old")
    _replace(output_dir, backup)
    try:
        _replace(staging, output_dir)
    except BaseException:
        if not output_dir.exists():
            _replace(backup, output_dir)
        raise
    _remove_tree(backup)


def _move_order(name: str) -> tuple[int, str]:
    """Weights first, config.json last: until the end the old config describes the folder, and a mix of new
    weights with the old config fails to load (shapes are checked) rather than loading the wrong model."""
    return (0 if name.endswith(".safetensors") else 2 if name == "config.json" else 1, name)


def _replace_files(staging: Path, output_dir: Path, names: list[str]) -> None:
    """Replace only the model's own files in a folder that holds other things, under a journal."""
    control = output_dir / CONTROL_DIR
    control.mkdir(exist_ok=True)
    stale = sorted(name for name in _previous_files(output_dir) - set(names) if (output_dir / name).is_file())
    journal = {"staging": staging.name, "files": sorted(names, key=_move_order), "remove": stale}
    temporary = control / f"{JOURNAL}.tmp"
    _write_text(temporary, json.dumps(journal, indent=1) + "\n")
    _replace(temporary, control / JOURNAL)  # the commit point: from here on the save is completed, never undone
    _finish_journal(output_dir)


def _finish_journal(output_dir: Path, skip_if_running: bool = False) -> None:
    """Carry out (again: every step is idempotent) the journalled replacement in `output_dir`; with
    `skip_if_running`, not while the process that wrote the journal is still running (its own save)."""
    control = output_dir / CONTROL_DIR
    try:
        journal = json.loads((control / JOURNAL).read_text())
        staging = output_dir.parent / journal["staging"]
        files, stale = list(journal["files"]), list(journal["remove"])
    except (ValueError, KeyError, TypeError):  # cannot happen (written whole, then renamed): drop it
        _remove_file(control / JOURNAL)
        return
    match = _SIBLING.match(staging.name)
    if skip_if_running and match and int(match["pid"]) != os.getpid() and _process_alive(int(match["pid"])):
        return
    for name in files:
        if (staging / name).exists():
            _replace(staging / name, output_dir / name)
    for name in stale:
        _remove_file(output_dir / name)
    if (staging / CONTROL_DIR / MANIFEST).exists():
        _replace(staging / CONTROL_DIR / MANIFEST, control / MANIFEST)
    _remove_file(control / JOURNAL)
    if staging.exists():
        _remove_tree(staging)


__all__ = ["SaveError", "recover_interrupted_save", "save_atomically"]
