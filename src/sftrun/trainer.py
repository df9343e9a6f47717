"""One run's stages, read top to bottom in ``_run``: plan, build, confirm, lock, restore,
train, evaluate, finish.

Detail lives in the rooms it calls: ``plan`` (everything decided before the model exists),
``placement`` (model, optimizer, precision and devices), ``loop`` (the optimizer steps,
metrics, evaluation and saves), ``snapshot`` (what a checkpoint holds and how it comes back),
``checkpoint`` (the files), ``data`` and ``sampler`` (what each step sees), ``monitor`` (what
is shown). ``accelerate`` places the model, runs mixed precision and synchronises processes.
Tests and benchmarks reach in only through ``hooks.RunHooks``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shlex
import signal
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sftrun import checkpoint, distributed, integrity, mirror, rng, runlock
from sftrun import constants as C
from sftrun.config import TrainingConfig, config_to_dict
from sftrun.errors import SftrunError
from sftrun.hooks import RunHooks
from sftrun.loop import Loop, report_accuracy, train_loop
from sftrun.loss import LabelOnlyLoss
from sftrun.modeling import resolved_targets
from sftrun.monitor import (
    close_logging,
    mark_superseded_boards,
    run_summary,
    setup_logging,
    timestamp,
)
from sftrun.placement import Model, build_model, make_accelerator, memory_line, place
from sftrun.plan import RunPlan, make_plan, recheck_folder, sets_length
from sftrun.resume import flatten
from sftrun.trackers import Dashboards, Start

log = logging.getLogger("sftrun")


@dataclass
class RunOptions:
    """How this invocation runs, beside the config."""

    resume: str | None = None
    yes: bool = False
    no_unsloth: bool = False
    allow_data_change: bool = False
    console: bool = True
    # The settings arguments this run was started with (--config, KEY=VALUE, flags), so the
    # printed resume command reproduces the run.
    settings_args: list[str] = field(default_factory=list)
    hooks: RunHooks = field(default_factory=RunHooks)
    trained: bool = False  # set once this run holds its folder and starts training

    def resume_command(self, checkpoint_path: Path | None, world: int = 1, **changes: Any) -> str:
        """The command that resumes this run from ``checkpoint_path`` with its settings
        (and ``changes`` as KEY=VALUE in place of the same keys) on ``world`` processes (one
        machine, through ``sftrun.launch``, torchrun's arguments)."""
        target = str(checkpoint_path) if checkpoint_path is not None else C.RESUME_LATEST
        kept = [a for a in self.settings_args if a.partition("=")[0] not in changes]
        extra = [f"{k}={v}" for k, v in changes.items()]
        # Works from any folder and any shell: this folder (the config's relative paths are
        # relative to it), this interpreter, and the script this run was started with.
        script = Path(sys.argv[0]) if sys.argv else Path()
        entry = (
            [str(script.resolve())]
            if script.name == "run_model_training.py"
            else ["-m", "sftrun", "train"]
        )
        launch = ["-m", "sftrun.launch", "--standalone", f"--nproc_per_node={world}"]
        args = [sys.executable, *(launch if world > 1 else []), *entry]
        args += ["--resume", target, "-y", *kept, *extra]
        return f"cd {shlex.quote(os.getcwd())} && {shlex.join(args)}"


@dataclass
class RunResult:
    """What a run did, for the CLI's last line."""

    global_step: int
    total_steps: int
    last_checkpoint: Path | None
    log_file: Path
    board_dir: Path | None
    accuracy_before: float | None = None
    accuracy_after: float | None = None
    stopped_by: str | None = None  # signal name when a signal ended the run early
    cancelled: bool = False
    complete: bool = False  # the run had already reached its last step: nothing was done
    seconds: float = 0.0
    tokens_per_second: float = 0.0


class StopRequest:
    """SIGTERM/SIGHUP/SIGINT set a flag the loop checks after each optimizer step.

    The loop then commits a checkpoint and exits. A second SIGINT aborts at once; the last
    committed checkpoint is still intact because commits are atomic.
    """

    def __init__(self) -> None:
        self.received = 0  # the signal this process got (0: none)
        self.signal_name: str | None = None  # the one all processes agreed to stop on
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.received and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.received = signum
        log.warning(
            "%s received: finishing this step, then saving a checkpoint "
            "(press Ctrl-C again to abort without saving)",
            signal.Signals(signum).name,
        )

    def agree(self, device: Any) -> bool:
        """After a step: every process stops if any got a signal (one collective when
        there are several processes); True when the run must stop now."""
        agreed = distributed.agreed_signal(self.received, device)
        if agreed:
            self.signal_name = signal.Signals(agreed).name
        return bool(agreed)

    @contextlib.contextmanager
    def installed(self) -> Iterator[StopRequest]:
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)
        try:
            yield self
        finally:
            for signum, handler in self._previous.items():
                signal.signal(signum, handler)


