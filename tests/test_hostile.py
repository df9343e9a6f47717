"""A careless or hostile user: every command pointed at the wrong thing, every file lying.

Each case asserts the one-line message and that nothing outside the intended folder changed
(a hash of the whole working tree before and after). The run folder is a copy of a finished
tiny run (checkpoints 3, 6, 9, 12 of run R), made fresh for each test.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import threading
from pathlib import Path
from typing import Any

import pytest
from tests.runs import (
    adapter,
    changed,
    cli,
    entries,
    one_line_error,
    run_sftrun,
    trainer_state,
    tree,
)

from sftrun import checkpoint, fs, integrity, runfolder
from sftrun.cli import main

OUT = Path("checkpoints/sft_model")


# Files every command may create: its own log and the data stage's cache and stats.
SIDE_FILES = ("outputs/logs", "outputs/1_data")


def train(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    return cli(capsys, "train", "-y", "--config", "config.yaml", *args)


# --- 1. deletion is confined and owned -------------------------------------------------------


@pytest.mark.parametrize(
    "target",
    [
        "checkpoints/sft_model",  # a run folder
        "checkpoints/sft_model/checkpoint-12",  # the source checkpoint itself
        "checkpoints/sft_model/checkpoint-9",  # another checkpoint
        ".",  # the current folder
        "BASE",  # the base model folder
        "config.yaml",  # a file
        "LINK",  # a symlink to an empty folder
    ],
)
def test_merge_never_replaces_a_folder_it_did_not_export(
    run: Path, workdir: Path, tiny_model: Path, capsys, target: str
) -> None:
    os.mkdir(workdir / "empty")
    os.symlink(workdir / "empty", workdir / "LINK")
    out = str(tiny_model) if target == "BASE" else target
    before, base_before = tree(workdir), tree(tiny_model)
    code, _, err = cli(capsys, "merge", "--checkpoint", str(OUT / "checkpoint-12"), "--out", out)
    assert code == 4
    assert "--out" in one_line_error(err) and out in err
    assert changed(before, tree(workdir)) == set() and tree(tiny_model) == base_before


def test_merge_replaces_only_its_own_export_of_the_same_checkpoint(
    run: Path, workdir: Path, capsys
) -> None:
    ck12, ck9 = str(OUT / "checkpoint-12"), str(OUT / "checkpoint-9")
    assert cli(capsys, "merge", "--checkpoint", ck12, "--out", "export")[0] == 0
    first = tree(workdir / "export")
    # The same checkpoint again: replaced in place, same content.
    assert cli(capsys, "merge", "--checkpoint", ck12, "--out", "export")[0] == 0
    assert tree(workdir / "export") == first
    # Another checkpoint into that export: refused, the first export untouched.
    code, _, err = cli(capsys, "merge", "--checkpoint", ck9, "--out", "export")
    assert code == 4 and "is not an earlier export of" in one_line_error(err)
    assert tree(workdir / "export") == first
    # Default names carry the run id, so two runs' checkpoint-12 never collide.
    assert cli(capsys, "merge", "--checkpoint", ck12)[0] == 0
    run_id = json.loads((OUT / "checkpoint-12/manifest.json").read_text())["run_id"]
    assert (workdir / f"outputs/5_export/{run_id[:8]}-checkpoint-12/config.json").is_file()
    assert not list(workdir.glob("**/.tmp-*")) and not list(workdir.glob("**/.old-*"))


def test_prune_and_rotation_never_follow_a_symlinked_checkpoint(
    run: Path, workdir: Path, capsys
) -> None:
    elsewhere = workdir / "elsewhere"
    shutil.copytree(run / "checkpoint-3", elsewhere / "checkpoint-1")
    os.symlink(elsewhere / "checkpoint-1", run / "checkpoint-1")
    outside = tree(elsewhere)
    code, out, _ = cli(capsys, "ckpt", "prune", str(run), "--keep", "1")
    assert code == 0
    assert "checkpoint-1: " in out and "symbolic link" in out
    assert entries(run) == ["checkpoint-1", "checkpoint-12"]
    assert tree(elsewhere) == outside
    run_id = integrity.run_id_of(run / "checkpoint-12")
    assert runfolder.rotate(run, 1, set(), run_id) == []  # the link is never a candidate
    assert tree(elsewhere) == outside


def test_prune_keep_zero_is_refused_and_prune_says_what_it_kept(run: Path, capsys) -> None:
    code, _, err = cli(capsys, "ckpt", "prune", str(run), "--keep", "0")
    assert code == 1 and "prune always keeps the newest" in one_line_error(err)
    assert len(entries(run)) == 4
    code, out, _ = cli(capsys, "ckpt", "prune", str(run), "--keep", "2")
    assert code == 0 and "kept 2: checkpoint-9, checkpoint-12" in out


def test_temp_cleanup_leaves_a_folder_it_did_not_write(run: Path, capsys) -> None:
    strange = run / ".tmp-checkpoint-15-999"
    strange.mkdir()
    (strange / "notes.txt").write_text("mine")
    ours = run / ".tmp-checkpoint-16-998"
    ours.mkdir()
    (ours / "optimizer.pt").write_bytes(b"half")
    assert checkpoint.remove_temp_folders(run) == [ours]
    assert (strange / "notes.txt").read_text() == "mine"


def test_remove_owned_refuses_links_files_and_other_folders(tmp_path: Path) -> None:
    (tmp_path / "run").mkdir()
    (tmp_path / "other").mkdir()
    (tmp_path / "run/file").write_text("x")
    os.symlink(tmp_path / "other", tmp_path / "run/link")
    for path, parent in (
        (tmp_path / "run/link", tmp_path / "run"),
        (tmp_path / "run/file", tmp_path / "run"),
        (tmp_path / "other", tmp_path / "run"),
        (tmp_path / "run/..", tmp_path / "run"),
    ):
        with pytest.raises(checkpoint.CheckpointError, match="refusing to delete"):
            checkpoint.remove_owned(path, parent)
    assert (tmp_path / "other").is_dir() and (tmp_path / "run/file").is_file()


# --- 2. a run owns its folder ----------------------------------------------------------------


def test_fresh_run_refuses_a_folder_that_holds_another_run(run: Path, workdir: Path, capsys):
    before = tree(workdir)
    code, _, err = train(capsys, "max_steps=6")
    assert code == 4
    assert one_line_error(err).startswith(
        "error: output_dir checkpoints/sft_model already holds checkpoints of run "
    )
    assert "continue that run with --resume latest" in err
    assert "output_dir=checkpoints/sft_model-2" in err
    assert changed(before, tree(workdir), SIDE_FILES) == set()


def test_resume_refuses_a_checkpoint_of_another_run(run: Path, workdir: Path, capsys) -> None:
    assert train(capsys, "output_dir=runb", "max_steps=6")[0] == 0
    before = tree(workdir)
    code, _, err = train(capsys, "--resume", "runb/checkpoint-6")
    assert code == 4
    assert "runb/checkpoint-6 belongs to run " in one_line_error(err)
    assert "but output_dir checkpoints/sft_model holds checkpoints of run " in err
    assert "resume with output_dir=runb" in err
    assert changed(before, tree(workdir), SIDE_FILES) == set()


def test_empty_resume_is_an_error(run: Path, workdir: Path, capsys) -> None:
    before = tree(workdir)
    code, _, err = train(capsys, "--resume", "")
    assert code == 4 and "--resume was given an empty value" in one_line_error(err)
    assert changed(before, tree(workdir), SIDE_FILES) == set()


def _rewrite_state(ckpt: Path, edit) -> None:
    state = trainer_state(ckpt)
    edit(state)
    data = json.dumps(state).encode()
    (ckpt / "trainer_state.json").write_bytes(data)
    _rewrite_manifest(ckpt, lambda m: m["files"].update({"trainer_state.json": _entry(data)}))


def test_a_moved_run_keeps_its_best_checkpoint(run: Path, workdir: Path, capsys) -> None:
    # Make checkpoint-6 the best one (a lower eval loss than any later step can reach).
    best = {"best_model_checkpoint": str(OUT / "checkpoint-6"), "best_metric": -1.0}
    _rewrite_state(run / "checkpoint-12", lambda s: s.update(best))
    shutil.move("checkpoints", "moved")
    code, out, err = train(
        capsys,
        "--resume",
        "latest",
        "output_dir=moved/sft_model",
        "max_steps=18",
        "save_total_limit=2",
    )
    assert code == 0, err
    kept = entries(Path("moved/sft_model"))
    assert kept == ["checkpoint-15", "checkpoint-18", "checkpoint-6"]


def test_a_copy_named_for_another_step_is_not_a_checkpoint(run: Path, capsys) -> None:
    shutil.copytree(run / "checkpoint-3", run / "checkpoint-99")
    problem = integrity.verify(run / "checkpoint-99")
    assert problem is not None and "the manifest is for step 3, not 99" in problem
    assert runfolder.resolve("latest", run)[0].name == "checkpoint-12"


# --- 3. manifests and state files are validated, never trusted -------------------------------


def _rewrite_manifest(ckpt: Path, edit) -> None:
    manifest = json.loads((ckpt / "manifest.json").read_text())
    edit(manifest)
    (ckpt / "manifest.json").write_text(json.dumps(manifest))


def _entry(data: bytes) -> dict[str, Any]:
    return {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}


@pytest.mark.parametrize(
    ("attack", "reason"),
    [
        ("dotdot", "is not a plain file name"),
        ("absolute", "is not a plain file name"),
        ("dev_zero", "is not a plain file name"),
        ("link_out", "is a symbolic link, not a file"),
        ("fifo", "is not a regular file"),
        ("wrong_shape", "manifest.json is malformed"),
        ("state_list", "trainer_state.json is malformed"),
        ("step_mismatch", "trainer_state.json is at step 3 but the manifest says 12"),
        ("nan_adapter", "holds NaN or infinity"),
    ],
)
def test_a_lying_checkpoint_is_invalid_and_no_tool_crashes_or_hangs(
    run: Path, workdir: Path, capsys, attack: str, reason: str
) -> None:
    import safetensors.torch

    ckpt = run / "checkpoint-12"
    secret = workdir / "secret.txt"
    secret.write_text("top secret " * 100)
    if attack == "dotdot":
        _rewrite_manifest(ckpt, lambda m: m["files"].update({"../../../secret.txt": _entry(b"")}))
    elif attack == "absolute":
        entry = _entry(secret.read_bytes())
        _rewrite_manifest(ckpt, lambda m: m["files"].update({str(secret): entry}))
    elif attack == "dev_zero":
        _rewrite_manifest(ckpt, lambda m: m["files"].update({"/dev/zero": _entry(b"")}))
    elif attack == "link_out":
        (ckpt / "scheduler.pt").unlink()
        os.symlink(secret, ckpt / "scheduler.pt")
    elif attack == "fifo":
        (ckpt / "rng_state.pth").unlink()
        os.mkfifo(ckpt / "rng_state.pth")
    elif attack == "wrong_shape":
        _rewrite_manifest(ckpt, lambda m: m["files"].update({"optimizer.pt": 5}))
    elif attack in ("state_list", "step_mismatch"):
        body = b"[1]" if attack == "state_list" else (run / "checkpoint-3/trainer_state.json")
        data = body if isinstance(body, bytes) else body.read_bytes()
        (ckpt / "trainer_state.json").write_bytes(data)
        _rewrite_manifest(ckpt, lambda m: m["files"].update({"trainer_state.json": _entry(data)}))
    elif attack == "nan_adapter":
        tensors = adapter(ckpt)
        first = next(iter(tensors))
        tensors[first][0] = float("nan")
        data = safetensors.torch.save(tensors, metadata={"format": "pt"})
        (ckpt / "adapter_model.safetensors").write_bytes(data)
        _rewrite_manifest(ckpt, lambda m: m["files"].update({C_ADAPTER: _entry(data)}))
    problem = integrity.verify(ckpt)
    assert problem is not None and reason in problem
    assert "top secret" not in problem and str(len(secret.read_bytes())) not in problem

    # Every tool answers in bounded time (a FIFO or /dev/zero would hang a naive reader).
    results: dict[str, Any] = {}

    def tools() -> None:
        results["list"] = cli(capsys, "ckpt", "list", str(run))
        results["list_json"] = cli(capsys, "ckpt", "list", str(run), "--json")
        results["verify"] = cli(capsys, "ckpt", "verify", str(ckpt))
        results["inspect"] = cli(capsys, "ckpt", "inspect", str(ckpt), "--config", "config.yaml")
        results["latest"] = runfolder.resolve("latest", run)

    worker = threading.Thread(target=tools, daemon=True)
    worker.start()
    worker.join(timeout=120)
    assert not worker.is_alive(), "a checkpoint tool hung"
    assert "checkpoint-12" in results["list"][1] and "INVALID" in results["list"][1]
    assert results["verify"][0] == 1 and reason in results["verify"][1]
    assert results["inspect"][0] == 1 and "INVALID" in results["inspect"][1]
    assert results["latest"][0].name == "checkpoint-9"


C_ADAPTER = "adapter_model.safetensors"


# --- 4. divergence stops, it is not committed -----------------------------------------------


@pytest.mark.parametrize(
    "override", ["learning_rate=.inf", "num_train_epochs=.inf", "lora.dropout=.nan"]
)
def test_non_finite_settings_are_refused(tiny_config, workdir: Path, capsys, override: str) -> None:
    tiny_config()
    code, _, err = train(capsys, override)
    assert code == 2 and "command line" in one_line_error(err)
    assert "finite number" in err
    assert not (workdir / "checkpoints").exists()


def test_divergence_stops_naming_the_step_and_the_last_good_checkpoint(
    tiny_config, workdir: Path, capsys
) -> None:
    tiny_config(save_steps=1, max_grad_norm=0, learning_rate=1e30, warmup_steps=0)
    code, _, err = train(capsys)
    assert code == 7
    one_line_error(err)
    assert "training diverged at step " in err and "nothing from this step was applied" in err
    saved = runfolder.scan(OUT)
    assert all(info.valid for info in saved)  # nothing non-finite was committed
    if saved:
        assert f"the last good checkpoint is {saved[-1].path}" in err
        assert "learning_rate=1e+29" in err


def test_a_non_finite_payload_is_never_committed(tmp_path: Path) -> None:
    import torch

    from sftrun.errors import DivergenceError

    payload = checkpoint.CheckpointPayload(
        adapter_state={"w": torch.tensor([1.0, float("inf")])},
        adapter_config={},
        optimizer_state={},
        scheduler_state={},
        trainer_state={"global_step": 1},
        training_args={},
        rng_state={},
        identity={},
    )
    with pytest.raises(DivergenceError, match="adapter tensor w holds NaN or infinity"):
        checkpoint.save(tmp_path, 1, payload)
    assert list(tmp_path.iterdir()) == []


# --- 5. training longer from a finished run trains --------------------------------------------


def test_train_longer_from_a_finished_run_restarts_the_decay(run: Path, capsys) -> None:
    code, out, _ = train(capsys, "--resume", "latest", "max_steps=24")
    assert code == 0
    assert "LR at step 12: 0 -> 0.005 (the old decay had ended" in out
    assert "decay now ends at step 24" in out
    history = trainer_state(run / "checkpoint-24")["log_history"]
    lrs = {h["step"]: h["learning_rate"] for h in history if "learning_rate" in h}
    assert lrs[13] == pytest.approx(5e-3) and 0 < lrs[24] < lrs[18] < lrs[13]
    before, after = adapter(run / "checkpoint-12"), adapter(run / "checkpoint-24")
    assert any(not bool((before[k] == after[k]).all()) for k in before)


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
