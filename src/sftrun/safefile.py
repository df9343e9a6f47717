"""Reading a small file that anybody could have replaced: never through a symbolic link,
never a FIFO or device (no hang, no endless read), never more than a size limit.

Owns :func:`read_small` and :func:`read_json_object` (and its parser, also used for a remote
mirror's files), used for the run lock's info file, an
export's marker and a local mirror's manifests and marker. (Checkpoint files have their own
reader in ``checkpoint``, which names what is wrong instead of returning None.)
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any


def read_small(path: str | Path, limit: int) -> bytes | None:
    """The bytes of ``path`` if it is a regular file (not a link) of at most ``limit`` bytes;
    None otherwise, or when it cannot be opened."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return None
    with os.fdopen(fd, "rb") as fh:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_size > limit:
            return None
        raw = fh.read(limit + 1)
    return raw if len(raw) <= limit else None


def parse_json_object(raw: bytes | None) -> dict[str, Any] | None:
    """``raw`` parsed as a JSON object; None when it is missing or not one (invalid, too deep,
    a number too long, another type)."""
    if raw is None:
        return None
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError):
        return None
    return data if isinstance(data, dict) else None


def read_json_object(path: str | Path, limit: int) -> dict[str, Any] | None:
    """:func:`read_small` parsed as a JSON object (:func:`parse_json_object`)."""
    return parse_json_object(read_small(path, limit))
