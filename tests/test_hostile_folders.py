"""A careless or hostile user, against folders: deletion is confined to what the run owns,
and a run owns its folder.

Each case asserts the one-line message and that nothing outside the intended folder changed
(a hash of the whole working tree before and after). The run folder is a copy of a finished
tiny run (checkpoints 3, 6, 9, 12 of run R), made fresh for each test.
"""

from __future__ import annotations

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
    rewrite_state,
    train,
    tree,
)

from sftrun import checkpoint, integrity, runfolder

# Files every command may create: its own log and the data stage's cache and stats.
SIDE_FILES = ("outputs/logs", "outputs/1_data")


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


def test_a_moved_run_keeps_its_best_checkpoint(run: Path, workdir: Path, capsys) -> None:
    # Make checkpoint-6 the best one (a lower eval loss than any later step can reach).
    best = {"best_model_checkpoint": str(OUT / "checkpoint-6"), "best_metric": -1.0}
    rewrite_state(run / "checkpoint-12", lambda s: s.update(best))
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
