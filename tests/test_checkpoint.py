"""Checkpoint format: the file set, the manifest, verification, resolution and safety."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import pickle
import re
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from tests.conftest import main_in, tiny_settings, write_config
from tests.runs import entries

from sftrun import checkpoint, fs, integrity, runfolder
from sftrun import constants as C
from sftrun.cli import main
from sftrun.errors import CheckpointError, DiskSpaceError
from sftrun.hooks import RunHooks

CKPT_FILES = {
    "adapter_model.safetensors",
    "adapter_config.json",
    "optimizer.pt",
    "scheduler.pt",
    "trainer_state.json",
    "training_args.bin",
    "rng_state.pth",
    "manifest.json",
}


@pytest.fixture(scope="module")
def finished_run(
    tmp_path_factory: pytest.TempPathFactory, tiny_model: Path, sample_dir: Path
) -> Path:
    """A finished tiny run (checkpoints 3, 6, 9, 12); tests copy it before changing it."""
    cwd = tmp_path_factory.mktemp("finished")
    cfg = write_config(cwd / "config.yaml", tiny_settings(tiny_model, sample_dir))
    return main_in(cwd, ["train", "-y", "--config", str(cfg)])


@pytest.fixture
def run_copy(finished_run: Path, copy_into_workdir) -> Path:
    """A private copy of the finished run's folder, as the current directory."""
    return copy_into_workdir(finished_run) / "checkpoints/sft_model"


def test_checkpoint_holds_exactly_the_documented_files(run_copy: Path) -> None:
    assert entries(run_copy) == [
        "checkpoint-12",
        "checkpoint-3",
        "checkpoint-6",
        "checkpoint-9",
    ]
    ckpt = run_copy / "checkpoint-6"
    assert {p.name for p in ckpt.iterdir()} == CKPT_FILES
    manifest = json.loads((ckpt / "manifest.json").read_text())
    assert manifest["format_version"] == C.CHECKPOINT_FORMAT_VERSION and manifest["step"] == 6
    for name, entry in manifest["files"].items():
        data = (ckpt / name).read_bytes()
        assert entry == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    assert set(manifest["versions"]) >= {"torch", "transformers", "peft", "accelerate"}
    assert manifest["identity"]["global_batch_size"] == 4


def test_trainer_state_has_hf_keys_and_samples_seen(run_copy: Path) -> None:
    state = json.loads((run_copy / "checkpoint-6/trainer_state.json").read_text())
    hf_keys = {
        "global_step",
        "epoch",
        "max_steps",
        "num_train_epochs",
        "logging_steps",
        "save_steps",
        "train_batch_size",
        "log_history",
        "best_metric",
    }
    assert hf_keys <= set(state)
    assert (state["global_step"], state["epoch"], state["max_steps"]) == (6, 1.0, 12)
    assert state["samples_seen"] == 24 and state["num_train_epochs"] == 2
    assert [h["step"] for h in state["log_history"] if "loss" in h] == [1, 2, 3, 4, 5, 6]


def test_every_torch_file_loads_without_unpickling_objects(run_copy: Path) -> None:
    ckpt = run_copy / "checkpoint-6"
    for name in ("optimizer.pt", "scheduler.pt", "training_args.bin", "rng_state.pth"):
        torch.load(ckpt / name, weights_only=True)
    args = torch.load(ckpt / "training_args.bin", weights_only=True)
    assert args["learning_rate"] == pytest.approx(5e-3) and args["world_size"] == 1


def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    ("damage", "expected"),
    [
        (
            lambda c: (c / "optimizer.pt").write_bytes((c / "optimizer.pt").read_bytes()[:100]),
            r"optimizer.pt is 100 bytes but the manifest says \d+ \(truncated",
        ),
        (
            lambda c: _flip_byte(c / "adapter_model.safetensors"),
            "adapter_model.safetensors does not match its sha256 in the manifest",
        ),
        (lambda c: (c / "scheduler.pt").unlink(), "scheduler.pt is missing"),
        (
            lambda c: (c / "manifest.json").unlink(),
            "manifest.json is missing, so the save did not finish",
        ),
        (lambda c: (c / "manifest.json").write_text("{"), "manifest.json is damaged"),
    ],
    ids=["truncated", "flipped-byte", "missing-file", "missing-manifest", "bad-manifest"],
)
def test_damaged_checkpoint_is_refused_naming_the_file(
    run_copy: Path, capsys: pytest.CaptureFixture[str], damage, expected: str
) -> None:
    ckpt = run_copy / "checkpoint-9"
    damage(ckpt)
    assert integrity.verify(ckpt) is not None
    code = main(
        ["train", "-y", "--config", "config.yaml", "--resume", "checkpoints/sft_model/checkpoint-9"]
    )
    err = capsys.readouterr().err
    assert code == 4
    assert err.count("\n") == 1 and err.startswith("error: cannot resume: ")
    assert len(re.findall(expected, err)) == 1
    assert "resume from checkpoints/sft_model/checkpoint-12 instead" in err
    assert integrity.verify(run_copy / "checkpoint-6") is None  # others untouched


