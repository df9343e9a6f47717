"""The training loop: one run from config (and optionally a checkpoint) to the last step.

Owns the order of a run's steps, read top to bottom in ``run_training``: load, check, plan,
confirm, restore, train, save, evaluate. Detail lives in the modules it calls: ``data`` and
``sampler`` (what each step sees), ``schedule`` (the LR), ``checkpoint`` (the files),
``resume`` (what may change), ``modeling`` (model and loss), ``monitor`` (what is shown).
``accelerate`` places the model, runs mixed precision and synchronises processes.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import re
import shlex
import shutil
import signal
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from sftrun import checkpoint, rng
from sftrun import constants as C
from sftrun.config import TrainingConfig, config_to_dict
from sftrun.data import (
    Conversation,
    TokenizedData,
    check_data_file,
    collate,
    format_counts,
    read_conversations,
)
from sftrun.datastage import load_or_tokenize, write_report
from sftrun.datastage import stats as data_stats
from sftrun.errors import ConfigError, DiskSpaceError, DivergenceError, SftrunError
from sftrun.evaluate import eval_loss, generation_accuracy
from sftrun.modeling import (
    LabelOnlyLoss,
    load_lora_model,
    load_tokenizer,
    restore_adapter,
    select_backend,
    tokenizer_sha256,
    trainable_parameters,
    weights_sha256,
)
from sftrun.monitor import (
    Board,
    close_logging,
    fmt_bytes,
    progress_bar,
    setup_logging,
    timestamp,
)
from sftrun.resume import (
    build_identity,
    check_folder_owner,
    check_identity,
    config_overrides,
    describe_difference,
    identity_differences,
    ignored_changes,
    plan_schedule,
    resolved_dtype,
)
from sftrun.sampler import step_indices, total_steps
from sftrun.schedule import Schedule, build_schedule

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

    def resume_command(self, checkpoint_path: Path | None, **changes: Any) -> str:
        """The command that resumes this run from ``checkpoint_path`` with its settings
        (and ``changes`` as KEY=VALUE in place of the same keys)."""
        target = str(checkpoint_path) if checkpoint_path is not None else C.RESUME_LATEST
        kept = [a for a in self.settings_args if a.partition("=")[0] not in changes]
        extra = [f"{k}={v}" for k, v in changes.items()]
        args = ["python", "run_model_training.py", "--resume", target, "-y", *kept, *extra]
        return shlex.join(args)


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
    seconds: float = 0.0
    tokens_per_second: float = 0.0


@dataclass
class TrainState:
    """What the loop tracks between steps; saved as ``trainer_state.json``."""

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
    run_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    tensorboard_runs: list[str] = field(default_factory=list)


class StopRequest:
    """SIGTERM/SIGHUP/SIGINT set a flag the loop checks after each optimizer step.

    The loop then commits a checkpoint and exits. A second SIGINT aborts at once; the last
    committed checkpoint is still intact because commits are atomic.
    """

    def __init__(self) -> None:
        self.signal_name: str | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signal_name is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signal_name = signal.Signals(signum).name
        log.warning(
            "%s received: finishing this step, then saving a checkpoint "
            "(press Ctrl-C again to abort without saving)",
            self.signal_name,
        )

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


def _make_accelerator(dtype: str) -> Any:
    from accelerate import Accelerator

    return Accelerator(
        cpu=not torch.cuda.is_available(),
        mixed_precision="bf16" if dtype == "bfloat16" else "no",
    )


def _fmt_count(n: float) -> str:
    for unit, div in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.1f}{unit}"
    return f"{n:.0f}"


def _data_line(name: str, path: str, data: TokenizedData) -> str:
    c = data.counts
    formats = format_counts(c)
    return (
        f"  {name:<12} {path}: {len(data)} examples ({formats}), {data.num_tokens:,} tokens, "
        f"{data.num_label_tokens:,} with loss; truncated {c['truncated']}, dropped {c['dropped']}"
    )


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


def _default_confirm(summary: str) -> bool:
    if not sys.stdin.isatty():
        raise SftrunError(
            "training waits for confirmation but there is no terminal to ask on; "
            "pass -y to start without asking"
        )
    answer = input("Start training? [y/N] ").strip().lower()
    return answer in ("y", "yes")


def run_training(
    cfg: TrainingConfig, opts: RunOptions, log_started: tuple[str, Path] | None = None
) -> RunResult:
    """Train (or resume) one run as configured; see the module docstring for the steps.

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
    plan = _plan(cfg, opts)  # checkpoint, data, identity, length, schedule: all checked
    model = _build_model(cfg, plan)  # base model + LoRA; refuses without disk space
    summary = _summary(cfg, plan, model, log_file)
    log.info("%s", summary)
    log.info("resolved config: %s", config_to_dict(cfg))
    if not opts.yes and not _default_confirm(summary):
        log.info("cancelled; nothing was changed")
        return RunResult(plan.state.global_step, plan.planned, None, log_file, None, cancelled=True)

    _tidy_output_folder(plan)  # only after confirmation: temp folders, newer checkpoints
    optimizer = _optimizer(cfg, plan, model.peft_model)  # restored when resuming
    loss_module, optimizer = plan.accelerator.prepare(LabelOnlyLoss(model.peft_model), optimizer)
    board = Board(stamp) if plan.accelerator.is_main_process else None
    if board is not None:
        plan.state.tensorboard_runs.append(board.path.name)
        board.text("config", f"```\n{summary}\n```", plan.state.global_step)
        log.info(
            "TensorBoard: tensorboard --logdir %s (this run: %s)", C.TENSORBOARD_DIR, board.path
        )
    if plan.payload is None:
        plan.state.accuracy_before = _report_accuracy(cfg, plan, model.peft_model, "before")

    # The RNG is set last, so step 0 (or the resume step) starts from a defined state
    # whatever the setup above consumed.
    if plan.payload is not None:
        rng.restore(plan.payload.rng_state)
    else:
        rng.seed_everything(cfg.seed)
    ctx = _LoopContext(cfg, opts, plan, loss_module, optimizer, model.peft_model, board)
    stopper = StopRequest()
    with stopper.installed():
        last = _train_loop(ctx, stopper)

    result = RunResult(
        plan.state.global_step,
        plan.planned,
        last,
        log_file,
        board.path if board else None,
        accuracy_before=plan.state.accuracy_before,
        stopped_by=stopper.signal_name,
    )
    if stopper.signal_name is None:
        result.accuracy_after = _report_accuracy(cfg, plan, model.peft_model, "after")
        if board is not None and result.accuracy_after is not None:
            board.scalars(plan.state.global_step, {"eval/accuracy": result.accuracy_after})
    if board is not None:
        board.close()
    result.seconds = time.perf_counter() - started
    result.tokens_per_second = ctx.tokens_per_second()
    return result


