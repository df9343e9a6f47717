"""``oom: adapt``: an out-of-memory error inside a step halves the micro-batch, doubles the
accumulation and redoes the same step, so the run stays the same run (same samples, same
global batch, same optimizer state).

The error is injected through the hooks seam (``on_batch`` raises ``torch.OutOfMemoryError``
for a micro-batch over a given number of rows), as a GPU would raise it from the allocator;
bench/gpu_check.py runs the real thing on a GPU.
"""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from tests.conftest import tiny_settings, write_config
from tests.runs import (
    OUT,
    adapter,
    assert_same_tensors,
    one_line_error,
    rewrite_state,
    run_sftrun,
    step_records,
    trainer_state,
)

from sftrun import integrity
from sftrun.cli import main
from sftrun.errors import ConfigError
from sftrun.hooks import RunHooks
from sftrun.oom import halved_split
from sftrun.plan import _check_parallel

STEPS = 6


def oom_hooks(rows: int, from_step: int, nth: int | None = None, seen: list | None = None):
    """Hooks that raise like an allocator at a micro-batch of more than ``rows`` rows from
    step ``from_step`` on (only at the ``nth`` micro-batch of a step, if given). ``seen``
    collects (step, sample ids) of every step and then (step, rows) of every micro-batch."""
    at = {"step": 0, "micro": 0}

    def on_samples(step: int, ids: list[int]) -> None:
        at["step"], at["micro"] = step + 1, 0
        if seen is not None:
            seen.append((step + 1, tuple(ids)))

    def on_batch(batch: dict[str, torch.Tensor]) -> None:
        at["micro"] += 1
        if seen is not None:
            seen.append((at["step"], len(batch["input_ids"])))
        big = len(batch["input_ids"]) > rows and at["step"] >= from_step
        if big and (nth is None or at["micro"] == nth):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    return RunHooks(on_samples=on_samples, on_batch=on_batch)


def train_in(folder: Path, settings: dict, hooks: RunHooks | None = None, *extra: str) -> int:
    folder.mkdir(parents=True, exist_ok=True)
    write_config(folder / "config.yaml", settings)
    old = os.getcwd()
    os.chdir(folder)
    try:
        return main(["train", "-y", "--config", "config.yaml", *extra], hooks=hooks)
    finally:
        os.chdir(old)


@pytest.fixture
def settings(tiny_model: Path, sample_dir: Path):
    def make(**overrides):
        base = {"max_steps": STEPS, "save_steps": 2, "eval_file": None, "oom": "adapt"}
        return tiny_settings(tiny_model, sample_dir, **{**base, **overrides})

    return make


@pytest.mark.parametrize(
    ("split", "smaller"),
    [((4, 2), (2, 4)), ((2, 2), (1, 4)), ((3, 2), (1, 6)), ((6, 1), (3, 2)), ((5, 1), (1, 5))],
)
def test_the_smaller_split_keeps_the_examples_per_step(split, smaller) -> None:
    assert halved_split(*split) == smaller
    assert smaller[0] * smaller[1] == split[0] * split[1]


def test_a_micro_batch_of_one_cannot_be_halved() -> None:
    assert halved_split(1, 8) is None


def test_a_step_is_redone_from_its_start_with_half_the_micro_batch(
    settings, tmp_path: Path
) -> None:
    """The error at the first micro-batch of step 3, or at its second (after one backward
    has added gradients and dropout has drawn masks): the same run either way, on the same
    samples as a run that never ran out of memory."""
    clean: list = []
    assert train_in(tmp_path / "clean", settings(), oom_hooks(99, 99, seen=clean)) == 0
    runs = {}
    for nth in (1, 2):
        seen: list = []
        folder = tmp_path / f"nth{nth}"
        assert train_in(folder, settings(), oom_hooks(1, 3, nth=nth, seen=seen)) == 0
        runs[nth] = folder / OUT
        # every step trained on the clean run's samples
        samples = [x for x in seen if isinstance(x[1], tuple)]
        assert samples == [x for x in clean if isinstance(x[1], tuple)]
        # step 3: the failed attempt's nth micro-batch of 2 rows, then four of 1 row
        rows = {s: [r for t, r in seen if t == s and isinstance(r, int)] for s in (2, 3, 4)}
        assert rows == {2: [2, 2], 3: [2] * nth + [1, 1, 1, 1], 4: [1, 1, 1, 1]}
    assert_same_tensors(
        adapter(runs[1] / f"checkpoint-{STEPS}"), adapter(runs[2] / f"checkpoint-{STEPS}")
    )
    for nth in (1, 2):
        state = trainer_state(runs[nth] / f"checkpoint-{STEPS}")
        assert state["adapted_split"] == {"configured": [2, 2], "adapted": [1, 4], "step": 3}
        assert state["global_step"] == STEPS and state["samples_seen"] == STEPS * 4
        assert state["global_batch_size"] == 4 and state["gradient_accumulation_steps"] == 4
        before = trainer_state(runs[nth] / "checkpoint-2")
        assert before["adapted_split"] is None and before["train_batch_size"] == 2
        (log,) = (runs[nth].parent.parent / "outputs/logs").glob("sft_trainer_*.log")
        assert (
            "step 3: out of memory with micro-batch 2 x accumulation 2; redoing the step with "
            "micro-batch 1 x accumulation 4"
        ) in log.read_text()


