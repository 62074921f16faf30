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

A model folder may come from a stranger, so its manifest and journal are not trusted: an entry is only acted on when
it is a plain file name in the folder (no path separator, not `.`/`..`, not absolute, no NUL) naming a regular file
(not a link, not a folder); a journal's staging folder must be a real folder beside this one named like this
path's own staging folders. Anything else is ignored with a warning (a bad journal is dropped, not carried out), a
`.hf_vit_compress` that is a link is neither read nor written through, and leftovers beside the folder that are
links are skipped: a save never touches a path outside its folder.

Saves (and `recover_interrupted_save`) into one path are serialised by an `fcntl.flock` on a lock file beside the
folder (`.<name>.hf_vit_compress-lock`, removed when the save ends): a second save waits. Where there is no `fcntl`
(Windows) it proceeds unlocked. Names beside the folder that would exceed the file-name limit use a prefix of the
folder's name plus a hash of the full name.

Written by hand: `save_pretrained` and huggingface_hub write in place, and no library does the folder swap.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import json
import os
import re
import shutil
import stat
import uuid
from pathlib import Path

from transformers.utils import logging

from .save_lock import folder_lock

logger = logging.get_logger(__name__)

CONTROL_DIR = ".hf_vit_compress"
MANIFEST = "manifest.json"
JOURNAL = "journal.json"
_SIBLING = re.compile(r"^\.(?P<name>.+)\.(?:hf_vit_compress-(?P<kind>staging|old)|(?P<legacy>partial|old))-"
                      r"(?P<pid>\d+)-[0-9a-f]+$")
LOCK_SUFFIX = ".hf_vit_compress-lock"
#: bytes a sibling's name adds to the folder's: ".", ".hf_vit_compress-staging-" (the longest kind), a pid of up
#: to 10 digits, "-" and 8 hex digits
_SIBLING_EXTRA = 1 + len(".hf_vit_compress-staging-") + 10 + 1 + 8
_HASH_CHARS = 16
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
        control = _control_dir(output_dir)
        if control is not None and os.path.lexists(control / JOURNAL):
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
    previous model nor anything else in `output_dir` (see the module docstring for how). A second save into the same
    path waits until this one is done.

    Raises:
        SaveError: `output_dir` is a file; the save would overwrite a file that no model save wrote (e.g. your own
            README.md); or it would leave a `model.safetensors` that no model save wrote in place of new shards.
        NonFiniteError: the model has NaN/Inf weights (named); nothing is written.
    """
    from ..numerics import assert_finite, model_tensors

    output_dir = Path(output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise SaveError(f"cannot save the model to {str(output_dir)!r}: it is a file, not a folder (nothing was "
                        "written); pass a folder path")
    assert_finite(model_tensors(model), f"the model to save to {output_dir}", "Nothing was written.")
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    with _locked(output_dir):
        _recover(output_dir)
        staging = _sibling(output_dir, "staging")
        staging.mkdir()
        try:
            names = _write_staging(model, staging, extra_files, save_kwargs)
            if not output_dir.exists():
                _replace(staging, output_dir)  # one rename: the new complete folder appears at once
                return output_dir
            ours = _previous_files(output_dir)
            if _is_dedicated(output_dir, names, ours):
                _swap_in(staging, output_dir)
            else:
                _replace_files(staging, output_dir, names, ours)
        except BaseException:
            _abandon(output_dir, staging)
            raise
    return output_dir


def recover_interrupted_save(output_dir: str | os.PathLike) -> None:
    """Complete or clean up what an interrupted save into `output_dir` left behind: finish a journalled file
    replacement, put back a folder that a two-rename swap had moved aside, remove staging folders of processes
    that are no longer running. `save_atomically` calls it first; call it yourself to repair a folder without
    saving. A journal that this path's saves cannot have written is dropped with a warning, not carried out."""
    output_dir = Path(output_dir)
    if not output_dir.parent.is_dir():
        return  # no folder and nothing beside it
    with _locked(output_dir):
        _recover(output_dir)


# -- helpers ------------------------------------------------------------------------------------------------------
def _recover(output_dir: Path) -> None:
    """`recover_interrupted_save` with the lock already held (by the save that runs it)."""
    if output_dir.is_dir():
        _finish_journal(output_dir, skip_if_running=True)
    stems = _stems(output_dir)
    for entry in sorted(output_dir.parent.iterdir()):
        match = _own_sibling(entry.name, stems)
        if match is None:
            continue
        if entry.is_symlink():  # a link named like a leftover could lead anywhere: neither moved nor deleted
            logger.warning(f"leaving {str(entry)!r} alone: named like a leftover of a save into {str(output_dir)!r}, "
                           "but a link")
            continue
        if not entry.is_dir():
            continue
        pid = int(match["pid"])
        if pid != os.getpid() and _process_alive(pid):
            continue  # another process's save in progress (one not holding the lock: an older version)
        if (match["kind"] or match["legacy"]) == "old" and not output_dir.exists():
            _replace(entry, output_dir)  # a two-rename swap was interrupted: this is the good copy
        else:
            _remove_tree(entry)


