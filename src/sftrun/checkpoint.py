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
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import shutil
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

from sftrun import constants as C
from sftrun.errors import CheckpointError, DiskSpaceError

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


@dataclass(frozen=True)
class CheckpointInfo:
    """One folder under the output folder and what verification found."""

    path: Path
    step: int
    problem: str | None  # None when the checkpoint is intact

    @property
    def valid(self) -> bool:
        return self.problem is None


def checkpoint_path(output_dir: str | Path, step: int) -> Path:
    return Path(output_dir) / f"{C.CHECKPOINT_PREFIX}{step}"


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
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    final = checkpoint_path(out, step)
    tmp = out / f"{C.TMP_CHECKPOINT_PREFIX}{step}-{os.getpid()}"
    try:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
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
        shutil.rmtree(tmp, ignore_errors=True)
        if exc.errno == errno.ENOSPC:
            raise DiskSpaceError(
                f"disk full while writing checkpoint-{step} in {out}; the partial folder was "
                "removed and earlier checkpoints are intact; free space (or lower "
                "save_total_limit) and resume with --resume latest"
            ) from None
        raise CheckpointError(
            f"could not write checkpoint-{step} in {out}: {exc.strerror or exc}; the partial "
            "folder was removed and earlier checkpoints are intact"
        ) from None
    return final


def read_manifest(path: Path) -> dict[str, Any]:
    try:
        manifest = json.loads((path / C.MANIFEST_FILE).read_text())
    except FileNotFoundError:
        raise CheckpointError(
            f"{path}: {C.MANIFEST_FILE} is missing, so the save did not finish"
        ) from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise CheckpointError(f"{path}: {C.MANIFEST_FILE} is damaged (not valid JSON)") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        raise CheckpointError(f"{path}: {C.MANIFEST_FILE} has no file list")
    if manifest.get("format_version") != C.CHECKPOINT_FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: checkpoint format {manifest.get('format_version')} is not supported "
            f"(this sftrun reads format {C.CHECKPOINT_FORMAT_VERSION})"
        )
    return manifest


def _read_verified(path: Path, name: str, expect: dict[str, Any]) -> bytes:
    try:
        data = (path / name).read_bytes()
    except FileNotFoundError:
        raise CheckpointError(f"{path}: {name} is missing") from None
    if len(data) != expect["size"]:
        raise CheckpointError(
            f"{path}: {name} is {len(data)} bytes but the manifest says {expect['size']} "
            "(truncated or overwritten)"
        )
    if hashlib.sha256(data).hexdigest() != expect["sha256"]:
        raise CheckpointError(f"{path}: {name} does not match its sha256 in the manifest (damaged)")
    return data


def verify(path: str | Path) -> str | None:
    """Return None if the folder is an intact checkpoint, else what is wrong."""
    p = Path(path)
    try:
        manifest = read_manifest(p)
        for name in C.REQUIRED_CHECKPOINT_FILES:
            if name not in manifest["files"]:
                return f"{p}: {name} is not listed in the manifest"
        for name, expect in manifest["files"].items():
            _read_verified(p, name, expect)
    except CheckpointError as exc:
        return str(exc)
    _remember_intact(p)
    return None


def _fingerprint(path: Path) -> tuple[tuple[str, int, int], ...] | None:
    try:
        stats = [(entry.name, entry.stat()) for entry in os.scandir(path)]
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
    if known is not None and known == _fingerprint(p):
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
    try:
        adapter = safetensors.torch.load(raw[C.ADAPTER_WEIGHTS_FILE])
        adapter_config = json.loads(raw[C.ADAPTER_CONFIG_FILE])
        trainer_state = json.loads(raw[C.TRAINER_STATE_FILE])
    except (ValueError, safetensors.SafetensorError) as exc:
        raise CheckpointError(f"{p}: could not parse a checkpoint file ({exc})") from None
    payload = CheckpointPayload(
        adapter_state=adapter,
        adapter_config=adapter_config,
        optimizer_state=_torch_load(raw[C.OPTIMIZER_FILE], p, C.OPTIMIZER_FILE),
        scheduler_state=_torch_load(raw[C.SCHEDULER_FILE], p, C.SCHEDULER_FILE),
        trainer_state=trainer_state,
        training_args=_torch_load(raw[C.TRAINING_ARGS_FILE], p, C.TRAINING_ARGS_FILE),
        rng_state=_torch_load(raw[C.RNG_STATE_FILE], p, C.RNG_STATE_FILE),
        identity=manifest.get("identity", {}),
    )
    return payload, manifest


def _checkpoint_dirs(output_dir: str | Path) -> list[tuple[int, Path]]:
    """``(step, path)`` of every ``checkpoint-<step>`` folder, oldest step first, unverified."""
    out = Path(output_dir)
    if not out.is_dir():
        return []
    found = []
    for child in out.iterdir():
        match = C.CHECKPOINT_RE.match(child.name)
        if match and child.is_dir():
            found.append((int(match.group(1)), child))
    return sorted(found, key=lambda item: item[0])


