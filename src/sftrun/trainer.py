"""The training loop: one run from config (and optionally a checkpoint) to the last step.

Owns the order of a run's stages, read top to bottom in ``_run``: plan, build, confirm,
restore, train, evaluate. Detail lives in the modules it calls: ``plan`` (everything decided
before the model exists), ``data`` and ``sampler`` (what each step sees), ``schedule`` (the
LR), ``checkpoint`` (the files), ``modeling`` (model and loss), ``monitor`` (what is shown),
``state`` (what is counted). ``accelerate`` places the model, runs mixed precision and
synchronises processes. Tests and benchmarks reach in only through ``hooks.RunHooks``.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import shlex
import shutil
import signal
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from sftrun import checkpoint, distributed, memory, mirror, rng, runlock
from sftrun import constants as C
from sftrun.config import TrainingConfig, config_to_dict
from sftrun.data import collate
from sftrun.errors import DiskSpaceError, DivergenceError, SftrunError
from sftrun.evaluate import eval_loss, generation_accuracy
from sftrun.hooks import RunHooks
from sftrun.modeling import (
    LabelOnlyLoss,
    load_lora_model,
    resolved_targets,
    restore_adapter,
    trainable_parameters,
)
from sftrun.monitor import (
    close_logging,
    fmt_bytes,
    mark_superseded_boards,
    progress_bar,
    run_summary,
    setup_logging,
    timestamp,
)
from sftrun.plan import RunPlan, make_plan, recheck_folder, sets_length
from sftrun.resume import flatten
from sftrun.sampler import step_indices
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
    accelerator = _make_accelerator(plan.dtype)
    model = _build_model(plan, opts.hooks)  # base model + LoRA; refuses without disk space
    summary = run_summary(
        plan,
        trainable=sum(p.numel() for p in model.params),
        total=model.n_total,
        checkpoint_bytes=model.checkpoint_bytes,
        log_file=log_file,
        targets=resolved_targets(model.peft_model),
        memory=_memory(plan, model, accelerator),
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
    model: _Model,
    started: tuple[str, str, Path, float],  # timestamp, summary, log file, start time
) -> RunResult:
    stamp, summary, log_file, t0 = started
    opts.trained = True
    _tidy_output_folder(plan, accelerator)
    loss_module, optimizer = _place(plan, accelerator, model, opts.hooks.make_loss or LabelOnlyLoss)
    board = _open_board(plan, accelerator, stamp, summary)
    ctx = _Loop(plan, opts, accelerator, loss_module, optimizer, model.peft_model, board)
    ctx.scaler = _loss_scaler(plan, accelerator)
    if plan.cfg.mirror_to and accelerator.is_main_process:
        ctx.uploader = mirror.Uploader(mirror.Remote(plan.cfg.mirror_to), plan.state.run_id)
    try:
        if plan.payload is None:
            plan.state.accuracy_before = _report_accuracy(ctx, "before")
        _set_rng(plan, accelerator)  # last: the first step starts from a defined state
        stopper = StopRequest()
        with stopper.installed():
            _train_loop(ctx, stopper)
    except KeyboardInterrupt:
        raise  # a second Ctrl-C: abort at once, without waiting for uploads
    except BaseException:
        _finish_uploads(ctx)  # what was committed reaches the mirror even when a step failed
        raise
    _finish_uploads(ctx)
    return _finish(ctx, stopper, log_file, t0)


def _loss_scaler(plan: RunPlan, acc: Any) -> Any:
    """float16: a GradScaler, restored from the checkpoint when resuming (planning refused a
    float16 checkpoint without its state, before anything was touched)."""
    if plan.dtype != "float16":
        return None
    scaler = torch.amp.GradScaler(acc.device.type)
    if plan.payload is not None:
        scaler.load_state_dict(plan.payload.scheduler_state["scaler"])
    return scaler


def _finish_uploads(ctx: _Loop) -> None:
    if ctx.uploader is not None:
        log.info("%s", ctx.uploader.finish())
        ctx.uploader = None


def _set_rng(plan: RunPlan, accelerator: Any) -> None:
    """Each process's random state for the first step: the checkpoint's own when it was
    written by as many processes, else derived from (seed, step, process)."""
    rank, world = accelerator.process_index, accelerator.num_processes
    saved = plan.payload.rng_state if plan.payload is not None else None
    saved_world = int(plan.payload.training_args.get("world_size", 1)) if plan.payload else 0
    if saved is not None and saved_world == world:
        rng.restore(saved["ranks"][rank] if world > 1 else saved)
    else:
        rng.seed_everything(distributed.rank_seed(plan.cfg.seed, plan.state.global_step, rank))


def _finish(ctx: _Loop, stopper: StopRequest, log_file: Path, started: float) -> RunResult:
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
        result.accuracy_after = _report_accuracy(ctx, "after")
        if ctx.board is not None and result.accuracy_after is not None:
            ctx.board.scalars(state.global_step, {"eval/accuracy": result.accuracy_after})
    if ctx.board is not None:
        ctx.board.close()
    result.seconds = time.perf_counter() - started
    result.tokens_per_second = ctx.tokens_per_second()
    return result


def _make_accelerator(dtype: str) -> Any:
    from accelerate import Accelerator

    return Accelerator(
        cpu=not torch.cuda.is_available(),
        mixed_precision="bf16" if dtype == "bfloat16" else "no",
    )


def _memory(plan: RunPlan, model: _Model, acc: Any) -> str:
    """The summary's memory line; a warning (with the setting to change) if it may not fit."""
    cfg = plan.cfg
    e = memory.estimate(
        model.peft_model,
        micro_batch=cfg.per_device_train_batch_size,
        seq_len=cfg.max_seq_length,
        compute_bytes=4 if plan.dtype == "float32" else 2,
        checkpointing=cfg.gradient_checkpointing,
        device=acc.device,
    )
    if not e.fits():
        log.warning(
            "the estimated peak memory (%s) is more than %d%% of %s (%s); to fit, set %s",
            fmt_bytes(e.total),
            int(memory.WARN_SHARE * 100),
            e.device,
            fmt_bytes(e.capacity or 0),
            memory.advice(e, cfg),
        )
    return memory.summary_line(e, cfg.gradient_checkpointing)


