"""Dashboards: TensorBoard, Weights & Biases, MLflow and the other trackers accelerate knows.

Owns one tracker run per sftrun run, continued on resume: the tracker's run id is kept in
every checkpoint (``tracker_runs`` in ``trainer_state.json``). TensorBoard purges the steps a
killed run drew after its checkpoint (``monitor.Board``); W&B rewinds its run to the
checkpoint's step (``resume_from``, steps after it are replaced); MLflow cannot remove
points, so those steps are logged again and the newest value of a step is the one that
counts (docs/trackers.md). Records the config
when a run starts, and the overrides and the resume step when it resumes. A tracker that
fails to start or to log is reported once and left out from then on; training never stops
for it. Process 0 only. Each tracker takes its settings from its own environment variables.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sftrun.monitor import Board

log = logging.getLogger("sftrun")

INSTALL = {"wandb": "pip install 'sftrun[wandb]'", "mlflow": "pip install 'sftrun[mlflow]'"}


@dataclass(frozen=True)
class Start:
    """What the trackers are told when a run starts or resumes."""

    name: str  # the sftrun run id
    config: dict[str, Any]  # flat: "lora.r" -> 8
    step: int  # the checkpoint's step (0: a new run)
    runs: dict[str, str]  # tracker -> its run id, from the checkpoint
    overrides: dict[str, str] = field(default_factory=dict)  # key -> "old -> new"
    resumed_from: list[int] = field(default_factory=list)
    boards: list[str] = field(default_factory=list)  # TensorBoard folders, the last one last


class _WandB:
    """A W&B run with the sftrun run id as its id; a resume rewinds it (``resume_from``)."""

    name = "wandb"

    def __init__(self, start: Start) -> None:
        import wandb

        settings = wandb.Settings(console="off")
        project = os.environ.get("WANDB_PROJECT", "sftrun")
        run_id = start.runs.get(self.name)
        self.run = None
        if run_id and start.step:
            try:  # keep steps <= the checkpoint's; the next step W&B takes is step + 1
                rewind = f"{run_id}?_step={start.step}"
                self.run = wandb.init(project=project, resume_from=rewind, settings=settings)
            except Exception as exc:  # a server without rewind refuses it at init
                log.warning(
                    "W&B could not rewind run %s to step %d (%s); continuing it instead: the "
                    "steps after %d that the stopped run logged stay, and W&B ignores the "
                    "repeated ones",
                    run_id,
                    start.step,
                    _reason(exc),
                    start.step,
                )
        if self.run is None:
            self.run = wandb.init(
                project=project,
                id=run_id or start.name,
                resume="allow",
                name=start.name,
                config=start.config,
                settings=settings,
            )
        self.run_id = str(self.run.id)
        if start.step:
            events = {"resumed_from": start.resumed_from, "overrides": start.overrides}
            self.run.config.update(events, allow_val_change=True)

    def log(self, step: int, values: dict[str, float]) -> None:
        assert self.run is not None
        self.run.log(values, step=step)

    def close(self) -> None:
        assert self.run is not None
        self.run.finish()


class _MLflow:
    """An MLflow run continued by id; it keeps every point (the newest per step counts)."""

    name = "mlflow"

    def __init__(self, start: Start) -> None:
        from mlflow import MlflowClient

        self.client = MlflowClient()  # MLFLOW_TRACKING_URI, or MLflow's default store
        run_id = start.runs.get(self.name)
        if run_id:
            self.client.update_run(run_id, status="RUNNING")
        else:
            name = os.environ.get("MLFLOW_EXPERIMENT_NAME", "sftrun")
            found = self.client.get_experiment_by_name(name)
            experiment = found.experiment_id if found else self.client.create_experiment(name)
            run_id = self.client.create_run(experiment, run_name=start.name).info.run_id
            params = {k: str(v)[:6000] for k, v in start.config.items()}
            for key, value in params.items():
                self.client.log_param(run_id, key, value)
            self.client.set_tag(run_id, "sftrun.run_id", start.name)
        self.run_id = run_id
        if start.step:
            resumed = ",".join(str(s) for s in start.resumed_from)
            self.client.set_tag(run_id, "sftrun.resumed_from", resumed)
            for key, change in start.overrides.items():
                self.client.set_tag(run_id, f"sftrun.override.{key}", change)

    def log(self, step: int, values: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(k, float(v), now, step) for k, v in values.items()]
        self.client.log_batch(self.run_id, metrics=metrics)

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


class _Accelerate:
    """Any other tracker accelerate supports: a new tracker run at every start."""

    def __init__(self, name: str, start: Start) -> None:
        from accelerate.tracking import LOGGER_TYPE_TO_CLASS

        self.name = name
        self.tracker = LOGGER_TYPE_TO_CLASS[name](start.name)
        self.tracker.start()
        self.tracker.store_init_configuration(start.config)
        self.run_id = ""

    def log(self, step: int, values: dict[str, float]) -> None:
        self.tracker.log(values, step=step)

    def close(self) -> None:
        self.tracker.finish()


def _reason(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]


class Dashboards:
    """Every configured dashboard of one run; what fails is reported once, then left out."""

    def __init__(self, names: Sequence[str], start: Start, stamp: str) -> None:
        self.board = None
        if "tensorboard" in names:
            last = start.boards[-1] if start.boards and start.step else None
            self.board = Board(stamp, (last, start.step) if last else None)
        self.trackers: list[Any] = []
        for name in names:
            if name != "tensorboard":
                self._start(name, start)

    def _start(self, name: str, start: Start) -> None:
        makers: dict[str, Callable[[], Any]] = {
            "wandb": lambda: _WandB(start),
            "mlflow": lambda: _MLflow(start),
        }
        try:
            tracker = makers.get(name, lambda: _Accelerate(name, start))()
        except ImportError as exc:
            hint = INSTALL.get(name, f"pip install {name}")
            log.warning(
                "%s is not installed (%s); training goes on without it: %s", name, exc, hint
            )
            return
        except Exception as exc:  # a tracker's own errors: network, credentials, its store
            log.warning("%s did not start (%s); training goes on without it", name, _reason(exc))
            return
        self.trackers.append(tracker)
        continued = f", continuing run {tracker.run_id}" if start.runs.get(name) else ""
        log.info("%s: run %s%s", name, tracker.run_id or start.name, continued)

    @property
    def path(self) -> Path | None:
        return self.board.path if self.board is not None else None

    def run_ids(self) -> dict[str, str]:
        """Tracker -> run id, for the checkpoint (trackers without one are left out)."""
        return {t.name: t.run_id for t in self.trackers if t.run_id}

    def scalars(self, step: int, values: dict[str, float]) -> None:
        if self.board is not None:
            self.board.scalars(step, values)
        self._each("log", lambda t: t.log(step, values))

    def text(self, tag: str, body: str, step: int) -> None:
        if self.board is not None:
            self.board.text(tag, body, step)

    def close(self) -> None:
        if self.board is not None:
            self.board.close()
        self._each("close", lambda t: t.close())

    def _each(self, what: str, call: Callable[[Any], None]) -> None:
        for tracker in list(self.trackers):
            try:
                call(tracker)
            except Exception as exc:  # never let a dashboard stop training
                self.trackers.remove(tracker)
                log.warning(
                    "%s failed to %s (%s); training goes on without it",
                    tracker.name,
                    what,
                    _reason(exc),
                )