def scan(output_dir: str | Path) -> list[CheckpointInfo]:
    """Every ``checkpoint-<step>`` folder under ``output_dir``, oldest step first, verified."""
    return [CheckpointInfo(path, step, verify(path)) for step, path in _checkpoint_dirs(output_dir)]


def newer_than(output_dir: str | Path, step: int) -> list[Path]:
    """Checkpoint folders past ``step``, intact or not (no hashing: only names are needed)."""
    return [path for s, path in _checkpoint_dirs(output_dir) if s > step]


def temp_folders(output_dir: str | Path) -> list[Path]:
    out = Path(output_dir)
    if not out.is_dir():
        return []
    return sorted(p for p in out.iterdir() if p.name.startswith(C.TMP_CHECKPOINT_PREFIX))


def remove_temp_folders(output_dir: str | Path) -> list[Path]:
    """Delete leftovers of saves that never committed (one writer per output folder)."""
    removed = temp_folders(output_dir)
    for p in removed:
        shutil.rmtree(p, ignore_errors=True)
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
        os.rename(p, dest / p.name)
    _fsync_dir(out)
    return dest


def rotate(output_dir: str | Path, limit: int | None, protect: set[Path]) -> list[Path]:
    """Delete the oldest intact checkpoints beyond ``limit``.

    Never deletes the newest valid checkpoint, anything in ``protect`` (the best one), or a
    damaged folder (left for the user to inspect). Folders are checked with
    :func:`verify_known`: a save re-hashes only what changed since this process last saw it.
    """
    if limit is None:
        return []
    dirs = _checkpoint_dirs(output_dir)
    if len(dirs) <= limit:
        return []  # nothing can be over the limit: no need to look inside any folder
    valid = [CheckpointInfo(path, step, None) for step, path in dirs if verify_known(path) is None]
    keep = {c.path.resolve() for c in valid[-limit:]} | {p.resolve() for p in protect}
    if valid:
        keep.add(valid[-1].path.resolve())
    removed: list[Path] = []
    # Damaged folders are left for the user to inspect; only intact ones count and rotate.
    for info in valid:
        if len(valid) - len(removed) <= limit:
            break
        if info.path.resolve() not in keep:
            shutil.rmtree(info.path)
            removed.append(info.path)
    return removed


def describe_available(output_dir: Path) -> str:
    infos = scan(output_dir)
    if not infos:
        return f"no checkpoints in {output_dir}"
    names = [c.path.name + ("" if c.valid else " (incomplete)") for c in infos]
    return f"checkpoints in {output_dir}: {', '.join(names)}"


def resolve(arg: str, output_dir: str | Path) -> tuple[Path, list[CheckpointInfo]]:
    """Turn ``--resume`` into a verified checkpoint folder.

    ``latest`` means the newest valid checkpoint under ``output_dir``; the second value is the
    list of newer folders that were skipped because they are not intact. Raises CheckpointError
    with the list of checkpoints that do exist when the path is missing or invalid.
    """
    out = Path(output_dir)
    if arg == C.RESUME_LATEST:
        # Newest first, stopping at the first intact one: older checkpoints need no hashing.
        skipped: list[CheckpointInfo] = []
        for step, path in reversed(_checkpoint_dirs(out)):
            problem = verify(path)
            if problem is None:
                return path, list(reversed(skipped))
            skipped.append(CheckpointInfo(path, step, problem))
        raise CheckpointError(
            f"--resume latest: no complete checkpoint in {out} "
            f"({describe_available(out)}); start a new run without --resume"
        )
    path = Path(arg)
    if not path.is_dir():
        where = path.parent if path.parent.is_dir() and path.parent != Path(".") else out
        valid = [c for c in scan(where) if c.valid]
        hint = f"; try --resume {valid[-1].path}" if valid else ""
        raise CheckpointError(
            f"checkpoint not found: {path}; {describe_available(where)}{hint} (or --resume latest)"
        )
    problem = verify(path)
    if problem is not None:
        others = [c for c in scan(path.parent) if c.valid and c.path.resolve() != path.resolve()]
        hint = f"; resume from {others[-1].path} instead" if others else ""
        raise CheckpointError(f"cannot resume: {problem}{hint}")
    return path, []


def dir_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def peek(path: str | Path) -> dict[str, Any]:
    """Best-effort view of a folder for listings: trainer state and manifest, unverified.

    Never raises; missing or unreadable parts are simply absent. Use ``load`` for anything
    that feeds training.
    """
    p = Path(path)
    view: dict[str, Any] = {}
    for key, name in (("state", C.TRAINER_STATE_FILE), ("manifest", C.MANIFEST_FILE)):
        try:
            view[key] = json.loads((p / name).read_text())
        except (OSError, ValueError):
            pass
    try:
        view["mtime"] = p.stat().st_mtime
        view["size"] = dir_size(p)
    except OSError:
        pass
    return view


def delete(path: Path) -> int:
    """Remove a checkpoint folder; return the bytes freed."""
    size = dir_size(path)
    shutil.rmtree(path)
    _fsync_dir(path.parent)
    return size
