"""Helpers to run sftrun in a subprocess and read what a run left behind."""

from __future__ import annotations

import atexit
import hashlib
import json
import os
import select
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest
import safetensors.torch
import torch

HELPERS = Path(__file__).resolve().parent / "helpers"
OUT = Path("checkpoints/sft_model")  # the default output_dir, relative to a test's workdir


def run_sftrun(
    args: list[str],
    cwd: Path,
    env: dict[str, str] | None = None,
    script: str | None = None,
    timeout: float = 300,
    cold: bool = False,
) -> subprocess.CompletedProcess[str]:
    """``python -m sftrun ARGS`` (or a helper script) in ``cwd``, in its own process; output
    captured. The process is forked from a warm parent (``helpers/zygote.py``) unless
    ``cold`` (a fresh interpreter, for what import time or the process's memory decides) or
    ``SFTRUN_TEST_COLD=1``."""
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
    cmd = [sys.executable, str(HELPERS / script)] if script else [sys.executable, "-m", "sftrun"]
    if not cold and os.environ.get("SFTRUN_TEST_COLD") != "1":
        return _zygote().run(cmd, args, Path(cwd), full_env, script, timeout)
    return subprocess.run(
        cmd + args, cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout
    )


class Zygote:
    """The client of ``helpers/zygote.py``: one server per test process, started on first use."""

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="sftrun-zygote-"))
        self.socket = self.dir / "socket"
        env = {**os.environ, "HF_HUB_OFFLINE": "1"}
        self.server = subprocess.Popen(
            [sys.executable, str(HELPERS / "zygote.py"), str(self.socket)],
            env=env,
            stdin=subprocess.DEVNULL,
        )
        atexit.register(self.close)
        self.count = 0

    def close(self) -> None:
        self.server.kill()
        self.server.wait()
        shutil.rmtree(self.dir, ignore_errors=True)

    def spawn(
        self, args: list[str], cwd: Path, env: dict[str, str], script: str | None
    ) -> WarmProcess:
        """Start ``python -m sftrun ARGS`` (or a helper script) as a forked job; returns
        once its pid is known."""
        deadline = time.monotonic() + 120
        while not self.socket.exists():  # the server binds once its imports are done
            if self.server.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the test zygote did not start (exit {self.server.poll()})")
            time.sleep(0.05)
        self.count += 1
        out, err = (self.dir / f"{self.count}.{name}" for name in ("out", "err"))
        request = {
            "argv": args,
            "cwd": str(Path(cwd).resolve()),
            "env": env,
            "script": str(HELPERS / script) if script else None,
            "stdout": str(out),
            "stderr": str(err),
        }
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        conn.connect(str(self.socket))
        conn.sendall(json.dumps(request).encode() + b"\n")
        return WarmProcess(conn, out, err)

    def run(
        self,
        cmd: list[str],
        args: list[str],
        cwd: Path,
        env: dict[str, str],
        script: str | None,
        timeout: float,
    ) -> subprocess.CompletedProcess[str]:
        proc = self.spawn(args, cwd, env, script)
        code = proc.wait(timeout)
        if code is None:
            proc.send_signal(signal.SIGKILL)
            raise subprocess.TimeoutExpired(cmd + args, timeout)
        return subprocess.CompletedProcess(cmd + args, code, *proc.output())


class WarmProcess:
    """A job the zygote forked: its pid, signals, and its exit status (negative: a signal)."""

    def __init__(self, conn: socket.socket, out: Path, err: Path) -> None:
        self.conn, self.out, self.err = conn, out, err
        self.buffer = b""
        self.pid = int(json.loads(self._line(None) or b"{}")["pid"])
        self.returncode: int | None = None

    def _line(self, timeout: float | None) -> bytes | None:
        """The server's next line; None if none arrived within ``timeout`` (None: wait)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while b"\n" not in self.buffer:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not select.select([self.conn], [], [], left)[0]:
                return None
            chunk = self.conn.recv(4096)
            if not chunk:
                raise RuntimeError("the test zygote closed the connection")
            self.buffer += chunk
        line, self.buffer = self.buffer.split(b"\n", 1)
        return line

    def send_signal(self, sig: int) -> None:
        if self.returncode is None:
            os.kill(self.pid, sig)

    def poll(self) -> int | None:
        return self.wait(0) if self.returncode is None else self.returncode

    def wait(self, timeout: float | None = None) -> int | None:
        """The exit status; with ``timeout``, None if the job is still running then."""
        if self.returncode is None:
            line = self._line(timeout)
            if line is None:
                return None
            self.returncode = int(json.loads(line)["status"])
            self.conn.close()
        return self.returncode

    def output(self) -> tuple[str, str]:
        """The job's stdout and stderr (after it ended); the files are removed."""
        texts = (self.out.read_text(), self.err.read_text())
        self.out.unlink()
        self.err.unlink()
        return texts