def run_training(
    cfg: TrainingConfig, opts: RunOptions, log_started: tuple[str, Path] | None = None
) -> RunResult:
    """Train (or resume) one run as configured; see the module docstring for the stages.

    ``log_started`` is ``(timestamp, log file)`` when the caller already opened the run's log
    (the CLI does, so that a config error lands in it too); the caller then closes it.
    """
    if log_started is not None:
        return _run(cfg, opts, *log_started)
    stamp = timestamp()
    log_file = setup_logging(stamp, opts.console)
    try:
        return _run(cfg, opts, stamp, log_file)
    finally:
        close_logging()


def _run(cfg: TrainingConfig, opts: RunOptions, stamp: str, log_file: Path) -> RunResult:
    started = time.perf_counter()
    plan = make_plan(  # checkpoint, ownership, data, identity, length, schedule: all checked
        cfg,
        resume=opts.resume,
        no_unsloth=opts.no_unsloth,
        allow_data_change=opts.allow_data_change,
        length_set=sets_length(opts.settings_args),
    )
    try:
        return _planned_run(plan, opts, stamp, log_file, started)
    finally:
        mirror.discard(plan.staging)  # a download that did not join the run folder


def _planned_run(
    plan: RunPlan, opts: RunOptions, stamp: str, log_file: Path, started: float
) -> RunResult:
    if plan.complete:  # the caller says so (the CLI prints and logs one line)
        if plan.staging is not None:  # the final checkpoint, downloaded: keep it locally
            _with_lock(plan, lambda: None)
        step = plan.state.global_step
        return RunResult(step, plan.planned, plan.ckpt_path, log_file, None, complete=True)
    accelerator = make_accelerator(plan.dtype)
    model = build_model(plan, opts.hooks)  # base model + LoRA; refuses without disk space
    summary = run_summary(
        plan,
        trainable=sum(p.numel() for p in model.params),
        total=model.n_total,
        checkpoint_bytes=model.checkpoint_bytes,
        log_file=log_file,
        targets=resolved_targets(model.peft_model),
        memory=memory_line(plan, model, accelerator),
    )
    log.info("%s", summary)
    log.info("resolved config: %s", config_to_dict(plan.cfg))
    if not opts.yes and not distributed.decided_by_main(lambda: _confirm(summary)):
        log.info("cancelled; nothing was changed")
        return RunResult(plan.state.global_step, plan.planned, None, log_file, None, cancelled=True)
    # Everything so far only read; from here on this process owns the output folder.
    return _with_lock(
        plan,
        lambda: _train_run(plan, opts, accelerator, model, (stamp, summary, log_file, started)),
    )


def _with_lock(plan: RunPlan, work: Any) -> Any:
    """``work()`` while this run holds its output folder (see :func:`_lock_folder`)."""
    held: list[runlock.RunLock] = []
    try:
        distributed.decided_by_main(lambda: _lock_folder(plan, held))
        return work()
    finally:
        for lock in held:
            lock.release()


def _lock_folder(plan: RunPlan, held: list[runlock.RunLock]) -> None:
    """Take the output folder's lock, check that it is still as planned, then move a
    checkpoint downloaded from the mirror into it and claim the mirror for this run."""
    lock = runlock.acquire(plan.out)
    held.append(lock)
    if lock.note:
        log.warning("%s", lock.note)
    recheck_folder(plan)
    if plan.staging is not None and plan.ckpt_path is not None:
        plan.ckpt_path = mirror.commit(plan.ckpt_path, plan.out)
        mirror.discard(plan.staging)
        plan.staging = None
        log.info("moved the mirror's copy into %s", plan.ckpt_path)
    if plan.cfg.mirror_to:
        mirror.claim(plan.cfg.mirror_to, plan.state.run_id)