def _confirm(summary: str) -> bool:
    if not sys.stdin.isatty():
        raise SftrunError(
            "training waits for confirmation but there is no terminal to ask on; "
            "pass -y to start without asking"
        )
    answer = input("Start training? [y/N] ").strip().lower()
    return answer in ("y", "yes")


@dataclass
class _Model:
    peft_model: Any
    params: list[torch.nn.Parameter]
    n_total: int
    checkpoint_bytes: int


def _build_model(plan: RunPlan, hooks: RunHooks) -> _Model:
    """Base model with a LoRA adapter; its init is seeded (a resume overwrites it)."""
    cfg = plan.cfg
    rng.seed_everything(cfg.seed)
    compute_dtype = getattr(torch, plan.dtype)  # the frozen base; LoRA weights stay fp32
    peft_model = load_lora_model(
        cfg.model_name_or_path,
        cfg.lora,
        plan.backend,
        compute_dtype,
        cfg.max_seq_length,
        fast_lora=hooks.fast_lora,
        gradient_checkpointing=cfg.gradient_checkpointing,
        quantization=cfg.quantization,
    )
    params = trainable_parameters(peft_model)
    n_total = sum(p.numel() for p in peft_model.parameters())
    return _Model(peft_model, params, n_total, _check_disk(plan.out, params))


def _check_disk(output_dir: Path, params: list[torch.nn.Parameter]) -> int:
    """Refuse to start when the free space cannot hold two checkpoints; return one's estimate."""
    # Adapter weights + AdamW's two moments, all fp32-sized, plus small JSON/RNG files.
    per_ckpt = sum(p.numel() * 4 for p in params) * 3 + 256 * 1024
    probe = output_dir
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if free < 2 * per_ckpt:
        raise DiskSpaceError(
            f"not enough disk space in {probe}: {fmt_bytes(free)} free, but two checkpoints "
            f"need about {fmt_bytes(2 * per_ckpt)} ({fmt_bytes(per_ckpt)} each); free some "
            "space or set output_dir to a larger disk"
        )
    return per_ckpt


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
        runs = checkpoint.peek(folder).get("state", {}).get("tensorboard_runs", [])
        boards |= {n for n in runs if isinstance(n, str)}
    renamed = mark_superseded_boards(boards, plan.state.global_step)
    plan.state.tensorboard_runs = [renamed.get(n, n) for n in plan.state.tensorboard_runs]


