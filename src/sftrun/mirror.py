"""Checkpoint copies on other storage (``mirror_to``): uploaded after each commit, downloaded
to resume on a machine whose disk is gone.

Owns the remote layout ``<url>/checkpoint-<step>/<file>``, in which ``manifest.json`` is
uploaded last and deleted first, so that a remote folder without a manifest (an upload cut
short) is never taken as a checkpoint; the background uploader (one thread, retries, never
stops training); the mirror's rotation (it keeps what the local folder keeps, of this run);
listing and downloading remote checkpoints.

A mirror belongs to one run, like its output folder: ``<url>/.sftrun-mirror.json`` names the
run id, written when the run first uses the mirror, and checked before every upload. A
mirror never overlaps the run's own folder (:func:`check_separate`). Nothing is deleted from a
mirror but this run's copies (its run id in their manifest) and uploads this process itself
began and did not finish. "uploaded" is logged only after the remote manifest was read back
and equals the local one. A remote manifest is read as a size-limited regular file: a FIFO or
a link to a device in its place is an incomplete copy, not a hang.

Storage is reached only through ``fsspec`` (local paths built in, ``s3://`` through ``s3fs``);
credentials and endpoints come from that library's usual environment and config files, never
from sftrun's config or its logs.
Downloaded bytes are verified by ``integrity.verify`` before anything uses them.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import shutil
import stat
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sftrun import checkpoint, integrity
from sftrun import constants as C
from sftrun.errors import CheckpointError, ConfigError
from sftrun.safefile import parse_json_object, read_small

log = logging.getLogger("sftrun")

RETRIES = 3  # attempts per upload
BACKOFF_S = 1.0  # doubled after each failed attempt


def is_url(text: str) -> bool:
    """True when a path names remote storage (``scheme://...``)."""
    return "://" in text


def local_path(url: str) -> Path | None:
    """The folder a mirror URL names on this machine's file system (None for object storage)."""
    if url.startswith("file://"):
        return Path(url[len("file://") :])
    return None if is_url(url) else Path(url)


def check_separate(mirror_to: str, output_dir: str | Path) -> None:
    """Refuse a mirror that is the run folder, inside it, or holds it (links resolved).

    Such a mirror's clean-up would delete the run's own checkpoints, and a lost disk would take
    both copies."""
    mine = local_path(mirror_to)
    if mine is None:
        return
    m, o = Path(os.path.realpath(mine)), Path(os.path.realpath(output_dir))
    if m == o:
        how = "is the same folder as"
    elif m.is_relative_to(o):
        how = "is inside"
    elif o.is_relative_to(m):
        how = "contains"
    else:
        return
    raise ConfigError(
        f"mirror_to {mirror_to} {how} output_dir {output_dir} (both resolve to {m} and {o}); "
        "the mirror is a second copy, so it must be a folder outside the run folder (another "
        "disk) or a bucket such as s3://bucket/run; set mirror_to to one, or leave it out"
    )


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

    @property
    def _local(self) -> bool:
        """This machine's file system: files are checked with the OS before they are read."""
        protocol = self.fs.protocol
        return bool({"file", "local"} & set((protocol,) if isinstance(protocol, str) else protocol))

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

    def _read_small(self, path: str, limit: int) -> bytes | None:
        """A small remote file's bytes; None when it is missing, not a regular file, or over
        ``limit`` (checked before reading, so a FIFO or /dev/zero cannot hang or fill memory)."""
        if self._local:
            return read_small(path, limit)
        try:
            info = self.fs.info(path)
        except FileNotFoundError:
            return None
        if info.get("type") != "file" or int(info.get("size") or 0) > limit:
            return None
        raw = self.fs.cat_file(path)
        return bytes(raw) if len(raw) <= limit else None

    def manifest_bytes(self, name: str) -> bytes | None:
        return self._read_small(self._path(name, C.MANIFEST_FILE), C.MAX_MANIFEST_BYTES)

    def manifest(self, name: str) -> dict[str, Any] | None:
        """The remote folder's manifest, or None while it has none (an unfinished upload)
        or it is not a small regular JSON file."""
        return parse_json_object(self.manifest_bytes(name))

    def owner(self) -> str | None:
        """The run id in the mirror's marker, or None when it has none."""
        raw = self._read_small(self._path(C.MIRROR_MARKER_FILE), C.MAX_MANIFEST_BYTES)
        run_id = (parse_json_object(raw) or {}).get("run_id")
        return run_id if isinstance(run_id, str) else None

    def claim(self, run_id: str) -> None:
        """Make this mirror run ``run_id``'s: write the marker if there is none; raise
        CheckpointError if it names another run (checked again after writing, so that of two
        runs starting at once on one mirror only one goes on believing it owns it)."""
        if self.owner() is None:
            marker = self._path(C.MIRROR_MARKER_FILE)
            self.fs.makedirs(self.root, exist_ok=True)
            self.fs.pipe_file(marker, (json.dumps({"run_id": run_id}) + "\n").encode())
        self.check_owner(run_id, missing_ok=False)

    def check_owner(self, run_id: str | None, missing_ok: bool = True) -> None:
        """Raise CheckpointError when the marker names a run other than ``run_id`` (or, without
        ``missing_ok``, when there is none)."""
        owner = self.owner()
        if owner != run_id and not (missing_ok and owner is None):
            raise CheckpointError(
                f"mirror_to {self.url} belongs to run {str(owner)[:8]} ({C.MIRROR_MARKER_FILE}); "
                "each run needs its own mirror: set mirror_to to a new folder or bucket prefix"
            )

    def owners(self) -> dict[str | None, list[Path]]:
        """Remote checkpoints by the run id of their manifest (as ``runfolder.owners``)."""
        found: dict[str | None, list[Path]] = {}
        for name in self.names():
            manifest = self.manifest(name)
            run_id = manifest.get("run_id") if manifest else None
            found.setdefault(run_id, []).append(Path(name))
        return found

    def upload(self, folder: Path, run_id: str) -> None:
        """Copy one committed checkpoint: files first, the manifest last, then read the manifest
        back. Never writes into another run's mirror or replaces another run's copy."""
        base = self._path(folder.name)
        manifest = f"{base}/{C.MANIFEST_FILE}"
        self.claim(run_id)
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
        if self.manifest_bytes(folder.name) != (folder / C.MANIFEST_FILE).read_bytes():
            raise CheckpointError(
                f"{self.where(folder.name)}: the manifest read back differs from the one "
                "uploaded (another writer on this mirror?)"
            )
        self.claim(run_id)  # still ours after the upload

    def _get_regular(self, remote: str, local: Path) -> None:
        """Download one file; anything that is not a regular file is refused, not read."""
        if self._local:
            if not stat.S_ISREG(os.lstat(remote).st_mode):
                raise CheckpointError(
                    f"{remote} is not a regular file (a link, FIFO or device); not downloaded"
                )
        self.fs.get_file(remote, str(local))

    def remove(self, name: str) -> None:
        """Delete a remote checkpoint, manifest first (so a half-deleted one is incomplete)."""
        base = self._path(name)
        if self.fs.exists(f"{base}/{C.MANIFEST_FILE}"):
            self.fs.rm_file(f"{base}/{C.MANIFEST_FILE}")
        self.fs.rm(base, recursive=True)

    def download(self, name: str, staging: Path) -> Path:
        """Fetch ``name`` into ``staging/name`` (``staging`` must exist) and verify it; the
        caller decides whether it goes into a run folder (:func:`commit`, :func:`discard`).
        Raises CheckpointError naming what is wrong with the copy."""
        final = staging / name
        if final.exists():
            raise CheckpointError(f"{final} already exists; resume from it, or move it away")
        tmp = staging / f"{C.TMP_DOWNLOAD_PREFIX}{name}-{os.getpid()}"
        tmp.mkdir()
        try:
            listed = [str(p) for p in self.fs.ls(self._path(name), detail=False)]
            for remote in listed:
                file_name = remote.rstrip("/").rsplit("/", 1)[-1]
                if C.MANIFEST_FILE_NAME_RE.match(file_name) or file_name == C.MANIFEST_FILE:
                    self._get_regular(remote, tmp / file_name)
            problem = integrity.verify(tmp)
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
    return _readable(url, lambda remote: remote.owners())


def check_owner(url: str, run_id: str | None) -> None:
    """:meth:`Remote.check_owner` (a mirror without a marker passes), with any storage
    failure as one CheckpointError line (as :func:`readable_owners`)."""
    _readable(url, lambda remote: remote.check_owner(run_id))


def _readable(url: str, read: Any) -> Any:
    try:
        return read(Remote(url))
    except CheckpointError:
        raise
    except Exception as exc:  # noqa: BLE001 - storage libraries raise many kinds
        detail = str(exc).splitlines()[0] if str(exc) else ""
        raise CheckpointError(
            f"mirror_to {url} cannot be read ({type(exc).__name__}: {detail[:160]}); check the "
            "URL and the storage library's credentials/endpoint settings, or leave mirror_to out"
        ) from None


def claim(url: str, run_id: str) -> None:
    """:meth:`Remote.claim`, with a storage failure as one CheckpointError line."""
    _readable(url, lambda remote: remote.claim(run_id))


def staging_folder(out: Path) -> Path:
    """A private folder for downloads, beside the run folder (same disk: the final rename is
    atomic) and not inside it, so that a refused resume leaves the run folder as it was."""
    parent = Path(os.path.abspath(out)).parent
    while not parent.is_dir() and parent != parent.parent:
        parent = parent.parent  # the nearest existing folder: nothing is created for it
    return Path(tempfile.mkdtemp(prefix=f"{C.TMP_DOWNLOAD_PREFIX}{out.name}-", dir=parent))


def discard(staging: Path | None) -> None:
    """Remove a folder made by :func:`staging_folder` and what it still holds."""
    if staging is not None and staging.is_dir() and not staging.is_symlink():
        shutil.rmtree(staging)


def commit(staged: Path, out: Path) -> Path:
    """Move a verified download from its staging folder into the run folder; return it."""
    out.mkdir(parents=True, exist_ok=True)
    final = out / staged.name
    if final.exists() or final.is_symlink():
        raise CheckpointError(f"{final} appeared while this run was starting; start it again")
    os.rename(staged, final)
    return final


def newest(
    url: str, staging: Path, above: int = -1, run_id: str | None = None
) -> tuple[Path | None, list[str]]:
    """Download the mirror's newest complete, intact checkpoint whose step is over ``above``
    (and of run ``run_id``, when given) into ``staging``. Returns it (None when there is none)
    and one line per newer remote folder skipped, with the reason."""
    remote = Remote(url)
    skipped = []
    for name in reversed(remote.names()):
        if checkpoint.step_of(Path(name)) <= above:
            break
        manifest = remote.manifest(name)
        if manifest is None:
            skipped.append(f"{remote.where(name)}: no manifest (an upload that did not finish)")
            continue
        if run_id is not None and manifest.get("run_id") != run_id:
            skipped.append(f"{remote.where(name)}: of run {str(manifest.get('run_id'))[:8]}")
            continue
        try:
            return remote.download(name, staging), skipped
        except CheckpointError as exc:
            skipped.append(str(exc))
    return None, skipped


def fetch(url: str, staging: Path) -> Path:
    """``--resume <url>/checkpoint-<step>``: download that one checkpoint into ``staging``."""
    base, _, name = url.rstrip("/").rpartition("/")
    if not C.CHECKPOINT_RE.match(name):
        raise CheckpointError(
            f"--resume {url}: name a checkpoint-<step> folder on the mirror, or use "
            "--resume latest/auto with mirror_to set"
        )
    remote = Remote(base)
    if remote.manifest(name) is None:
        raise CheckpointError(f"{url} has no manifest (missing, or its upload did not finish)")
    return remote.download(name, staging)


def verify_remote(url: str) -> str | None:
    """``ckpt verify <url>/checkpoint-<step>``: None if the copy is complete and intact."""
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
    started: set[str] = field(default_factory=set)  # uploads this process began
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
            self._rotate(keep, checkpoint.step_of(folder))
            self.seconds += time.perf_counter() - t0

    def _upload(self, folder: Path) -> None:
        delay = BACKOFF_S
        for attempt in range(1, RETRIES + 1):
            if not folder.is_dir():
                log.info("mirror: %s was removed locally before its upload; skipped", folder)
                return
            try:
                self.started.add(folder.name)
                self.remote.upload(folder, self.run_id)
                self.uploaded.append(folder.name)
                log.info("mirror: uploaded %s (manifest read back)", self.remote.where(folder.name))
                return
            except CheckpointError as exc:  # another run's mirror: retrying cannot help
                log.warning("mirror: upload of %s refused: %s", folder.name, exc)
                break
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

    def _rotate(self, keep: list[str], step: int) -> None:
        """Remove this run's copies the local folder no longer keeps, older than ``step``
        (a newer copy from before a resume is left), and uploads this process began that
        never got their manifest (a folder rotated away locally during its upload). A copy
        of another run, or a folder without a manifest that this process did not write (an
        HF Trainer checkpoint kept there), is never touched."""
        try:
            for name in self.remote.names():
                if name in keep:
                    continue
                manifest = self.remote.manifest(name)
                if manifest is None:
                    doomed = name in self.started and name not in self.uploaded
                else:
                    doomed = (
                        manifest.get("run_id") == self.run_id
                        and checkpoint.step_of(Path(name)) < step
                    )
                if doomed:
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
