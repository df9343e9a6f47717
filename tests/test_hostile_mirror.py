"""A careless or hostile user against ``mirror_to``, the run lock, ``prune`` and ``merge``.

Each case asserts the one-line message (or the log line) and compares a hash of the whole
working tree before and after: nothing the run does not own is deleted or overwritten. The
mirrors here are local folders (the same ``fsspec`` code as S3; test_mirror.py runs S3).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from tests.conftest import tiny_settings, write_config
from tests.runs import OUT, adapter, assert_same_tensors, changed, cli, one_line_error, train, tree

from sftrun import constants as C
from sftrun import integrity, mirror, runfolder
from sftrun.errors import CheckpointError


@pytest.fixture(scope="session")
def mirrored(tmp_path_factory, tiny_model: Path, sample_dir: Path) -> Path:
    """A finished 12-step run whose every checkpoint is on a local mirror ``mirror/``."""
    from tests.conftest import main_in

    cwd = tmp_path_factory.mktemp("mirrored")
    settings = tiny_settings(tiny_model, sample_dir, eval_file=None, mirror_to="mirror")
    write_config(cwd / "config.yaml", settings)
    return main_in(cwd, ["train", "-y", "--config", "config.yaml"])


@pytest.fixture
def mrun(mirrored: Path, copy_into_workdir) -> Path:
    """A private copy of the mirrored run (run folder and mirror) as the working directory."""
    return copy_into_workdir(mirrored)


# --- a mirror that overlaps the run folder ----------------------------------------------------


@pytest.mark.parametrize(
    ("mirror_to", "how"),
    [
        ("checkpoints/sft_model", "is the same folder as"),
        ("checkpoints/sft_model/copies", "is inside"),
        ("checkpoints", "contains"),
        ("file://{cwd}/checkpoints/sft_model", "is the same folder as"),
        ("LINK", "is the same folder as"),  # the run folder reached through a symlink
    ],
)
@pytest.mark.parametrize("resume", [None, "latest"])
def test_a_mirror_overlapping_the_run_folder_is_refused_up_front(
    run: Path, workdir: Path, tiny_model, sample_dir, capsys, mirror_to: str, how: str, resume
) -> None:
    os.symlink(workdir / OUT, workdir / "LINK")
    mirror_to = mirror_to.format(cwd=workdir)
    settings = tiny_settings(tiny_model, sample_dir, eval_file=None, mirror_to=mirror_to)
    write_config(workdir / "config.yaml", settings)
    before = tree(workdir)
    code, _, err = train(capsys, *(["--resume", resume] if resume else []))
    assert code == 2
    line = one_line_error(err)
    assert f"mirror_to {mirror_to} {how} output_dir {OUT}" in line
    assert "mirror_to=checkpoints" not in line  # never advises the run folder itself
    assert changed(before, tree(workdir), ignore=("outputs/logs",)) == set()


def test_the_refusal_for_another_runs_mirror_never_suggests_the_run_folder(
    mrun: Path, workdir: Path, tiny_model, sample_dir, capsys
) -> None:
    # A second run (its own folder) pointed at the first run's mirror, resuming its own
    # checkpoint: refused, and the advice is about the mirror, not a path of the run folder.
    shutil.copytree(workdir / OUT, workdir / "other/sft_model")
    for ckpt in (workdir / "other/sft_model").glob("checkpoint-*"):
        _set_run_id(ckpt, "b" * 32)
    settings = tiny_settings(
        tiny_model, sample_dir, eval_file=None, mirror_to="mirror", output_dir="other/sft_model"
    )
    write_config(workdir / "other.yaml", settings)
    before = tree(workdir)
    code, _, err = train(capsys, "--resume", "latest", config="other.yaml")
    assert code == 4
    line = one_line_error(err)
    assert "mirror_to mirror" in line and "mirror_to=other" not in line
    assert "set mirror_to to this run's own mirror, or leave mirror_to out" in line
    assert changed(before, tree(workdir), ignore=("outputs/logs",)) == set()


def _set_run_id(ckpt: Path, run_id: str) -> None:
    """Rewrite a checkpoint's manifest so that it belongs to ``run_id`` (still intact)."""
    manifest = json.loads((ckpt / C.MANIFEST_FILE).read_text())
    manifest["run_id"] = run_id
    (ckpt / C.MANIFEST_FILE).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")