@dataclass
class _Plan:
    """Everything decided before the model is built; all of it checked."""

    accelerator: Any
    dtype: str
    out: Path
    backend: Any
    tokenizer: Any
    train_data: TokenizedData
    eval_data: TokenizedData | None
    eval_convs: list[Conversation]
    identity: dict[str, Any]
    global_batch: int
    planned: int
    state: TrainState
    schedule: Schedule
    ckpt_path: Path | None = None
    payload: checkpoint.CheckpointPayload | None = None
    skipped: list[checkpoint.CheckpointInfo] = field(default_factory=list)
    newer: list[Path] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def _plan(cfg: TrainingConfig, opts: RunOptions) -> _Plan:
    """Verify the checkpoint, read the data, compare identities and plan length and LR."""
    dtype = resolved_dtype(cfg, torch.cuda.is_available())
    out = Path(cfg.output_dir)
    # Preflight, then the checkpoint: a wrong path fails before anything slow happens.
    check_output_dir(out)
    for key in ("train_file", "eval_file"):
        if getattr(cfg, key):
            check_data_file(getattr(cfg, key), key)
    ckpt_path: Path | None = None
    payload: checkpoint.CheckpointPayload | None = None
    skipped: list[checkpoint.CheckpointInfo] = []
    if opts.resume is not None:
        ckpt_path, skipped = checkpoint.resolve(opts.resume, out)
        payload, _ = checkpoint.load(ckpt_path)
    owners = checkpoint.owners(out)
    check_folder_owner(
        out,
        owners,
        checkpoint.superseded_folders(out),
        ckpt_path,
        payload.run_id if payload is not None else None,
    )

    tokenizer = load_tokenizer(cfg.model_name_or_path)
    tok_sha = tokenizer_sha256(tokenizer)
    train_data, eval_data = prepare_data(cfg, tokenizer, tok_sha)
    eval_convs = (
        read_conversations(cfg.eval_file)[: cfg.eval_max_samples or None] if cfg.eval_file else []
    )

    # The process count without creating the Accelerator yet: its mixed-precision setting
    # is fixed for the life of the process, so it must come after the checks below.
    from accelerate import PartialState

    world = PartialState().num_processes
    identity = _identity(cfg, tok_sha, train_data, dtype, world)
    global_batch = cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps * world
    planned = total_steps(len(train_data), global_batch, cfg.num_train_epochs, cfg.max_steps)
    plan = _Plan(
        None,
        dtype,
        out,
        select_backend(cfg.backend, opts.no_unsloth),
        tokenizer,
        train_data,
        eval_data,
        eval_convs,
        identity,
        global_batch,
        planned,
        TrainState(),
        build_schedule(
            cfg.lr_scheduler_type, cfg.learning_rate, planned, cfg.warmup_steps, cfg.warmup_ratio
        ),
        ckpt_path,
        payload,
        skipped,
    )
    if payload is not None:
        _plan_resume(cfg, opts, plan, payload)
    plan.accelerator = _make_accelerator(dtype)
    return plan


