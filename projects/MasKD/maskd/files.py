"""Writing files so that a killed or crashed process never leaves a half-written one."""

import logging
import os
import re
import tempfile
from typing import Callable, List, Optional

__all__ = ["atomic_write", "remove_stale_temporaries", "write_text"]

logger = logging.getLogger(__name__)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync(path: str, directory: bool = False) -> None:
    fd = os.open(path, os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if directory else 0))
    try:
        os.fsync(fd)
    except OSError:  # some file systems cannot sync a directory
        if not directory:
            raise
    finally:
        os.close(fd)


def atomic_write(path: str, write: Callable[[str], None], overwrite: bool = False) -> None:
    """Call ``write(tmp_path)``, then move the result to ``path`` in one rename.

    The file gets the mode that the umask gives new files (0644 under umask 022, as
    ``torch.save`` would write it), and reaches the disk (fsync) before the rename, so that
    after a crash ``path`` is the old file or the complete new one.

    Raises:
        FileExistsError: if ``path`` exists and ``overwrite`` is False.
    """
    if os.path.exists(path) and not overwrite:
        raise FileExistsError(f"'{path}' exists; pass --force (overwrite=True) to replace it")
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    remove_stale_temporaries(folder, os.path.basename(path))  # of a killed earlier write
    # ".<name>.<random>.tmp": never matches the patterns of checkpoints (*.pth, model_*.pth)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    os.close(fd)
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600 files
        write(tmp)
        _fsync(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    _fsync(folder, directory=True)


def remove_stale_temporaries(folder: str, target: Optional[str] = None) -> List[str]:
    """Delete the temporary files that :func:`atomic_write` leaves in ``folder`` when a process
    is killed while writing (``.<name>.<random>.tmp``), of every file or of ``target`` (a file
    name) only; returns their paths.

    Call it where a run starts writing into ``folder``, from one process only."""
    removed = []
    if not os.path.isdir(folder):
        return removed
    name_pattern = re.escape(target) if target else ".+"
    pattern = re.compile(rf"\.{name_pattern}\.[a-z0-9_]{{8}}\.tmp")
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        if pattern.fullmatch(name) and os.path.isfile(path):
            os.remove(path)
            removed.append(path)
    if removed:
        logger.info("Removed temporary files of an interrupted run: %s", ", ".join(removed))
    return removed


def write_text(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)
