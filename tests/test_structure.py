"""The code's own rules: a total resume policy, seams instead of patches, short functions,
and a checkpoint written before the current format still resumes."""

from __future__ import annotations

import ast
import dataclasses
import json
import re
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from tests.conftest import REPO
from tests.runs import entries, trainer_state

from sftrun import checkpoint, integrity
from sftrun.cli import main
from sftrun.config import TrainingConfig
from sftrun.resume import IDENTITY, KEPT, TUNABLE


def test_resume_policy_names_every_config_key_exactly_once() -> None:
    groups = [set(IDENTITY), set(TUNABLE), set(KEPT)]
    assert set().union(*groups) == set(TrainingConfig.model_fields)
    assert sum(len(g) for g in groups) == len(TrainingConfig.model_fields)  # no overlap


def test_the_resume_docs_and_config_comments_are_generated_from_the_policy() -> None:
    """docs/resume.md's table and every "[resume: ...]" comment of the config file say what
    resume.IDENTITY/TUNABLE/KEPT say (regenerate: python -m tests.helpers.policy_docs)."""
    from tests.helpers.policy_docs import CONFIG, DOC, config_text, doc_text

    from sftrun.resume import config_rule

    CONFIG_DOC = REPO / "docs/configuration.md"

    assert DOC.read_text() == doc_text(DOC.read_text())
    assert CONFIG.read_text() == config_text(CONFIG.read_text())
    assert "[resume: may change]" in CONFIG.read_text().split("eval_file:")[1].splitlines()[0]
    # docs/configuration.md's "on resume" column starts from the same rule, key by key.
    rows = re.findall(r"^\| `([a-z_.0-9]+)` \|.*\| ([^|]*) \|$", CONFIG_DOC.read_text(), re.M)
    assert rows and all(config_rule(key.split(".")[0]) in said for key, said in rows), rows


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


def test_no_test_patches_the_file_system_calls_behind_the_seam() -> None:
    """A full disk, a denied folder or a count of reads goes through sftrun.fs.replaced."""
    seam = re.compile(r"setattr\(\s*[\"']?(os|shutil|tempfile|safetensors)\b")
    files = [*(REPO / "tests").rglob("*.py"), *(REPO / "bench").rglob("*.py")]
    offenders = [
        f"{f.relative_to(REPO)}:{n}"
        for f in files
        if f.name != "test_structure.py"  # the patch detector's own examples
        for n, line in enumerate(f.read_text().splitlines(), 1)
        if seam.search(line)
    ]
    assert offenders == []


def _function_lengths() -> dict[str, int]:
    lengths = {}
    for path in (REPO / "src/sftrun").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef):
                assert node.end_lineno is not None
                lengths[f"{path.name}:{node.name}"] = node.end_lineno - node.lineno + 1
    return lengths


def test_no_module_is_over_450_lines() -> None:
    """A module that outgrows this gets a room of its own (see ARCHITECTURE's module map)."""
    sizes = {p.name: len(p.read_text().splitlines()) for p in (REPO / "src/sftrun").glob("*.py")}
    assert {name: n for name, n in sizes.items() if n > 450} == {}


def test_every_public_function_and_class_says_what_it_is_for() -> None:
    undocumented = [
        f"{path.name}:{node.name}"
        for path in (REPO / "src/sftrun").glob("*.py")
        for node in ast.parse(path.read_text()).body
        if isinstance(node, ast.FunctionDef | ast.ClassDef)
        and not node.name.startswith("_")
        and not ast.get_docstring(node)
    ]
    assert undocumented == []


def test_no_function_is_over_80_lines_and_the_loop_fits_a_screen() -> None:
    lengths = _function_lengths()
    assert {k: n for k, n in lengths.items() if n > 80} == {}
    assert lengths["loop.py:train_loop"] <= 60


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
    assert integrity.verify(legacy) is None
    assert main(["train", "-y", "--config", str(cfg), "--resume", "latest"]) == 0
    state = trainer_state(out / "checkpoint-12")
    assert state["resumed_from"] == [3] and state["global_step"] == 12
    assert state["run_id"] == integrity.run_id_of(out / "checkpoint-12")
    # Rotation (limit 1) removed this run's older checkpoints but never the legacy one.
    assert entries(out) == ["checkpoint-12", "checkpoint-3"]