_server: Zygote | None = None


def spawn_sftrun(
    args: list[str], cwd: Path, env: dict[str, str] | None = None, script: str | None = None
) -> WarmProcess:
    """``python -m sftrun ARGS`` (or a helper script) started in ``cwd`` without waiting: a
    job forked from the warm parent, to be signalled, polled and waited on."""
    return _zygote().spawn(args, cwd, {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}, script)


def _zygote() -> Zygote:
    global _server
    if _server is None:
        _server = Zygote()
    return _server


def trainer_state(ckpt: Path) -> dict[str, Any]:
    return json.loads((ckpt / "trainer_state.json").read_text())


def adapter(ckpt: Path) -> dict[str, torch.Tensor]:
    return safetensors.torch.load_file(ckpt / "adapter_model.safetensors")


def step_records(history: list[dict[str, Any]], after: int = 0) -> dict[int, dict[str, Any]]:
    """Per-step train records (loss, LR, grad norm) with step > after, keyed by step."""
    keys = ("loss", "learning_rate", "grad_norm", "epoch")
    return {
        h["step"]: {k: h[k] for k in keys} for h in history if "loss" in h and h["step"] > after
    }


def eval_records(history: list[dict[str, Any]], after: int = 0) -> dict[int, float]:
    return {h["step"]: h["eval_loss"] for h in history if "eval_loss" in h and h["step"] > after}


def assert_same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), f"{key} differs"


def entries(folder: Path) -> list[str]:
    """The names in a run folder, sorted, without the run lock's own files."""
    return sorted(p.name for p in folder.iterdir() if not p.name.startswith(".sftrun.lock"))


def tree(root: Path) -> dict[str, Any]:
    """Every entry below ``root`` (links not followed): type plus content hash or target."""
    found: dict[str, Any] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            rel = str(path.relative_to(root))
            st = os.lstat(path)
            if stat.S_ISLNK(st.st_mode):
                found[rel] = ("link", os.readlink(path))
            elif stat.S_ISREG(st.st_mode):
                found[rel] = ("file", hashlib.sha256(path.read_bytes()).hexdigest())
            elif stat.S_ISDIR(st.st_mode):
                found[rel] = ("dir",)
            else:
                found[rel] = ("other", stat.S_IFMT(st.st_mode))
    return found


def changed(before: dict[str, Any], after: dict[str, Any], ignore: tuple[str, ...] = ()) -> set:
    """Paths added, removed or modified, except those under an ``ignore`` prefix."""
    keys = {k for k in before.keys() | after.keys() if before.get(k) != after.get(k)}
    return {k for k in keys if not k.startswith(ignore)}


def cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """Run the CLI in-process; its exit code, stdout and stderr."""
    from sftrun.cli import main

    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def train(capsys: pytest.CaptureFixture[str], *args: str, config: str = "config.yaml"):
    """``sftrun train -y --config CONFIG ARGS`` in this process: (exit code, stdout, stderr)."""
    return cli(capsys, "train", "-y", "--config", config, *args)


def one_line_error(err: str) -> str:
    assert err.startswith("error: ") and err.count("\n") == 1, err
    return err


def rewrite_state(ckpt: Path, edit) -> None:
    """Edit a checkpoint's trainer_state.json and keep its manifest entry true (a lie that
    verification cannot catch, for the checks behind it)."""
    state = trainer_state(ckpt)
    edit(state)
    data = json.dumps(state).encode()
    (ckpt / "trainer_state.json").write_bytes(data)
    rewrite_manifest(
        ckpt, lambda m: m["files"].update({"trainer_state.json": manifest_entry(data)})
    )


def rewrite_manifest(ckpt: Path, edit) -> None:
    """Edit a checkpoint's manifest.json in place."""
    manifest = json.loads((ckpt / "manifest.json").read_text())
    edit(manifest)
    (ckpt / "manifest.json").write_text(json.dumps(manifest))


def manifest_entry(data: bytes) -> dict[str, Any]:
    """The manifest's entry for a file holding ``data``."""
    return {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
