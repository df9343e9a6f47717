"""An export's folder: the marker that says which checkpoint, format and precision it holds,
the checks that ``--out`` is new, empty or an earlier export of the same kind, and landing a
finished export there (one rename onto a new folder; file by file under a lock onto an earlier
export, leaving files the user added). Nothing here loads a model.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from sftrun import constants as C
from sftrun import integrity
from sftrun.errors import CheckpointError
from sftrun.safefile import read_json_object


def export_marker(ckpt: str | Path) -> dict[str, Any]:
    """The marker's fields that name the checkpoint (the caller adds format and precision)."""
    manifest = integrity.read_manifest(Path(ckpt))
    return {
        "checkpoint": str(Path(ckpt).resolve()),
        "run_id": manifest.get("run_id"),
        "step": manifest["step"],
        "adapter_sha256": manifest["files"][C.ADAPTER_WEIGHTS_FILE]["sha256"],
    }


def _read_marker(folder: Path) -> dict[str, Any] | None:
    return read_json_object(folder / C.EXPORT_MARKER_FILE, 1 << 20)


def _same_export(folder: Path, marker: dict[str, Any]) -> bool:
    found = _read_marker(folder)
    keys = ("run_id", "step", "adapter_sha256", "format", "precision")
    # An export from before formats existed is the float32 HF one.
    old = {"format": "hf", "precision": "float32", **(found or {})}
    return found is not None and all(old.get(k) == marker[k] for k in keys)


def check_export_target(target: Path, marker: dict[str, Any], ckpt: str | Path) -> bool:
    """Refuse an ``--out`` that is not new, empty, or an export of this same checkpoint;
    True when it is new or empty (then it must still be so when the export lands)."""
    if target.is_symlink():
        raise CheckpointError(f"--out {target} is a symbolic link; pass a real folder path")
    if not target.exists():
        return True
    if not target.is_dir():
        raise CheckpointError(f"--out {target} is a file; pass a folder path")
    if not any(target.iterdir()):
        return True
    if not _same_export(target, marker):
        raise CheckpointError(
            f"--out {target} is not empty and is not an earlier export of {ckpt}; sftrun "
            "replaces only its own export of the same checkpoint; pass a new folder"
        )
    return False


@contextlib.contextmanager
def _folder_lock(target: Path, ckpt: str | Path) -> Iterator[None]:
    """An exclusive lock on the export folder itself (no file is added to it)."""
    fd = os.open(target, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise CheckpointError(
                f"--out {target} is being written by another merge of {ckpt}; wait for it, "
                "or pass another folder"
            ) from None
        yield
    finally:
        os.close(fd)


def replace(tmp: Path, target: Path, marker: dict[str, Any], ckpt: str | Path, fresh: bool) -> None:
    """Put the finished export in place.

    A folder that was new or empty when the merge started is claimed by one rename, which
    fails when anything got there first (of two merges racing for one folder, one succeeds).
    An earlier export of the same checkpoint has the files its marker lists replaced one by
    one, under a lock on the folder; files the user added there are left as they are.
    """
    lost = CheckpointError(
        f"--out {target} was written by another command while this merge ran; it was left "
        "as that command wrote it; pass another folder"
    )
    if fresh:
        try:
            os.rename(tmp, target)  # onto a missing or empty folder only
        except OSError as exc:
            if exc.errno in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR, errno.EISDIR):
                raise lost from None
            raise
        return
    with _folder_lock(target, ckpt):
        if any(target.iterdir()) and not _same_export(target, marker):
            raise lost  # checked before the slow part; changed since
        old = _read_marker(target) or {}
        ours = set(old.get("files") or []) | set(marker["files"])
        for name in marker["files"]:
            os.replace(tmp / name, target / name)
        for name in sorted(ours - set(marker["files"])):  # the old export's, not written now
            path = target / name
            if path.is_file() and not path.is_symlink():
                path.unlink()
        os.replace(tmp / C.EXPORT_MARKER_FILE, target / C.EXPORT_MARKER_FILE)  # last


def readable(folder: Path) -> None:
    """The export as readable as a downloaded model folder: the folder 0755, files 0644
    (mkdtemp made them private), less what the umask withholds."""
    mask = os.umask(0)
    os.umask(mask)
    folder.chmod(0o755 & ~mask)
    for path in folder.iterdir():
        if path.is_file() and not path.is_symlink():
            path.chmod(0o644 & ~mask)


def precision_of(fmt: str, dtype: str, quant: str) -> str:
    """The precision an export is written in: ``dtype`` for an HF folder, ``quant`` for GGUF."""
    return dtype if fmt == "hf" else quant


def default_export_dir(ckpt: str | Path, fmt: str = "hf", precision: str = "float32") -> Path:
    """``outputs/5_export/<run id>-checkpoint-<step>`` for the float32 HF export, with
    ``-<format>-<precision>`` for any other: two runs or two kinds never share a default."""
    run_id = integrity.run_id_of(Path(ckpt))
    name = Path(ckpt).resolve().name
    prefix = run_id[:8] if run_id else Path(ckpt).resolve().parent.name
    kind = "" if (fmt, precision) == ("hf", "float32") else f"-{fmt}-{precision}"
    return Path(C.EXPORT_DIR) / f"{prefix}-{name}{kind}"
