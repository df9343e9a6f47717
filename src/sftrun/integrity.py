"""Whether a checkpoint folder is intact, read without trusting anything in it.

Owns the manifest's and ``trainer_state.json``'s schemas, reads of the folder's files (every
name in the manifest must be a plain name of a regular file in the folder: no path, no
symlink, no FIFO or device; sizes are compared before anything is read), verification by
size and sha256, and the cache of folders known intact. Rotation after each save trusts a
folder this process committed or fully verified as long as no file in it changed size or
mtime (:func:`verify_known`), so a save does not re-hash the checkpoints it keeps;
``--resume`` and ``sftrun ckpt verify`` always hash every byte.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import stat
from pathlib import Path
from typing import Any, Literal

import safetensors.torch
import torch
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from sftrun import constants as C
from sftrun import fs
from sftrun.errors import CheckpointError

# Folder -> fingerprint (name, size, mtime_ns of every file) when it was last known intact.
_known_intact: dict[Path, tuple[tuple[str, int, int], ...]] = {}


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


class AdaptedSplit(BaseModel):
    """``trainer_state.json``'s record of an out-of-memory adaptation (``loop``)."""

    configured: tuple[int, int]  # micro-batch, accumulation the run started with
    adapted: tuple[int, int]  # the split it moved to
    step: int = Field(ge=1, strict=True)  # the step that was redone with it

    @model_validator(mode="after")
    def _same_batch(self) -> AdaptedSplit:
        (m0, a0), (m1, a1) = self.configured, self.adapted
        if min(m0, a0, m1, a1) < 1 or m0 * a0 != m1 * a1:
            raise ValueError("the adapted split must keep micro-batch x accumulation")
        return self


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
    data_order: Literal["sftrun", "hf-trainer"] | None = None  # sampler.ORDERS
    data_seed: int | None = Field(None, strict=True)
    adapted_split: AdaptedSplit | None = None


def schema_problem(exc: ValidationError) -> str:
    """The first schema error, as ``field.path: message``."""
    first = exc.errors()[0]
    where = ".".join(str(x) for x in first["loc"]) or "top level"
    return f"{where}: {first['msg']}"


def open_regular(path: Path, name: str) -> int:
    """An fd of ``path/name`` if it is a regular file in the folder; never follows a link.

    ``O_NONBLOCK`` so that a FIFO planted in place of a file cannot hang the open.
    """
    try:
        fd = fs.ops().open(path / name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
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


def read_small(path: Path, name: str, limit: int) -> bytes:
    """A small file of the folder (checked to be regular and under ``limit`` bytes)."""
    fd = open_regular(path, name)
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


def _hf_trainer_layout(path: Path) -> bool:
    """HF Trainer's files, and a trainer state sftrun did not write (it has no samples_seen)."""
    if not (path / C.OPTIMIZER_FILE).is_file():
        return False
    try:
        raw = read_small(path, C.TRAINER_STATE_FILE, C.MAX_MANIFEST_BYTES * 64)
        state = json.loads(raw)
    except (CheckpointError, ValueError, RecursionError):
        return False
    return isinstance(state, dict) and "global_step" in state and "samples_seen" not in state


def read_manifest(path: Path) -> dict[str, Any]:
    """The folder's manifest, validated (schema, plain file names, step = folder number)."""
    _check_folder(path)
    try:
        raw = read_small(path, C.MANIFEST_FILE, C.MAX_MANIFEST_BYTES)
    except CheckpointError as exc:
        if str(exc).endswith(f"{C.MANIFEST_FILE} is missing"):
            if _hf_trainer_layout(path):
                raise CheckpointError(  # a finished save of another tool, not a broken one
                    f"{path}: a Hugging Face Trainer checkpoint (no sftrun {C.MANIFEST_FILE}); "
                    f"continue it in sftrun with: sftrun ckpt import {path} --config <config>"
                ) from None
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
            f"{path}: {C.MANIFEST_FILE} is malformed ({schema_problem(exc)})"
        ) from None
    match = C.CHECKPOINT_RE.match(path.name)
    if match and int(match.group(1)) != manifest["step"]:
        raise CheckpointError(
            f"{path}: the manifest is for step {manifest['step']}, not {match.group(1)} "
            "(a renamed or copied folder)"
        )
    return manifest


def read_verified(path: Path, name: str, expect: dict[str, Any], keep: bool = True) -> bytes:
    """Hash ``path/name`` against its manifest entry; return its bytes (``b""`` if not kept)."""
    fd = open_regular(path, name)
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


def parse_trainer_state(path: Path, raw: bytes, step: int) -> dict[str, Any]:
    """``trainer_state.json`` checked against its schema and the manifest's step."""
    try:
        state = json.loads(raw)
        TrainerStateView.model_validate(state)
    except (ValueError, ValidationError, RecursionError) as exc:
        why = schema_problem(exc) if isinstance(exc, ValidationError) else "not valid JSON"
        raise CheckpointError(f"{path}: {C.TRAINER_STATE_FILE} is malformed ({why})") from None
    if state["global_step"] != step:
        raise CheckpointError(
            f"{path}: {C.TRAINER_STATE_FILE} is at step {state['global_step']} but the "
            f"manifest says {step}"
        )
    return dict(state)


def parse_adapter(path: Path, raw: bytes) -> dict[str, torch.Tensor]:
    """The adapter's tensors from safetensors bytes; refused if any holds NaN or infinity."""
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
            name: read_verified(p, name, expect, keep=name in parsed)
            for name, expect in manifest["files"].items()
        }
        parse_trainer_state(p, raw[C.TRAINER_STATE_FILE], manifest["step"])
        parse_adapter(p, raw[C.ADAPTER_WEIGHTS_FILE])
    except CheckpointError as exc:
        return str(exc)
    remember_intact(p)
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


def remember_intact(path: Path) -> None:
    """Note that ``path`` is intact as it is now (see :func:`verify_known`)."""
    fingerprint = _fingerprint(path)
    if fingerprint is not None:
        _known_intact[path.resolve()] = fingerprint


def forget_known_intact() -> None:
    """Forget every folder known intact, as a new process would (each is hashed again)."""
    _known_intact.clear()


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
            data = json.loads(read_small(p, name, limit))
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