# --- mirror clean-up deletes only what this run wrote ------------------------------------------


def test_mirror_rotation_leaves_hf_checkpoints_and_other_runs_copies(
    mrun: Path, workdir: Path, tiny_model, sample_dir, capsys
) -> None:
    # The user keeps an HF Trainer checkpoint (no manifest) in the mirror folder.
    hf = workdir / "mirror/checkpoint-2000"
    hf.mkdir()
    (hf / "adapter_model.safetensors").write_bytes(b"weights of a week on a GPU")
    (hf / "trainer_state.json").write_text('{"global_step": 2000}')
    settings = tiny_settings(
        tiny_model, sample_dir, eval_file=None, mirror_to="mirror", save_total_limit=1
    )
    write_config(workdir / "config.yaml", settings)
    before = tree(workdir / "mirror/checkpoint-2000")
    code, out, _ = train(capsys, "--resume", "latest", "num_train_epochs=3")
    assert code == 0, out
    assert tree(workdir / "mirror/checkpoint-2000") == before
    # This run's own older copies did go, as the local folder's did.
    kept = sorted(p.name for p in (workdir / "mirror").iterdir())
    assert kept == [C.MIRROR_MARKER_FILE, "checkpoint-18", "checkpoint-2000"]


def test_rotation_never_removes_an_unfinished_upload_it_did_not_start(tmp_path: Path) -> None:
    remote_dir = tmp_path / "mirror"
    (remote_dir / "checkpoint-1").mkdir(parents=True)  # no manifest: somebody else's
    (remote_dir / "checkpoint-1/notes.txt").write_text("mine")
    up = mirror.Uploader(mirror.Remote(str(remote_dir)), "a" * 32)
    try:
        up._rotate(keep=[], step=5)
    finally:
        up.finish()
    assert (remote_dir / "checkpoint-1/notes.txt").read_text() == "mine"


# --- two runs, one mirror ----------------------------------------------------------------------


def test_a_second_run_is_refused_a_mirror_that_belongs_to_another_run(
    mrun: Path, workdir: Path, tiny_model, sample_dir, capsys
) -> None:
    # The first run's copies rotated away (or deleted by hand): its marker still owns it.
    for ckpt in (workdir / "mirror").glob("checkpoint-*"):
        shutil.rmtree(ckpt)
    settings = tiny_settings(
        tiny_model, sample_dir, eval_file=None, mirror_to="mirror", output_dir="second"
    )
    write_config(workdir / "second.yaml", settings)
    before = tree(workdir)
    code, _, err = train(capsys, config="second.yaml")
    assert code == 4
    run_id = json.loads((workdir / "mirror" / C.MIRROR_MARKER_FILE).read_text())["run_id"]
    assert f"mirror_to mirror belongs to run {run_id[:8]}" in one_line_error(err)
    assert changed(before, tree(workdir), ignore=("outputs/logs",)) == set()


def test_an_upload_into_a_mirror_claimed_by_another_run_fails_and_says_so(
    run: Path, tmp_path: Path
) -> None:
    # Two runs started at once on an empty mirror: the other one's marker landed last.
    remote_dir = tmp_path / "mirror"
    remote_dir.mkdir()
    (remote_dir / C.MIRROR_MARKER_FILE).write_text(json.dumps({"run_id": "b" * 32}))
    run_id = integrity.run_id_of(run / "checkpoint-12")
    assert run_id is not None
    up = mirror.Uploader(mirror.Remote(str(remote_dir)), run_id)
    up.submit(run / "checkpoint-12", ["checkpoint-12"])
    line = up.finish()
    assert line.endswith("uploaded nothing; FAILED checkpoint-12 (the local copies are intact)")
    assert sorted(p.name for p in remote_dir.iterdir()) == [C.MIRROR_MARKER_FILE]


