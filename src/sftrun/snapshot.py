"""What a checkpoint holds: captured from a live run and restored into a new one, side by side.

``checkpoint`` owns the files (``CheckpointPayload`` is their in-memory form, one field per
file); this module owns what they mean: which piece of the run goes into which file under
which key, and how each piece comes back. A new piece of state is added here in three places
that sit next to each other (the field, :meth:`RunSnapshot.capture`, :meth:`RunSnapshot.restore`),
and the round trip in tests/test_structure.py proves that it comes back.

The order a resume restores in is part of exactness: adapter, optimizer and loss scaler
before accelerate wraps them (:meth:`RunSnapshot.restore`), the random states last, just
before the first step (:meth:`RunSnapshot.restore_rng`), so nothing draws from them between.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from sftrun import checkpoint, rng
from sftrun import constants as C
from sftrun.checkpoint import CheckpointPayload
from sftrun.errors import CheckpointError

# Keys inside the files (the file names are in constants).
SCHEDULE = "schedule"  # scheduler.pt: the LR schedule (schedule.Schedule.to_dict)
SCALER = "scaler"  # scheduler.pt: float16's GradScaler state
RANKS = "ranks"  # rng_state.pth: every process's state in rank order (several processes)
WORLD_SIZE = "world_size"  # training_args.bin: how many processes wrote the checkpoint
MODEL_PATH_ABSOLUTE = "model_path_absolute"  # training_args.bin: for tools run elsewhere


@dataclass
class RunSnapshot:
    """One step of a run, every piece typed; the checkpoint's files are its serialised form."""

    adapter: dict[str, torch.Tensor]  # the LoRA tensors (peft's state-dict names)
    adapter_config: dict[str, Any]  # peft's LoraConfig, as written to adapter_config.json
    optimizer: dict[str, Any]  # AdamW's state_dict
    schedule: dict[str, Any]  # schedule.Schedule.to_dict()
    scaler: dict[str, Any] | None  # GradScaler.state_dict() (float16 runs only)
    state: dict[str, Any]  # state.TrainState.to_dict(): counters, history, run bookkeeping
    args: dict[str, Any]  # the resolved config plus world_size and the base model's path
    rng: list[dict[str, Any]]  # every process's random state, in rank order
    identity: dict[str, Any]  # what a resume must match (resume.build_identity)
    run_id: str | None = None  # None only in checkpoints written before run ids existed

    @property
    def world_size(self) -> int:
        """The number of processes that wrote this snapshot."""
        return int(self.args.get(WORLD_SIZE, 1))

    @classmethod
    def capture(
        cls,
        peft_model: Any,
        optimizer: torch.optim.Optimizer,
        scaler: Any,
        *,
        schedule: dict[str, Any],
        state: dict[str, Any],
        config: dict[str, Any],
        rng_states: list[dict[str, Any]],
        identity: dict[str, Any],
    ) -> RunSnapshot:
        """The live run's state; ``rng_states`` holds every process's (see rng.capture)."""
        from peft import get_peft_model_state_dict

        adapter_config = peft_model.peft_config["default"].to_dict()
        adapter_config = {
            k: sorted(v) if isinstance(v, set) else v for k, v in adapter_config.items()
        }
        return cls(
            adapter=get_peft_model_state_dict(peft_model),
            adapter_config=adapter_config,
            optimizer=optimizer.state_dict(),
            schedule=schedule,
            scaler=scaler.state_dict() if scaler is not None else None,
            state=state,
            args={
                **config,
                WORLD_SIZE: len(rng_states),
                # Where the base model was, for tools run from another folder.
                MODEL_PATH_ABSOLUTE: str(Path(config["model_name_or_path"]).resolve()),
            },
            rng=rng_states,
            identity=identity,
            run_id=state.get("run_id"),
        )

    def restore(
        self, peft_model: Any, optimizer: torch.optim.Optimizer, scaler: Any, source: Path | None
    ) -> None:
        """Adapter, optimizer and loss scaler, into a freshly built run of the same shape
        (before accelerate wraps them). Refuses an optimizer state that does not fit."""
        from sftrun.modeling import restore_adapter, trainable_parameters

        restore_adapter(peft_model, self.adapter, source)
        check_optimizer_fits(self.optimizer, trainable_parameters(peft_model), source)
        optimizer.load_state_dict(self.optimizer)
        if scaler is not None and self.scaler is not None:
            scaler.load_state_dict(self.scaler)

    def restore_rng(self, rank: int) -> None:
        """Process ``rank``'s random state; call last, just before the first step. Only
        meaningful on the process count that wrote the snapshot (the caller checks)."""
        rng.restore(self.rng[rank])

    def to_payload(self) -> CheckpointPayload:
        """The files' layout: one process's random state is the whole rng file; several
        processes' are process 0's plus ``ranks``, so a one-process reader still works."""
        rng_file = self.rng[0] if len(self.rng) == 1 else {**self.rng[0], RANKS: self.rng}
        scheduler = {SCHEDULE: self.schedule}
        if self.scaler is not None:
            scheduler[SCALER] = self.scaler
        return CheckpointPayload(
            adapter_state=self.adapter,
            adapter_config=self.adapter_config,
            optimizer_state=self.optimizer,
            scheduler_state=scheduler,
            trainer_state=self.state,
            training_args=self.args,
            rng_state=rng_file,
            identity=self.identity,
            run_id=self.run_id,
        )

    @classmethod
    def from_payload(cls, payload: CheckpointPayload, path: Path) -> RunSnapshot:
        """The snapshot a checkpoint's files hold; a file whose content lies about its
        shape (no schedule, a rank list that does not match the process count) is refused."""
        world = payload.training_args.get(WORLD_SIZE, 1)
        schedule = payload.scheduler_state.get(SCHEDULE)
        scaler = payload.scheduler_state.get(SCALER)
        ranks = payload.rng_state.get(RANKS)
        rng_states = ranks if ranks is not None else [payload.rng_state]
        problem = None
        if not isinstance(world, int) or world < 1:
            problem = f"{C.TRAINING_ARGS_FILE} says {WORLD_SIZE}={world!r}"
        elif not isinstance(schedule, dict):
            problem = f"{C.SCHEDULER_FILE} holds no LR schedule"
        elif scaler is not None and not isinstance(scaler, dict):
            problem = f"{C.SCHEDULER_FILE} holds a loss-scaler state that is not a mapping"
        elif not isinstance(rng_states, list) or len(rng_states) != world:
            problem = (
                f"{C.RNG_STATE_FILE} does not hold one random state for each of {world} process(es)"
            )
        elif not all(isinstance(r, dict) for r in rng_states):
            problem = f"{C.RNG_STATE_FILE} holds a random state that is not a mapping"
        if problem is not None or not isinstance(schedule, dict):
            raise CheckpointError(f"{path}: {problem}; this checkpoint was not written by sftrun")
        return cls(
            adapter=payload.adapter_state,
            adapter_config=payload.adapter_config,
            optimizer=payload.optimizer_state,
            schedule=schedule,
            scaler=scaler,
            state=payload.trainer_state,
            args=payload.training_args,
            rng=rng_states,
            identity=payload.identity,
            run_id=payload.run_id,
        )


def load(path: Path) -> RunSnapshot:
    """The verified checkpoint at ``path`` (see checkpoint.load) as a snapshot."""
    return RunSnapshot.from_payload(checkpoint.load(path)[0], path)


def check_optimizer_fits(
    saved: dict[str, Any], params: list[torch.nn.Parameter], source: Path | None
) -> None:
    """torch pairs optimizer state with parameters by position without checking; check the
    count and every moment's shape first, so a mismatch is a refusal, not silent garbage."""
    ids = [i for group in saved.get("param_groups", []) for i in group.get("params", [])]
    problem = None
    if len(ids) != len(params):
        problem = f"it holds {len(ids)} parameters, this adapter has {len(params)}"
    else:
        for index, param in zip(ids, params, strict=True):
            for key, value in saved.get("state", {}).get(index, {}).items():
                if isinstance(value, torch.Tensor) and value.dim() and value.shape != param.shape:
                    problem = f"{key} of parameter {index} is {tuple(value.shape)}, not "
                    problem += f"{tuple(param.shape)}"
    if problem is not None:
        raise CheckpointError(
            f"{source}: {C.OPTIMIZER_FILE} does not fit this adapter ({problem}); "
            "resume with the LoRA settings the checkpoint was made with"
        )
