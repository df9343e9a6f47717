"""A careless or hostile user, before anything is loaded: every command pointed at the wrong
thing gets one line (what, where, the fix) and changes nothing; and the words it prints are
true.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path

import pytest
from tests.runs import (
    OUT,
    changed,
    cli,
    entries,
    one_line_error,
    run_sftrun,
    train,
    tree,
)

from sftrun import checkpoint, fs, integrity
from sftrun.cli import main

# Files every command may create: its own log and the data stage's cache and stats.
SIDE_FILES = ("outputs/logs", "outputs/1_data")


# --- 6. preflight: one line, before any model is loaded ---------------------------------------


def _write(path: Path, data: bytes) -> str:
    path.write_bytes(data)
    return str(path)


@pytest.mark.parametrize(
    ("override", "code", "message"),
    [
        (
            "output_dir=config.yaml",
            2,
            "output_dir config.yaml: config.yaml is a file, not a folder",
        ),
        ("output_dir=config.yaml/sub", 2, "is a file, not a folder"),
        ("train_file=missing.jsonl", 3, "data file not found: missing.jsonl; check train_file"),
        ("train_file=.", 3, "train_file . is a folder but not one written by Dataset.save_to_disk"),
        ("train_file=BINARY", 3, "BINARY:1: not UTF-8 text"),
        ("train_file=LATIN1", 3, "LATIN1:2: not UTF-8 text (byte 0xe9"),
        ("train_file=HUGE", 3, "HUGE:2: a record longer than 16 MiB"),
        ("seed=99999999999999999999", 2, "seed"),
        ("model_name_or_path=NOTOKENIZER", 5, "could not load a tokenizer from"),
    ],
)
def test_bad_input_is_one_line_before_any_model_is_loaded(
    tiny_config, workdir: Path, tiny_model: Path, sample_dir: Path, capsys, override, code, message
) -> None:
    good = (sample_dir / "train.jsonl").read_text().splitlines()[0].encode() + b"\n"
    files = {
        "BINARY": lambda: _write(workdir / "bin.jsonl", b"\x00\xff\xfe\x80" * 100),
        "LATIN1": lambda: _write(workdir / "latin.jsonl", good + "café\n".encode("latin-1")),
        "HUGE": lambda: _write(workdir / "huge.jsonl", good + b"x" * (17 << 20) + b"\n"),
        "NOTOKENIZER": lambda: str(_model_without_tokenizer(tiny_model, workdir)),
    }
    key, _, value = override.partition("=")
    if value in files:
        path = files[value]()
        override, message = f"{key}={path}", message.replace(value, path)
    tiny_config()
    result, _, err = train(capsys, override)
    assert result == code and message in one_line_error(err)
    assert not (workdir / "checkpoints").exists()


def _model_without_tokenizer(tiny_model: Path, workdir: Path) -> Path:
    target = workdir / "model-no-tok"
    target.mkdir()
    for f in tiny_model.iterdir():
        if "token" not in f.name:
            shutil.copy(f, target / f.name)
    return target


def test_corrupt_base_weights_are_one_line(tiny_config, workdir, tiny_model: Path, capsys):
    broken = workdir / "broken"
    shutil.copytree(tiny_model, broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:200])
    tiny_config(model_name_or_path=str(broken))
    code, _, err = train(capsys)
    assert code == 5 and "could not load the base model from" in one_line_error(err)


def test_config_file_problems_are_one_line(workdir: Path, tiny_config, capsys) -> None:
    cfg = tiny_config()
    text = cfg.read_text()
    cfg.write_bytes("# café\n".encode("latin-1") + text.encode())
    code, _, err = train(capsys)
    assert code == 2 and "config.yaml: not UTF-8 text" in one_line_error(err)
    cfg.write_text(text + "seed: 5\n")
    code, _, err = train(capsys)
    assert code == 2 and "key 'seed' is given twice" in one_line_error(err)
    cfg.write_bytes(b"\xef\xbb\xbf" + text.encode() + b"max_steps: 1\n")  # a BOM is fine
    assert train(capsys)[0] == 0


def test_a_bom_in_data_is_accepted_and_validate_agrees_with_train(
    workdir: Path, sample_dir: Path, tiny_config, capsys
) -> None:
    lines = (sample_dir / "train.jsonl").read_text().splitlines()
    bom = workdir / "bom.jsonl"
    bom.write_bytes(b"\xef\xbb\xbf" + "\n".join(lines).encode() + b"\n")
    array = workdir / "array.txt"
    array.write_text(json.dumps([json.loads(x) for x in lines]))
    for path in (bom, array):
        code, out, _ = cli(capsys, "data", "validate", str(path))
        assert code == 0 and f"{len(lines)} good records" in out
    tiny_config(train_file=str(array), max_steps=1)
    assert train(capsys)[0] == 0


def test_disk_full_while_caching_data_is_one_line(tiny_config, workdir, capsys, monkeypatch):

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    tiny_config()
    with fs.replaced(save_tensors=full):
        code, _, err = train(capsys)
    assert code == 6 and "disk full while writing the tokenized data cache" in one_line_error(err)
    assert not list((workdir / "outputs/1_data").glob("cache/*.tmp*"))


@pytest.mark.slow
def test_sighup_saves_a_checkpoint_like_sigterm(workdir: Path, tiny_config) -> None:
    cfg = tiny_config(save_steps=100)
    proc = run_sftrun(
        ["train", "-y", "--config", str(cfg), "learning_rate=1e-3"],
        workdir,
        env={"SFTRUN_TEST_SIGNAL_AT_STEP": "4:SIGHUP"},
        script="chaos.py",
    )
    assert proc.returncode == 128 + 1, proc.stderr
    assert integrity.verify(workdir / OUT / "checkpoint-5") is None
    # The printed command repeats the run's settings, so it resumes as started.
    command = f"--resume {OUT}/checkpoint-5 -y --config {cfg} learning_rate=1e-3"
    assert command in proc.stdout


# --- 7. words that are true --------------------------------------------------------------------


def test_resume_of_a_file_says_it_is_a_file(run: Path, capsys) -> None:
    code, _, err = train(capsys, "--resume", str(run / "checkpoint-12/manifest.json"))
    assert code == 4 and "that is a file; pass the checkpoint folder" in one_line_error(err)


def test_ckpt_list_refuses_a_key_value_or_missing_folder(run: Path, capsys) -> None:
    code, _, err = cli(capsys, "ckpt", "list", "max_steps=10")
    assert code == 1 and "this command takes a folder, not KEY=VALUE" in one_line_error(err)
    code, _, err = cli(capsys, "ckpt", "list", "nowhere")
    assert code == 1 and "nowhere is not a folder" in one_line_error(err)


def test_log_file_exists_and_records_a_refused_run(workdir: Path, capsys) -> None:
    code, _, err = cli(capsys, "train", "-y", "--config", "missing.yaml")
    assert code == 2
    # Kept apart from the logs of runs that trained (the newest of those is the one to tail).
    assert not list((workdir / "outputs/logs").glob("sft_trainer_*.log"))
    logs = sorted((workdir / "outputs/logs/not_trained").glob("sft_trainer_*.log"))
    assert len(logs) == 1 and one_line_error(err).strip() in logs[0].read_text()


def test_done_line_is_in_the_log(run: Path, workdir: Path, capsys) -> None:
    code, out, _ = train(capsys, "--resume", "latest", "max_steps=13")
    assert code == 0
    newest = max((workdir / "outputs/logs").glob("sft_trainer_*.log"), key=os.path.getmtime)
    assert "done: step 13/13" in newest.read_text() and "done: step 13/13" in out


def test_tools_find_the_base_model_from_another_folder(
    tiny_config, workdir: Path, tiny_model: Path, capsys
) -> None:
    shutil.copytree(tiny_model, workdir / "model/models")
    tiny_config(model_name_or_path="model/models", max_steps=3, eval_file=None)
    assert train(capsys)[0] == 0
    ckpt = (workdir / OUT / "checkpoint-3").resolve()
    elsewhere = workdir / "elsewhere"
    elsewhere.mkdir()
    os.chdir(elsewhere)  # model/models does not exist here
    code, _, err = cli(
        capsys, "chat", "--checkpoint", str(ckpt), "--prompt", "hi", "--max-new-tokens", "2"
    )
    assert code == 0, err
    code, out, err = cli(capsys, "merge", "--checkpoint", str(ckpt), "--out", "export")
    assert code == 0, err
    assert (elsewhere / "export/config.json").is_file()


def test_help_shows_every_default(capsys) -> None:
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = capsys.readouterr().out
    assert "(default: configs/training_config.yaml)" in out and "--resume DIR" in out
    with pytest.raises(SystemExit):
        main(["chat", "--help"])
    assert "(default: 256)" in capsys.readouterr().out


def test_ctrl_c_in_chat_does_not_talk_about_training(run: Path, capsys, monkeypatch) -> None:
    class CtrlC:
        def readline(self) -> str:
            raise KeyboardInterrupt

    monkeypatch.setattr("sys.stdin", CtrlC())
    code, _, err = cli(capsys, "chat", "--checkpoint", str(run / "checkpoint-12"))
    assert code == 130 and "checkpoint" not in err


def test_superseded_steps_rename_their_tensorboard_run(run: Path, workdir: Path, capsys) -> None:
    boards = entries(workdir / "outputs/3_training/runs")
    assert len(boards) == 1
    code, out, _ = train(capsys, "--resume", str(OUT / "checkpoint-6"))
    assert code == 0
    names = entries(workdir / "outputs/3_training/runs")
    assert f"{boards[0]}.superseded-after-6" in names


@pytest.mark.parametrize("target", ["checkpoints/sft_model", ".", "LINK"])
def test_model_prepare_force_replaces_only_a_model_folder(
    run: Path, workdir: Path, capsys, target: str
) -> None:
    os.symlink(workdir / "checkpoints", workdir / "LINK")
    before = tree(workdir)
    code, _, err = cli(capsys, "model", "prepare", "--out", target, "--force")
    assert code == 5 and "pass another --out" in one_line_error(err)
    assert changed(before, tree(workdir)) == set()


@pytest.mark.parametrize("target", ["checkpoints/sft_model/checkpoint-12", ".", "BASE", "LINK"])
def test_prune_pointed_at_the_wrong_folder_deletes_nothing(
    run: Path, workdir: Path, tiny_model: Path, capsys, target: str
) -> None:
    os.symlink(workdir / "elsewhere", workdir / "LINK")
    (workdir / "elsewhere").mkdir()
    folder = str(tiny_model) if target == "BASE" else target
    before, base_before = tree(workdir), tree(tiny_model)
    code, out, _ = cli(capsys, "ckpt", "prune", folder, "--keep", "1")
    assert code == 0 and "freed 0 B; kept 0: none" in out
    assert changed(before, tree(workdir)) == set() and tree(tiny_model) == base_before


def test_an_unwritable_output_dir_is_found_before_training(
    tiny_config, workdir: Path, capsys, monkeypatch
) -> None:

    def denied(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied")

    tiny_config()
    with fs.replaced(mkstemp=denied):
        code, _, err = train(capsys)
    assert code == 2
    assert "output_dir checkpoints/sft_model: cannot write in ." in one_line_error(err)
    assert "set output_dir to a writable folder" in err


def test_a_dangling_output_dir_link_is_found_before_training(
    tiny_config, workdir: Path, capsys
) -> None:
    os.symlink(workdir / "gone", workdir / "ckpts")
    tiny_config(output_dir="ckpts")
    code, _, err = train(capsys)
    assert code == 2 and "output_dir ckpts is a symbolic link to a missing folder" in err
    one_line_error(err)


def test_a_save_never_removes_a_temporary_folder_it_did_not_make(tmp_path: Path) -> None:
    import torch

    planted = tmp_path / f".tmp-checkpoint-5-{os.getpid()}"  # the name this save would use
    planted.mkdir()
    (planted / "notes.txt").write_text("mine")
    payload = checkpoint.CheckpointPayload(
        adapter_state={"w": torch.ones(2)},
        adapter_config={},
        optimizer_state={},
        scheduler_state={},
        trainer_state={"global_step": 5},
        training_args={},
        rng_state={},
        identity={},
    )
    with pytest.raises(checkpoint.CheckpointError, match="could not write checkpoint-5"):
        checkpoint.save(tmp_path, 5, payload)
    assert (planted / "notes.txt").read_text() == "mine"
