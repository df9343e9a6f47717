"""The file-system calls a test may replace: the one seam for a full disk, a denied folder or
a count of reads, instead of patching ``os``, ``shutil``, ``tempfile`` or ``safetensors``.

The code that writes or deletes on the run's behalf calls these through :func:`ops`;
:func:`replaced` swaps some of them for the duration of a ``with`` block, in this process.
Every default is the real call, so a run that never enters ``replaced`` is unchanged.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from typing import Any


def _save_tensors(tensors: Any, path: Any, metadata: dict[str, str] | None = None) -> None:
    import safetensors.torch  # only where tensors are written, not for `sftrun --help`

    safetensors.torch.save_file(tensors, path, metadata=metadata)


@dataclasses.dataclass(frozen=True)
class Ops:
    """The calls behind the seam (each the real one by default)."""

    # Free space before a run starts (placement's check for two checkpoints).
    disk_usage: Callable[[Any], Any] = shutil.disk_usage
    # Opening a checkpoint file for reading (integrity: every verified read).
    open: Callable[..., int] = os.open
    # The probe that output_dir can be written (plan's preflight).
    mkstemp: Callable[..., tuple[int, str]] = tempfile.mkstemp
    # Deleting a checkpoint folder (rotation, prune) or an unfinished save.
    rmtree: Callable[..., None] = shutil.rmtree
    # Writing the tokenized data cache (datastage).
    save_tensors: Callable[..., None] = _save_tensors


_current = Ops()


def ops() -> Ops:
    """The calls in effect (the real ones unless a test entered :func:`replaced`)."""
    return _current


@contextlib.contextmanager
def replaced(**calls: Callable[..., Any]) -> Iterator[Ops]:
    """``with fs.replaced(disk_usage=fake): ...``: the named calls replaced inside the block."""
    global _current
    before = _current
    _current = dataclasses.replace(before, **calls)
    try:
        yield _current
    finally:
        _current = before
