"""Dashboards across a kill -9 and a resume: TensorBoard, W&B (offline) and MLflow (SQLite).

Nothing here reaches a network: W&B writes its offline run files, which are read back from
its transaction log; MLflow writes a local SQLite store, read back through its client.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
from tests.conftest import tiny_settings, write_config
from tests.runs import run_sftrun, trainer_state

from sftrun.cli import main

OUT = Path("checkpoints/sft_model")
KEYS = ("train/loss", "train/learning_rate", "train/grad_norm", "train/epoch")


def _env(cwd: Path) -> dict[str, str]:
    return {
        "WANDB_MODE": "offline",
        "WANDB_DIR": str(cwd),
        "WANDB_SILENT": "true",
        # W&B writes its offline log every 15 s by default, and a SIGKILL loses what it has
        # not written (docs/trackers.md); these runs last seconds.
        "WANDB__TRANSACTION_LOG_FLUSH_INTERVAL": "0.1",
        "MLFLOW_TRACKING_URI": f"sqlite:///{cwd}/mlflow.db",
    }


def _train(cwd: Path, *args: str, env: dict[str, str] | None = None):
    return run_sftrun(
        ["train", "-y", "--config", "config.yaml", *args],
        cwd,
        env={**_env(cwd), **(env or {})},
        script="chaos.py",
    )


def wandb_segments(cwd: Path) -> list[tuple[str, int | None, dict[int, dict[str, float]]]]:
    """(run id, rewound to step or None, step -> values) of each offline W&B run folder,
    oldest first, read from its transaction log (W&B 0.31 ships no Python reader: the log is
    LevelDB's record format, 32 KiB blocks of CRC/length/type-headed chunks, after a 7-byte
    ':W&B' header; each record is a protobuf ``Record``)."""
    from wandb.proto import wandb_internal_pb2 as pb

    segments = []
    folders = sorted((cwd / "wandb").glob("offline-run-*"), key=lambda p: p.stat().st_mtime)
    for folder in folders:
        data = next(folder.glob("run-*.wandb")).read_bytes()
        assert data[:4] == b":W&B"
        pos, buf, run_id, rewind, steps = 7, b"", "", None, {}
        while pos + 7 <= len(data):
            room = 32768 - pos % 32768
            _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
            if room < 7 or (length == 0 and kind == 0):
                pos += room
                continue
            chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
            buf = chunk if kind in (1, 2) else buf + chunk
            if kind not in (1, 4):
                continue
            record = pb.Record()
            record.ParseFromString(buf)
            which = record.WhichOneof("record_type")
            if which == "run":
                run_id = record.run.run_id
                if record.run.HasField("branch_point"):
                    assert record.run.branch_point.run == run_id  # a rewind, not a fork
                    rewind = int(record.run.branch_point.value)
            elif which == "history":
                items = {  # a key with "/" comes as a one-element nested_key
                    i.key or "/".join(i.nested_key): json.loads(i.value_json)
                    for i in record.history.item
                }
                steps[int(items["_step"])] = {k: items[k] for k in KEYS if k in items}
        segments.append((run_id, rewind, steps))
    return segments


def mlflow_points(cwd: Path) -> tuple[list, dict[str, list]]:
    """The MLflow runs of the store and, for the only one, every logged point per key."""
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{cwd}/mlflow.db")
    experiment = client.get_experiment_by_name("sftrun")
    runs = client.search_runs([experiment.experiment_id])
    return runs, {k: client.get_metric_history(runs[0].info.run_id, k) for k in KEYS}


def tensorboard_steps(cwd: Path) -> tuple[int, dict[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    runs = list((cwd / "outputs/3_training/runs").iterdir())
    acc = EventAccumulator(str(runs[0]))
    acc.Reload()
    loss = acc.Scalars("train/loss")
    assert len({e.step for e in loss}) == len(loss), "a step shown twice"
    return len(runs), {e.step: e.value for e in loss}


@pytest.mark.slow
def test_a_killed_and_resumed_run_is_one_run_in_every_tracker_with_the_uninterrupted_values(
    tmp_path: Path, tiny_model: Path, sample_dir: Path
) -> None:
    settings = tiny_settings(
        tiny_model, sample_dir, eval_file=None, report_to=["tensorboard", "wandb", "mlflow"]
    )
    ref, cwd = tmp_path / "ref", tmp_path / "killed"
    for folder in (ref, cwd):
        folder.mkdir()
        write_config(folder / "config.yaml", settings)
    assert _train(ref).returncode == 0
    # SIGKILL as step 9 starts: steps 7 and 8 were logged everywhere, checkpoint-6 is the last.
    killed = _train(cwd, env={"SFTRUN_TEST_SIGNAL_AT_STEP": "8:SIGKILL"})
    assert killed.returncode == -9
    resumed = _train(cwd, "--resume", "latest")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    state = trainer_state(cwd / OUT / "checkpoint-12")
    assert state["resumed_from"] == [6]
    run_id = state["run_id"]
    assert state["tracker_runs"]["wandb"] == run_id  # W&B's id is sftrun's
    assert "wandb: run" in resumed.stdout and "continuing run" in resumed.stdout

    # TensorBoard: one run, every step once, the uninterrupted values.
    assert tensorboard_steps(cwd) == tensorboard_steps(ref)

    # W&B: one run id; the resumed segment rewinds to step 6 (later steps are replaced), so
    # no step repeats and each step's value is the uninterrupted run's.
    ((_, _, expected),) = wandb_segments(ref)
    first, second = wandb_segments(cwd)
    assert first[0] == second[0] == run_id and first[1] is None and second[1] == 6
    # (The last step before the kill may not have reached W&B's file: it writes in the
    # background; what matters is that steps 1-6 did, and the rest is replaced.)
    assert set(range(1, 7)) <= set(first[2]) <= set(range(1, 9))
    assert sorted(second[2]) == list(range(7, 13))
    history = {s: v for s, v in first[2].items() if s <= second[1]} | second[2]
    assert history == expected

    # MLflow: one run; steps 7 and 8 were logged twice, and the newest value of each step
    # is the uninterrupted run's.
    runs, points = mlflow_points(cwd)
    _, ref_points = mlflow_points(ref)
    assert len(runs) == 1 and runs[0].info.run_id == state["tracker_runs"]["mlflow"]
    assert runs[0].data.tags["sftrun.resumed_from"] == "6"
    assert runs[0].data.params["learning_rate"] == str(settings["learning_rate"])
    for key in KEYS:
        steps = [m.step for m in points[key]]
        assert sorted(steps) == sorted([*range(1, 13), 7, 8])
        newest = {m.step: m.value for m in sorted(points[key], key=lambda m: m.timestamp)}
        assert newest == {m.step: m.value for m in ref_points[key]}


def test_a_tracker_that_cannot_start_is_reported_once_and_training_goes_on(
    tiny_config, workdir: Path, monkeypatch, capsys
) -> None:
    tiny_config(max_steps=2, report_to=["tensorboard", "mlflow", "aim"])
    (workdir / "file").write_text("")  # a store that cannot be created under a file
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{workdir}/file/mlflow.db")
    assert main(["train", "-y", "--config", "config.yaml"]) == 0
    out = capsys.readouterr()
    err = out.out + out.err
    assert err.count("mlflow did not start (") == 1, err
    assert "training goes on without it" in err
    assert err.count("aim is not installed") == 1 and "pip install aim" in err
    state = trainer_state(OUT / "checkpoint-2")
    assert state["tracker_runs"] == {}
