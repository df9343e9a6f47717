"""Runs under schedulers and retry loops: ``--resume auto``, a finished run is success, and
one process at a time per output folder (the run lock)."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from tests.conftest import main_in, tiny_settings, write_config
from tests.runs import HELPERS, OUT, adapter, assert_same_tensors, entries, run_sftrun, train

from sftrun import constants as C
from sftrun import runfolder, runlock
from sftrun.cli import main
from sftrun.errors import FolderInUseError


def test_resume_auto_starts_fresh_then_a_finished_run_is_success(tiny_config, capsys) -> None:
    tiny_config(eval_file=None)
    code, out, _ = train(capsys, "--resume", "auto")
    assert code == 0 and "--resume auto: no checkpoint in checkpoints/sft_model" in out
    before = {p.name: p.stat().st_mtime_ns for p in OUT.iterdir()}
    for how in ("auto", "latest", str(OUT / "checkpoint-12")):
        code, out, _ = train(capsys, "--resume", how)
        assert code == 0
        assert "run complete at step 12 (checkpoint-12); nothing to train" in out
    assert {p.name: p.stat().st_mtime_ns for p in OUT.iterdir()} == before
    # Asking for more steps still trains.
    code, out, _ = train(capsys, "--resume", "auto", "max_steps=13")
    assert code == 0 and "done: step 13/13" in out


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_model: Path, sample_dir: Path) -> Path:
    cwd = tmp_path_factory.mktemp("ops-ref")
    write_config(cwd / "config.yaml", tiny_settings(tiny_model, sample_dir, eval_file=None))
    return main_in(cwd, ["train", "-y", "--config", "config.yaml"]) / OUT


@pytest.mark.slow
def test_a_retry_loop_with_sigkills_finishes_from_nothing_bit_exactly(
    reference: Path, tmp_path: Path, tiny_model: Path, sample_dir: Path
) -> None:
    """`until train --resume auto; do :; done` with SIGKILLs at random instants, one of them
    right after the final commit: it ends with exit 0 and the uninterrupted run's adapter."""
    write_config(tmp_path / "config.yaml", tiny_settings(tiny_model, sample_dir, eval_file=None))
    rng = random.Random(13)
    cmd = [sys.executable, str(HELPERS / "chaos.py"), "train", "-y", "--config", "config.yaml"]
    cmd += ["--resume", "auto"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "SFTRUN_TEST_SLOW_SAVE": "0.05"}
    codes = []
    for attempt in range(20):
        extra = {"SFTRUN_TEST_KILL_AFTER_STEP": "12"} if attempt == 2 else {}
        proc = subprocess.Popen(
            cmd, cwd=tmp_path, env={**env, **extra}, stdout=subprocess.PIPE, text=True
        )
        try:
            if attempt < 5 and attempt != 2:
                time.sleep(rng.uniform(2.0, 5.0))  # start-up is ~2 s: kill during the steps
                proc.send_signal(signal.SIGKILL)
            out, _ = proc.communicate(timeout=180)
        finally:
            proc.kill()
        codes.append(proc.returncode)
        if proc.returncode == 0:
            break
    assert codes[-1] == 0 and -signal.SIGKILL in codes, codes
    assert all(info.valid for info in runfolder.scan(tmp_path / OUT))
    assert_same_tensors(
        adapter(reference / "checkpoint-12"), adapter(tmp_path / OUT / "checkpoint-12")
    )
    assert "run complete at step 12" in out or "done: step 12/12" in out


@pytest.mark.slow
def test_a_second_run_on_the_same_folder_is_refused_naming_the_first(
    reference: Path, tmp_path: Path, tiny_model: Path, sample_dir: Path
) -> None:
    write_config(tmp_path / "config.yaml", tiny_settings(tiny_model, sample_dir, eval_file=None))
    first = subprocess.Popen(
        [sys.executable, str(HELPERS / "chaos.py"), "train", "-y", "--config", "config.yaml"],
        cwd=tmp_path,
        # Slow saves keep the first run holding the lock while the second one starts, also
        # when the machine is busy with other tests (make test runs two at a time).
        env={**os.environ, "HF_HUB_OFFLINE": "1", "SFTRUN_TEST_SLOW_SAVE": "1.0"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        info = tmp_path / OUT / C.LOCK_INFO_FILE
        deadline = time.monotonic() + 60
        while not info.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert info.exists(), "the first run never took the lock"
        # prune locks only a folder that holds checkpoints: wait for the first one (a process
        # forked from the tests' warm parent starts before a cold one would have)
        while not runfolder.names(tmp_path / OUT) and time.monotonic() < deadline:
            time.sleep(0.1)
        second = run_sftrun(
            ["train", "-y", "--config", "config.yaml", "--resume", "auto"], tmp_path
        )
        assert second.returncode == FolderInUseError.exit_code
        assert f"checkpoints/sft_model is in use by pid {first.pid} on " in second.stderr
        assert "chaos.py train -y --config config.yaml" in second.stderr
        pruned = run_sftrun(["ckpt", "prune", str(OUT), "--keep", "1"], tmp_path)
        assert pruned.returncode == FolderInUseError.exit_code
        out, err = first.communicate(timeout=180)
    finally:
        first.kill()
    assert first.returncode == 0, err
    assert entries(tmp_path / OUT) == [
        "checkpoint-12",
        "checkpoint-3",
        "checkpoint-6",
        "checkpoint-9",
    ]
    assert_same_tensors(
        adapter(reference / "checkpoint-12"), adapter(tmp_path / OUT / "checkpoint-12")
    )
    assert not info.exists()  # released: the info file goes with the lock


def test_a_lock_left_by_a_dead_process_is_taken_over(tiny_config, workdir: Path, capsys) -> None:
    tiny_config(eval_file=None, max_steps=3)
    OUT.mkdir(parents=True)
    dead = {"pid": 999999, "host": "gone", "started": "2026-01-01T00:00:00", "command": "old"}
    (OUT / C.LOCK_INFO_FILE).write_text(json.dumps(dead))
    code, out, _ = train(capsys)
    assert code == 0
    assert "took over the lock of pid 999999 on gone, started 2026-01-01T00:00:00 (old)" in out


def test_prune_refuses_while_the_folder_is_locked(tiny_config, workdir: Path, capsys) -> None:
    tiny_config(eval_file=None)
    assert train(capsys)[0] == 0
    lock = runlock.acquire(workdir / OUT, "a training run")
    try:
        code = main(["ckpt", "prune", str(OUT), "--keep", "1"])
        err = capsys.readouterr().err
        assert code == FolderInUseError.exit_code
        assert "is in use by pid" in err and "(a training run)" in err
        assert len(entries(OUT)) == 4
    finally:
        lock.release()
    assert main(["ckpt", "prune", str(OUT), "--keep", "1"]) == 0
    assert entries(OUT) == ["checkpoint-12"]


def test_without_a_terminal_progress_is_a_periodic_line_in_console_and_log(
    tiny_config, workdir: Path, capsys
) -> None:
    tiny_config(eval_file=None)
    assert main(["train", "-y", "--config", "config.yaml"]) == 0
    out = capsys.readouterr().out
    first = [line for line in out.splitlines() if line.startswith("progress: step 1/12 (8%)")]
    assert len(first) == 1 and "tok_s" in first[0] and "; ETA 0:" in first[0]
    assert "progress: step 12/12 (100%)" in out
    log = next((workdir / "outputs/logs").glob("sft_trainer_*.log")).read_text()
    assert "progress: step 1/12 (8%)" in log and "progress: step 12/12 (100%)" in log
