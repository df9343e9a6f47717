"""Precision: float16 with a loss scaler whose state is checkpointed (torch's GradScaler runs
on the CPU), bfloat16 autocast on the CPU when asked or where the CPU has it natively (and a
resume keeping the checkpoint's on any machine), and the summary naming what is used."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tests.conftest import tiny_settings, write_config
from tests.runs import adapter, assert_same_tensors, run_sftrun, step_records, trainer_state

from sftrun.cli import main
from sftrun.hooks import RunHooks
from sftrun.loss import LabelOnlyLoss

OUT = Path("checkpoints/sft_model")


def _scaler(ckpt: Path) -> dict:
    return torch.load(ckpt / "scheduler.pt", weights_only=True)["scaler"]


@pytest.mark.slow
def test_float16_resumes_bit_exactly_with_its_loss_scale(
    tiny_model: Path, sample_dir: Path, tmp_path: Path
) -> None:
    settings = tiny_settings(tiny_model, sample_dir, eval_file=None, max_steps=6, dtype="float16")
    ref, cwd = tmp_path / "ref", tmp_path / "killed"
    for folder in (ref, cwd):
        folder.mkdir()
        write_config(folder / "config.yaml", settings)
    train = ["train", "-y", "--config", "config.yaml"]
    first = run_sftrun(train, ref)
    assert first.returncode == 0, first.stderr[-2000:]
    assert "float16 (autocast, loss scaling)" in first.stdout
    killed = run_sftrun(train, cwd, {"SFTRUN_TEST_KILL_AFTER_STEP": "3"}, "chaos.py")
    assert killed.returncode == -9
    assert _scaler(cwd / OUT / "checkpoint-3")["_growth_tracker"] == 3
    resumed = run_sftrun([*train, "--resume", "latest"], cwd)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    a, b = ref / OUT / "checkpoint-6", cwd / OUT / "checkpoint-6"
    assert_same_tensors(adapter(a), adapter(b))
    assert _scaler(a) == _scaler(b) and _scaler(b)["_growth_tracker"] == 6


class _OverflowOnce(LabelOnlyLoss):
    """The label-only loss, times 1e34 in the first step: finite, but the scaled fp16
    gradients overflow, as a real fp16 run's occasionally do."""

    calls = 0

    def forward(self, input_ids, attention_mask, labels):
        loss_sum, count = super().forward(input_ids, attention_mask, labels)
        if self.training:
            type(self).calls += 1
        return (loss_sum * 1e34 if self.training and type(self).calls <= 2 else loss_sum), count


def test_a_float16_overflow_skips_the_update_and_lowers_the_scale(
    tiny_config, workdir: Path, capsys
) -> None:
    tiny_config(eval_file=None, max_steps=2, dtype="float16", save_steps=1)
    hooks = RunHooks(make_loss=_OverflowOnce)
    assert main(["train", "-y", "--config", "config.yaml"], hooks=hooks) == 0
    out = capsys.readouterr()
    assert "step 1: fp16 gradients overflowed; update skipped, loss scale now 32768" in out.out
    first = adapter(OUT / "checkpoint-1")
    assert all(torch.count_nonzero(t) == 0 for k, t in first.items() if "lora_B" in k)
    assert _scaler(OUT / "checkpoint-2")["scale"] == 32768.0
    history = trainer_state(OUT / "checkpoint-2")["log_history"]
    assert history[0]["grad_norm"] is None and history[1]["grad_norm"] > 0


def test_a_float16_checkpoint_without_scaler_state_is_refused(tiny_config, capsys) -> None:
    from sftrun import checkpoint

    tiny_config(eval_file=None, max_steps=2, save_steps=1)
    assert main(["train", "-y", "--config", "config.yaml", "dtype=float16"]) == 0
    payload, _ = checkpoint.load(OUT / "checkpoint-1")
    del payload.scheduler_state["scaler"]  # as a checkpoint written without one would be
    checkpoint.save("other", 1, payload)
    args = ["--resume", "other/checkpoint-1", "dtype=float16", "output_dir=other", "max_steps=3"]
    before = {p: p.read_bytes() for p in Path("other").rglob("*") if p.is_file()}
    boards = sorted(Path("outputs/3_training/runs").iterdir())
    assert main(["train", "-y", "--config", "config.yaml", *args]) == 4
    err = capsys.readouterr().err
    assert "scheduler.pt has no loss-scaler state, which a float16 run needs" in err
    # Refused while planning: the folder and the dashboards are as they were.
    assert {p: p.read_bytes() for p in Path("other").rglob("*") if p.is_file()} == before
    assert sorted(Path("outputs/3_training/runs").iterdir()) == boards


def test_bfloat16_autocast_runs_on_the_cpu_when_asked(tiny_config, workdir: Path) -> None:
    tiny_config(eval_file=None, max_steps=1)
    # A process of its own: accelerate keeps one precision per process.
    proc = run_sftrun(["train", "-y", "--config", "config.yaml", "dtype=bfloat16"], workdir)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "bfloat16 (autocast); LoRA weights float32" in proc.stdout


def _manifest_dtype(ckpt: Path) -> str:
    return json.loads((ckpt / "manifest.json").read_text())["identity"]["dtype"]


@pytest.mark.slow
def test_auto_is_bf16_where_the_cpu_has_it_and_a_resume_on_another_cpu_keeps_it(
    tiny_config, workdir: Path
) -> None:
    """Each process answers as the CPU the test names (the helper's SFTRUN_TEST_CPU_BF16):
    a run started where bf16 is native trains in bf16 autocast, a kill and a resume on a CPU
    without it keeps bf16 (slower, never refused) and ends bit-identical to the run that was
    never interrupted; a new run on that CPU is fp32."""
    tiny_config(eval_file=None, max_steps=4, save_steps=1)
    native, other = {"SFTRUN_TEST_CPU_BF16": "1"}, {"SFTRUN_TEST_CPU_BF16": "0"}
    args = ["train", "-y", "--config", "config.yaml"]
    ref = run_sftrun([*args, "output_dir=ref"], workdir, env=native, script="chaos.py")
    assert ref.returncode == 0, ref.stderr[-2000:]
    assert "bfloat16 (autocast) [auto: the CPU computes bf16 natively" in ref.stdout
    killed = run_sftrun(
        args, workdir, env={**native, "SFTRUN_TEST_KILL_AFTER_STEP": "2"}, script="chaos.py"
    )
    assert killed.returncode == -9
    resumed = run_sftrun([*args, "--resume", "latest"], workdir, env=other, script="chaos.py")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "bfloat16 (autocast) [auto, kept from the checkpoint]" in resumed.stdout
    assert _manifest_dtype(OUT / "checkpoint-4") == "bfloat16"
    assert_same_tensors(adapter(OUT / "checkpoint-4"), adapter(Path("ref/checkpoint-4")))
    ours, theirs = (
        trainer_state(p)["log_history"] for p in (OUT / "checkpoint-4", Path("ref/checkpoint-4"))
    )
    assert step_records(ours) == step_records(theirs) and len(step_records(ours)) == 4
    fresh = run_sftrun(
        [*args, "output_dir=fresh", "max_steps=1"], workdir, env=other, script="chaos.py"
    )
    assert fresh.returncode == 0, fresh.stderr[-2000:]
    assert "float32 [auto: the CPU has no native bf16" in fresh.stdout
    assert _manifest_dtype(Path("fresh/checkpoint-1")) == "float32"
