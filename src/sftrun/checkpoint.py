"""Checkpoint format: the only code that reads or writes checkpoint folders.

Owns the folder layout (see ``constants``), the atomic commit, the manifest, verification,
listing, rotation and moving superseded checkpoints aside. Never decides *whether* a resume
is allowed (that is ``resume``); it only says what a folder holds and whether it is intact.

Commit protocol (a crash at any instant leaves every earlier checkpoint intact):
  1. serialise each file in memory, write it into ``.tmp-checkpoint-<step>-<pid>/`` and fsync
     (a writer thread writes and hashes one file while the next is serialised);
  2. write ``manifest.json`` last (format version, step, identity, library versions, size
     and sha256 of every file) and fsync it and the temporary folder;
  3. rename the temporary folder to ``checkpoint-<step>`` (atomic) and fsync the parent.
A folder is a checkpoint only if its manifest is present and every file matches it.
Rotation after each save trusts a folder this process committed or fully verified as long as
no file in it changed size or mtime (:func:`verify_known`), so a save does not re-hash the
checkpoints it keeps; ``--resume`` and ``sftrun ckpt verify`` always hash every byte.
Everything is loaded without unpickling objects: safetensors, JSON, and
``torch.load(weights_only=True)`` on bytes whose sha256 was checked first.

Nothing read from a folder is trusted: the manifest and ``trainer_state.json`` are checked
against a schema, every file name in the manifest must be a plain name of a regular file in
the folder (no path, no symlink, no FIFO or device), sizes are compared before anything is
read, the manifest's step must equal the folder's number, and the adapter must be finite.
Deletion is confined: only real directories directly inside the folder being managed, of
this run (the manifest's ``run_id``), are ever removed (:func:`remove_owned`).
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import shutil
import stat
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime
from importlib import metadata
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from sftrun import constants as C
from sftrun.errors import CheckpointError, DiskSpaceError, DivergenceError

# Called after each file is written during a save (tests use it to crash mid-save).
SaveHook = Callable[[str], None]

# Folder -> fingerprint (name, size, mtime_ns of every file) when it was last known intact.
_known_intact: dict[Path, tuple[tuple[str, int, int], ...]] = {}


@dataclass
class CheckpointPayload:
    """Everything a checkpoint holds, as in-memory plain data and tensors."""

    adapter_state: dict[str, torch.Tensor]
    adapter_config: dict[str, Any]
    optimizer_state: dict[str, Any]
    scheduler_state: dict[str, Any]
    trainer_state: dict[str, Any]
    training_args: dict[str, Any]
    rng_state: dict[str, Any]
    identity: dict[str, Any]
    run_id: str | None = None  # None only in checkpoints written before run ids existed


class FileEntry(BaseModel):
    """One file of a checkpoint as the manifest records it."""

    model_config = ConfigDict(extra="forbid", strict=True)

    size: int = Field(ge=0)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")


class Manifest(BaseModel):
    """``manifest.json``: validated before any name or number in it is used."""

    model_config = ConfigDict(extra="allow", strict=True)

    format_version: int
    step: int = Field(ge=0)
    created: str = ""
    run_id: str | None = Field(None, pattern=r"^[0-9a-f]{8,64}$")
    identity: dict[str, Any] = Field(default_factory=dict)
    versions: dict[str, str] = Field(default_factory=dict)
    files: dict[str, FileEntry]

    @field_validator("files")
    @classmethod
    def _plain_names(cls, files: dict[str, FileEntry]) -> dict[str, FileEntry]:
        for name in files:
            if not C.MANIFEST_FILE_NAME_RE.match(name) or name == C.MANIFEST_FILE:
                raise ValueError(f"file name {name!r} is not a plain file name in the folder")
        return files


class TrainerStateView(BaseModel):
    """The parts of ``trainer_state.json`` that tools and resume read, with their types."""

    model_config = ConfigDict(extra="allow")

    global_step: int = Field(ge=0, strict=True)
    epoch: float | None = None
    num_train_epochs: float | None = None
    max_steps: int | None = None
    samples_seen: int | None = Field(None, ge=0)
    tokens_seen: int | None = None
    log_history: list[dict[str, Any]] = Field(default_factory=list)
    best_model_checkpoint: str | None = None
    run_id: str | None = None
    tracker_runs: dict[str, str] = Field(default_factory=dict)


def _schema_problem(exc: ValidationError) -> str:
    first = exc.errors()[0]
    where = ".".join(str(x) for x in first["loc"]) or "top level"
    return f"{where}: {first['msg']}"


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


def checkpoint_path(output_dir: str | Path, step: int) -> Path:
    return Path(output_dir) / f"{C.CHECKPOINT_PREFIX}{step}"


def step_of(path: Path) -> int:
    """The step in a ``checkpoint-<step>`` folder's name (-1 for any other name)."""
    match = C.CHECKPOINT_RE.match(path.name)
    return int(match.group(1)) if match else -1


