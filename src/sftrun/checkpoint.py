"""Checkpoint files: the commit that writes them and the load that reads them back.

Owns the folder layout (see ``constants``), serialising a payload, the atomic commit and the
verified load. ``integrity`` says whether a folder is intact without trusting anything in it;
``runfolder`` lists, chooses, rotates and moves the checkpoints of a run folder. Never decides
*whether* a resume is allowed (that is ``resume``), nor what the files mean (``snapshot``).

Commit protocol (a crash at any instant leaves every earlier checkpoint intact):
  1. serialise each file in memory, write it into ``.tmp-checkpoint-<step>-<pid>/`` and fsync
     (a writer thread writes and hashes one file while the next is serialised);
  2. write ``manifest.json`` last (format version, step, identity, library versions, size
     and sha256 of every file) and fsync it and the temporary folder;
  3. rename the temporary folder to ``checkpoint-<step>`` (atomic) and fsync the parent.
A folder is a checkpoint only if its manifest is present and every file matches it.
Everything is loaded without unpickling objects: safetensors, JSON, and
``torch.load(weights_only=True)`` on bytes whose sha256 was checked first.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
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

from sftrun import constants as C
from sftrun import fs
from sftrun.errors import CheckpointError, DiskSpaceError, DivergenceError
from sftrun.integrity import (
    parse_adapter,
    parse_trainer_state,
    read_manifest,
    read_verified,
    remember_intact,
)

# Called after each file is written during a save (tests use it to crash mid-save).
SaveHook = Callable[[str], None]


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


def checkpoint_path(output_dir: str | Path, step: int) -> Path:
    """The folder of step ``step``'s checkpoint under ``output_dir``."""
    return Path(output_dir) / f"{C.CHECKPOINT_PREFIX}{step}"


def step_of(path: Path) -> int:
    """The step in a ``checkpoint-<step>`` folder's name (-1 for any other name)."""
    match = C.CHECKPOINT_RE.match(path.name)
    return int(match.group(1)) if match else -1


def library_versions() -> dict[str, str]:
    """The versions of the libraries a checkpoint depends on, for its manifest."""
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


def fsync_dir(path: Path) -> None:
    """Flush a folder's entries (a rename or removal in it) to disk."""
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
        fsync_dir(tmp)
        if final.exists():
            # Only reachable when re-saving a step that already has a checkpoint; keep it.
            move_aside(out, [final])
        os.rename(tmp, final)
        fsync_dir(out)
        remember_intact(final)
    except OSError as exc:
        if made:
            fs.ops().rmtree(tmp, ignore_errors=True)
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
        raw[name] = read_verified(p, name, files[name])
    adapter = parse_adapter(p, raw[C.ADAPTER_WEIGHTS_FILE])
    trainer_state = parse_trainer_state(p, raw[C.TRAINER_STATE_FILE], manifest["step"])
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


def is_real_dir(path: Path) -> bool:
    """True for a directory itself, False for a link to one, a file or nothing."""
    try:
        return stat.S_ISDIR(os.lstat(path).st_mode)
    except OSError:
        return False


def temp_folders(output_dir: str | Path) -> list[Path]:
    """Unfinished saves: real folders named ``.tmp-checkpoint-<step>-<pid>``."""
    out = Path(output_dir)
    if not out.is_dir():
        return []
    return sorted(p for p in out.iterdir() if C.TMP_CHECKPOINT_RE.match(p.name) and is_real_dir(p))


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
    if not is_real_dir(path):
        raise CheckpointError(f"refusing to delete {path}: it is not a real folder")
    fs.ops().rmtree(path)


def remove_temp_folders(output_dir: str | Path, only: list[Path] | None = None) -> list[Path]:
    """Delete leftovers of saves that never committed; return what was removed.

    Only folders that hold nothing but files a save writes; anything else is left alone.
    """
    out = Path(output_dir)
    removed = []
    for p in temp_folders(out) if only is None else only:
        if is_real_dir(p) and _only_checkpoint_files(p):
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
    fsync_dir(out)
    return dest
