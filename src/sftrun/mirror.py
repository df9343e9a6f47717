"""Checkpoint copies on other storage (``mirror_to``): uploaded after each commit, downloaded
to resume on a machine whose disk is gone.

Owns the remote layout ``<url>/checkpoint-<step>/<file>``, in which ``manifest.json`` is
uploaded last and deleted first, so that a remote folder without a manifest (an upload cut
short) is never taken as a checkpoint; the background uploader (one thread, retries, never
stops training); the mirror's rotation (it keeps what the local folder keeps, of this run);
listing and downloading remote checkpoints. Storage is reached only through ``fsspec``
(local paths built in, ``s3://`` through ``s3fs``); credentials and endpoints come from that
library's usual environment and config files, never from sftrun's config or its logs.
Downloaded bytes are verified by ``checkpoint.verify`` before anything uses them.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sftrun import checkpoint
from sftrun import constants as C
from sftrun.errors import CheckpointError

log = logging.getLogger("sftrun")

RETRIES = 3  # attempts per upload
BACKOFF_S = 1.0  # doubled after each failed attempt


def is_url(text: str) -> bool:
    return "://" in text


class Remote:
    """One mirror location (a URL or a local path that fsspec understands)."""

    def __init__(self, url: str) -> None:
        import fsspec

        self.url = url.rstrip("/")
        try:
            # A fresh client: endpoints and credentials are read from the environment now.
            self.fs, self.root = fsspec.core.url_to_fs(self.url, skip_instance_cache=True)
        except (ImportError, ValueError) as exc:
            raise CheckpointError(
                f"mirror {url}: {exc}; install the storage extra (pip install "
                "'sftrun[remote]') or check the URL"
            ) from None

    def _path(self, *parts: str) -> str:
        return "/".join([self.root.rstrip("/"), *parts])

    def where(self, name: str) -> str:
        return f"{self.url}/{name}"

    def names(self) -> list[str]:
        """``checkpoint-<step>`` folders on the mirror, oldest step first (complete or not)."""
        try:
            entries = self.fs.ls(self.root, detail=False)
        except FileNotFoundError:
            return []
        found = [str(e).rstrip("/").rsplit("/", 1)[-1] for e in entries]
        steps = [(int(m.group(1)), n) for n in found if (m := C.CHECKPOINT_RE.match(n))]
        return [n for _, n in sorted(steps)]

    def manifest(self, name: str) -> dict[str, Any] | None:
        """The remote folder's manifest, or None while it has none (an unfinished upload)."""
        try:
            raw = self.fs.cat_file(self._path(name, C.MANIFEST_FILE))
        except FileNotFoundError:
            return None
        try:
            data = json.loads(raw)
        except ValueError:
            return None
        return data if isinstance(data, dict) else None

    def owners(self) -> dict[str | None, list[Path]]:
        """Remote checkpoints by the run id of their manifest (as ``checkpoint.owners``)."""
        found: dict[str | None, list[Path]] = {}
        for name in self.names():
            manifest = self.manifest(name)
            run_id = manifest.get("run_id") if manifest else None
            found.setdefault(run_id, []).append(Path(name))
        return found

    def upload(self, folder: Path, run_id: str | None = None) -> None:
        """Copy one committed checkpoint: files first, the manifest last. Never replaces
        another run's copy."""
        base = self._path(folder.name)
        manifest = f"{base}/{C.MANIFEST_FILE}"
        existing = self.manifest(folder.name)
        if existing is not None and existing.get("run_id") not in (None, run_id):
            raise CheckpointError(
                f"{self.where(folder.name)} belongs to run {str(existing.get('run_id'))[:8]}; "
                "not replaced"
            )
        if self.fs.exists(manifest):
            self.fs.rm_file(manifest)  # a replaced folder is incomplete until the new one lands
        names = sorted(p.name for p in folder.iterdir() if p.name != C.MANIFEST_FILE)
        self.fs.makedirs(base, exist_ok=True)  # a local path needs the folder; S3 ignores it
        for name in names:
            self.fs.put_file(str(folder / name), f"{base}/{name}")
        self.fs.put_file(str(folder / C.MANIFEST_FILE), manifest)

    def remove(self, name: str) -> None:
        """Delete a remote checkpoint, manifest first (so a half-deleted one is incomplete)."""
        base = self._path(name)
        if self.fs.exists(f"{base}/{C.MANIFEST_FILE}"):
            self.fs.rm_file(f"{base}/{C.MANIFEST_FILE}")
        self.fs.rm(base, recursive=True)

    def download(self, name: str, out: Path) -> Path:
        """Fetch ``name`` into ``out/name`` through a temporary folder; verified before it is
        renamed into place. Raises CheckpointError naming what is wrong with the copy."""
        out.mkdir(parents=True, exist_ok=True)
        final = out / name
        if final.exists():
            raise CheckpointError(f"{final} already exists; resume from it, or move it away")
        tmp = out / f"{C.TMP_DOWNLOAD_PREFIX}{name}-{os.getpid()}"
        tmp.mkdir()
        try:
            listed = [str(p) for p in self.fs.ls(self._path(name), detail=False)]
            for remote in listed:
                file_name = remote.rstrip("/").rsplit("/", 1)[-1]
                if C.MANIFEST_FILE_NAME_RE.match(file_name) or file_name == C.MANIFEST_FILE:
                    self.fs.get_file(remote, str(tmp / file_name))
            problem = checkpoint.verify(tmp)
            if problem is not None:
                raise CheckpointError(
                    f"{self.where(name)}: {problem.split(': ', 1)[-1]} (the copy on the mirror)"
                )
            os.rename(tmp, final)
        finally:
            if tmp.is_dir() and not tmp.is_symlink():
                shutil.rmtree(tmp)  # made above by this call
        return final