def test_uploaded_is_said_only_after_the_manifest_was_read_back(
    run: Path, tmp_path: Path, caplog
) -> None:
    remote_dir = tmp_path / "mirror"
    run_id = integrity.run_id_of(run / "checkpoint-12")
    assert run_id is not None
    remote = mirror.Remote(str(remote_dir))
    real_put = remote.fs.put_file

    def lossy_put(local: str, dest: str, **kw) -> None:  # the manifest arrives damaged
        real_put(local, dest, **kw)
        if dest.endswith(C.MANIFEST_FILE):
            Path(dest).write_text("{}")

    remote.fs.put_file = lossy_put  # type: ignore[method-assign]
    up = mirror.Uploader(remote, run_id)
    up.submit(run / "checkpoint-12", ["checkpoint-12"])
    assert "FAILED checkpoint-12" in up.finish()
    assert "read back differs" in caplog.text


# --- a refused resume changes nothing locally --------------------------------------------------


def test_resume_from_another_runs_mirror_is_refused_and_changes_nothing(
    mrun: Path, workdir: Path, capsys
) -> None:
    # This folder's own run (a copy of the same tiny run under another run id).
    for ckpt in (workdir / OUT).glob("checkpoint-*"):
        _set_run_id(ckpt, "c" * 32)
    before = tree(workdir)
    url = f"file://{workdir}/mirror/checkpoint-9"
    code, _, err = train(capsys, "--resume", url)
    assert code == 4
    assert "belongs to run" in one_line_error(err)
    assert changed(before, tree(workdir), ignore=("outputs/logs",)) == set()
    # The run can still resume its own checkpoints.
    assert runfolder.resolve("latest", OUT)[0] == OUT / "checkpoint-12"


def test_a_cancelled_resume_from_a_mirror_leaves_no_download_behind(
    mrun: Path, workdir: Path, capsys, monkeypatch
) -> None:
    shutil.rmtree(workdir / "checkpoints")
    shutil.rmtree(workdir / "mirror/checkpoint-12")  # so there is a step left to train
    before = tree(workdir)
    monkeypatch.setattr("sys.stdin.isatty", lambda: True)
    monkeypatch.setattr("builtins.input", lambda prompt: "n")
    code = cli(capsys, "train", "--config", "config.yaml", "--resume", "auto")[0]
    assert code == 1
    assert changed(before, tree(workdir), ignore=("outputs/",)) == set()


# --- --resume auto and a mirror ahead of the local folder -------------------------------------


def test_resume_auto_takes_the_mirrors_newer_copy_and_finishes_bit_exactly(
    mrun: Path, workdir: Path, capsys
) -> None:
    final = adapter(workdir / OUT / "checkpoint-12")
    # The local folder lost its last two checkpoints; the mirror has 9 (and lost 12).
    for name in ("checkpoint-9", "checkpoint-12"):
        shutil.rmtree(workdir / OUT / name)
    shutil.rmtree(workdir / "mirror/checkpoint-12")
    mirror_9 = tree(workdir / "mirror/checkpoint-9")
    code, out, _ = train(capsys, "--resume", "auto")
    assert code == 0
    assert "the mirror's checkpoint-9 is newer than the newest valid checkpoint in" in out
    assert_same_tensors(adapter(workdir / OUT / "checkpoint-12"), final)
    assert tree(workdir / "mirror/checkpoint-9") == mirror_9
    assert not list(workdir.glob("**/.tmp-download-*"))


# --- the run lock's info file ---------------------------------------------------------------


@pytest.mark.parametrize("planted", ["link", "fifo"])
@pytest.mark.parametrize("command", ["train", "prune"])
def test_a_planted_lock_info_file_is_refused_and_its_target_untouched(
    run: Path, workdir: Path, capsys, planted: str, command: str
) -> None:
    victim = workdir / "victim.txt"
    victim.write_text("precious\n")
    info = run / C.LOCK_INFO_FILE
    if planted == "link":
        os.symlink(victim, info)
    else:
        os.mkfifo(info)
    before = tree(workdir)
    if command == "train":
        code, _, err = train(capsys, "--resume", "latest", "num_train_epochs=3")
    else:
        code, _, err = cli(capsys, "ckpt", "prune", str(run), "--keep", "1")
    assert code == 8
    kind = "a symbolic link" if planted == "link" else "not a regular file"
    assert f"{C.LOCK_INFO_FILE} is {kind}" in one_line_error(err)
    assert victim.read_text() == "precious\n"
    assert changed(before, tree(workdir), ignore=("outputs/",)) == set()


def test_a_lock_info_link_to_dev_zero_does_not_hang_the_refusal(run: Path) -> None:
    from sftrun import runlock

    os.symlink("/dev/zero", run / C.LOCK_INFO_FILE)
    assert runlock._read_info(run) is None


