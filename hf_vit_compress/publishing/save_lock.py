"""The lock that serialises saves into one folder: an `fcntl.flock` on a lock file beside it, removed by the
holder when it is done, so whoever waited locks the file now at the path. Where there is no `fcntl` (not POSIX),
saves are not serialised."""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Iterator
from pathlib import Path

from transformers.utils import logging

try:
    import fcntl
except ImportError:  # not POSIX: saves are not serialised
    fcntl = None

logger = logging.get_logger(__name__)


@contextlib.contextmanager
def folder_lock(path: Path, output_dir: Path) -> Iterator[None]:
    """Hold an exclusive `flock` on the file at `path` (saves into `output_dir`) while the block runs; a no-op
    where there is no `fcntl`."""
    descriptor = _acquire_lock(path, output_dir) if fcntl is not None else None
    try:
        yield
    finally:
        if descriptor is not None:
            _release_lock(path, descriptor)


def _acquire_lock(path: Path, output_dir: Path) -> int | None:
    """Lock the file at `path` (waiting for a save that holds it), None where the folder beside which it goes
    cannot be written (nothing to serialise: a save fails there anyway)."""
    flags = os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    while True:
        try:
            descriptor = os.open(path, flags, 0o644)
        except OSError as error:
            if error.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
                return None
            raise
        try:
            if not _try_lock(descriptor):
                logger.info(f"waiting for another save into {str(output_dir)!r} to finish")
                fcntl.flock(descriptor, fcntl.LOCK_EX)
            if _same_file(descriptor, path):
                return descriptor
        except BaseException:
            os.close(descriptor)
            raise
        os.close(descriptor)  # the save before us removed this file as it finished: lock the one now at the path


def _try_lock(descriptor: int) -> bool:
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def _same_file(descriptor: int, path: Path) -> bool:
    try:
        on_disk = os.stat(path, follow_symlinks=False)
    except FileNotFoundError:
        return False
    held = os.fstat(descriptor)
    return (on_disk.st_dev, on_disk.st_ino) == (held.st_dev, held.st_ino)


def _release_lock(path: Path, descriptor: int) -> None:
    """Remove the lock file while still holding it (so that whoever waits on it sees it is gone and locks a new
    one: `_same_file`), then unlock. A lock file left by a kill is harmless and reused."""
    try:
        os.unlink(path)
    except OSError:
        pass
    finally:
        os.close(descriptor)