def _plan_resume(
    cfg: TrainingConfig, opts: RunOptions, plan: _Plan, payload: checkpoint.CheckpointPayload
) -> None:
    """Check identity, restore the trainer state and re-plan what the config changed."""
    plan.notes += check_identity(payload.identity, plan.identity, opts.allow_data_change)
    ts = payload.trainer_state
    step = int(ts["global_step"])
    # A checkpoint from before run ids joins the one run its folder holds, if any.
    known = [r for r in checkpoint.owners(plan.out) if r is not None]
    run_id = payload.run_id or (known[0] if len(known) == 1 else uuid.uuid4().hex)
    plan.state = TrainState(
        run_id=run_id,
        tensorboard_runs=list(ts.get("tensorboard_runs", [])),
        global_step=step,
        samples_seen=int(ts["samples_seen"]),
        tokens_seen=int(ts.get("tokens_seen", 0)),
        label_tokens_seen=int(ts.get("label_tokens_seen", 0)),
        log_history=list(ts.get("log_history", [])),
        best_metric=ts.get("best_metric"),
        best_step=ts.get("best_step"),
        best_model_checkpoint=ts.get("best_model_checkpoint"),
        accuracy_before=ts.get("accuracy_before"),
        resumed_from=[*ts.get("resumed_from", []), step],
    )
    old = Schedule.from_dict(payload.scheduler_state["schedule"])
    lr_plan = plan_schedule(old, step, cfg.learning_rate, plan.planned)
    plan.schedule = lr_plan.schedule
    for key, was, now in config_overrides(payload.training_args, cfg):
        plan.notes.append(f"override {key}: {was!r} -> {now!r}")
    for key, was, now in ignored_changes(payload.training_args, cfg):
        plan.notes.append(f"kept {key}={was!r} from the checkpoint (config says {now!r})")
    if lr_plan.changed:
        plan.notes.append(lr_plan.describe(step))
    plan.newer = checkpoint.newer_than(plan.out, step)


def check_output_dir(out: Path) -> None:
    """Raise ConfigError unless ``out`` is (or can be created as) a writable folder.

    Checked by writing and removing a probe file, before any model is loaded, so a bad
    folder is found before the first save rather than after the steps up to it.
    """
    if out.is_symlink() and not out.exists():
        raise ConfigError(
            f"output_dir {out} is a symbolic link to a missing folder ({os.readlink(out)}); "
            "create that folder or set output_dir elsewhere"
        )
    probe = out
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise ConfigError(
            f"output_dir {out}: {probe} is a file, not a folder; set output_dir to a folder"
        )
    try:
        fd, name = tempfile.mkstemp(prefix=".sftrun-write-test-", dir=probe)
        os.close(fd)
        os.unlink(name)
    except OSError as exc:
        raise ConfigError(
            f"output_dir {out}: cannot write in {probe} ({exc.strerror}); set output_dir to "
            "a writable folder"
        ) from None


