"""The checkpoints of a run folder: list, choose (``--resume``), rotate, move aside, delete.

Deletion is confined: only real directories directly inside the folder being managed, of
this run (the manifest's ``run_id``), are ever removed (:func:`remove_owned`). Every listed
folder is verified (``integrity``) before it is trusted.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from sftrun import constants as C
from sftrun.checkpoint import fsync_dir, is_real_dir, remove_owned
from sftrun.errors import CheckpointError
from sftrun.integrity import dir_size, run_id_of, verify, verify_known


@dataclass(frozen=True)
class CheckpointInfo:
    """One folder under the output folder and what verification found."""

    path: Path
    step: int
    problem: str | None  # None when the checkpoint is intact
    run_id: str | None = None  # from the manifest, when it could be read

    @property
    def valid(self) -> bool:
        return self.problem is None


def _checkpoint_dirs(output_dir: str | Path) -> list[tuple[int, Path]]:
    """``(step, path)`` of every entry named ``checkpoint-<step>``, oldest first, unverified.

    Symbolic links and files with such a name are listed too (verification marks them
    invalid), so that nothing that looks like a checkpoint goes unreported.
    """
    out = Path(output_dir)
    if not out.is_dir():
        return []
    found = []
    for child in out.iterdir():
        match = C.CHECKPOINT_RE.match(child.name)
        if match:
            found.append((int(match.group(1)), child))
    return sorted(found, key=lambda item: item[0])


def scan(output_dir: str | Path) -> list[CheckpointInfo]:
    """Every ``checkpoint-<step>`` entry under ``output_dir``, oldest step first, verified."""
    return [
        CheckpointInfo(path, step, verify(path), run_id_of(path))
        for step, path in _checkpoint_dirs(output_dir)
    ]


def names(output_dir: str | Path) -> list[str]:
    """Names of the ``checkpoint-<step>`` entries (no hashing), oldest step first."""
    return [path.name for _, path in _checkpoint_dirs(output_dir)]


def owners(output_dir: str | Path) -> dict[str | None, list[Path]]:
    """Checkpoint entries by the run id their manifest names (None: none or unreadable)."""
    found: dict[str | None, list[Path]] = {}
    for _, path in _checkpoint_dirs(output_dir):
        found.setdefault(run_id_of(path), []).append(path)
    return found


def superseded_folders(output_dir: str | Path) -> list[Path]:
    """The ``superseded-*`` folders a resume moved newer checkpoints into."""
    out = Path(output_dir)
    if not out.is_dir():
        return []
    return sorted(p for p in out.glob(f"{C.SUPERSEDED_PREFIX}*") if is_real_dir(p))


def newer_than(output_dir: str | Path, step: int) -> list[Path]:
    """Checkpoint folders past ``step``, intact or not (no hashing: only names are needed)."""
    return [path for s, path in _checkpoint_dirs(output_dir) if s > step]


def rotate(
    output_dir: str | Path,
    limit: int | None,
    protect: set[str],
    run_id: str | None,
    on_error: Callable[[Path, OSError], None] | None = None,
) -> list[Path]:
    """Delete the oldest intact checkpoints of run ``run_id`` beyond ``limit``; return them.

    ``protect`` holds folder *names* (the best checkpoint), so a moved or copied run folder
    protects the same ones. Never deletes the newest valid checkpoint, a damaged folder (left
    for the user to inspect), or another run's checkpoint. Folders are checked with
    :func:`verify_known`: a save re-hashes only what changed since this process last saw it.
    With ``on_error``, a folder that cannot be deleted (permissions, a read-only mount) is
    reported to it and rotation goes on; without, the OSError is raised.
    """
    if limit is None:
        return []
    out = Path(output_dir)
    dirs = _checkpoint_dirs(out)
    if len(dirs) <= limit:
        return []  # nothing can be over the limit: no need to look inside any folder
    valid = [path for _, path in dirs if verify_known(path) is None]
    mine = [path for path in valid if run_id_of(path) == run_id]
    keep = {p.name for p in mine[-limit:]} | set(protect)
    if valid:
        keep.add(valid[-1].name)
    doomed = [p for p in mine if p.name not in keep][: max(0, len(mine) - limit)]
    removed = []
    for path in doomed:
        try:
            remove_owned(path, out)
            removed.append(path)
        except OSError as exc:
            if on_error is None:
                raise
            on_error(path, exc)
    if removed:
        fsync_dir(out)
    return removed


def describe_available(output_dir: Path) -> str:
    """The checkpoints of a folder, for messages (incomplete ones marked)."""
    infos = scan(output_dir)
    if not infos:
        return f"no checkpoints in {output_dir}"
    names_ = [c.path.name + ("" if c.valid else " (incomplete)") for c in infos]
    return f"checkpoints in {output_dir}: {', '.join(names_)}"


def resolve(arg: str, output_dir: str | Path) -> tuple[Path | None, list[CheckpointInfo]]:
    """Turn ``--resume`` into a verified checkpoint folder.

    ``latest`` means the newest valid checkpoint under ``output_dir``; ``auto`` the same, or
    None (a new run) when there is none. The second value is the list of newer folders that
    were skipped because they are not intact. Raises CheckpointError with the list of
    checkpoints that do exist when the path is missing or invalid.
    """
    out = Path(output_dir)
    if not arg.strip():
        raise CheckpointError(
            "--resume was given an empty value (an unset shell variable?); pass a checkpoint "
            "folder or 'latest', or leave --resume out to start a new run"
        )
    if arg in (C.RESUME_LATEST, C.RESUME_AUTO):
        # Newest first, stopping at the first intact one: older checkpoints need no hashing.
        skipped: list[CheckpointInfo] = []
        for step, path in reversed(_checkpoint_dirs(out)):
            problem = verify(path)
            if problem is None:
                return path, list(reversed(skipped))
            skipped.append(CheckpointInfo(path, step, problem))
        if arg == C.RESUME_AUTO:
            return None, list(reversed(skipped))
        raise CheckpointError(
            f"--resume latest: no complete checkpoint in {out} "
            f"({describe_available(out)}); start a new run without --resume"
        )
    path = Path(arg)
    if path.exists() and not path.is_dir():
        raise CheckpointError(
            f"--resume {path}: that is a file; pass the checkpoint folder that holds "
            f"{C.MANIFEST_FILE} (for example {path.parent})"
        )
    if not path.is_dir():
        where = path.parent if path.parent.is_dir() and path.parent != Path(".") else out
        valid = [c for c in scan(where) if c.valid]
        hint = f"; try --resume {valid[-1].path}" if valid else ""
        raise CheckpointError(
            f"checkpoint not found: {path}; {describe_available(where)}{hint} (or --resume latest)"
        )
    if not (path / C.MANIFEST_FILE).exists() and _checkpoint_dirs(path):
        valid = [c for c in scan(path) if c.valid]
        example = f", e.g. --resume {valid[-1].path}" if valid else ""
        raise CheckpointError(
            f"--resume {path}: that is a run folder; use --resume latest (with output_dir="
            f"{path}) or a checkpoint-N inside it{example}"
        )
    problem = verify(path)
    if problem is not None:
        others = [c for c in scan(path.parent) if c.valid and c.path.resolve() != path.resolve()]
        hint = f"; resume from {others[-1].path} instead" if others else ""
        raise CheckpointError(f"cannot resume: {problem}{hint}")
    return path, []


def delete(path: Path) -> int:
    """Remove a checkpoint folder of its run folder; return the bytes freed."""
    size = dir_size(path)
    remove_owned(path, path.parent)
    fsync_dir(path.parent)
    return size
