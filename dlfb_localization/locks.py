"""One writer per folder: an advisory lock held while a folder is written.

The writers of a run folder (`runs.train_run`, `nucleus.run.run_prediction`,
`demo.run`), of a checkpoint folder (`loop.fit`) and of a data cache
(`dataset.cache`) hold `lock_folder` from before their first write to after
their last. A second writer fails at once with `FolderLockedError`, naming the
holder, instead of waiting or mixing its files with the first one's. Readers
take no lock.

The lock is `fcntl.flock` on `<folder>/.lock`, a file that names its holder
(pid, host, start time, command line) and is removed when the lock is
released. The kernel releases a flock when its holder exits, however it ends
(even by SIGKILL), so the lock file a dead process leaves behind is simply
locked again by the next writer: a stale lock needs no detection and no
cleanup. A lock is held by an open file, not by a process: a process locking a
folder it already holds is refused like any other writer.

flock is reliable on a local file system. On NFS, Linux emulates it with
byte-range locks, which exclude writers on different hosts only when the
server's lock manager works; two hosts writing one folder are not guaranteed
to exclude each other.
"""

import contextlib
import fcntl
import json
import os
import socket
import sys
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

__all__ = ["LOCK_FILE", "FolderLockedError", "lock_folder"]

LOCK_FILE = ".lock"
# The holder's command line as shown in the message (the rest is cut).
_COMMAND_CHARS = 200
_NAME_WAITS = 50


class FolderLockedError(RuntimeError):
    """Another writer holds the folder's lock."""


@contextlib.contextmanager
def lock_folder(folder: str | os.PathLike) -> Iterator[None]:
    """Holds the write lock of `folder` (created if missing) for the block.

    Args:
      folder: the folder about to be written.

    Raises:
      FolderLockedError: another writer holds it; the one-line message names
        the holder's pid, host, start time and command.
      OSError: the folder or its lock file cannot be created (e.g. a read-only
        folder).
    """
    folder = Path(folder).expanduser()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_FILE
    fd = _acquire(path, folder)
    try:
        # Written over a dead holder's name, then cut to length: the file is
        # empty only just after it is created (a refused writer then waits).
        holder = json.dumps(_holder()).encode()
        os.pwrite(fd, holder, 0)
        os.ftruncate(fd, len(holder))
        yield
    finally:
        # Removed while still locked: a writer that opened this file meanwhile
        # finds, once it gets the lock, that it is no longer the lock file.
        path.unlink(missing_ok=True)
        os.close(fd)


def _acquire(path: Path, folder: Path) -> int:
    """An open descriptor of the lock file `path`, flock-ed exclusively."""
    while True:
        # O_NOFOLLOW: a symlink planted at the lock file's name is an error.
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _describe(_read_holder(fd))
            os.close(fd)
            raise FolderLockedError(
                f"{folder} is being written by {holder}; wait for it to finish "
                "or use another folder"
            ) from None
        except BaseException:
            os.close(fd)
            raise
        if _is_at(fd, path):
            return fd
        # The previous holder removed the file between our open and our lock.
        os.close(fd)


def _is_at(fd: int, path: Path) -> bool:
    """Whether the open file `fd` is still the file at `path`."""
    try:
        return os.path.samestat(os.fstat(fd), os.stat(path, follow_symlinks=False))
    except FileNotFoundError:
        return False


def _holder() -> dict:
    return {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "since": datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": " ".join(sys.orig_argv),
    }


def _read_holder(fd: int) -> bytes:
    """The lock file's content, waiting up to half a second for a holder that
    locked it an instant ago to write its name."""
    for _ in range(_NAME_WAITS):
        recorded = os.pread(fd, 4096, 0)
        if recorded:
            break
        time.sleep(0.01)
    return recorded


def _describe(recorded: bytes) -> str:
    """The holder as one line, from its lock file's content."""
    try:
        holder = json.loads(recorded)
        command = " ".join(str(holder["command"]).split())
        if len(command) > _COMMAND_CHARS:
            command = command[:_COMMAND_CHARS] + "..."
        return (
            f"pid {holder['pid']} on {holder['host']} since {holder['since']} "
            f"(command: {command})"
        )
    except (ValueError, KeyError, TypeError):
        return "another process"  # that has not written its name yet