def prepare_data(
    cfg: TrainingConfig, tokenizer: Any, tok_sha: str
) -> tuple[TokenizedData, TokenizedData | None]:
    """Stage 1: validated, tokenized train/eval data (from the cache when it is current).

    ``tok_sha`` is ``tokenizer_sha256(tokenizer)``, part of the cache key. Also writes
    ``outputs/1_data/stats.json`` and ``stats.md``.
    """
    splits = {"train": cfg.train_file, **({"eval": cfg.eval_file} if cfg.eval_file else {})}
    loaded: dict[str, TokenizedData] = {}
    for split, path in splits.items():
        data, cached = load_or_tokenize(
            tokenizer, tok_sha, path, cfg.max_seq_length, cfg.overlong, cfg.train_on
        )
        log.info("%s data %s: %s", split, path, "tokenized cache hit" if cached else "tokenized")
        loaded[split] = data
    write_report({k: (splits[k], data_stats(v)) for k, v in loaded.items()})
    return loaded["train"], loaded.get("eval")


def _identity(
    cfg: TrainingConfig, tok_sha: str, train_data: TokenizedData, dtype: str, world: int
) -> dict[str, Any]:
    return build_identity(
        cfg,
        base_model_sha256=weights_sha256(cfg.model_name_or_path),
        tokenizer_sha256=tok_sha,
        data_fingerprint=train_data.fingerprint,
        dtype=dtype,
        world_size=world,
    )


def preview_resume(cfg: TrainingConfig, path: Path, allow_data_change: bool) -> dict[str, Any]:
    """What ``--resume path`` would do with this config, without changing anything.

    Returns the differences that would refuse the resume, the overrides that would be taken,
    the settings kept from the checkpoint, the LR at the resume step before/after, and the
    steps left. Raises CheckpointError only when the checkpoint itself is not intact.
    """
    payload, _ = checkpoint.load(path)
    tokenizer = load_tokenizer(cfg.model_name_or_path)
    tok_sha = tokenizer_sha256(tokenizer)
    train_data, _ = load_or_tokenize(
        tokenizer,
        tok_sha,
        cfg.train_file,
        cfg.max_seq_length,
        cfg.overlong,
        cfg.train_on,
    )
    world = int(payload.training_args.get("world_size", 1))
    dtype = resolved_dtype(cfg, torch.cuda.is_available())
    identity = _identity(cfg, tok_sha, train_data, dtype, world)
    refusals = [
        describe_difference(*d)
        for d in identity_differences(payload.identity, identity)
        if not (d[0] == "data_fingerprint" and allow_data_change)
    ]
    global_batch = cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps * world
    planned = total_steps(len(train_data), global_batch, cfg.num_train_epochs, cfg.max_steps)
    step = int(payload.trainer_state["global_step"])
    old = Schedule.from_dict(payload.scheduler_state["schedule"])
    preview: dict[str, Any] = {
        "step": step,
        "planned_steps": planned,
        "steps_left": max(0, planned - step),
        "refusals": refusals,
        "overrides": config_overrides(payload.training_args, cfg),
        "kept": ignored_changes(payload.training_args, cfg),
        "lr_before": old.lr(step),
    }
    try:
        lr_plan = plan_schedule(old, step, cfg.learning_rate, planned)
        preview["lr_after"] = lr_plan.lr_after
        preview["decay_ends"] = lr_plan.schedule.total_steps
    except SftrunError as exc:
        preview["refusals"].append(str(exc))
        preview["lr_after"] = None
    return preview


@dataclass
class _Model:
    peft_model: Any
    params: list[torch.nn.Parameter]
    n_total: int
    checkpoint_bytes: int