def _tiny_peft(seed: int) -> Any:
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    shape = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1}
    base = LlamaForCausalLM(
        LlamaConfig(vocab_size=32, num_attention_heads=2, num_key_value_heads=2, **shape)
    )
    lora = LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"])
    return get_peft_model(base, lora)


def _live(seed: int) -> tuple[Any, torch.optim.Optimizer, torch.amp.GradScaler]:
    """A peft model one AdamW step in (so every moment exists) and a used loss scaler."""
    model = _tiny_peft(seed)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.1)
    ids = torch.randint(0, 32, (2, 6))
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**seed)
    scaler.scale(torch.ones(()))  # creates the scale
    scaler.update(2.0 ** (seed + 1))
    return model, optimizer, scaler


def _same(a: Any, b: Any, where: str) -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), where
        for key in a:
            _same(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, list | tuple):
        assert isinstance(b, list | tuple) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _same(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def test_everything_a_snapshot_saves_is_restored(tmp_path: Path) -> None:
    """Captured from one live run, through the files, into a differently initialised one,
    and captured again: every field of RunSnapshot (a new field is covered by this loop)
    comes back, and the live pieces (adapter, optimizer, scaler, each rank's RNG) equal."""
    from sftrun import rng
    from sftrun.snapshot import RunSnapshot, load

    model, optimizer, scaler = _live(seed=3)
    ranks = [rng.capture()]
    torch.rand(5)  # the second "process" is at another point of its stream
    ranks.append(rng.capture())
    extras = {
        "schedule": {"kind": "cosine", "peak_lr": 0.1, "total_steps": 9},
        "state": {
            "global_step": 5,
            "run_id": "0123abcd",
            "log_history": [{"step": 5, "loss": 1.5}],
        },
        "config": {"model_name_or_path": "model/models", "learning_rate": 0.1},
        "identity": {"seed": 3, "global_batch_size": 4},
    }
    saved = RunSnapshot.capture(model, optimizer, scaler, rng_states=ranks, **extras)
    path = checkpoint.save(tmp_path, 5, saved.to_payload())
    back = load(path)
    for f in dataclasses.fields(RunSnapshot):
        _same(getattr(saved, f.name), getattr(back, f.name), f.name)
    assert back.world_size == 2 and back.run_id == "0123abcd"

    model2, optimizer2, scaler2 = _live(seed=4)  # other weights, moments and scale
    back.restore(model2, optimizer2, scaler2, path)
    back.restore_rng(1)
    again = RunSnapshot.capture(
        model2, optimizer2, scaler2, rng_states=[ranks[0], rng.capture()], **extras
    )
    for f in dataclasses.fields(RunSnapshot):
        _same(getattr(saved, f.name), getattr(again, f.name), f.name)


def test_a_snapshot_file_that_lies_about_its_shape_is_refused(tmp_path: Path) -> None:
    from sftrun import rng
    from sftrun.errors import CheckpointError
    from sftrun.snapshot import RunSnapshot, load

    model, optimizer, _ = _live(seed=1)
    saved = RunSnapshot.capture(
        model,
        optimizer,
        None,
        schedule={"kind": "constant"},
        state={"global_step": 1, "run_id": "0123abcd"},
        config={"model_name_or_path": "m"},
        rng_states=[rng.capture(), rng.capture()],
        identity={},
    )
    payload = saved.to_payload()
    payload.rng_state["ranks"] = payload.rng_state["ranks"][:1]  # two processes, one state
    path = checkpoint.save(tmp_path, 1, payload)
    with pytest.raises(CheckpointError, match="one random state for each of 2 process"):
        load(path)
