"""Crash safety under fire: SIGKILL a real training process at 20+ random instants.

Each attempt resumes with ``--resume latest``; saves are slowed down so that many kills land
in the middle of a checkpoint write. After every kill, every ``checkpoint-*`` folder must
verify (a crash never leaves a half-written checkpoint under that name), and the run that is
finally allowed to finish must be bit-identical to one that was never interrupted.
"""

from __future__ import annotations

import random
import signal
import time
from pathlib import Path

import pytest
from tests.conftest import tiny_settings, write_config
from tests.runs import (
    WarmProcess,
    adapter,
    assert_same_tensors,
    run_sftrun,
    spawn_sftrun,
    step_records,
    trainer_state,
)

from sftrun import checkpoint, runfolder

STEPS = 100
KILLS = 22


def _first_step_logged(cwd: Path, since: set[Path], proc: WarmProcess) -> bool:
    """Wait until this attempt's log file shows a training step (or the process ended)."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        for log in set((cwd / "outputs/logs").glob("*.log")) - since:
            if " step " in f" {log.read_text()}" and "loss" in log.read_text():
                return True
        time.sleep(0.01)
    return False


@pytest.mark.slow
def test_random_sigkills_never_lose_the_run(tmp_path: Path, tiny_model: Path, sample_dir: Path):
    settings = tiny_settings(
        tiny_model, sample_dir, max_steps=STEPS, save_steps=1, eval_steps=0, eval_file=None
    )
    ref_dir, cwd = tmp_path / "reference", tmp_path / "chaos"
    ref_dir.mkdir()
    cwd.mkdir()
    cfg = write_config(tmp_path / "config.yaml", settings)
    assert run_sftrun(["train", "-y", "--config", str(cfg)], ref_dir).returncode == 0

    rnd = random.Random(20261128)
    out = cwd / "checkpoints/sft_model"
    env = {"SFTRUN_TEST_SLOW_SAVE": "0.02"}
    kills = during_save = 0
    while kills < KILLS:
        resume = ["--resume", "latest"] if runfolder.scan(out) else []
        logs_before = set((cwd / "outputs/logs").glob("*.log"))
        # A real process (forked from the tests' warm parent: no import time to wait for).
        proc = spawn_sftrun(["train", "-y", "--config", str(cfg), *resume], cwd, env, "chaos.py")
        started = _first_step_logged(cwd, logs_before, proc)
        assert started, proc.wait() is not None and proc.output()[1]
        time.sleep(rnd.uniform(0.0, 0.6))
        if proc.poll() is not None:
            break  # finished before the kill: fine, but then too few kills (asserted below)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        kills += 1
        during_save += bool(checkpoint.temp_folders(out))
        infos = runfolder.scan(out)
        assert infos, "a kill after the first step must leave at least one checkpoint"
        assert all(info.valid for info in infos), [i.problem for i in infos if not i.valid]

    assert kills == KILLS, f"the run finished after only {kills} kills"
    assert during_save >= 3, f"only {during_save} kills landed inside a save"
    final = run_sftrun(["train", "-y", "--config", str(cfg), "--resume", "latest"], cwd)
    assert final.returncode == 0, final.stderr
    ours = out / f"checkpoint-{STEPS}"
    ref = ref_dir / f"checkpoints/sft_model/checkpoint-{STEPS}"
    assert step_records(trainer_state(ours)["log_history"]) == step_records(
        trainer_state(ref)["log_history"]
    )
    assert_same_tensors(adapter(ours), adapter(ref))
