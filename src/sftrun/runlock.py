"""The run folder's lock: one process at a time may change an output folder.

Owns ``<output_dir>/.sftrun.lock`` (an OS file lock through ``filelock``, released by the
kernel when its process dies) and ``.sftrun.lock.json`` beside it, which says who holds it
(pid, host, start time, command) so that a refusal can name the holder. Training holds it for
its whole life, ``ckpt prune`` while it deletes; read-only tools never take it. Never
decides anything about checkpoints.

Neither file is ever reached through a symbolic link, and the info file is only ever read or
written as a regular file (``O_NOFOLLOW``, ``O_NONBLOCK``, size-limited): a link planted in
its place would otherwise make every run overwrite the link's target, and a FIFO would hang
the refusal message.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import socket
import stat
import sys
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout

from sftrun import constants as C
from sftrun.errors import FolderInUseError
from sftrun.safefile import read_json_object

MAX_INFO_BYTES = 64 << 10


def _describe(info: dict[str, Any]) -> str:
    return (
        f"pid {info.get('pid', '?')} on {info.get('host', '?')}, started "
        f"{info.get('started', '?')} ({info.get('command', '?')})"
    )


def _read_info(folder: Path) -> dict[str, Any] | None:
    """The holder's info, or None when it is missing, not a regular file, or malformed."""
    return read_json_object(folder / C.LOCK_INFO_FILE, MAX_INFO_BYTES)


def _check_not_linked(folder: Path) -> None:
    """Refuse a lock or info file that is a symbolic link or not a regular file."""
    for name in (C.LOCK_FILE, C.LOCK_INFO_FILE):
        try:
            st = os.lstat(folder / name)
        except FileNotFoundError:
            continue
        if not stat.S_ISREG(st.st_mode):
            kind = "a symbolic link" if stat.S_ISLNK(st.st_mode) else "not a regular file"
            raise FolderInUseError(
                f"{folder / name} is {kind}; sftrun writes its lock files only as regular "
                "files it made; remove it (no run holds a lock through it) and start again"
            )


def _write_info(folder: Path, info: dict[str, Any]) -> None:
    path = folder / C.LOCK_INFO_FILE
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_NONBLOCK
    try:
        fd = os.open(path, flags, 0o644)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            _check_not_linked(folder)
        raise
    with os.fdopen(fd, "w") as fh:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise FolderInUseError(f"{path} is not a regular file; remove it and start again")
        fh.write(json.dumps(info) + "\n")


@dataclass
class RunLock:
    """A held lock; ``note`` says whether a lock left by a dead process was taken over."""

    folder: Path
    lock: FileLock
    note: str | None

    def release(self) -> None:
        path = self.folder / C.LOCK_INFO_FILE
        with contextlib.suppress(OSError):
            if stat.S_ISREG(os.lstat(path).st_mode):
                path.unlink()  # ours; a link or FIFO put there since is left alone
        self.lock.release()


def acquire(folder: Path, command: str | None = None) -> RunLock:
    """Take the folder's lock without waiting; raise FolderInUseError naming the holder."""
    folder.mkdir(parents=True, exist_ok=True)
    _check_not_linked(folder)
    lock = FileLock(str(folder / C.LOCK_FILE), timeout=0)
    try:
        lock.acquire()
    except Timeout:
        info = _read_info(folder)
        holder = _describe(info) if info else "another process"
        raise FolderInUseError(
            f"{folder} is in use by {holder}; wait for it to finish, or stop it first "
            "(two runs in one folder would overwrite each other's checkpoints)"
        ) from None
    stale = _read_info(folder)
    note = (
        f"took over the lock of {_describe(stale)}, which is no longer running" if stale else None
    )
    info = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "started": datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": command or " ".join(sys.argv),
    }
    try:
        _write_info(folder, info)
    except BaseException:
        lock.release()
        raise
    return RunLock(folder, lock, note)
