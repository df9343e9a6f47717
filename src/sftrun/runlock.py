"""The run folder's lock: one process at a time may change an output folder.

Owns ``<output_dir>/.sftrun.lock`` (an OS file lock through ``filelock``, released by the
kernel when its process dies) and ``.sftrun.lock.json`` beside it, which says who holds it
(pid, host, start time, command) so that a refusal can name the holder. Training holds it for
its whole life, ``ckpt prune`` while it deletes; read-only tools never take it. Never
decides anything about checkpoints.
"""

from __future__ import annotations

import json
import os
import socket
import sys
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout

from sftrun import constants as C
from sftrun.errors import FolderInUseError


def _describe(info: dict[str, Any]) -> str:
    return (
        f"pid {info.get('pid', '?')} on {info.get('host', '?')}, started "
        f"{info.get('started', '?')} ({info.get('command', '?')})"
    )


def _read_info(folder: Path) -> dict[str, Any] | None:
    try:
        info = json.loads((folder / C.LOCK_INFO_FILE).read_text())
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) else None


@dataclass
class RunLock:
    """A held lock; ``note`` says whether a lock left by a dead process was taken over."""

    folder: Path
    lock: FileLock
    note: str | None

    def release(self) -> None:
        (self.folder / C.LOCK_INFO_FILE).unlink(missing_ok=True)
        self.lock.release()


def acquire(folder: Path, command: str | None = None) -> RunLock:
    """Take the folder's lock without waiting; raise FolderInUseError naming the holder."""
    folder.mkdir(parents=True, exist_ok=True)
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
    (folder / C.LOCK_INFO_FILE).write_text(json.dumps(info) + "\n")
    return RunLock(folder, lock, note)
