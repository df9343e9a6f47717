"""The code's own rules: a total resume policy, seams instead of patches, short functions,
and a checkpoint written before the current format still resumes."""

from __future__ import annotations

import ast
import json
import shutil
from pathlib import Path

from tests.conftest import REPO
from tests.runs import entries, trainer_state

from sftrun import checkpoint
from sftrun.cli import main
from sftrun.config import TrainingConfig
from sftrun.resume import IDENTITY, KEPT, TUNABLE


def test_resume_policy_names_every_config_key_exactly_once() -> None:
    groups = [set(IDENTITY), set(TUNABLE), set(KEPT)]
    assert set().union(*groups) == set(TrainingConfig.model_fields)
    assert sum(len(g) for g in groups) == len(TrainingConfig.model_fields)  # no overlap


def _sftrun_names(tree: ast.Module) -> set[str]:
    """Local names bound to sftrun modules or objects by this file's imports."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {
                (a.asname or a.name).split(".")[0]
                for a in node.names
                if a.name.startswith("sftrun")
            }
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("sftrun"):
            names |= {a.asname or a.name for a in node.names}
    return names


def _root(node: ast.expr) -> str | None:
    while isinstance(node, ast.Attribute):
        node = node.value
    return node.id if isinstance(node, ast.Name) else None


def patches_of_sftrun(source: str) -> list[int]:
    """Lines that assign an attribute of something imported from sftrun (directly, with
    setattr, or with monkeypatch.setattr on it or on a dotted "sftrun...." string)."""
    tree = ast.parse(source)
    ours = _sftrun_names(tree)
    found = []
    for node in ast.walk(tree):
        targets: list[ast.expr] = []
        if isinstance(node, ast.Assign):
            targets = node.targets
        elif isinstance(node, ast.AugAssign | ast.AnnAssign):
            targets = [node.target]
        if any(isinstance(t, ast.Attribute) and _root(t) in ours for t in targets):
            found.append(node.lineno)
        if isinstance(node, ast.Call) and node.args:
            func = node.func
            is_setattr = (isinstance(func, ast.Name) and func.id == "setattr") or (
                isinstance(func, ast.Attribute) and func.attr == "setattr"
            )
            first = node.args[0]
            names_ours = _root(first) in ours if isinstance(first, ast.expr) else False
            dotted = (
                isinstance(first, ast.Constant)
                and isinstance(first.value, str)
                and first.value.startswith("sftrun.")
            )
            if is_setattr and (names_ours or dotted):
                found.append(node.lineno)
    return found


def test_the_patch_detector_finds_each_form() -> None:
    bad = (
        "import sftrun.trainer as t\nfrom sftrun import checkpoint\nfrom sftrun.x import K\n"
        "t.f = 1\ncheckpoint.save = None\nK.forward = 2\nsetattr(checkpoint, 'a', 1)\n"
        "mp.setattr(checkpoint, 'save', 1)\nmp.setattr('sftrun.trainer.x', 1)\n"
        "import os\nos.open = 1\nmp.setattr(os, 'open', 1)\n"
    )
    assert patches_of_sftrun(bad) == [4, 5, 6, 7, 8, 9]


def test_no_test_or_benchmark_patches_sftrun() -> None:
    files = [*(REPO / "tests").rglob("*.py"), *(REPO / "bench").rglob("*.py")]
    offenders = {
        str(f.relative_to(REPO)): lines
        for f in files
        if f.name != "test_structure.py" and (lines := patches_of_sftrun(f.read_text()))
    }
    assert offenders == {}, "use sftrun.hooks.RunHooks instead of patching"


def _function_lengths() -> dict[str, int]:
    lengths = {}
    for path in (REPO / "src/sftrun").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef):
                assert node.end_lineno is not None
                lengths[f"{path.name}:{node.name}"] = node.end_lineno - node.lineno + 1
    return lengths


def test_no_function_is_over_80_lines_and_the_loop_fits_a_screen() -> None:
    lengths = _function_lengths()
    assert {k: n for k, n in lengths.items() if n > 80} == {}
    assert lengths["trainer.py:_train_loop"] <= 60


def test_a_checkpoint_from_before_run_ids_still_resumes(tiny_config, workdir: Path) -> None:
    """tests/assets/legacy-checkpoint-3 was written by sftrun 0.1.0 before run ids and the
    hardened manifest (commit 8476a0f), with the same tiny settings; only the identity hashes
    are re-pointed at this session's tiny model, as its build is not byte-stable."""
    cfg = tiny_config(eval_file=None, save_total_limit=1)
    out = workdir / "checkpoints/sft_model"
    assert main(["train", "-y", "--config", str(cfg), "output_dir=probe", "max_steps=1"]) == 0
    fresh = json.loads((workdir / "probe/checkpoint-1/manifest.json").read_text())["identity"]
    legacy = out / "checkpoint-3"
    shutil.copytree(REPO / "tests/assets/legacy-checkpoint-3", legacy)
    manifest = json.loads((legacy / "manifest.json").read_text())
    assert "run_id" not in manifest
    for key in ("base_model", "base_model_sha256", "tokenizer_sha256", "data_fingerprint"):
        manifest["identity"][key] = fresh[key]
    (legacy / "manifest.json").write_text(json.dumps(manifest))
    assert checkpoint.verify(legacy) is None
    assert main(["train", "-y", "--config", str(cfg), "--resume", "latest"]) == 0
    state = trainer_state(out / "checkpoint-12")
    assert state["resumed_from"] == [3] and state["global_step"] == 12
    assert state["run_id"] == checkpoint.run_id_of(out / "checkpoint-12")
    # Rotation (limit 1) removed this run's older checkpoints but never the legacy one.
    assert entries(out) == ["checkpoint-12", "checkpoint-3"]