def _build_model(cfg: TrainingConfig, plan: _Plan) -> _Model:
    """Base model with a LoRA adapter; its init is seeded (a resume overwrites it)."""
    rng.seed_everything(cfg.seed)
    compute_dtype = torch.bfloat16 if plan.dtype == "bfloat16" else torch.float32
    peft_model = load_lora_model(
        cfg.model_name_or_path, cfg.lora, plan.backend, compute_dtype, cfg.max_seq_length
    )
    params = trainable_parameters(peft_model)
    n_total = sum(p.numel() for p in peft_model.parameters())
    return _Model(peft_model, params, n_total, _check_disk(plan.out, params))


def _summary(cfg: TrainingConfig, plan: _Plan, model: _Model, log_file: Path) -> str:
    n_train = len(plan.train_data)
    n_trainable = sum(p.numel() for p in model.params)
    sched = plan.schedule
    lines = [
        "sftrun: LoRA fine-tuning",
        f"  {'model':<12} {cfg.model_name_or_path} "
        f"(backend {plan.backend.name}: {plan.backend.reason})",
        f"  {'trainable':<12} {_fmt_count(n_trainable)} of {_fmt_count(model.n_total)} "
        f"parameters; LoRA r={cfg.lora.r} alpha={cfg.lora.alpha:g} dropout={cfg.lora.dropout:g}"
        f" on {', '.join(cfg.lora.target_modules)}",
        _data_line("train data", cfg.train_file, plan.train_data),
    ]
    if plan.eval_data is not None and cfg.eval_file:
        lines.append(_data_line("eval data", cfg.eval_file, plan.eval_data))
    epochs = plan.planned * plan.global_batch / n_train
    lines += [
        f"  {'batch':<12} {cfg.per_device_train_batch_size} per device x "
        f"{cfg.gradient_accumulation_steps} accumulation x {plan.accelerator.num_processes} "
        f"process(es) = {plan.global_batch} examples per step; max_seq_length "
        f"{cfg.max_seq_length}; {plan.dtype}",
        f"  {'length':<12} {plan.planned} steps = {epochs:.2f} epochs; LR {sched.peak_lr:g} "
        f"{sched.kind}, warm-up {sched.warmup_steps} steps",
        f"  {'checkpoints':<12} {plan.out}/checkpoint-<step> every {cfg.save_steps} steps and "
        f"at the end, about {fmt_bytes(model.checkpoint_bytes)} each"
        + (f", keeping {cfg.save_total_limit}" if cfg.save_total_limit else ""),
    ]
    if plan.ckpt_path is not None:
        epoch = plan.state.samples_seen / n_train
        lines.append(
            f"  {'resume':<12} from {plan.ckpt_path}: step {plan.state.global_step}/"
            f"{plan.planned}, epoch {epoch:.2f}/{epochs:.2f} ({100 * epoch / epochs:.1f}%)"
        )
        lines += [f"  {'skipped':<12} {i.path.name}: {i.problem}" for i in plan.skipped]
        if plan.newer:
            lines.append(
                f"  {'move aside':<12} {', '.join(p.name for p in plan.newer)} are newer than "
                "the resume step; they will be moved into a superseded-<timestamp>/ folder"
            )
    lines += [f"  {'note':<12} {n}" for n in plan.notes]
    lines.append(f"  {'logs':<12} {log_file}")
    return "\n".join(lines)


def _tidy_output_folder(plan: _Plan) -> None:
    if not plan.accelerator.is_main_process:
        return
    for tmp in checkpoint.remove_temp_folders(plan.out):
        log.info("removed unfinished save %s", tmp)
    moved = checkpoint.move_aside(plan.out, plan.newer)
    if moved is not None:
        log.info("moved %s into %s", ", ".join(p.name for p in plan.newer), moved)
        _mark_superseded_boards(plan, moved)