def test_resume_latest_skips_a_damaged_newest_checkpoint(
    run_copy: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _flip_byte(run_copy / "checkpoint-12/optimizer.pt")
    path, skipped = runfolder.resolve("latest", run_copy)
    assert path == run_copy / "checkpoint-9"
    assert [s.path.name for s in skipped] == ["checkpoint-12"]
    assert main(["train", "-y", "--config", "config.yaml", "--resume", "latest"]) == 0
    out = capsys.readouterr().out
    assert "skipped      checkpoint-12:" in out and "optimizer.pt does not match" in out
    assert "moved checkpoint-12 into" in out  # the damaged folder is kept aside, not deleted
    assert integrity.verify(run_copy / "checkpoint-12") is None  # re-made by the resume


def test_missing_checkpoint_lists_the_ones_that_exist(
    run_copy: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(
        [
            "train",
            "-y",
            "--config",
            "config.yaml",
            "--resume",
            "checkpoints/sft_model/checkpoint-2000",
        ]
    )
    err = capsys.readouterr().err
    assert code == 4
    assert err == (
        "error: checkpoint not found: checkpoints/sft_model/checkpoint-2000; checkpoints in "
        "checkpoints/sft_model: checkpoint-3, checkpoint-6, checkpoint-9, checkpoint-12; try "
        "--resume checkpoints/sft_model/checkpoint-12 (or --resume latest)\n"
    )


def test_resume_latest_with_nothing_to_resume(workdir: Path, tiny_config) -> None:
    tiny_config()
    with pytest.raises(CheckpointError, match="no complete checkpoint in .*start a new run"):
        runfolder.resolve("latest", workdir / "checkpoints/sft_model")


class Payload:
    """Runs code when unpickled: the attack a weights_only load must stop."""

    def __reduce__(self):
        return (os.system, ("touch PWNED",))


@pytest.mark.parametrize(
    "name", ["optimizer.pt", "scheduler.pt", "training_args.bin", "rng_state.pth"]
)
def test_planted_pickle_payload_never_runs(
    run_copy: Path, capsys: pytest.CaptureFixture[str], name: str
) -> None:
    ckpt = run_copy / "checkpoint-12"
    evil = pickle.dumps({"state": Payload()})
    torch.save({"x": 1}, ckpt / name)  # a valid zip container...
    with open(ckpt / name, "wb") as fh:  # ...replaced by a raw pickle stream with the payload
        fh.write(evil)
    # The attacker rewrites the manifest too, so checksums alone cannot stop it.
    manifest = json.loads((ckpt / "manifest.json").read_text())
    manifest["files"][name] = {"size": len(evil), "sha256": hashlib.sha256(evil).hexdigest()}
    (ckpt / "manifest.json").write_text(json.dumps(manifest))
    code = main(["train", "-y", "--config", "config.yaml", "--resume", str(ckpt)])
    err = capsys.readouterr().err
    assert code == 4
    assert f"{name} holds something other than plain tensors and numbers" in err
    assert not Path("PWNED").exists()


def test_leftover_temp_folder_is_removed_on_next_start(
    run_copy: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    tmp = run_copy / ".tmp-checkpoint-15-999"
    tmp.mkdir()
    (tmp / "optimizer.pt").write_bytes(b"half")
    assert runfolder.resolve("latest", run_copy)[0].name == "checkpoint-12"
    assert (
        main(
            ["train", "-y", "--config", "config.yaml", "--resume", "latest", "num_train_epochs=2.5"]
        )
        == 0
    )
    assert not tmp.exists()
    assert "removed unfinished save" in capsys.readouterr().out


def test_disk_full_during_save_keeps_earlier_checkpoints(
    workdir: Path, tiny_config, capsys: pytest.CaptureFixture[str], monkeypatch
) -> None:
    cfg = tiny_config()

    def full_at_6(step: int, name: str) -> None:
        if step == 6 and name == "optimizer.pt":
            raise OSError(errno.ENOSPC, "No space left on device")

    code = main(["train", "-y", "--config", str(cfg)], hooks=RunHooks(after_file=full_at_6))
    err = capsys.readouterr().err
    assert code == DiskSpaceError.exit_code
    assert "error: disk full while writing checkpoint-6" in err and err.count("\n") == 1
    out = workdir / "checkpoints/sft_model"
    assert entries(out) == ["checkpoint-3"]
    assert integrity.verify(out / "checkpoint-3") is None


def test_refuses_to_start_without_room_for_two_checkpoints(
    workdir: Path, tiny_config, capsys: pytest.CaptureFixture[str], monkeypatch
) -> None:
    cfg = tiny_config()
    usage = shutil.disk_usage(workdir)
    with fs.replaced(disk_usage=lambda p: usage._replace(free=10_000)):
        assert main(["train", "-y", "--config", str(cfg)]) == DiskSpaceError.exit_code
    err = capsys.readouterr().err
    assert "not enough disk space" in err and "10.0 kB free, but two checkpoints need about" in err
    assert not (workdir / "checkpoints").exists()


def test_rotation_keeps_the_newest(workdir: Path, tiny_config) -> None:
    cfg = tiny_config(save_total_limit=2, eval_file=None)
    assert main(["train", "-y", "--config", str(cfg)]) == 0
    out = workdir / "checkpoints/sft_model"
    assert entries(out) == ["checkpoint-12", "checkpoint-9"]


def _tiny_payload(step: int, value: float | None = None) -> checkpoint.CheckpointPayload:
    return checkpoint.CheckpointPayload(
        adapter_state={"w": torch.full((2,), float(step if value is None else value))},
        adapter_config={},
        optimizer_state={},
        scheduler_state={},
        trainer_state={"global_step": step},
        training_args={},
        rng_state={},
        identity={},
    )


def test_rotation_protects_newest_and_best_and_ignores_damaged(tmp_path: Path) -> None:
    for step in (1, 2, 3, 4, 5):
        checkpoint.save(tmp_path, step, _tiny_payload(step))
    (tmp_path / "checkpoint-1/manifest.json").unlink()  # damaged: left for the user
    removed = runfolder.rotate(tmp_path, 2, protect={"checkpoint-2"}, run_id=None)
    assert sorted(p.name for p in removed) == ["checkpoint-3"]
    assert entries(tmp_path) == [
        "checkpoint-1",
        "checkpoint-2",
        "checkpoint-4",
        "checkpoint-5",
    ]


@pytest.fixture
def stack() -> Iterator[contextlib.ExitStack]:
    """Contexts a test enters midway (fs.replaced), left at its end."""
    with contextlib.ExitStack() as entered:
        yield entered


def _count_hashing(stack: contextlib.ExitStack) -> list[str]:
    """From now on, record each checkpoint file opened for reading (verification opens every
    file it hashes), through the file-system seam."""
    opened: list[str] = []
    real = fs.ops().open
    names = {*C.REQUIRED_CHECKPOINT_FILES}

    def counting(path, flags, *args, **kwargs):
        p = Path(path)
        if p.name in names:
            opened.append(f"{p.parent.name}/{p.name}")
        return real(path, flags, *args, **kwargs)

    stack.enter_context(fs.replaced(open=counting))
    return opened


def test_rotation_after_a_save_does_not_rehash_what_this_process_wrote(
    tmp_path: Path, stack: contextlib.ExitStack
) -> None:
    for step in (1, 2, 3, 4):
        checkpoint.save(tmp_path, step, _tiny_payload(step))
    hashed = _count_hashing(stack)
    removed = runfolder.rotate(tmp_path, 2, protect=set(), run_id=None)
    assert [p.name for p in removed] == ["checkpoint-1", "checkpoint-2"]
    assert hashed == []


def test_rotation_rehashes_a_folder_changed_since_it_was_written(
    tmp_path: Path, stack: contextlib.ExitStack
) -> None:
    for step in (1, 2, 3):
        checkpoint.save(tmp_path, step, _tiny_payload(step))
    weights = tmp_path / "checkpoint-3/adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # same size, new content and mtime
    time.sleep(0.01)
    weights.write_bytes(bytes(data))
    hashed = _count_hashing(stack)
    removed = runfolder.rotate(tmp_path, 1, protect=set(), run_id=None)
    # checkpoint-3 is damaged, so checkpoint-2 is the newest intact one and stays.
    assert [p.name for p in removed] == ["checkpoint-1"]
    assert any(h.startswith("checkpoint-3/") for h in hashed)
    assert not any(h.startswith(("checkpoint-1/", "checkpoint-2/")) for h in hashed)
    assert (tmp_path / "checkpoint-3").is_dir()


def test_rotation_under_the_limit_opens_no_folder(
    tmp_path: Path, stack: contextlib.ExitStack
) -> None:
    for step in (1, 2):
        checkpoint.save(tmp_path, step, _tiny_payload(step))
    integrity.forget_known_intact()  # as in a new process
    hashed = _count_hashing(stack)
    assert runfolder.rotate(tmp_path, 2, protect=set(), run_id=None) == []
    assert hashed == []


def test_saving_an_existing_step_moves_the_old_one_aside(tmp_path: Path) -> None:
    first = checkpoint.save(tmp_path, 7, _tiny_payload(7))
    checkpoint.save(tmp_path, 7, _tiny_payload(7, value=8.0))
    aside = list(tmp_path.glob("superseded-*/checkpoint-7"))
    assert len(aside) == 1 and integrity.verify(aside[0]) is None
    assert checkpoint.load(first)[0].adapter_state["w"][0] == 8.0


def test_resume_latest_opens_no_checkpoint_older_than_the_one_it_takes(
    run_copy: Path, stack: contextlib.ExitStack
) -> None:
    opened = _count_hashing(stack)
    assert (
        main(["train", "-y", "--config", "config.yaml", "--resume", "latest", "max_steps=13"]) == 0
    )
    assert {o.split("/")[0] for o in opened} <= {"checkpoint-12", "checkpoint-13"}