def _place(plan: RunPlan, acc: Any, model: _Model, make_loss: Any) -> tuple[Any, Any]:
    """The loss module and the optimizer (restored when resuming), on the device.

    DDP (and one process): accelerate places and wraps the whole model. FSDP: the frozen
    decoder layers are sharded over the processes first; the adapter stays whole, so the
    optimizer is the same as under DDP, and the loop averages its gradients itself.
    """
    if not plan.sharded:
        optimizer = _optimizer(plan, model.peft_model)
        return acc.prepare(make_loss(model.peft_model), optimizer)
    base = model.peft_model.get_base_model()
    layers = distributed.shard_frozen_layers(base, acc.device, set(model.params))
    log.info("FSDP: %d decoder layers sharded over %d processes", layers, plan.world)
    optimizer = acc.prepare(_optimizer(plan, model.peft_model))
    return make_loss(model.peft_model), optimizer


def _optimizer(plan: RunPlan, peft_model: Any) -> torch.optim.Optimizer:
    """AdamW over the adapter; when resuming, adapter and optimizer come from the checkpoint."""
    cfg = plan.cfg
    optimizer = torch.optim.AdamW(
        trainable_parameters(peft_model),
        lr=plan.schedule.lr(plan.state.global_step),
        betas=(cfg.adam_beta1, cfg.adam_beta2),
        eps=cfg.adam_epsilon,
        weight_decay=cfg.weight_decay,
    )
    if plan.payload is not None:
        restore_adapter(peft_model, plan.payload.adapter_state, plan.ckpt_path)
        _check_optimizer_state(plan, trainable_parameters(peft_model))
        optimizer.load_state_dict(plan.payload.optimizer_state)
        for group in optimizer.param_groups:
            group["weight_decay"] = cfg.weight_decay  # tunable; betas/eps stay the checkpoint's
        log.info(
            "restored from %s: adapter (%d tensors), optimizer, schedule, step %d, "
            "%d samples seen, RNG states",
            plan.ckpt_path,
            len(plan.payload.adapter_state),
            plan.state.global_step,
            plan.state.samples_seen,
        )
    return optimizer


def _check_optimizer_state(plan: RunPlan, params: list[torch.nn.Parameter]) -> None:
    """torch pairs optimizer state with parameters by position without checking; check the
    count and every moment's shape first, so a mismatch is a refusal, not silent garbage."""
    assert plan.payload is not None
    saved = plan.payload.optimizer_state
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
        raise SftrunError(
            f"{plan.ckpt_path}: {C.OPTIMIZER_FILE} does not fit this adapter ({problem}); "
            "resume with the LoRA settings the checkpoint was made with"
        )


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


@dataclass
class _Loop:
    """The plan plus what setup built from it: what the loop, evals and saves need."""

    plan: RunPlan
    opts: RunOptions
    acc: Any
    loss_module: Any
    optimizer: Any
    peft_model: Any
    board: Dashboards | None
    train_seconds: float = 0.0
    train_tokens: int = 0
    saved_here: Path | None = None  # the last checkpoint this process committed
    uploader: mirror.Uploader | None = None  # process 0 with mirror_to set
    scaler: Any = None  # torch.amp.GradScaler with dtype float16
    rotation_failed: bool = False  # warned once that rotation could not delete a checkpoint

    def cannot_delete(self, path: Path, exc: OSError) -> None:
        """Rotation could not delete ``path``: training goes on; the first time, say so."""
        if not self.rotation_failed:
            log.warning(
                "could not delete %s to keep save_total_limit=%s (%s); training goes on and "
                "keeps the extra checkpoints (this is said once; delete them yourself, or fix "
                "the folder's permissions)",
                path,
                self.cfg.save_total_limit,
                exc.strerror or exc,
            )
        self.rotation_failed = True

    @property
    def cfg(self) -> TrainingConfig:
        return self.plan.cfg

    def autocast(self) -> Any:
        """The forward's precision: accelerate's bf16 autocast, or our fp16 one (accelerate
        has no fp16 on the CPU, so float16 uses torch's autocast and GradScaler directly on
        every device)."""
        if self.scaler is None:
            return self.acc.autocast()
        return torch.autocast(self.acc.device.type, dtype=torch.float16)

    @property
    def hooks(self) -> RunHooks:
        return self.opts.hooks

    def tokens_per_second(self) -> float:
        return self.train_tokens / self.train_seconds if self.train_seconds else 0.0