def _mark_superseded_boards(plan: _Plan, moved: Path) -> None:
    """Rename the TensorBoard runs that drew the superseded steps, so that TensorBoard shows
    them as their own, marked curves instead of one line with two versions of those steps.

    Only folders this run recorded (``tensorboard_runs``), directly inside the TensorBoard
    folder, are renamed; the name gains ``.superseded-after-<step>``.
    """
    step = plan.state.global_step
    kept = set(plan.state.tensorboard_runs)
    root = Path(C.TENSORBOARD_DIR)
    names: set[str] = set()
    for folder in moved.iterdir():
        state = checkpoint.peek(folder).get("state", {})
        names |= {n for n in state.get("tensorboard_runs", []) if isinstance(n, str)}
    for name in sorted(names):
        source = root / name
        if not re.fullmatch(r"[0-9_]+", name) or not source.is_dir() or source.is_symlink():
            continue
        target = root / f"{name}.superseded-after-{step}"
        if not target.exists():
            os.rename(source, target)
            log.info("TensorBoard run %s drew steps past %d: renamed to %s", name, step, target)
            if name in kept:
                plan.state.tensorboard_runs[plan.state.tensorboard_runs.index(name)] = target.name


def _optimizer(cfg: TrainingConfig, plan: _Plan, peft_model: Any) -> torch.optim.Optimizer:
    """AdamW over the adapter; when resuming, adapter and optimizer come from the checkpoint."""
    optimizer = torch.optim.AdamW(
        trainable_parameters(peft_model),
        lr=plan.schedule.lr(plan.state.global_step),
        betas=(cfg.adam_beta1, cfg.adam_beta2),
        eps=cfg.adam_epsilon,
        weight_decay=cfg.weight_decay,
    )
    if plan.payload is not None:
        restore_adapter(peft_model, plan.payload.adapter_state, plan.ckpt_path)
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


def _report_accuracy(cfg: TrainingConfig, plan: _Plan, peft_model: Any, when: str) -> float | None:
    """Held-out generation accuracy, logged; None when there is nothing to score."""
    if not plan.eval_convs or cfg.eval_accuracy == "none":
        return None
    result = generation_accuracy(
        peft_model,
        plan.tokenizer,
        plan.eval_convs,
        cfg.eval_accuracy,
        cfg.eval_max_new_tokens,
        cfg.per_device_eval_batch_size,
        plan.accelerator.device,
    )
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


@dataclass
class _LoopContext:
    """The plan plus what setup built from it: what the loop and saves need."""

    cfg: TrainingConfig
    opts: RunOptions
    plan: _Plan
    loss_module: Any
    optimizer: Any
    peft_model: Any
    board: Board | None
    train_seconds: float = 0.0
    train_tokens: int = 0
    last_saved: Path | None = None  # committed by this process

    def tokens_per_second(self) -> float:
        return self.train_tokens / self.train_seconds if self.train_seconds else 0.0