# --- prune respects run ids -----------------------------------------------------------------


def test_prune_refuses_a_folder_holding_two_runs(run: Path, workdir: Path, capsys) -> None:
    # A foreign checkpoint dropped in (an old refused download, a copy by hand), newest.
    foreign = run / "checkpoint-15"
    shutil.copytree(run / "checkpoint-12", foreign)
    manifest = json.loads((foreign / C.MANIFEST_FILE).read_text())
    state = json.loads((foreign / C.TRAINER_STATE_FILE).read_text())
    state["global_step"] = 15
    raw = (json.dumps(state, indent=2, sort_keys=True) + "\n").encode()
    (foreign / C.TRAINER_STATE_FILE).write_bytes(raw)
    import hashlib

    manifest["files"][C.TRAINER_STATE_FILE] = {
        "size": len(raw),
        "sha256": hashlib.sha256(raw).hexdigest(),
    }
    manifest["step"], manifest["run_id"] = 15, "d" * 32
    (foreign / C.MANIFEST_FILE).write_text(json.dumps(manifest, indent=2, sort_keys=True))
    assert integrity.verify(foreign) is None
    before = tree(workdir)
    code, _, err = cli(capsys, "ckpt", "prune", str(run), "--keep", "1")
    assert code == 4
    line = one_line_error(err)
    assert "holds checkpoints of 2 runs" in line and "run dddddddd: checkpoint-15" in line
    assert "nothing was deleted" in line
    assert changed(before, tree(workdir)) == set()


# --- merge into an earlier export -----------------------------------------------------------


def test_remerge_keeps_files_the_user_added(run: Path, workdir: Path, capsys) -> None:
    ck12 = str(OUT / "checkpoint-12")
    assert cli(capsys, "merge", "--checkpoint", ck12, "--out", "export")[0] == 0
    (workdir / "export/README.md").write_text("# my model card\n")
    (workdir / "export/eval").mkdir()
    (workdir / "export/eval/results.json").write_text("{}")
    first = tree(workdir / "export")
    assert cli(capsys, "merge", "--checkpoint", ck12, "--out", "export")[0] == 0
    assert tree(workdir / "export") == first
    marker = json.loads((workdir / "export" / C.EXPORT_MARKER_FILE).read_text())
    assert "README.md" not in marker["files"] and "config.json" in marker["files"]


def test_two_merges_racing_for_one_new_folder_do_not_both_succeed(run: Path, workdir: Path) -> None:
    from sftrun import export
    from sftrun.hooks import RunHooks

    ck12 = OUT / "checkpoint-12"
    other: list[dict] = []

    def another_merge_lands_first(target: Path) -> None:
        other.append(export.merge(ck12, target))

    with pytest.raises(CheckpointError, match="was written by another command while this merge"):
        export.merge(
            ck12, workdir / "export", hooks=RunHooks(before_export_lands=another_merge_lands_first)
        )
    assert other[0]["path"] == str(workdir / "export")  # the other one succeeded, alone
    assert (workdir / "export/config.json").is_file()
    assert not list(workdir.glob(".tmp-*"))


# --- a mirror manifest that lies ----------------------------------------------------------------


@pytest.mark.parametrize("planted", ["fifo", "dev-zero"])
def test_a_fifo_or_device_as_a_mirror_manifest_is_an_incomplete_copy(
    mrun: Path, workdir: Path, capsys, planted: str
) -> None:
    manifest = workdir / "mirror/checkpoint-12" / C.MANIFEST_FILE
    manifest.unlink()
    if planted == "fifo":
        os.mkfifo(manifest)
    else:
        os.symlink("/dev/zero", manifest)
    code, out, _ = cli(capsys, "ckpt", "list", "file://" + str(workdir / "mirror"))
    assert code == 0
    assert "checkpoint-12    incomplete: no manifest" in out
    # A new machine: --resume auto skips it and takes checkpoint-9.
    shutil.rmtree(workdir / "checkpoints")
    code, out, _ = train(capsys, "--resume", "auto")
    assert code == 0
    assert "skipped on the mirror: mirror/checkpoint-12: no manifest" in out
    assert "resumed from the mirror's checkpoint-9" in out
