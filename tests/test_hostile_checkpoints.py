"""A careless or hostile user, against checkpoint files: manifests and state files are
validated and never trusted, a diverged step is never committed, and training longer from a
finished run trains.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any

import pytest
from tests.runs import (
    OUT,
    adapter,
    cli,
    manifest_entry,
    one_line_error,
    rewrite_manifest,
    train,
    trainer_state,
)

from sftrun import checkpoint, integrity, runfolder

# Files every command may create: its own log and the data stage's cache and stats.
SIDE_FILES = ("outputs/logs", "outputs/1_data")


# --- 3. manifests and state files are validated, never trusted -------------------------------


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
        rewrite_manifest(
            ckpt, lambda m: m["files"].update({"../../../secret.txt": manifest_entry(b"")})
        )
    elif attack == "absolute":
        entry = manifest_entry(secret.read_bytes())
        rewrite_manifest(ckpt, lambda m: m["files"].update({str(secret): entry}))
    elif attack == "dev_zero":
        rewrite_manifest(ckpt, lambda m: m["files"].update({"/dev/zero": manifest_entry(b"")}))
    elif attack == "link_out":
        (ckpt / "scheduler.pt").unlink()
        os.symlink(secret, ckpt / "scheduler.pt")
    elif attack == "fifo":
        (ckpt / "rng_state.pth").unlink()
        os.mkfifo(ckpt / "rng_state.pth")
    elif attack == "wrong_shape":
        rewrite_manifest(ckpt, lambda m: m["files"].update({"optimizer.pt": 5}))
    elif attack in ("state_list", "step_mismatch"):
        body = b"[1]" if attack == "state_list" else (run / "checkpoint-3/trainer_state.json")
        data = body if isinstance(body, bytes) else body.read_bytes()
        (ckpt / "trainer_state.json").write_bytes(data)
        rewrite_manifest(
            ckpt, lambda m: m["files"].update({"trainer_state.json": manifest_entry(data)})
        )
    elif attack == "nan_adapter":
        tensors = adapter(ckpt)
        first = next(iter(tensors))
        tensors[first][0] = float("nan")
        data = safetensors.torch.save(tensors, metadata={"format": "pt"})
        (ckpt / "adapter_model.safetensors").write_bytes(data)
        rewrite_manifest(ckpt, lambda m: m["files"].update({C_ADAPTER: manifest_entry(data)}))
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