def _train_loop(ctx: _LoopContext, stopper: StopRequest) -> Path | None:
    cfg, state, acc = ctx.cfg, ctx.plan.state, ctx.plan.accelerator
    micro = cfg.per_device_train_batch_size
    accum = cfg.gradient_accumulation_steps
    rank, world = acc.process_index, acc.num_processes
    pad_id = _pad_id(ctx.peft_model)
    n_train = len(ctx.plan.train_data)
    params = [p for p in ctx.loss_module.parameters() if p.requires_grad]
    max_norm = cfg.max_grad_norm if cfg.max_grad_norm > 0 else math.inf
    window: dict[str, float] = {"loss": 0.0, "steps": 0, "tokens": 0, "seconds": 0.0}
    last_saved: Path | None = None
    bar = progress_bar(ctx.plan.planned, state.global_step)
    try:
        while state.global_step < ctx.plan.planned:
            t0 = time.perf_counter()
            step = state.global_step
            lr = ctx.plan.schedule.lr(step)
            for group in ctx.optimizer.param_groups:
                group["lr"] = lr
            # This step's samples: the next global batch of the stream, this rank's share.
            indices = step_indices(cfg.seed, n_train, state.samples_seen, ctx.plan.global_batch)
            mine = indices[rank * micro * accum : (rank + 1) * micro * accum]
            batches = [
                collate(ctx.plan.train_data, mine[i * micro : (i + 1) * micro], pad_id)
                for i in range(accum)
            ]
            # Normalise by the label tokens of the whole step (all micro-batches, all ranks),
            # so every token weighs the same whatever micro-batch it landed in.
            local_labels = sum(int((b["labels"][:, 1:] != C.IGNORE_INDEX).sum()) for b in batches)
            n_labels = int(acc.reduce(torch.tensor(local_labels, device=acc.device), "sum"))
            loss_total = torch.zeros((), device=acc.device)
            for i, batch in enumerate(batches):
                batch = {k: v.to(acc.device) for k, v in batch.items()}
                sync = contextlib.nullcontext() if i == accum - 1 else acc.no_sync(ctx.loss_module)
                with sync:
                    loss_sum, _ = ctx.loss_module(**batch)
                    # DDP averages gradients over ranks, hence the factor `world`.
                    acc.backward(loss_sum * world / max(1, n_labels))
                loss_total += loss_sum.detach()
            grad_norm = acc.clip_grad_norm_(params, max_norm)
            loss = float(acc.reduce(loss_total, "sum")) / max(1, n_labels)
            if not (math.isfinite(loss) and math.isfinite(float(grad_norm))):
                raise DivergenceError(_divergence_message(ctx, step + 1, loss, float(grad_norm)))
            ctx.optimizer.step()
            ctx.optimizer.zero_grad(set_to_none=True)
            step_tokens = sum(int(b["attention_mask"].sum()) for b in batches) * world

            state.global_step += 1
            state.samples_seen += ctx.plan.global_batch
            state.tokens_seen += step_tokens
            state.label_tokens_seen += n_labels
            seconds = time.perf_counter() - t0
            ctx.train_seconds += seconds
            ctx.train_tokens += step_tokens
            window["loss"] += loss
            window["steps"] += 1
            window["tokens"] += step_tokens
            window["seconds"] += seconds
            epoch = state.samples_seen / n_train
            bar.update(1)
            bar.set_postfix(
                epoch=f"{epoch:.2f}",
                loss=f"{loss:.4f}",
                lr=f"{lr:.2e}",
                tok_s=f"{step_tokens / seconds:.0f}",
            )

            gs = state.global_step
            if gs % cfg.logging_steps == 0 or gs == ctx.plan.planned:
                entry = {
                    "step": gs,
                    "epoch": round(epoch, 4),
                    "loss": window["loss"] / window["steps"],
                    "learning_rate": lr,
                    "grad_norm": float(grad_norm),
                    "tokens_per_second": window["tokens"] / max(1e-9, window["seconds"]),
                }
                state.log_history.append(entry)
                log.info(
                    "step %d/%d epoch %.2f loss %.4f lr %.3e grad_norm %.3f tokens/s %.0f",
                    gs,
                    ctx.plan.planned,
                    epoch,
                    entry["loss"],
                    lr,
                    entry["grad_norm"],
                    entry["tokens_per_second"],
                )
                if ctx.board is not None:
                    ctx.board.scalars(
                        gs,
                        {
                            "train/loss": entry["loss"],
                            "train/learning_rate": lr,
                            "train/grad_norm": entry["grad_norm"],
                            "train/tokens_per_second": entry["tokens_per_second"],
                            "train/epoch": epoch,
                        },
                    )
                window = {"loss": 0.0, "steps": 0, "tokens": 0, "seconds": 0.0}
            do_eval = ctx.plan.eval_data is not None and (
                (cfg.eval_steps and gs % cfg.eval_steps == 0) or gs == ctx.plan.planned
            )
            if do_eval:
                _evaluate(ctx, pad_id)
            if gs % cfg.save_steps == 0 or gs == ctx.plan.planned or stopper.signal_name:
                last_saved = _save(ctx)
                ctx.last_saved = last_saved
            if stopper.signal_name:
                log.warning(
                    "stopped by %s at step %d; resume with: %s",
                    stopper.signal_name,
                    gs,
                    ctx.opts.resume_command(last_saved),
                )
                break
    except torch.OutOfMemoryError:
        raise SftrunError(_oom_message(cfg, state.global_step, ctx.plan.global_batch)) from None
    finally:
        bar.close()
    return last_saved


