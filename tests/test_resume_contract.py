"""The resume contract: what must match, what may change and how, signals, confirmation."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tests.conftest import tiny_settings, write_config
from tests.runs import (
    adapter,
    assert_same_tensors,
    entries,
    run_sftrun,
    step_records,
    trainer_state,
)

from sftrun import integrity
from sftrun.cli import main
from sftrun.hooks import RunHooks
from sftrun.schedule import build_schedule

OUT = Path("checkpoints/sft_model")


def train(*args: str) -> int:
    return main(["train", "-y", "--config", "config.yaml", *args])


@pytest.fixture
def run_to_6(tiny_config) -> Path:
    """A run stopped at step 6 of 12 (checkpoints 3 and 6), as if interrupted."""
    tiny_config()
    assert train() == 0
    for step in (9, 12):  # as if the run had died after step 6
        shutil.rmtree(OUT / f"checkpoint-{step}")
    return OUT / "checkpoint-6"


def test_identity_change_is_refused_naming_every_setting(
    run_to_6: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = train(
        "--resume",
        str(run_to_6),
        "max_seq_length=128",
        "lora.r=8",
        "seed=3",
        "per_device_train_batch_size=4",
    )
    err = capsys.readouterr().err
    assert code == 4 and err.count("\n") == 1
    assert err.startswith("error: the model is not compatible with the checkpoint: ")
    for part in (
        "max_seq_length: 160 -> 128",
        "lora.r: 4 -> 8",
        "seed: 11 -> 3",
        "global batch size (micro-batch x accumulation x processes): "
        "4 (2 x 2 x 1) -> 8 (4 x 2 x 1)",
    ):
        assert part in err
    # max_seq_length is a rendering setting: named once, not also as changed data.
    assert "training data" not in err
    assert integrity.verify(run_to_6) is None


@pytest.mark.parametrize(
    ("override", "named"),
    [
        ("dtype=bfloat16", "dtype: 'float32' -> 'bfloat16'"),
        ("lora.target_modules=[q_proj]", "lora.target_modules: ['q_proj', 'v_proj'] -> ['q_proj']"),
        ("lora.alpha=16", "lora.alpha: 8 -> 16"),
        ("lora.dropout=0.2", "lora.dropout: 0.1 -> 0.2"),
        ("overlong=drop", "overlong: 'truncate' -> 'drop'"),
        ("train_on=all", "train_on: 'assistant' -> 'all'"),
    ],
)
def test_each_other_identity_setting_is_checked(
    run_to_6: Path, capsys: pytest.CaptureFixture[str], override: str, named: str
) -> None:
    assert train("--resume", str(run_to_6), override) == 4
    assert named in capsys.readouterr().err


def test_changed_chat_template_is_refused(
    run_to_6: Path, tiny_model: Path, workdir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    other = workdir / "retemplated"
    shutil.copytree(tiny_model, other)
    config = json.loads((other / "tokenizer_config.json").read_text())
    template_file = other / "chat_template.jinja"
    if template_file.exists():
        template_file.write_text(template_file.read_text().replace("<|im_start|>", "<|im_start|> "))
    else:
        config["chat_template"] = config["chat_template"].replace("<|im_start|>", "<|im_start|> ")
        (other / "tokenizer_config.json").write_text(json.dumps(config))
    assert train("--resume", str(run_to_6), f"model_name_or_path={other}") == 4
    err = capsys.readouterr().err
    assert "tokenizer or chat template: " in err


def test_changed_base_model_is_refused(
    run_to_6: Path, tiny_model: Path, workdir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import safetensors.torch

    other = workdir / "other-model"
    shutil.copytree(tiny_model, other)
    weights = safetensors.torch.load_file(other / "model.safetensors")
    first = sorted(weights)[0]
    weights[first] = weights[first] + 1
    safetensors.torch.save_file(weights, other / "model.safetensors", metadata={"format": "pt"})
    assert train("--resume", str(run_to_6), f"model_name_or_path={other}") == 4
    err = capsys.readouterr().err
    assert "base_model: " in err and "base model weights: " in err


def test_changed_data_is_refused_unless_allowed(
    run_to_6: Path, workdir: Path, sample_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    changed = workdir / "train.jsonl"
    lines = (sample_dir / "train.jsonl").read_text().splitlines()
    changed.write_text("\n".join(reversed(lines)) + "\n")
    assert train("--resume", str(run_to_6), f"train_file={changed}") == 4
    err = capsys.readouterr().err
    assert "training data (content or rendering settings)" in err
    assert "pass --allow-data-change" in err
    assert "train_file" not in err.split("compatible with the checkpoint:")[1].split(";")[0]
    assert train("--resume", str(run_to_6), f"train_file={changed}", "--allow-data-change") == 0
    assert "training data changed since the checkpoint; accepted" in capsys.readouterr().out


def test_new_learning_rate_takes_effect_at_the_resume_step(
    run_to_6: Path, tiny_settings_dict, capsys: pytest.CaptureFixture[str]
) -> None:
    old = build_schedule("cosine", 5e-3, 12, 2, 0)
    assert train("--resume", str(run_to_6), "learning_rate=2.5e-3") == 0
    out = capsys.readouterr().out
    assert "override learning_rate: 0.005 -> 0.0025" in out
    assert f"LR at step 6: {old.lr(6):.3g} -> {old.lr(6) / 2:.3g}" in out
    records = step_records(trainer_state(OUT / "checkpoint-12")["log_history"], after=6)
    for step, rec in records.items():
        assert rec["learning_rate"] == pytest.approx(old.lr(step - 1) / 2)


def test_more_epochs_retarget_the_decay_without_a_jump(
    run_to_6: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    old = build_schedule("cosine", 5e-3, 12, 2, 0)
    assert train("--resume", str(run_to_6), "num_train_epochs=3") == 0
    out = capsys.readouterr().out
    assert "override num_train_epochs: 2.0 -> 3.0" in out
    assert "decay now ends at step 18" in out
    state = trainer_state(OUT / "checkpoint-18")
    assert state["global_step"] == 18 and state["epoch"] == 3.0
    lrs = {s: r["learning_rate"] for s, r in step_records(state["log_history"]).items()}
    assert lrs[7] == pytest.approx(old.lr(6))  # the first resumed step: no jump
    assert lrs[18] < lrs[12] < lrs[7] and lrs[7] <= lrs[6]


def test_same_global_batch_split_differently_resumes_at_the_same_position(tiny_config) -> None:
    # Without LoRA dropout the only difference a new split makes is the float summation
    # order; with dropout the random masks are drawn per micro-batch and differ too.
    tiny_config(lora={"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]})
    assert train() == 0
    reference = trainer_state(OUT / "checkpoint-12")
    ref_adapter = adapter(OUT / "checkpoint-12")
    assert (
        train(
            "--resume",
            str(OUT / "checkpoint-6"),
            "per_device_train_batch_size=1",
            "gradient_accumulation_steps=4",
        )
        == 0
    )
    split = trainer_state(OUT / "checkpoint-12")
    assert split["samples_seen"] == reference["samples_seen"] == 48
    ref_steps = step_records(reference["log_history"], after=6)
    for step, rec in step_records(split["log_history"], after=6).items():
        assert rec["loss"] == pytest.approx(ref_steps[step]["loss"], rel=1e-5)
    for key, tensor in adapter(OUT / "checkpoint-12").items():
        assert tensor.allclose(ref_adapter[key], atol=1e-6), key


def test_resume_from_an_older_checkpoint_moves_newer_ones_aside(
    tiny_config, capsys: pytest.CaptureFixture[str]
) -> None:
    tiny_config()
    assert train() == 0
    assert train("--resume", str(OUT / "checkpoint-6"), "num_train_epochs=3") == 0
    out = capsys.readouterr().out
    assert "checkpoint-9, checkpoint-12 are newer than the resume step" in out
    aside = sorted(p.name for p in OUT.glob("superseded-*/*"))
    assert aside == ["checkpoint-12", "checkpoint-9"]
    assert all(integrity.verify(p) is None for p in OUT.glob("superseded-*/*"))


def test_a_finished_run_is_success_and_a_shorter_one_an_error(
    tiny_config, capsys: pytest.CaptureFixture[str]
) -> None:
    tiny_config()
    assert train() == 0
    capsys.readouterr()
    assert train("--resume", "latest") == 0
    assert "run complete at step 12 (checkpoint-12); nothing to train" in capsys.readouterr().out
    assert train("--resume", "latest", "max_steps=6") == 4
    err = capsys.readouterr().err
    assert "the checkpoint is at step 12 but the configured run ends at step 6" in err


@pytest.mark.slow
@pytest.mark.parametrize(
    ("signals", "code", "final"),
    [("SIGTERM", 128 + signal.SIGTERM, 5), ("SIGINT", 128 + signal.SIGINT, 5)],
)
def test_signal_finishes_the_step_saves_and_resumes_exactly(
    tmp_path: Path, tiny_model: Path, sample_dir: Path, signals: str, code: int, final: int
) -> None:
    cfg = write_config(tmp_path / "config.yaml", tiny_settings(tiny_model, sample_dir))
    stopped = run_sftrun(
        ["train", "-y", "--config", str(cfg)],
        tmp_path,
        env={"SFTRUN_TEST_SIGNAL_AT_STEP": f"4:{signals}"},
        script="chaos.py",
    )
    assert stopped.returncode == code, stopped.stderr
    out = tmp_path / OUT
    assert entries(out) == ["checkpoint-3", f"checkpoint-{final}"]
    printed = [line for line in stopped.stdout.splitlines() if "resume with: " in line]
    assert len(printed) == 1
    command = printed[0].split("resume with: ", 1)[1]
    assert command.startswith(f"cd {tmp_path} && {sys.executable} -m sftrun train ")
    assert f"--resume {OUT}/checkpoint-5 -y --config {cfg}" in command
    # The printed command works as printed, from another folder.
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    resumed = subprocess.run(["bash", "-c", command], cwd="/", env=env, capture_output=True)
    assert resumed.returncode == 0, resumed.stderr
    ref_dir = tmp_path / "ref"
    ref_dir.mkdir()
    assert run_sftrun(["train", "-y", "--config", str(cfg)], ref_dir).returncode == 0
    ref = ref_dir / OUT / "checkpoint-12"
    assert step_records(
        trainer_state(out / "checkpoint-12")["log_history"], after=final
    ) == step_records(trainer_state(ref)["log_history"], after=final)
    assert_same_tensors(adapter(out / "checkpoint-12"), adapter(ref))


@pytest.mark.slow
def test_second_sigint_aborts_at_once(tmp_path: Path, tiny_model: Path, sample_dir: Path) -> None:
    cfg = write_config(tmp_path / "config.yaml", tiny_settings(tiny_model, sample_dir))
    proc = run_sftrun(
        ["train", "-y", "--config", str(cfg)],
        tmp_path,
        env={"SFTRUN_TEST_SIGNAL_AT_STEP": "4:SIGINT,SIGINT"},
        script="chaos.py",
    )
    assert proc.returncode == 130
    assert "aborted: the last committed checkpoint is intact" in proc.stderr
    out = tmp_path / OUT
    assert entries(out) == ["checkpoint-3"]
    assert integrity.verify(out / "checkpoint-3") is None


def test_without_a_terminal_and_without_yes_it_exits_instead_of_hanging(
    tmp_path: Path, tiny_model: Path, sample_dir: Path
) -> None:
    cfg = write_config(tmp_path / "config.yaml", tiny_settings(tiny_model, sample_dir))
    proc = run_sftrun(["train", "--config", str(cfg)], tmp_path)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1] == (
        "error: training waits for confirmation but there is no terminal to ask on; "
        "pass -y to start without asking"
    )
    assert not (tmp_path / OUT).exists()


def test_declining_the_prompt_changes_nothing(tiny_config, monkeypatch) -> None:
    tiny_config()
    monkeypatch.setattr("sys.stdin.isatty", lambda: True)
    monkeypatch.setattr("builtins.input", lambda prompt: "n")
    assert main(["train", "--config", "config.yaml"]) == 1
    assert not OUT.exists()


def test_log_file_and_tensorboard_steps_continue_after_resume(run_to_6: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    runs = sorted(Path("outputs/3_training/runs").iterdir())
    before = EventAccumulator(str(runs[0]))
    before.Reload()
    assert [e.step for e in before.Scalars("train/loss")] == list(range(1, 13))
    assert train("--resume", str(run_to_6)) == 0
    # The same TensorBoard run continues; what the first run drew after step 6 is purged,
    # so every step shows once (without the purge, 7-12 would show twice).
    assert sorted(Path("outputs/3_training/runs").iterdir()) == runs
    acc = EventAccumulator(str(runs[0]))
    acc.Reload()
    loss = acc.Scalars("train/loss")
    assert [e.step for e in loss] == list(range(1, 13))
    history = json.loads((OUT / "checkpoint-12" / "trainer_state.json").read_text())
    resumed = {e["step"]: e["loss"] for e in history["log_history"] if "loss" in e}
    assert all(abs(e.value - resumed[e.step]) < 1e-6 for e in loss)
    logs = sorted(Path("outputs/logs").glob("sft_trainer_*.log"))
    assert len(logs) == 2
    text = logs[1].read_text()
    assert "restored from checkpoints/sft_model/checkpoint-6: adapter" in text
    assert "resolved config: {" in text and "step 12/12 epoch 2.00 loss" in text


@pytest.fixture
def tiny_settings_dict(tiny_model: Path, sample_dir: Path) -> dict:
    return tiny_settings(tiny_model, sample_dir)


def test_trainer_state_is_plain_json(run_to_6: Path) -> None:
    state = json.loads((run_to_6 / "trainer_state.json").read_text())
    assert state["global_step"] == 6 and state["max_steps"] == 12


def test_out_of_memory_says_how_to_resume(
    tiny_config, monkeypatch, capsys: pytest.CaptureFixture[str]
) -> None:
    tiny_config()
    calls = {"n": 0}

    def on_batch(batch: dict) -> None:
        calls["n"] += 1
        if calls["n"] > 8:  # 2 micro-batches per step: fail in step 5
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    hooks = RunHooks(on_batch=on_batch)
    assert main(["train", "-y", "--config", "config.yaml"], hooks=hooks) == 1
    err = capsys.readouterr().err
    assert err == (
        "error: out of GPU memory at step 5 with micro-batch 2, accumulation 2, max_seq_length "
        "160; resume with per_device_train_batch_size=1 gradient_accumulation_steps=4 (same "
        "global batch 4, so `--resume latest` continues at the exact data position); the last "
        "committed checkpoint is intact\n"
    )
    assert integrity.verify(OUT / "checkpoint-3") is None


def test_best_checkpoint_is_tracked_and_survives_rotation(tiny_config, monkeypatch) -> None:
    tiny_config(save_total_limit=1, eval_steps=3, metric_for_best_model="eval_loss")
    losses = iter([0.5, 0.2, 0.9, 0.7])  # step 6 is the best
    hooks = RunHooks(on_eval=lambda step, value: next(losses))
    assert main(["train", "-y", "--config", "config.yaml"], hooks=hooks) == 0
    assert entries(OUT) == ["checkpoint-12", "checkpoint-6"]
    state = trainer_state(OUT / "checkpoint-12")
    assert state["best_metric"] == 0.2 and state["best_step"] == 6
    assert state["best_model_checkpoint"] == str(OUT / "checkpoint-6")


def test_the_resume_decision_is_one_pure_function(run: Path, workdir: Path) -> None:
    """``resumeplan.decide`` reads nothing: given the checkpoint's snapshot, the request and
    the facts, it decides the same with the run folder and the data gone, and says how each
    changed setting applies (overrides, a longer LR curve, the restored state)."""
    from sftrun import snapshot
    from sftrun.config import load_config
    from sftrun.resumeplan import Facts, Request, decide
    from sftrun.sampler import total_steps

    data = workdir / "train.jsonl"
    shutil.copy(load_config("config.yaml", []).train_file, data)
    cfg = load_config("config.yaml", [f"train_file={data}", "num_train_epochs=3"])
    cfg = cfg.model_copy(update={"learning_rate": 1e-3})
    saved = snapshot.load(OUT / "checkpoint-6")
    planned = total_steps(24, 4, 3, -1)
    request = Request(
        cfg=cfg,
        identity=saved.identity,
        world=1,
        n_train=24,
        global_batch=4,
        planned=planned,
        schedule=build_schedule(cfg.lr_scheduler_type, 1e-3, planned, 2, 0.0),
        dtype="float32",
        ckpt_path=OUT / "checkpoint-6",
        length_set=True,
        auto=False,
        allow_data_change=False,
    )
    facts = Facts(same_content=False, folder_run_ids=())
    first = decide(saved, request, facts)
    shutil.rmtree(OUT)
    data.unlink()
    again = decide(saved, request, facts)
    assert repr(first) == repr(again)
    assert first.planned == 18 and not first.complete and not first.blocking
    assert first.state.global_step == 6 and first.state.resumed_from == [6]
    assert {k for k, _, _ in first.overrides} == {"num_train_epochs", "learning_rate"}
    assert first.lr_plan is not None and first.schedule.total_steps == 18
    assert "override learning_rate: 0.005 -> 0.001" in first.notes