@dataclass(frozen=True)
class StepStats:
    """What one optimizer step did."""

    loss: float  # mean per label token, over every process
    grad_norm: float
    lr: float
    tokens: int  # attended tokens, every process
    label_tokens: int
    seconds: float


@dataclass
class MetricsWindow:
    """Steps since the last log line; averaged into one entry of ``log_history``."""

    loss: float = 0.0
    steps: int = 0
    tokens: int = 0
    seconds: float = 0.0

    def add(self, stats: StepStats) -> None:
        self.loss += stats.loss
        self.steps += 1
        self.tokens += stats.tokens
        self.seconds += stats.seconds

    def mean_loss(self) -> float:
        return self.loss / max(1, self.steps)

    def tokens_per_second(self) -> float:
        return self.tokens / max(1e-9, self.seconds)


def _due(step: int, every: int, last: int) -> bool:
    """True at every ``every``-th step (0: never) and at the run's last step."""
    return (every > 0 and step % every == 0) or step == last


def _train_loop(ctx: _Loop, stopper: StopRequest) -> None:
    """Optimizer steps until the planned end or a stop signal; log, evaluate, save."""
    cfg, plan, state = ctx.cfg, ctx.plan, ctx.plan.state
    window = MetricsWindow()
    bar = progress_bar(plan.planned, state.global_step)
    try:
        while state.global_step < plan.planned:
            ctx.hooks.on_step_start(state.global_step)
            stats = _optimizer_step(ctx)
            _count(ctx, stats)
            window.add(stats)
            bar.set_postfix(
                epoch=f"{state.samples_seen / len(plan.train_data):.2f}",
                loss=f"{stats.loss:.4f}",
                lr=f"{stats.lr:.2e}",
                tok_s=f"{stats.tokens / stats.seconds:.0f}",
            )
            bar.update(1)
            step = state.global_step
            if _due(step, cfg.logging_steps, plan.planned):
                _log_metrics(ctx, window, stats)
                window = MetricsWindow()
            if plan.eval_data is not None and _due(step, cfg.eval_steps, plan.planned):
                _evaluate(ctx)
            stop = stopper.agree(ctx.acc.device)
            if _due(step, cfg.save_steps, plan.planned) or stop:
                ctx.saved_here = _save(ctx)
            if stop:
                if ctx.acc.is_main_process:  # once, not once per process
                    log.warning(
                        "stopped by %s at step %d; resume with: %s",
                        stopper.signal_name,
                        step,
                        _resume_advice(ctx),
                    )
                break
    except torch.OutOfMemoryError:
        raise SftrunError(_oom_message(cfg, state.global_step, plan.global_batch)) from None
    finally:
        bar.close()