def _write_staging(model, staging: Path, extra_files: dict[str, str] | None, save_kwargs: dict) -> list[str]:
    """Write the model, `extra_files` and the manifest into `staging`; returns the names written."""
    model.save_pretrained(staging, **save_kwargs)
    for name, text in (extra_files or {}).items():
        _write_text(staging / name, text)
    names = sorted(entry.name for entry in staging.iterdir() if entry.name != CONTROL_DIR)
    (staging / CONTROL_DIR).mkdir(exist_ok=True)
    _write_text(staging / CONTROL_DIR / MANIFEST, json.dumps({"files": names}, indent=1) + "\n")
    _sync_folder(staging)
    return names


# -- names beside the folder --------------------------------------------------------------------------------------
def _name_max(folder: Path) -> int:
    """The longest file name (bytes) the file system of `folder` takes."""
    try:
        limit = os.pathconf(folder, "PC_NAME_MAX")
    except (AttributeError, OSError, ValueError):  # no pathconf (Windows), or not a folder (yet)
        return 255
    return limit if limit > 0 else 255


def _stem(output_dir: Path) -> str:
    """The folder's name as the names beside it (staging, old, lock) spell it: whole where the longest of them fits
    the file-name limit, else a prefix of it plus a hash of the whole name (so still one per folder)."""
    name = output_dir.name
    budget = _name_max(output_dir.parent) - _SIBLING_EXTRA
    if len(os.fsencode(name)) <= budget:
        return name
    digest = hashlib.sha256(os.fsencode(name)).hexdigest()[:_HASH_CHARS]
    prefix = name[: max(budget - _HASH_CHARS - 1, 0)]
    while prefix and len(os.fsencode(prefix)) > budget - _HASH_CHARS - 1:  # multi-byte characters
        prefix = prefix[:-1]
    return f"{prefix}~{digest}"


def _stems(output_dir: Path) -> set[str]:
    """The spellings of the folder's name in the names of its leftovers (the whole name: versions before the
    shortening, and every name that fits)."""
    return {output_dir.name, _stem(output_dir)}


def _sibling(output_dir: Path, kind: str) -> Path:
    return output_dir.with_name(f".{_stem(output_dir)}.hf_vit_compress-{kind}-{os.getpid()}-{uuid.uuid4().hex[:8]}")


def _own_sibling(name: str, stems: set[str]) -> re.Match | None:
    """The `_SIBLING` match of `name` when it is a staging / old folder name of a save into the folder whose name
    is spelled `stems`, else None."""
    match = _SIBLING.match(name)
    return match if match and match["name"] in stems else None


# -- the lock -----------------------------------------------------------------------------------------------------
def _lock_path(output_dir: Path) -> Path:
    """Beside the folder, not in it: it must exist before the folder does, and not move with a swapped folder."""
    return output_dir.with_name(f".{_stem(output_dir)}{LOCK_SUFFIX}")


def _locked(output_dir: Path):
    """Hold the lock of saves into `output_dir` while the block runs (`save_lock.folder_lock`)."""
    return folder_lock(_lock_path(output_dir), output_dir)


# -- what the folder's manifest and journal may name --------------------------------------------------------------
def _plain_name(name: object) -> bool:
    """A file name in the folder itself: no path separator, not `.` / `..`, not absolute, no NUL (JSON from a
    stranger could name any path)."""
    return (isinstance(name, str) and name not in ("", ".", "..", CONTROL_DIR) and "\0" not in name
            and not any(separator in name for separator in ("/", "\\", os.sep, os.altsep or "/"))
            and not os.path.isabs(name) and not os.path.splitdrive(name)[0])


def _is_regular(path: Path) -> bool:
    """A regular file, not a link (to anything) nor a folder."""
    try:
        return stat.S_ISREG(os.lstat(path).st_mode)
    except (OSError, ValueError):
        return False


def _plain_entry(output_dir: Path, name: object, what: str) -> bool:
    if _plain_name(name):
        return True
    logger.warning(f"{str(output_dir)!r}: ignoring the {what} {name!r}: not a plain file name in the folder")
    return False


def _file_entry(output_dir: Path, name: object, what: str) -> bool:
    """`name` is a plain name of a regular file in `output_dir`, or of nothing (warns about anything else)."""
    if not _plain_entry(output_dir, name, what):
        return False
    if not os.path.lexists(output_dir / name) or _is_regular(output_dir / name):
        return True
    logger.warning(f"{str(output_dir)!r}: ignoring the {what} {name!r}: not a regular file (a link or a folder)")
    return False


def _control_dir(output_dir: Path) -> Path | None:
    """The folder's `.hf_vit_compress`, None where it is missing or not a real folder (nothing is read or written
    through a link)."""
    control = output_dir / CONTROL_DIR
    return control if control.is_dir() and not control.is_symlink() else None


def _make_control_dir(output_dir: Path) -> Path:
    control = output_dir / CONTROL_DIR
    if control.is_symlink() or (control.exists() and not control.is_dir()):
        logger.warning(f"{str(output_dir)!r}: replacing {CONTROL_DIR}, a link or a file, by a folder of its own")
        _remove_file(control)  # the link itself: what it points to stays
    control.mkdir(exist_ok=True)
    return control


