"""Retry loops and the README's commands in the order a user types them.

``until python run_model_training.py --resume auto -y; do sleep 10; done`` must end: no exit
code may make it spin, whatever was done to the run before (a "train longer" resume, a
shorter config). A command that trains nothing keeps its log out of the way of ``tail -f``.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from tests.runs import OUT, adapter, assert_same_tensors, changed, train, trainer_state, tree


def top_logs(workdir: Path) -> set[Path]:
    return set((workdir / "outputs/logs").glob("sft_trainer_*.log"))


def test_after_train_longer_the_retry_loop_with_the_old_config_ends(
    run: Path, workdir: Path, capsys
) -> None:
    assert train(capsys, "--resume", "latest", "num_train_epochs=3")[0] == 0  # to step 18
    before, logs = tree(workdir), top_logs(workdir)
    code, out, _ = train(capsys, "--resume", "auto")  # the config still says 2 epochs
    assert code == 0
    assert "run complete at step 18 (checkpoint-18); nothing to train" in out
    assert changed(before, tree(workdir), ignore=("outputs/logs/not_trained",)) == set()
    assert top_logs(workdir) == logs  # the newest log is still the run that trained


def test_an_interrupted_train_longer_is_finished_by_the_retry_loop_bit_exactly(
    run: Path, workdir: Path, capsys
) -> None:
    assert train(capsys, "--resume", "latest", "num_train_epochs=3")[0] == 0
    final = adapter(OUT / "checkpoint-18")
    shutil.rmtree(OUT / "checkpoint-18")  # as if killed after checkpoint-15
    code, out, _ = train(capsys, "--resume", "auto")
    assert code == 0
    assert "the config plans 12 steps; this run was planned to step 18" in out
    assert trainer_state(OUT / "checkpoint-18")["global_step"] == 18
    assert_same_tensors(adapter(OUT / "checkpoint-18"), final)


def test_the_readme_workflow_in_its_order(run: Path, workdir: Path, capsys) -> None:
    # "train longer", stopped early; then "continue at a lower LR" with the same config file.
    assert train(capsys, "--resume", "latest", "num_train_epochs=3")[0] == 0
    shutil.rmtree(OUT / "checkpoint-18")
    code, out, _ = train(capsys, "--resume", "latest", "learning_rate=1.0e-3")
    assert code == 0, out
    state = trainer_state(OUT / "checkpoint-18")
    assert state["global_step"] == 18
    assert "override learning_rate: 0.005 -> 0.001" in out


def test_resume_auto_past_a_shorter_explicit_end_is_complete_not_an_error(
    run: Path, workdir: Path, capsys
) -> None:
    before = tree(workdir)
    code, out, _ = train(capsys, "--resume", "auto", "max_steps=6")
    assert code == 0
    assert "run complete at step 12 (checkpoint-12); nothing to train" in out
    assert changed(before, tree(workdir), ignore=("outputs/logs/not_trained",)) == set()
    # --resume latest is a person at a terminal: the same request is an error naming the fix.
    code, _, err = train(capsys, "--resume", "latest", "max_steps=6")
    assert code == 4 and "raise num_train_epochs or max_steps" in err


def test_a_refused_start_keeps_its_log_apart(run: Path, workdir: Path, capsys) -> None:
    logs = top_logs(workdir)
    code, _, err = train(capsys)  # a new run into a folder that holds one: refused
    assert code == 4 and "already holds checkpoints" in err
    assert top_logs(workdir) == logs
    kept = list((workdir / "outputs/logs/not_trained").glob("sft_trainer_*.log"))
    assert len(kept) == 1 and "already holds checkpoints" in kept[0].read_text()
