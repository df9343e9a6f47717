"""Resume equivalence: a run killed with SIGKILL after checkpoint k and resumed is bit-exact.

Every later step's loss, LR and grad norm, every eval loss, and the final adapter tensors
must equal those of the run that was never interrupted (CPU, fp32, fixed seeds).
The tiny config has 24 examples, global batch 4 = 2 micro x 2 accumulation, 6 steps per
epoch, 12 steps, LoRA dropout 0.1.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from tests.conftest import tiny_settings, write_config
from tests.runs import (
    adapter,
    assert_same_tensors,
    eval_records,
    run_sftrun,
    step_records,
    trainer_state,
)

FINAL = 12


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path, sample_dir: Path) -> Path:
    """The uninterrupted run's final checkpoint."""
    cwd = tmp_path_factory.mktemp("reference")
    cfg = write_config(cwd / "config.yaml", tiny_settings(tiny_model, sample_dir))
    proc = run_sftrun(["train", "-y", "--config", str(cfg)], cwd)
    assert proc.returncode == 0, proc.stderr
    return cwd / "checkpoints/sft_model" / f"checkpoint-{FINAL}"


@pytest.mark.slow
@pytest.mark.parametrize(
    ("k", "resume_arg"),
    [(3, "path"), (6, "latest")],
    ids=["mid-epoch", "epoch-boundary"],
)
def test_sigkill_then_resume_matches_uninterrupted_run(
    k: int, resume_arg: str, reference: Path, tmp_path: Path, tiny_model: Path, sample_dir: Path
) -> None:
    cfg = write_config(tmp_path / "config.yaml", tiny_settings(tiny_model, sample_dir))
    killed = run_sftrun(
        ["train", "-y", "--config", str(cfg)],
        tmp_path,
        env={"SFTRUN_TEST_KILL_AFTER_STEP": str(k)},
        script="chaos.py",
    )
    assert killed.returncode == -9, killed.stderr
    out = tmp_path / "checkpoints/sft_model"
    assert sorted(p.name for p in out.glob("checkpoint-*")) == sorted(
        f"checkpoint-{s}" for s in range(3, k + 1, 3)
    )

    target = str(out / f"checkpoint-{k}") if resume_arg == "path" else "latest"
    resumed = run_sftrun(["train", "-y", "--resume", target, "--config", str(cfg)], tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    final = out / f"checkpoint-{FINAL}"

    ref_hist = trainer_state(reference)["log_history"]
    new_hist = trainer_state(final)["log_history"]
    assert len(step_records(ref_hist, after=k)) == FINAL - k
    assert step_records(new_hist, after=k) == step_records(ref_hist, after=k)
    assert eval_records(new_hist, after=k) == eval_records(ref_hist, after=k)
    assert_same_tensors(adapter(final), adapter(reference))
    assert trainer_state(final)["resumed_from"] == [k]
