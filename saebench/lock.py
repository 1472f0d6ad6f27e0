"""One writer per output folder: an advisory lock that a second writer hits at once, with a clear message.

``folder_lock(folder, what)`` takes an exclusive ``fcntl.flock`` on ``folder/.saebench.lock`` and
writes who holds it (pid, host, command, start time, what it is doing) into that file. A second
process asking for the same folder gets :class:`FolderInUseError` naming the holder, immediately (no
waiting). The kernel drops a flock when its process dies, SIGKILL included, so a lock file left
behind by a killed run never blocks the next one: the next writer simply takes the lock and
overwrites the stale details. The file itself is never deleted (deleting a lock file races with a
process that has just opened it); on release its contents are emptied.

Within one process the lock is re-entrant for the thread that holds it (the API takes it around
training and evaluation, the training loop again inside), and refused to other threads. Where the
filesystem cannot lock (some network mounts answer ENOLCK) a warning says so and the work goes on
unlocked.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import json
import os
import shlex
import socket
import sys
import threading
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path

try:
    import fcntl
except ImportError:  # not POSIX: no advisory locks, work goes on unlocked
    fcntl = None

LOCK_FILE = ".saebench.lock"

__all__ = ["LOCK_FILE", "FolderInUseError", "folder_lock", "folder_locks", "holder_of"]


class FolderInUseError(RuntimeError):
    """Another process (or thread) is writing into the folder; the message names it and says what to do."""


_held: dict[str, list] = {}  # resolved folder -> [fd, owning thread id, depth]
_held_guard = threading.Lock()


def holder_of(folder: str | Path) -> dict | None:
    """The details the current (or last) holder wrote into ``folder``'s lock file, or None."""
    try:
        text = (Path(folder) / LOCK_FILE).read_text()
        info = json.loads(text) if text.strip() else None
        return info if isinstance(info, dict) else None
    except (OSError, ValueError):
        return None


def _describe(info: dict | None) -> str:
    if not info:
        return "another process (it has not written its details yet)"
    return (f"pid {info.get('pid')} on {info.get('host')}, {info.get('what', 'writing')} since {info.get('started')}, "
            f"command: {info.get('command')}")


def _busy_message(folder: Path, info: dict | None, what: str, hint: str | None) -> str:
    return (f"{folder} is in use by another saebench process ({_describe(info)}). Two writers in one folder overwrite and delete "
            f"each other's files, so this {what} was not started. "
            + (hint or "Wait for the other process to finish (or stop it), or write to another folder."))


@contextlib.contextmanager
def folder_lock(folder: str | Path, what: str = "writing", hint: str | None = None) -> Iterator[Path]:
    """Hold the exclusive writer lock of ``folder`` (created if missing) for the ``with`` block.

    Args:
        folder: the output folder.
        what: what the holder does ("training", "harvest", ...), recorded for whoever is refused.
        hint: the advice in the refusal (default: wait, stop the other process, or use another folder).

    Raises:
        FolderInUseError: another process, or another thread of this one, holds the lock.
    """
    folder = Path(folder)
    key = str(folder.resolve())
    me = threading.get_ident()
    with _held_guard:
        entry = _held.get(key)
        if entry is not None:
            if entry[1] != me:
                raise FolderInUseError(_busy_message(folder, holder_of(folder), what, hint).replace("another saebench process", "another thread of this process"))
            entry[2] += 1
    if entry is not None:
        try:
            yield folder
        finally:
            with _held_guard:
                entry[2] -= 1
        return
    fd = _acquire(folder, what, hint)
    with _held_guard:
        _held[key] = [fd, me, 1]
    try:
        yield folder
    finally:
        with _held_guard:
            del _held[key]
        _release(fd)


def _acquire(folder: Path, what: str, hint: str | None) -> int | None:
    folder.mkdir(parents=True, exist_ok=True)
    if fcntl is None:
        return None
    fd = os.open(folder / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise FolderInUseError(_busy_message(folder, holder_of(folder), what, hint)) from None
    except OSError as e:
        os.close(fd)
        if e.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
            warnings.warn(f"cannot lock {folder} ({e.strerror}); make sure no other process writes into it", RuntimeWarning, stacklevel=4)
            return None
        raise
    info = {"pid": os.getpid(), "host": socket.gethostname(), "what": what,
            "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "command": shlex.join(sys.argv) if sys.argv and sys.argv[0] else sys.executable}
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
    return fd


def _release(fd: int | None) -> None:
    if fd is None:
        return
    try:
        os.ftruncate(fd, 0)  # while still held: nobody reads stale details of a finished run
    except OSError:
        pass
    finally:
        os.close(fd)  # closing the last descriptor drops the flock


@contextlib.contextmanager
def folder_locks(folders: Iterable[str | Path], what: str = "writing", hint: str | None = None) -> Iterator[list[Path]]:
    """``folder_lock`` on several folders (each once, in a fixed order); all or none are held."""
    unique = sorted({str(Path(f).resolve()): Path(f) for f in folders}.items())
    with contextlib.ExitStack() as stack:
        held = [stack.enter_context(folder_lock(p, what, hint)) for _, p in unique]
        yield held