def _optimizer_step(ctx: _Loop) -> StepStats:
    """One optimizer step over the next global batch (this process's share of it).

    The loss is normalised by the label tokens of the whole step (all micro-batches, all
    processes), so every token weighs the same whatever micro-batch it landed in. A NaN or
    infinite loss or gradient norm stops the run before the optimizer applies anything.
    """
    cfg, plan, acc = ctx.cfg, ctx.plan, ctx.acc
    t0 = time.perf_counter()
    step = plan.state.global_step
    lr = plan.schedule.lr(step)
    for group in ctx.optimizer.param_groups:
        group["lr"] = lr
    micro, accum = cfg.per_device_train_batch_size, cfg.gradient_accumulation_steps
    samples = step_indices(
        cfg.seed, len(plan.train_data), plan.state.samples_seen, plan.global_batch
    )
    ctx.hooks.on_samples(step, samples)
    pad_id = _pad_id(ctx.peft_model)
    batches = [
        collate(plan.train_data, ids, pad_id)
        for ids in distributed.micro_batches(samples, acc.process_index, micro, accum)
    ]
    local_labels = sum(int((b["labels"][:, 1:] != C.IGNORE_INDEX).sum()) for b in batches)
    n_labels = int(acc.reduce(torch.tensor(local_labels, device=acc.device), "sum"))
    loss_total = torch.zeros((), device=acc.device)
    for i, batch in enumerate(batches):
        ctx.hooks.on_batch(batch)
        batch = {k: v.to(acc.device) for k, v in batch.items()}
        sync = contextlib.nullcontext() if i == accum - 1 else acc.no_sync(ctx.loss_module)
        with sync, ctx.autocast():
            loss_sum, _ = ctx.loss_module(**batch)
            # DDP averages gradients over processes, hence the factor num_processes.
            scaled = loss_sum * acc.num_processes / max(1, n_labels)
            acc.backward(ctx.scaler.scale(scaled) if ctx.scaler is not None else scaled)
        loss_total += loss_sum.detach()
    params = [p for p in ctx.loss_module.parameters() if p.requires_grad]
    if plan.sharded:  # FSDP leaves the adapter to us; DDP averaged it during backward
        distributed.average_gradients(params)
    if ctx.scaler is not None:
        ctx.scaler.unscale_(ctx.optimizer)
    max_norm = cfg.max_grad_norm if cfg.max_grad_norm > 0 else math.inf
    grad_norm = float(acc.clip_grad_norm_(params, max_norm))
    loss = float(acc.reduce(loss_total, "sum")) / max(1, n_labels)
    overflow = ctx.scaler is not None and not math.isfinite(grad_norm)
    if not math.isfinite(loss) or not (math.isfinite(grad_norm) or overflow):
        raise DivergenceError(_divergence_message(ctx, step + 1, loss, grad_norm))
    if ctx.scaler is not None:  # an fp16 overflow skips the update and lowers the scale
        ctx.scaler.step(ctx.optimizer)
        ctx.scaler.update()
        if overflow:
            log.warning(
                "step %d: fp16 gradients overflowed; update skipped, loss scale now %g",
                step + 1,
                ctx.scaler.get_scale(),
            )
    else:
        ctx.optimizer.step()
    ctx.optimizer.zero_grad(set_to_none=True)
    tokens = sum(int(b["attention_mask"].sum()) for b in batches) * acc.num_processes
    return StepStats(loss, grad_norm, lr, tokens, n_labels, time.perf_counter() - t0)


def _count(ctx: _Loop, stats: StepStats) -> None:
    state = ctx.plan.state
    state.global_step += 1
    state.samples_seen += ctx.plan.global_batch
    state.tokens_seen += stats.tokens
    state.label_tokens_seen += stats.label_tokens
    ctx.train_seconds += stats.seconds
    ctx.train_tokens += stats.tokens


def _log_metrics(ctx: _Loop, window: MetricsWindow, last: StepStats) -> None:
    """One ``log_history`` entry (the window's mean loss), the log line and TensorBoard."""
    state = ctx.plan.state
    epoch = state.samples_seen / len(ctx.plan.train_data)
    # An fp16 overflow (update skipped) has no finite norm; JSON and dashboards get none.
    grad_norm = last.grad_norm if math.isfinite(last.grad_norm) else None
    entry = {
        "step": state.global_step,
        "epoch": round(epoch, 4),
        "loss": window.mean_loss(),
        "learning_rate": last.lr,
        "grad_norm": grad_norm,
        "tokens_per_second": window.tokens_per_second(),
    }
    state.log_history.append(entry)
    log.info(
        "step %d/%d epoch %.2f loss %.4f lr %.3e grad_norm %.3f tokens/s %.0f",
        state.global_step,
        ctx.plan.planned,
        epoch,
        entry["loss"],
        last.lr,
        last.grad_norm,
        entry["tokens_per_second"],
    )
    if ctx.board is not None:
        values = {
            "train/loss": entry["loss"],
            "train/learning_rate": last.lr,
            "train/grad_norm": grad_norm,
            "train/tokens_per_second": entry["tokens_per_second"],
            "train/epoch": epoch,
        }
        ctx.board.scalars(state.global_step, {k: v for k, v in values.items() if v is not None})