def _train_run(
    plan: RunPlan,
    opts: RunOptions,
    accelerator: Any,
    model: Model,
    started: tuple[str, str, Path, float],  # timestamp, summary, log file, start time
) -> RunResult:
    stamp, summary, log_file, t0 = started
    opts.trained = True
    _tidy_output_folder(plan, accelerator)
    make_loss = opts.hooks.make_loss or LabelOnlyLoss
    loss_module, optimizer, scaler = place(plan, accelerator, model, make_loss)
    board = _open_board(plan, accelerator, stamp, summary)
    ctx = Loop(plan, opts, accelerator, loss_module, optimizer, model.peft_model, board)
    ctx.scaler = scaler
    if plan.cfg.mirror_to and accelerator.is_main_process:
        ctx.uploader = mirror.Uploader(mirror.Remote(plan.cfg.mirror_to), plan.state.run_id)
    try:
        if plan.snapshot is None:
            plan.state.accuracy_before = report_accuracy(ctx, "before")
        _set_rng(plan, accelerator)  # last: the first step starts from a defined state
        stopper = StopRequest()
        with stopper.installed():
            train_loop(ctx, stopper)
    except KeyboardInterrupt:
        raise  # a second Ctrl-C: abort at once, without waiting for uploads
    except BaseException:
        _finish_uploads(ctx)  # what was committed reaches the mirror even when a step failed
        raise
    _finish_uploads(ctx)
    return _finish(ctx, stopper, log_file, t0)


def _finish_uploads(ctx: Loop) -> None:
    if ctx.uploader is not None:
        log.info("%s", ctx.uploader.finish())
        ctx.uploader = None


def _set_rng(plan: RunPlan, accelerator: Any) -> None:
    """Each process's random state for the first step: the checkpoint's own when it was
    written by as many processes, else derived from (seed, step, process)."""
    rank, world = accelerator.process_index, accelerator.num_processes
    if plan.snapshot is not None and plan.snapshot.world_size == world:
        plan.snapshot.restore_rng(rank)
    else:
        rng.seed_everything(distributed.rank_seed(plan.cfg.seed, plan.state.global_step, rank))


def _finish(ctx: Loop, stopper: StopRequest, log_file: Path, started: float) -> RunResult:
    state = ctx.plan.state
    result = RunResult(
        state.global_step,
        ctx.plan.planned,
        ctx.saved_here,
        log_file,
        ctx.board.path if ctx.board else None,
        accuracy_before=state.accuracy_before,
        stopped_by=stopper.signal_name,
    )
    if stopper.signal_name is None:
        result.accuracy_after = report_accuracy(ctx, "after")
        if ctx.board is not None and result.accuracy_after is not None:
            ctx.board.scalars(state.global_step, {"eval/accuracy": result.accuracy_after})
    if ctx.board is not None:
        ctx.board.close()
    result.seconds = time.perf_counter() - started
    result.tokens_per_second = ctx.tokens_per_second()
    return result


def _confirm(summary: str) -> bool:
    if not sys.stdin.isatty():
        raise SftrunError(
            "training waits for confirmation but there is no terminal to ask on; "
            "pass -y to start without asking"
        )
    answer = input("Start training? [y/N] ").strip().lower()
    return answer in ("y", "yes")


def _tidy_output_folder(plan: RunPlan, accelerator: Any) -> None:
    """Remove unfinished saves; move checkpoints newer than the resume step aside."""
    if not accelerator.is_main_process:
        return
    for tmp in checkpoint.remove_temp_folders(plan.out):
        log.info("removed unfinished save %s", tmp)
    moved = checkpoint.move_aside(plan.out, plan.newer)
    if moved is None:
        return
    log.info("moved %s into %s", ", ".join(p.name for p in plan.newer), moved)
    boards: set[str] = set()
    for folder in moved.iterdir():
        runs = integrity.peek(folder).get("state", {}).get("tensorboard_runs", [])
        boards |= {n for n in runs if isinstance(n, str)}
    renamed = mark_superseded_boards(boards, plan.state.global_step)
    plan.state.tensorboard_runs = [renamed.get(n, n) for n in plan.state.tensorboard_runs]


def _open_board(plan: RunPlan, accelerator: Any, stamp: str, summary: str) -> Dashboards | None:
    """The run's dashboards (process 0), each continuing its own run when resuming."""
    if not accelerator.is_main_process:
        return None
    state = plan.state
    start = Start(
        name=state.run_id,
        config=flatten(config_to_dict(plan.cfg)),
        step=state.global_step,
        runs=dict(state.tracker_runs),
        overrides={k: f"{was!r} -> {now!r}" for k, was, now in plan.overrides},
        resumed_from=list(state.resumed_from),
        boards=list(state.tensorboard_runs),
    )
    board = Dashboards(plan.cfg.report_to, start, stamp)
    state.tracker_runs.update(board.run_ids())
    if board.board is not None:
        if not board.board.continued:
            state.tensorboard_runs.append(board.board.path.name)
        board.text("config", f"```\n{summary}\n```", state.global_step)
        log.info(
            "TensorBoard: tensorboard --logdir %s (this run: %s)", C.TENSORBOARD_DIR, board.path
        )
    return board