def test_after_adapting_the_run_matches_one_with_the_smaller_split_from_the_start(
    settings, tmp_path: Path
) -> None:
    """Steps 1-2 ran as 2 x 2 and the rest as 1 x 4; the reference ran 1 x 4 throughout. With
    LoRA dropout 0 the only difference is the order in which fp32 sums were added (tolerance
    in docs/resume.md)."""
    same = {"lora": {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]}}
    assert train_in(tmp_path / "a", settings(**same), oom_hooks(1, 3)) == 0
    small = settings(**same, per_device_train_batch_size=1, gradient_accumulation_steps=4)
    assert train_in(tmp_path / "b", small) == 0
    a, b = (tmp_path / n / OUT / f"checkpoint-{STEPS}" for n in "ab")
    got, want = (step_records(trainer_state(c)["log_history"]) for c in (a, b))
    assert got.keys() == want.keys() == set(range(1, STEPS + 1))
    for step in got:
        assert got[step]["loss"] == pytest.approx(want[step]["loss"], rel=1e-5)
        assert got[step]["learning_rate"] == want[step]["learning_rate"]
    for key, value in adapter(a).items():
        assert torch.allclose(value, adapter(b)[key], rtol=0, atol=1e-6), key


def test_at_a_micro_batch_of_one_it_stops_with_the_fix(settings, tmp_path: Path, capsys) -> None:
    one = settings(per_device_train_batch_size=1, gradient_accumulation_steps=4)
    assert train_in(tmp_path, one, oom_hooks(0, 3)) == 1
    err = one_line_error(capsys.readouterr().err)
    assert "out of GPU memory at step 3 with micro-batch 1, accumulation 4" in err
    assert "lower max_seq_length or use a smaller model" in err
    assert integrity.verify(tmp_path / OUT / "checkpoint-2") is None


def test_auto_stops_on_the_cpu(settings, tmp_path: Path, capsys) -> None:
    """On the CPU, ``auto`` keeps today's behaviour: stop, name the split to resume with."""
    assert train_in(tmp_path, settings(oom="auto"), oom_hooks(1, 3)) == 1
    err = one_line_error(capsys.readouterr().err)
    assert "resume with per_device_train_batch_size=1 gradient_accumulation_steps=4" in err
    assert [p.name for p in (tmp_path / OUT).glob("checkpoint-*")] == ["checkpoint-2"]


def test_adapt_is_refused_with_several_processes(settings) -> None:
    from sftrun.config import TrainingConfig

    plan = SimpleNamespace(
        cfg=TrainingConfig(**settings()),
        world=2,
        sharded=False,
        backend=SimpleNamespace(name="plain"),
    )
    with pytest.raises(ConfigError, match="oom: adapt redoes a step in one process"):
        _check_parallel(plan, None, preview=False)  # type: ignore[arg-type]


def test_a_split_that_changes_the_batch_is_a_lie_the_resume_refuses(
    settings, tmp_path: Path, capsys
) -> None:
    assert train_in(tmp_path, settings(max_steps=4), oom_hooks(1, 3)) == 0
    ckpt = tmp_path / OUT / "checkpoint-4"
    rewrite_state(
        ckpt,
        lambda s: s.update(adapted_split={"configured": [2, 2], "adapted": [1, 3], "step": 3}),
    )
    assert (
        train_in(tmp_path, settings(max_steps=6), None, "--resume", str(OUT / "checkpoint-4")) == 4
    )
    err = one_line_error(capsys.readouterr().err)
    assert "adapted_split" in err and "checkpoint-4" in err


@pytest.mark.slow
def test_sigkill_after_adapting_then_resume_is_exact(
    tmp_path: Path, tiny_model: Path, sample_dir: Path
) -> None:
    """Killed after checkpoint-4 (the split adapted at step 3), resumed by a process that never
    runs out of memory: it keeps the adapted split (the config still says 2 x 2) and ends
    bit-identical to the uninterrupted adapted run."""
    settings = tiny_settings(
        tiny_model, sample_dir, max_steps=STEPS, save_steps=2, eval_file=None, oom="adapt"
    )
    env = {"SFTRUN_TEST_OOM": "1:3"}
    ends = {}
    for name, kill in (("whole", None), ("killed", "4")):
        cwd = tmp_path / name
        cwd.mkdir()
        cfg = write_config(cwd / "config.yaml", settings)
        run_env = {**env, **({"SFTRUN_TEST_KILL_AFTER_STEP": kill} if kill else {})}
        proc = run_sftrun(["train", "-y", "--config", str(cfg)], cwd, run_env, "chaos.py")
        assert proc.returncode == (-9 if kill else 0), proc.stderr
        ends[name] = cwd / OUT / f"checkpoint-{STEPS}"
    resumed = run_sftrun(
        ["train", "-y", "--resume", "latest", "--config", "config.yaml"], tmp_path / "killed"
    )
    assert resumed.returncode == 0, resumed.stderr
    assert "kept micro-batch 1 x accumulation 4, which this run adapted to" in resumed.stdout
    assert_same_tensors(adapter(ends["killed"]), adapter(ends["whole"]))
    whole, again = (trainer_state(ends[n]) for n in ("whole", "killed"))
    assert step_records(again["log_history"], 4) == step_records(whole["log_history"], 4)
    assert again["adapted_split"] == whole["adapted_split"]
