"""Writing files so that a killed or crashed process never leaves a half-written one, and
folders that one live run holds at a time."""

import contextlib
import errno
import fcntl
import logging
import os
import re
import socket
import stat
import sys
import tempfile
from typing import Callable, Iterator, List, Optional

__all__ = [
    "atomic_write",
    "remove_stale_temporaries",
    "write_text",
    "hold_folder",
    "FolderHeldError",
    "NotARegularFileError",
    "open_regular",
    "read_small_text",
]

logger = logging.getLogger(__name__)

# The host part of a temporary file's name: letters, digits and "-" only, so that a name never
# holds the separators of the pattern.
_HOST = re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname())[:64] or "host"


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


class NotARegularFileError(ValueError):
    """A path the project opens in a folder is a link, a directory, a FIFO or a device."""


_KINDS = (
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISFIFO, "a FIFO"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISLNK, "a symbolic link"),
)


def _kind(mode: int) -> str:
    return next((name for test, name in _KINDS if test(mode)), "not a regular file")


def open_regular(path: str, flags: int = os.O_RDONLY, what: str = "") -> int:
    """``os.open(path, flags)`` for a regular file only: a symbolic link is not followed and,
    like a directory, a FIFO or a device, refused (never blocking on a FIFO); ``O_CREAT`` in
    ``flags`` creates a missing file with the umask's mode.

    Args:
        what: who named the path (a config key, an argument), for the message.

    Returns:
        an open file descriptor.

    Raises:
        NotARegularFileError: naming the path and what it is.
    """
    prefix = f"{what}: " if what else ""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        if not flags & os.O_CREAT:
            raise
    else:
        if not stat.S_ISREG(st.st_mode):
            raise NotARegularFileError(
                f"{prefix}'{path}' is {_kind(st.st_mode)}, not a regular file: the project "
                "neither follows a link there nor reads or writes anything else; remove it"
            )
    nofollow = os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags | nofollow, 0o666 & ~_umask())
    except OSError as e:  # replaced between the check and the open
        if e.errno in (errno.ELOOP, errno.EISDIR, errno.ENXIO):
            raise NotARegularFileError(f"{prefix}'{path}' is not a regular file ({e})") from None
        raise
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise NotARegularFileError(f"{prefix}'{path}' is {_kind(st.st_mode)}, not a regular file")
    os.set_blocking(fd, True)
    return fd


def read_small_text(path: str, limit: int, what: str) -> str:
    """The text of a small regular file the project wrote (a marker, ``last_checkpoint``), read
    without following a link and without reading more than ``limit`` bytes.

    Raises:
        NotARegularFileError: the path is not a regular file.
        ValueError: the file is larger than ``limit`` or not UTF-8 text, naming it.
    """
    fd = open_regular(path, os.O_RDONLY, what)
    try:
        data = os.read(fd, limit + 1)
    finally:
        os.close(fd)
    if len(data) > limit:
        raise ValueError(f"{what}: '{path}' is larger than the {limit} bytes such a file holds")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{what}: '{path}' is not text ({e}): damaged or replaced") from None


def atomic_write(path: str, write: Callable[[str], None], overwrite: bool = False) -> None:
    """Call ``write(tmp_path)``, then move the result to ``path`` in one rename.

    The file gets the mode that the umask gives new files (0644 under umask 022, as
    ``torch.save`` would write it), and reaches the disk (fsync) before the rename, so that
    after a crash ``path`` is the old file or the complete new one.

    Raises:
        FileExistsError: if ``path`` exists and ``overwrite`` is False.
    """
    if os.path.lexists(path):
        mode = os.lstat(path).st_mode
        if stat.S_ISDIR(mode):  # a link or a FIFO is replaced by the rename, never written through
            raise NotARegularFileError(f"'{path}' is a directory: the file cannot be written there")
        if not overwrite:
            raise FileExistsError(f"'{path}' exists; pass --force (overwrite=True) to replace it")
    folder = os.path.dirname(os.path.abspath(path))
    _make_folder(folder)
    remove_stale_temporaries(folder, os.path.basename(path))  # of a killed earlier write
    # ".<name>.<pid>@<host>.<random>.tmp": never matches the patterns of checkpoints (*.pth,
    # model_*.pth); the writer's pid and host tell a live writer's file from a killed one's
    prefix = f".{os.path.basename(path)}.{os.getpid()}@{_HOST}."
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=prefix, suffix=".tmp")
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


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def remove_stale_temporaries(folder: str, target: Optional[str] = None) -> List[str]:
    """Delete the temporary files that :func:`atomic_write` leaves in ``folder`` when a process
    is killed while writing (``.<name>.<pid>@<host>.<random>.tmp``), of every file or of
    ``target`` (a file name) only; returns their paths.

    Only provably stale files go: those written on this host by a process that no longer
    exists. A live writer's file (another run, or a command such as ``--eval-only`` started
    beside a training) and files written on other hosts of a shared file system are left."""
    removed = []
    if not os.path.isdir(folder):
        return removed
    name_pattern = re.escape(target) if target else ".+"
    pattern = re.compile(rf"\.{name_pattern}\.([0-9]+)@([A-Za-z0-9-]+)\.[a-z0-9_]{{8}}\.tmp")
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        match = pattern.fullmatch(name)
        if not match or match.group(2) != _HOST or not os.path.isfile(path):
            continue
        if int(match.group(1)) == os.getpid() or _alive(int(match.group(1))):
            continue
        with contextlib.suppress(FileNotFoundError):  # removed by another process meanwhile
            os.remove(path)
            removed.append(path)
    if removed:
        logger.info("Removed temporary files of an interrupted run: %s", ", ".join(removed))
    return removed


LOCK_NAME = ".maskd.lock"


class FolderHeldError(RuntimeError):
    """The folder is held by a live run (:func:`hold_folder`)."""


@contextlib.contextmanager
def hold_folder(folder: str, what: str) -> Iterator[None]:
    """Hold ``folder`` for one run: while the ``with`` block runs, a second :func:`hold_folder`
    of the same folder, from any process, fails naming the process that holds it.

    The hold is an exclusive ``flock`` on ``<folder>/.maskd.lock``: the operating system
    releases it when the holder exits, killed or not, so no stale hold survives a crash.

    Args:
        folder: the run's output folder (made if missing).
        what: the config key or argument that named it, for the error message.

    Raises:
        FolderHeldError: naming the folder, ``what`` and the holder (pid, host, command).
    """
    _make_folder(folder, what)
    fd = open_regular(os.path.join(folder, LOCK_NAME), os.O_RDWR | os.O_CREAT, what)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "unknown"
            raise FolderHeldError(
                f"{what}: '{folder}' is held by a live run ({holder}); a second run there "
                "would overwrite its checkpoints and logs. Wait for it to end, stop it, or "
                "give this run another folder"
            ) from None
        os.ftruncate(fd, 0)
        command = " ".join(sys.argv)
        command = command if len(command) <= 300 else command[:297] + "..."
        holder = f"pid {os.getpid()} on {socket.gethostname()}: {command}"
        os.pwrite(fd, holder.encode(), 0)
        try:
            yield
        finally:
            os.ftruncate(fd, 0)
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def _make_folder(folder: str, what: str = "") -> None:
    """``os.makedirs(folder, exist_ok=True)``, naming a path that is a file."""
    try:
        os.makedirs(folder, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise NotARegularFileError(
            f"{what + ': ' if what else ''}'{folder}' is not a folder (a file is there, or in "
            "its path)"
        ) from None


def write_text(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)