def _divergence_message(ctx: _LoopContext, step: int, loss: float, grad_norm: float) -> str:
    last = ctx.last_saved or ctx.plan.ckpt_path
    where = (
        f"the last good checkpoint is {last}; resume from it with a lower learning_rate: "
        + ctx.opts.resume_command(last, learning_rate=f"{ctx.cfg.learning_rate / 10:g}")
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


def _evaluate(ctx: _LoopContext, pad_id: int) -> None:
    assert ctx.plan.eval_data is not None
    state = ctx.plan.state
    value = eval_loss(
        ctx.loss_module,
        ctx.plan.eval_data,
        ctx.cfg.per_device_eval_batch_size,
        pad_id,
        ctx.plan.accelerator.device,
    )
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


def _trainer_state(ctx: _LoopContext) -> dict[str, Any]:
    cfg, state = ctx.cfg, ctx.plan.state
    n_train = len(ctx.plan.train_data)
    return {
        # Hugging Face TrainerState keys
        "global_step": state.global_step,
        "epoch": state.samples_seen / n_train,
        "max_steps": ctx.plan.planned,
        "num_train_epochs": ctx.plan.planned * ctx.plan.global_batch / n_train,
        "logging_steps": cfg.logging_steps,
        "save_steps": cfg.save_steps,
        "eval_steps": cfg.eval_steps,
        "train_batch_size": cfg.per_device_train_batch_size,
        "log_history": state.log_history,
        "best_metric": state.best_metric,
        "best_step": state.best_step,
        "best_model_checkpoint": state.best_model_checkpoint,
        "num_input_tokens_seen": state.tokens_seen,
        # sftrun's own
        "samples_seen": state.samples_seen,
        "tokens_seen": state.tokens_seen,
        "label_tokens_seen": state.label_tokens_seen,
        "num_examples": n_train,
        "global_batch_size": ctx.plan.global_batch,
        "gradient_accumulation_steps": cfg.gradient_accumulation_steps,
        "accuracy_before": state.accuracy_before,
        "resumed_from": state.resumed_from,
        "run_id": state.run_id,
        "tensorboard_runs": state.tensorboard_runs,
    }


def _save(ctx: _LoopContext) -> Path:
    from peft import get_peft_model_state_dict

    acc = ctx.plan.accelerator
    acc.wait_for_everyone()
    path = checkpoint.checkpoint_path(ctx.cfg.output_dir, ctx.plan.state.global_step)
    if ctx.plan.state.best_step == ctx.plan.state.global_step:
        ctx.plan.state.best_model_checkpoint = str(path)
    if acc.is_main_process:
        t0 = time.perf_counter()
        peft_model = ctx.peft_model
        adapter_config = peft_model.peft_config["default"].to_dict()
        adapter_config = {
            k: sorted(v) if isinstance(v, set) else v for k, v in adapter_config.items()
        }
        payload = checkpoint.CheckpointPayload(
            adapter_state=get_peft_model_state_dict(peft_model),
            adapter_config=adapter_config,
            optimizer_state=ctx.optimizer.state_dict(),
            scheduler_state={
                "schedule": ctx.plan.schedule.to_dict(),
                "step": ctx.plan.state.global_step,
                "last_lr": ctx.plan.schedule.lr(max(0, ctx.plan.state.global_step - 1)),
            },
            trainer_state=_trainer_state(ctx),
            training_args={
                **config_to_dict(ctx.cfg),
                "world_size": acc.num_processes,
                # Where the base model was, for tools run from another folder.
                "model_path_absolute": str(Path(ctx.cfg.model_name_or_path).resolve()),
            },
            rng_state=rng.capture(),
            identity=ctx.plan.identity,
            run_id=ctx.plan.state.run_id,
        )
        path = checkpoint.save(ctx.cfg.output_dir, ctx.plan.state.global_step, payload)
        best = ctx.plan.state.best_model_checkpoint
        # By name inside the run folder: a moved or copied run protects the same folder.
        protect = {Path(best).name} if best else set()
        removed = checkpoint.rotate(
            ctx.cfg.output_dir, ctx.cfg.save_total_limit, protect, ctx.plan.state.run_id
        )
        log.info(
            "saved %s (%s, %.2f s)%s",
            path,
            fmt_bytes(checkpoint.dir_size(path)),
            time.perf_counter() - t0,
            f"; removed {', '.join(p.name for p in removed)}" if removed else "",
        )
    acc.wait_for_everyone()
    return path