def _resume_advice(ctx: _Loop) -> str:
    """The resume command on this run's process count; with several processes, also the
    setting that keeps the global batch on one process (a resume on another count)."""
    world, cfg = ctx.acc.num_processes, ctx.cfg
    command = ctx.opts.resume_command(ctx.saved_here, world=world)
    if world == 1:
        return command
    one = ctx.opts.resume_command(
        ctx.saved_here, gradient_accumulation_steps=cfg.gradient_accumulation_steps * world
    )
    return (
        f"{command}\n  on one process (the same global batch {ctx.plan.global_batch}, the same "
        f"samples): {one}"
    )


def _divergence_message(ctx: _Loop, step: int, loss: float, grad_norm: float) -> str:
    last = ctx.saved_here or ctx.plan.ckpt_path
    where = (
        f"the last good checkpoint is {last}; resume from it with a lower learning_rate: "
        + ctx.opts.resume_command(
            last, ctx.acc.num_processes, learning_rate=f"{ctx.cfg.learning_rate / 10:g}"
        )
        if last is not None
        else "no checkpoint was written; start again with a lower learning_rate"
    )
    return (
        f"training diverged at step {step}: loss {loss:g}, grad norm {grad_norm:g} (NaN or "
        f"infinity); nothing from this step was applied or saved; {where}"
    )


def _oom_message(cfg: TrainingConfig, step: int, global_batch: int) -> str:
    micro, accum = cfg.per_device_train_batch_size, cfg.gradient_accumulation_steps
    fix = (
        f"resume with per_device_train_batch_size={micro // 2} gradient_accumulation_steps="
        f"{accum * 2} (same global batch {global_batch}, so `--resume latest` continues at the "
        "exact data position)"
        if micro > 1
        else "lower max_seq_length or use a smaller model (both need a new run)"
    )
    return (
        f"out of GPU memory at step {step + 1} with micro-batch {micro}, accumulation {accum}, "
        f"max_seq_length {cfg.max_seq_length}; {fix}; the last committed checkpoint is intact"
    )


def _pad_id(peft_model: Any) -> int:
    cfg = peft_model.get_base_model().config
    pad = cfg.pad_token_id if cfg.pad_token_id is not None else cfg.eos_token_id
    if isinstance(pad, list):
        pad = pad[0]
    return int(pad) if pad is not None else 0


def _report_accuracy(ctx: _Loop, when: str) -> float | None:
    """Held-out generation accuracy, logged; None when there is nothing to score."""
    cfg, plan = ctx.cfg, ctx.plan
    if not plan.eval_convs or cfg.eval_accuracy == "none":
        return None
    if not (ctx.acc.is_main_process or plan.sharded):
        return None
    # A sharded model runs only when every process runs it: all generate, in step.
    with ctx.autocast():
        result = generation_accuracy(
            ctx.peft_model,
            plan.tokenizer,
            plan.eval_convs,
            cfg.eval_accuracy,
            cfg.eval_max_new_tokens,
            cfg.per_device_eval_batch_size,
            ctx.acc.device,
            synced=plan.sharded,
        )
    if not ctx.acc.is_main_process:
        return None
    line = f"held-out accuracy {when} training: {100 * result.accuracy:.1f}% "
    line += f"({result.correct}/{result.total})"
    if when == "after":
        before = plan.state.accuracy_before
        line += f"; before training: {'n/a' if before is None else f'{100 * before:.1f}%'}"
        for sample in result.samples[:3]:
            line += (
                f"\n  example: {sample['prompt']}\n    reference:  {sample['reference']}"
                f"\n    prediction: {sample['prediction']}"
            )
    log.info("%s", line)
    return result.accuracy


