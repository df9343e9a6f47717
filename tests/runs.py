"""Helpers to run sftrun in a subprocess and read what a run left behind."""

from __future__ import annotations

import hashlib
import json
import os
import stat
import subprocess
import sys
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
) -> subprocess.CompletedProcess[str]:
    """``python -m sftrun ARGS`` (or a helper script) in ``cwd``; output captured."""
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
    cmd = [sys.executable, str(HELPERS / script)] if script else [sys.executable, "-m", "sftrun"]
    return subprocess.run(
        cmd + args, cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout
    )


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