def library_versions() -> dict[str, str]:
    versions = {}
    for name in ("sftrun", "torch", "transformers", "peft", "accelerate", "safetensors"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "unknown"
    return versions


def _torch_bytes(obj: Any) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _json_bytes(obj: Any) -> bytes:
    return (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode()


def serialise(payload: CheckpointPayload) -> Iterator[tuple[str, bytes]]:
    """The name and bytes of every checkpoint file except the manifest, in write order.

    Lazy, so that a save can write and hash one file while the next is being serialised.
    """
    adapter = {k: v.detach().cpu().contiguous() for k, v in payload.adapter_state.items()}
    yield C.ADAPTER_WEIGHTS_FILE, safetensors.torch.save(adapter, metadata={"format": "pt"})
    yield C.ADAPTER_CONFIG_FILE, _json_bytes(payload.adapter_config)
    yield C.OPTIMIZER_FILE, _torch_bytes(payload.optimizer_state)
    yield C.SCHEDULER_FILE, _torch_bytes(payload.scheduler_state)
    yield C.TRAINING_ARGS_FILE, _torch_bytes(payload.training_args)
    yield C.RNG_STATE_FILE, _torch_bytes(payload.rng_state)
    yield C.TRAINER_STATE_FILE, _json_bytes(payload.trainer_state)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_file(path: Path, data: bytes) -> None:
    with open(path, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def _write_and_digest(path: Path, data: bytes, hook: SaveHook | None) -> dict[str, Any]:
    _write_file(path, data)
    entry = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    if hook is not None:
        hook(path.name)
    return entry


def save(
    output_dir: str | Path,
    step: int,
    payload: CheckpointPayload,
    hook: SaveHook | None = None,
) -> Path:
    """Commit ``payload`` as ``output_dir/checkpoint-<step>`` atomically and return its path.

    Raises DiskSpaceError on ENOSPC and CheckpointError on any other write failure; in both
    cases the temporary folder is removed and no existing checkpoint is touched.
    """
    check_finite(payload, step)
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    final = checkpoint_path(out, step)
    tmp = out / f"{C.TMP_CHECKPOINT_PREFIX}{step}-{os.getpid()}"
    made = False  # whether this call created ``tmp`` (only then may it remove it)
    try:
        if tmp.exists() or tmp.is_symlink():
            remove_temp_folders(out, only=[tmp])
        tmp.mkdir()
        made = True
        # One writer thread writes, fsyncs and hashes each file (all three release the GIL)
        # while this thread serialises the next; files are still written one at a time, in
        # order, and the first failure is the one raised.
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="sftrun-save") as writer:
            pending = [
                (name, writer.submit(_write_and_digest, tmp / name, data, hook))
                for name, data in serialise(payload)
            ]
            files = {name: done.result() for name, done in pending}
        manifest = {
            "format_version": C.CHECKPOINT_FORMAT_VERSION,
            "step": step,
            "run_id": payload.run_id,
            "created": datetime.now().astimezone().isoformat(timespec="seconds"),
            "identity": payload.identity,
            "versions": library_versions(),
            "files": files,
        }
        _write_file(tmp / C.MANIFEST_FILE, _json_bytes(manifest))
        if hook is not None:
            hook(C.MANIFEST_FILE)
        _fsync_dir(tmp)
        if final.exists():
            # Only reachable when re-saving a step that already has a checkpoint; keep it.
            move_aside(out, [final])
        os.rename(tmp, final)
        _fsync_dir(out)
        _remember_intact(final)
    except OSError as exc:
        if made:
            shutil.rmtree(tmp, ignore_errors=True)
        if exc.errno == errno.ENOSPC:
            raise DiskSpaceError(
                f"disk full while writing checkpoint-{step} in {out}; the partial folder was "
                "removed and earlier checkpoints are intact; free space (for example "
                f"`sftrun ckpt prune {out} --keep 1`) and resume with --resume latest"
            ) from None
        raise CheckpointError(
            f"could not write checkpoint-{step} in {out}: {exc.strerror or exc}; the partial "
            "folder was removed and earlier checkpoints are intact"
        ) from None
    return final


def check_finite(payload: CheckpointPayload, step: int) -> None:
    """Raise DivergenceError if an adapter or optimizer tensor holds NaN or infinity."""
    tensors = [("adapter", k, v) for k, v in payload.adapter_state.items()]
    for pid, slot in payload.optimizer_state.get("state", {}).items():
        tensors += [("optimizer", f"{pid}.{k}", v) for k, v in slot.items()]
    for kind, key, value in tensors:
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            if not bool(torch.isfinite(value).all()):
                raise DivergenceError(
                    f"checkpoint-{step} was not written: {kind} tensor {key} holds NaN or "
                    "infinity (training diverged)"
                )


def _open_regular(path: Path, name: str) -> int:
    """An fd of ``path/name`` if it is a regular file in the folder; never follows a link.

    ``O_NONBLOCK`` so that a FIFO planted in place of a file cannot hang the open.
    """
    try:
        fd = os.open(path / name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: {name} is missing") from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise CheckpointError(f"{path}: {name} is a symbolic link, not a file") from None
        raise CheckpointError(f"{path}: {name} cannot be read ({exc.strerror})") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise CheckpointError(f"{path}: {name} is not a regular file")
    return fd


def _read_small(path: Path, name: str, limit: int) -> bytes:
    """A small file of the folder (checked to be regular and under ``limit`` bytes)."""
    fd = _open_regular(path, name)
    with os.fdopen(fd, "rb") as fh:
        size = os.fstat(fh.fileno()).st_size
        if size > limit:
            raise CheckpointError(f"{path}: {name} is {size} bytes, over the {limit} byte limit")
        return fh.read(limit + 1)


def _check_folder(path: Path) -> None:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        raise CheckpointError(f"{path} does not exist") from None
    if stat.S_ISLNK(st.st_mode):
        raise CheckpointError(
            f"{path} is a symbolic link; sftrun only uses checkpoint folders it wrote itself"
        )
    if not stat.S_ISDIR(st.st_mode):
        raise CheckpointError(f"{path} is a file, not a checkpoint folder")


def read_manifest(path: Path) -> dict[str, Any]:
    """The folder's manifest, validated (schema, plain file names, step = folder number)."""
    _check_folder(path)
    try:
        raw = _read_small(path, C.MANIFEST_FILE, C.MAX_MANIFEST_BYTES)
    except CheckpointError as exc:
        if str(exc).endswith(f"{C.MANIFEST_FILE} is missing"):
            raise CheckpointError(
                f"{path}: {C.MANIFEST_FILE} is missing, so the save did not finish"
            ) from None
        raise
    try:
        manifest = json.loads(raw)
    except (ValueError, RecursionError):  # also too deep, or a number too long to convert
        raise CheckpointError(f"{path}: {C.MANIFEST_FILE} is damaged (not valid JSON)") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        raise CheckpointError(f"{path}: {C.MANIFEST_FILE} has no file list")
    if manifest.get("format_version") != C.CHECKPOINT_FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: checkpoint format {manifest.get('format_version')!r} is not supported "
            f"(this sftrun reads format {C.CHECKPOINT_FORMAT_VERSION})"
        )
    try:
        Manifest.model_validate(manifest)
    except ValidationError as exc:
        raise CheckpointError(
            f"{path}: {C.MANIFEST_FILE} is malformed ({_schema_problem(exc)})"
        ) from None
    match = C.CHECKPOINT_RE.match(path.name)
    if match and int(match.group(1)) != manifest["step"]:
        raise CheckpointError(
            f"{path}: the manifest is for step {manifest['step']}, not {match.group(1)} "
            "(a renamed or copied folder)"
        )
    return manifest


def _read_verified(path: Path, name: str, expect: dict[str, Any], keep: bool = True) -> bytes:
    """Hash ``path/name`` against its manifest entry; return its bytes (``b""`` if not kept)."""
    fd = _open_regular(path, name)
    with os.fdopen(fd, "rb") as fh:
        size = os.fstat(fh.fileno()).st_size
        if size != expect["size"]:
            raise CheckpointError(
                f"{path}: {name} is {size} bytes but the manifest says {expect['size']} "
                "(truncated or overwritten)"
            )
        digest = hashlib.sha256()
        chunks = []
        for block in iter(lambda: fh.read(1 << 22), b""):
            digest.update(block)
            if keep:
                chunks.append(block)
    if digest.hexdigest() != expect["sha256"]:
        raise CheckpointError(f"{path}: {name} does not match its sha256 in the manifest (damaged)")
    return b"".join(chunks)


def _parse_trainer_state(path: Path, raw: bytes, step: int) -> dict[str, Any]:
    try:
        state = json.loads(raw)
        TrainerStateView.model_validate(state)
    except (ValueError, ValidationError, RecursionError) as exc:
        why = _schema_problem(exc) if isinstance(exc, ValidationError) else "not valid JSON"
        raise CheckpointError(f"{path}: {C.TRAINER_STATE_FILE} is malformed ({why})") from None
    if state["global_step"] != step:
        raise CheckpointError(
            f"{path}: {C.TRAINER_STATE_FILE} is at step {state['global_step']} but the "
            f"manifest says {step}"
        )
    return dict(state)


def _parse_adapter(path: Path, raw: bytes) -> dict[str, torch.Tensor]:
    try:
        adapter = safetensors.torch.load(raw)
    except (ValueError, safetensors.SafetensorError) as exc:
        raise CheckpointError(f"{path}: could not parse {C.ADAPTER_WEIGHTS_FILE} ({exc})") from None
    for key, value in adapter.items():
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise CheckpointError(
                f"{path}: adapter tensor {key} holds NaN or infinity (a diverged run)"
            )
    return adapter


def verify(path: str | Path) -> str | None:
    """Return None if the folder is an intact checkpoint, else what is wrong.

    Intact: a valid manifest listing every required file, each a regular file of the listed
    size and sha256, a well-formed trainer state at the manifest's step, a finite adapter.
    """
    p = Path(path)
    try:
        manifest = read_manifest(p)
        for name in C.REQUIRED_CHECKPOINT_FILES:
            if name not in manifest["files"]:
                return f"{p}: {name} is not listed in the manifest"
        parsed = (C.ADAPTER_WEIGHTS_FILE, C.TRAINER_STATE_FILE)
        raw = {
            name: _read_verified(p, name, expect, keep=name in parsed)
            for name, expect in manifest["files"].items()
        }
        _parse_trainer_state(p, raw[C.TRAINER_STATE_FILE], manifest["step"])
        _parse_adapter(p, raw[C.ADAPTER_WEIGHTS_FILE])
    except CheckpointError as exc:
        return str(exc)
    _remember_intact(p)
    return None


def run_id_of(path: Path) -> str | None:
    """The run id in a folder's manifest; None when absent or unreadable (never raises)."""
    try:
        return read_manifest(path).get("run_id")
    except CheckpointError:
        return None


def _fingerprint(path: Path) -> tuple[tuple[str, int, int], ...] | None:
    try:
        stats = [(entry.name, entry.stat(follow_symlinks=False)) for entry in os.scandir(path)]
    except OSError:
        return None
    return tuple(sorted((name, st.st_size, st.st_mtime_ns) for name, st in stats))


def _remember_intact(path: Path) -> None:
    fingerprint = _fingerprint(path)
    if fingerprint is not None:
        _known_intact[path.resolve()] = fingerprint


def verify_known(path: str | Path) -> str | None:
    """:func:`verify`, skipping the hashing for a folder this process already knows is intact.

    Known: committed or fully verified by this process, and no file added, removed, resized
    or rewritten (mtime) since. Anything else is verified byte for byte.
    """
    p = Path(path)
    known = _known_intact.get(p.resolve())
    if known is not None and not p.is_symlink() and known == _fingerprint(p):
        return None
    return verify(p)


def _torch_load(data: bytes, path: Path, name: str) -> Any:
    try:
        return torch.load(io.BytesIO(data), weights_only=True, map_location="cpu")
    except Exception as exc:  # noqa: BLE001 - any unpickling refusal is the same user error
        raise CheckpointError(
            f"{path}: {name} holds something other than plain tensors and numbers, so it was "
            f"not loaded ({type(exc).__name__}); this checkpoint was not written by sftrun"
        ) from None


def load(path: str | Path) -> tuple[CheckpointPayload, dict[str, Any]]:
    """Verify and load a checkpoint; return its payload and manifest.

    Raises CheckpointError naming the missing or damaged file.
    """
    p = Path(path)
    manifest = read_manifest(p)
    files = manifest["files"]
    raw = {}
    for name in C.REQUIRED_CHECKPOINT_FILES:
        if name not in files:
            raise CheckpointError(f"{p}: {name} is not listed in the manifest")
        raw[name] = _read_verified(p, name, files[name])
    adapter = _parse_adapter(p, raw[C.ADAPTER_WEIGHTS_FILE])
    trainer_state = _parse_trainer_state(p, raw[C.TRAINER_STATE_FILE], manifest["step"])
    try:
        adapter_config = json.loads(raw[C.ADAPTER_CONFIG_FILE])
    except (ValueError, RecursionError) as exc:
        raise CheckpointError(f"{p}: could not parse {C.ADAPTER_CONFIG_FILE} ({exc})") from None
    payload = CheckpointPayload(
        adapter_state=adapter,
        adapter_config=adapter_config,
        optimizer_state=_torch_load(raw[C.OPTIMIZER_FILE], p, C.OPTIMIZER_FILE),
        scheduler_state=_torch_load(raw[C.SCHEDULER_FILE], p, C.SCHEDULER_FILE),
        trainer_state=trainer_state,
        training_args=_torch_load(raw[C.TRAINING_ARGS_FILE], p, C.TRAINING_ARGS_FILE),
        rng_state=_torch_load(raw[C.RNG_STATE_FILE], p, C.RNG_STATE_FILE),
        identity=manifest.get("identity", {}),
        run_id=manifest.get("run_id"),
    )
    for name, value in (
        (C.OPTIMIZER_FILE, payload.optimizer_state),
        (C.SCHEDULER_FILE, payload.scheduler_state),
        (C.TRAINING_ARGS_FILE, payload.training_args),
        (C.RNG_STATE_FILE, payload.rng_state),
    ):
        if not isinstance(value, dict):
            raise CheckpointError(f"{p}: {name} does not hold a mapping, so it is not sftrun's")
    return payload, manifest


def _is_real_dir(path: Path) -> bool:
    try:
        return stat.S_ISDIR(os.lstat(path).st_mode)
    except OSError:
        return False


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
    out = Path(output_dir)
    if not out.is_dir():
        return []
    return sorted(p for p in out.glob(f"{C.SUPERSEDED_PREFIX}*") if _is_real_dir(p))


def newer_than(output_dir: str | Path, step: int) -> list[Path]:
    """Checkpoint folders past ``step``, intact or not (no hashing: only names are needed)."""
    return [path for s, path in _checkpoint_dirs(output_dir) if s > step]


def temp_folders(output_dir: str | Path) -> list[Path]:
    """Unfinished saves: real folders named ``.tmp-checkpoint-<step>-<pid>``."""
    out = Path(output_dir)
    if not out.is_dir():
        return []
    return sorted(p for p in out.iterdir() if C.TMP_CHECKPOINT_RE.match(p.name) and _is_real_dir(p))


def _only_checkpoint_files(folder: Path) -> bool:
    """True if every entry is a regular file with a name a save writes (sftrun made it)."""
    allowed = {*C.REQUIRED_CHECKPOINT_FILES, C.MANIFEST_FILE}
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return False
    return all(e.name in allowed and e.is_file(follow_symlinks=False) for e in entries)


def remove_owned(path: Path, parent: Path) -> None:
    """Delete ``path`` only if it is a real directory directly inside ``parent``.

    The one gate every deletion of a folder goes through. Raises CheckpointError (and
    deletes nothing) for a symbolic link, a file, or a folder anywhere else.
    """
    if path.parent.resolve() != parent.resolve() or path.name in ("", ".", ".."):
        raise CheckpointError(f"refusing to delete {path}: it is not directly inside {parent}")
    if not _is_real_dir(path):
        raise CheckpointError(f"refusing to delete {path}: it is not a real folder")
    shutil.rmtree(path)


def remove_temp_folders(output_dir: str | Path, only: list[Path] | None = None) -> list[Path]:
    """Delete leftovers of saves that never committed; return what was removed.

    Only folders that hold nothing but files a save writes; anything else is left alone.
    """
    out = Path(output_dir)
    removed = []
    for p in temp_folders(out) if only is None else only:
        if _is_real_dir(p) and _only_checkpoint_files(p):
            remove_owned(p, out)
            removed.append(p)
    return removed


def move_aside(output_dir: str | Path, paths: list[Path]) -> Path | None:
    """Move checkpoints into ``superseded-<timestamp>/`` (never deletes them)."""
    if not paths:
        return None
    out = Path(output_dir)
    stamp = time.strftime(C.TIMESTAMP_FORMAT)
    dest = out / f"{C.SUPERSEDED_PREFIX}{stamp}"
    n = 1
    while dest.exists():
        dest = out / f"{C.SUPERSEDED_PREFIX}{stamp}_{n}"
        n += 1
    dest.mkdir()
    for p in paths:
        if p.parent.resolve() != out.resolve():
            raise CheckpointError(f"refusing to move {p}: it is not directly inside {out}")
        os.rename(p, dest / p.name)
    _fsync_dir(out)
    return dest


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
        _fsync_dir(out)
    return removed


def describe_available(output_dir: Path) -> str:
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


def dir_size(path: Path) -> int:
    """Bytes of the regular files in a folder tree; symbolic links are not followed."""
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            try:
                st = os.lstat(os.path.join(root, name))
            except OSError:
                continue
            if stat.S_ISREG(st.st_mode):
                total += st.st_size
    return total


def peek(path: str | Path) -> dict[str, Any]:
    """Best-effort view of a folder for listings: trainer state and manifest, unverified.

    Never raises and never hangs; a part that is missing, unreadable, oversized or of the
    wrong shape is simply absent. Use ``load`` for anything that feeds training.
    """
    p = Path(path)
    view: dict[str, Any] = {}
    parts: tuple[tuple[str, str, int, type[BaseModel]], ...] = (
        ("state", C.TRAINER_STATE_FILE, C.MAX_STATE_BYTES, TrainerStateView),
        ("manifest", C.MANIFEST_FILE, C.MAX_MANIFEST_BYTES, Manifest),
    )
    for key, name, limit, schema in parts:
        try:
            data = json.loads(_read_small(p, name, limit))
            schema.model_validate(data)
            view[key] = data
        except (CheckpointError, ValueError, ValidationError, RecursionError):
            pass
    try:
        view["mtime"] = os.lstat(p).st_mtime
        view["size"] = dir_size(p)
    except OSError:
        pass
    return view


def delete(path: Path) -> int:
    """Remove a checkpoint folder of its run folder; return the bytes freed."""
    size = dir_size(path)
    remove_owned(path, path.parent)
    _fsync_dir(path.parent)
    return size