def _read_json(path: Path) -> object:
    """The JSON in the regular file `path` (a link could point at anything, /dev/zero included), else None."""
    if not _is_regular(path):
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


# -- the save's steps ---------------------------------------------------------------------------------------------
def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except (OverflowError, OSError):  # not a pid at all
        return False
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
    """The files the previous save wrote (its manifest), as far as they are plain files in the folder."""
    control = _control_dir(output_dir)
    if control is None:
        if (output_dir / CONTROL_DIR).is_symlink():
            logger.warning(f"{str(output_dir)!r}: not reading the manifest of {CONTROL_DIR}: it is a link")
        return set()
    manifest = _read_json(control / MANIFEST)
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, list):
        return set()
    return {name for name in files if _file_entry(output_dir, name, "manifest entry")}


def _is_dedicated(output_dir: Path, names: list[str], ours: set[str]) -> bool:
    """True when `output_dir` holds nothing but files this save writes or the previous one wrote (`ours`, so the
    whole folder may be swapped); raises `SaveError` when the save would overwrite or be shadowed by a foreign file."""
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


def _replace_files(staging: Path, output_dir: Path, names: list[str], ours: set[str]) -> None:
    """Replace only the model's own files in a folder that holds other things, under a journal."""
    control = _make_control_dir(output_dir)
    stale = sorted(name for name in ours - set(names) if _is_regular(output_dir / name))
    journal = {"staging": staging.name, "files": sorted(names, key=_move_order), "remove": stale}
    temporary = control / f"{JOURNAL}.tmp"
    _write_text(temporary, json.dumps(journal, indent=1) + "\n")
    _replace(temporary, control / JOURNAL)  # the commit point: from here on the save is completed, never undone
    _finish_journal(output_dir)


def _journal_problem(output_dir: Path, journal: object) -> str | None:
    """Why `journal` cannot be one that a save into `output_dir` wrote (None when it can): carried out, it would
    move files in from, and delete, whatever it names."""
    if not isinstance(journal, dict):
        return "not a journal"
    staging = journal.get("staging")
    if not (isinstance(journal.get("files"), list) and isinstance(journal.get("remove"), list)):
        return "its 'files' and 'remove' are not lists"
    match = _own_sibling(staging, _stems(output_dir)) if _plain_name(staging) else None
    if match is None or match["kind"] != "staging":
        return f"its staging folder {staging!r} is not a name this folder's saves give their staging folders"
    path = output_dir.parent / staging
    if path.is_symlink() or not path.is_dir():
        return f"its staging folder {staging!r} is not a folder beside it (a link, or missing)"
    return None


def _read_journal(output_dir: Path) -> tuple[Path, list[str], list[str]] | None:
    """The journalled replacement in `output_dir` (staging folder, files to move in, files to remove), None when
    there is none, or when it is not one this path's saves wrote: that one is removed (it is in the folder)."""
    control = _control_dir(output_dir)
    if control is None or not os.path.lexists(control / JOURNAL):
        return None
    journal = _read_json(control / JOURNAL)
    problem = "not a JSON file" if journal is None else _journal_problem(output_dir, journal)
    if problem is not None:
        logger.warning(f"{str(output_dir)!r}: ignoring and removing {CONTROL_DIR}/{JOURNAL}: {problem}")
        _remove_file(control / JOURNAL)
        return None
    files = [name for name in journal["files"] if _plain_entry(output_dir, name, "journal entry")]
    stale = [name for name in journal["remove"] if _file_entry(output_dir, name, "journal entry")]
    return output_dir.parent / journal["staging"], files, stale


def _movable(source: Path) -> bool:
    """A regular file in the staging folder (one that is missing was moved in already: the journal is carried out
    again after an interruption)."""
    if _is_regular(source):
        return True
    if os.path.lexists(source):
        logger.warning(f"not moving {str(source)!r} into the folder: not a regular file (a link or a folder)")
    return False


def _finish_journal(output_dir: Path, skip_if_running: bool = False) -> None:
    """Carry out (again: every step is idempotent) the journalled replacement in `output_dir`; with
    `skip_if_running`, not while the process that wrote the journal is still running (its own save)."""
    journal = _read_journal(output_dir)
    if journal is None:
        return
    staging, files, stale = journal
    pid = int(_SIBLING.match(staging.name)["pid"])
    if skip_if_running and pid != os.getpid() and _process_alive(pid):
        return
    control = output_dir / CONTROL_DIR
    for name in files:
        if _movable(staging / name):
            _replace(staging / name, output_dir / name)  # a link at the target is replaced, never written through
    for name in stale:
        if _is_regular(output_dir / name):
            _remove_file(output_dir / name)
    if _is_regular(staging / CONTROL_DIR / MANIFEST):
        _replace(staging / CONTROL_DIR / MANIFEST, control / MANIFEST)
    _remove_file(control / JOURNAL)
    if staging.exists():
        _remove_tree(staging)


__all__ = ["SaveError", "recover_interrupted_save", "save_atomically"]
