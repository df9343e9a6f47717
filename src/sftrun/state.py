"""What a run tracks between optimizer steps, and its saved form ``trainer_state.json``.

Owns ``TrainState`` and both directions of its JSON form (Hugging Face ``TrainerState`` keys
plus sftrun's own). Never reads or writes files; ``checkpoint`` does that.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Any

from sftrun.config import TrainingConfig
from sftrun.sampler import SFTRUN


def new_run_id() -> str:
    """A new run's id."""
    return uuid.uuid4().hex


@dataclass
class TrainState:
    """Counters, history and bookkeeping of one run; restored exactly on resume."""

    global_step: int = 0
    samples_seen: int = 0
    tokens_seen: int = 0
    label_tokens_seen: int = 0
    log_history: list[dict[str, Any]] = field(default_factory=list)
    best_metric: float | None = None
    best_step: int | None = None
    best_model_checkpoint: str | None = None
    accuracy_before: float | None = None
    resumed_from: list[int] = field(default_factory=list)
    run_id: str = field(default_factory=new_run_id)
    tensorboard_runs: list[str] = field(default_factory=list)
    tracker_runs: dict[str, str] = field(default_factory=dict)  # tracker -> its run id
    # Which sampler order the run follows and its seed (None: the config's ``seed``); an
    # imported Hugging Face run keeps its trainer's (sampler.HF_TRAINER, data_seed or seed).
    data_order: str = SFTRUN
    data_seed: int | None = None
    imported_from: dict[str, Any] | None = None  # source folder, format and step of an import
    # The micro-batch split the run moved to after running out of memory (``oom: adapt``):
    # {"configured": [micro, accumulation], "adapted": [micro, accumulation], "step": k}.
    adapted_split: dict[str, Any] | None = None

    def to_dict(
        self, cfg: TrainingConfig, *, n_train: int, planned: int, global_batch: int
    ) -> dict[str, Any]:
        """The ``trainer_state.json`` form; ``epoch`` is ``samples_seen / n_train``."""
        return {
            # Hugging Face TrainerState keys
            "global_step": self.global_step,
            "epoch": self.samples_seen / n_train,
            "max_steps": planned,
            "num_train_epochs": planned * global_batch / n_train,
            "logging_steps": cfg.logging_steps,
            "save_steps": cfg.save_steps,
            "eval_steps": cfg.eval_steps,
            "train_batch_size": cfg.per_device_train_batch_size,
            "log_history": self.log_history,
            "best_metric": self.best_metric,
            "best_step": self.best_step,
            "best_model_checkpoint": self.best_model_checkpoint,
            "num_input_tokens_seen": self.tokens_seen,
            # sftrun's own
            "samples_seen": self.samples_seen,
            "tokens_seen": self.tokens_seen,
            "label_tokens_seen": self.label_tokens_seen,
            "num_examples": n_train,
            "global_batch_size": global_batch,
            "gradient_accumulation_steps": cfg.gradient_accumulation_steps,
            "accuracy_before": self.accuracy_before,
            "resumed_from": self.resumed_from,
            "run_id": self.run_id,
            "tensorboard_runs": self.tensorboard_runs,
            "tracker_runs": self.tracker_runs,
            "data_order": self.data_order,
            "data_seed": self.data_seed,
            "imported_from": self.imported_from,
            "adapted_split": self.adapted_split,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainState:
        """The state a checkpoint's ``trainer_state.json`` holds (keys it lacks get defaults;
        a state written before run ids gets a new one)."""
        return cls(
            global_step=int(data["global_step"]),
            samples_seen=int(data["samples_seen"]),
            tokens_seen=int(data.get("tokens_seen", 0)),
            label_tokens_seen=int(data.get("label_tokens_seen", 0)),
            log_history=list(data.get("log_history", [])),
            best_metric=data.get("best_metric"),
            best_step=data.get("best_step"),
            best_model_checkpoint=data.get("best_model_checkpoint"),
            accuracy_before=data.get("accuracy_before"),
            resumed_from=list(data.get("resumed_from", [])),
            run_id=str(data.get("run_id") or new_run_id()),
            tensorboard_runs=[str(n) for n in data.get("tensorboard_runs", [])],
            tracker_runs={str(k): str(v) for k, v in (data.get("tracker_runs") or {}).items()},
            data_order=str(data.get("data_order") or SFTRUN),
            data_seed=data.get("data_seed"),
            imported_from=data.get("imported_from"),
            adapted_split=data.get("adapted_split"),
        )