def _evaluate(ctx: _Loop) -> None:
    assert ctx.plan.eval_data is not None
    state = ctx.plan.state
    with ctx.autocast():
        value = eval_loss(
            ctx.loss_module,
            ctx.plan.eval_data,
            ctx.cfg.per_device_eval_batch_size,
            _pad_id(ctx.peft_model),
            ctx.acc.device,
        )
    value = ctx.hooks.on_eval(state.global_step, value)
    epoch = state.samples_seen / len(ctx.plan.train_data)
    state.log_history.append(
        {"step": state.global_step, "epoch": round(epoch, 4), "eval_loss": value}
    )
    log.info("step %d eval_loss %.4f", state.global_step, value)
    if ctx.board is not None:
        ctx.board.scalars(state.global_step, {"eval/loss": value})
    # Lower is better. The best *checkpoint* is set when this step is saved (see _save).
    if ctx.cfg.metric_for_best_model and (state.best_metric is None or value < state.best_metric):
        state.best_metric = value
        state.best_step = state.global_step


def _payload(ctx: _Loop, rng_states: list[dict[str, Any]]) -> checkpoint.CheckpointPayload:
    """Everything the checkpoint holds; ``rng_states`` has every process's, in rank order
    (one process: its state as the whole file; several: process 0's plus ``ranks``)."""
    from peft import get_peft_model_state_dict

    plan, state = ctx.plan, ctx.plan.state
    adapter_config = ctx.peft_model.peft_config["default"].to_dict()
    adapter_config = {k: sorted(v) if isinstance(v, set) else v for k, v in adapter_config.items()}
    return checkpoint.CheckpointPayload(
        adapter_state=get_peft_model_state_dict(ctx.peft_model),
        adapter_config=adapter_config,
        optimizer_state=ctx.optimizer.state_dict(),
        scheduler_state={
            "schedule": plan.schedule.to_dict(),
            **({"scaler": ctx.scaler.state_dict()} if ctx.scaler is not None else {}),
        },
        trainer_state=state.to_dict(
            ctx.cfg,
            n_train=len(plan.train_data),
            planned=plan.planned,
            global_batch=plan.global_batch,
        ),
        training_args={
            **config_to_dict(ctx.cfg),
            "world_size": ctx.acc.num_processes,
            # Where the base model was, for tools run from another folder.
            "model_path_absolute": str(Path(ctx.cfg.model_name_or_path).resolve()),
        },
        rng_state=rng_states[0] if len(rng_states) == 1 else {**rng_states[0], "ranks": rng_states},
        identity=plan.identity,
        run_id=state.run_id,
    )


def _save(ctx: _Loop) -> Path:
    """Commit this step's checkpoint (main process), then rotate this run's old ones."""
    acc, state, hooks = ctx.acc, ctx.plan.state, ctx.hooks
    acc.wait_for_everyone()
    step = state.global_step
    rng_states = distributed.gather_to_main(rng.capture())
    path = checkpoint.checkpoint_path(ctx.cfg.output_dir, step)
    if state.best_step == step:
        state.best_model_checkpoint = str(path)
    if rng_states is not None:  # the main process: the one writer
        t0 = time.perf_counter()
        path = checkpoint.save(
            ctx.cfg.output_dir,
            step,
            _payload(ctx, rng_states),
            hook=lambda name: hooks.after_file(step, name),
        )
        hooks.after_commit(step, path)
        best = state.best_model_checkpoint
        # By name inside the run folder: a moved or copied run protects the same folder.
        protect = {Path(best).name} if best else set()
        removed = checkpoint.rotate(
            ctx.cfg.output_dir, ctx.cfg.save_total_limit, protect, state.run_id, ctx.cannot_delete
        )
        if ctx.uploader is not None:  # in the background: the next step does not wait
            ctx.uploader.submit(path, checkpoint.names(ctx.cfg.output_dir))
        log.info(
            "saved %s (%s, %.2f s)%s",
            path,
            fmt_bytes(checkpoint.dir_size(path)),
            time.perf_counter() - t0,
            f"; removed {', '.join(p.name for p in removed)}" if removed else "",
        )
    acc.wait_for_everyone()
    return path