def readable_owners(url: str) -> dict[str | None, list[Path]]:
    """``Remote(url).owners()``, with any storage failure as one CheckpointError line (a
    wrong URL, missing credentials, an endpoint that does not answer)."""
    try:
        return Remote(url).owners()
    except CheckpointError:
        raise
    except Exception as exc:  # noqa: BLE001 - storage libraries raise many kinds
        detail = str(exc).splitlines()[0] if str(exc) else ""
        raise CheckpointError(
            f"mirror_to {url} cannot be read ({type(exc).__name__}: {detail[:160]}); check the "
            "URL and the storage library's credentials/endpoint settings, or leave mirror_to out"
        ) from None


def fetch_newest(url: str, out: Path) -> tuple[Path | None, list[str]]:
    """Download the newest complete, intact checkpoint of the mirror into ``out``.

    Returns its local folder (None when the mirror has none) and one line for each newer
    remote folder that was skipped, with the reason.
    """
    remote = Remote(url)
    skipped = []
    for name in reversed(remote.names()):
        if remote.manifest(name) is None:
            skipped.append(f"{remote.where(name)}: no manifest (an upload that did not finish)")
            continue
        try:
            return remote.download(name, out), skipped
        except CheckpointError as exc:
            skipped.append(str(exc))
    return None, skipped


def fetch(url: str, out: Path) -> Path:
    """``--resume <url>/checkpoint-<step>``: download that one checkpoint into ``out``."""
    base, _, name = url.rstrip("/").rpartition("/")
    if not C.CHECKPOINT_RE.match(name):
        raise CheckpointError(
            f"--resume {url}: name a checkpoint-<step> folder on the mirror, or use "
            "--resume latest/auto with mirror_to set"
        )
    remote = Remote(base)
    if remote.manifest(name) is None:
        raise CheckpointError(f"{url} has no manifest (missing, or its upload did not finish)")
    return remote.download(name, out)


def verify_remote(url: str) -> str | None:
    """``ckpt verify <url>/checkpoint-<step>``: None if the copy is complete and intact."""
    import tempfile

    base, _, name = url.rstrip("/").rpartition("/")
    remote = Remote(base)
    if remote.manifest(name) is None:
        return f"{url}: no manifest (missing, or an upload that did not finish)"
    with tempfile.TemporaryDirectory(prefix="sftrun-verify-") as tmp:
        try:
            remote.download(name, Path(tmp))
        except CheckpointError as exc:
            return str(exc)
    return None


@dataclass
class Uploader:
    """Uploads committed checkpoints in one background thread; training never waits for it
    (until ``finish``). Failures are retried, logged and never raised."""

    remote: Remote
    run_id: str
    jobs: queue.Queue[tuple[Path, list[str]] | None] = field(default_factory=queue.Queue)
    uploaded: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def __post_init__(self) -> None:
        self.thread = threading.Thread(target=self._work, name="sftrun-mirror", daemon=True)
        self.thread.start()

    def submit(self, folder: Path, keep: list[str]) -> None:
        """Upload ``folder``, then remove this run's remote checkpoints not in ``keep``."""
        self.jobs.put((folder, keep))

    def _work(self) -> None:
        while (job := self.jobs.get()) is not None:
            folder, keep = job
            t0 = time.perf_counter()
            self._upload(folder)
            self._rotate(keep)
            self.seconds += time.perf_counter() - t0

    def _upload(self, folder: Path) -> None:
        delay = BACKOFF_S
        for attempt in range(1, RETRIES + 1):
            if not folder.is_dir():
                log.info("mirror: %s was removed locally before its upload; skipped", folder)
                return
            try:
                self.remote.upload(folder, self.run_id)
                self.uploaded.append(folder.name)
                log.info("mirror: uploaded %s", self.remote.where(folder.name))
                return
            except Exception as exc:  # noqa: BLE001 - storage errors of any library: retry
                log.warning(
                    "mirror: upload of %s failed (attempt %d of %d): %s",
                    folder.name,
                    attempt,
                    RETRIES,
                    f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}",
                )
                if attempt < RETRIES:
                    time.sleep(delay)
                    delay *= 2
        self.failed.append(folder.name)

    def _rotate(self, keep: list[str]) -> None:
        try:
            for name in self.remote.names():
                manifest = self.remote.manifest(name)
                # This run's copies the local folder no longer keeps, and uploads cut short
                # (no manifest: a folder rotated away locally while it was being uploaded).
                ours = manifest is None or manifest.get("run_id") == self.run_id
                if name not in keep and ours:
                    self.remote.remove(name)
                    log.info("mirror: removed %s", self.remote.where(name))
        except Exception as exc:  # noqa: BLE001 - a failed clean-up never stops training
            log.warning("mirror: rotation failed: %s", exc)

    def finish(self) -> str:
        """Wait for every queued upload; one line saying what the mirror holds."""
        self.jobs.put(None)
        self.thread.join()
        line = f"mirror {self.remote.url}: uploaded {', '.join(self.uploaded) or 'nothing'}"
        if self.failed:
            line += f"; FAILED {', '.join(self.failed)} (the local copies are intact)"
        return line
