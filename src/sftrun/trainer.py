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
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from sftrun import checkpoint, rng
from sftrun import constants as C
from sftrun.config import TrainingConfig, config_to_dict
from sftrun.data import Conversation, TokenizedData, collate, read_conversations, tokenize_file
from sftrun.errors import DiskSpaceError, SftrunError
from sftrun.evaluate import AccuracyResult, eval_loss, generation_accuracy
from sftrun.modeling import (
    LabelOnlyLoss,
    load_lora_model,
    load_tokenizer,
    select_backend,
    tokenizer_sha256,
    trainable_parameters,
    weights_sha256,
)
from sftrun.monitor import Board, close_logging, progress_bar, setup_logging, timestamp
from sftrun.resume import (
    build_identity,
    check_identity,
    config_overrides,
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
    # Fault injection for tests: called after each checkpoint file is written.
    save_hook: checkpoint.SaveHook | None = None
    confirm: Callable[[str], bool] | None = None


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
    best_model_checkpoint: str | None = None
    accuracy_before: float | None = None
    resumed_from: list[int] = field(default_factory=list)


class StopRequest:
    """SIGTERM/SIGINT set a flag the loop checks after each optimizer step.

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
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)
        try:
            yield self
        finally:
            for sig, handler in self._previous.items():
                signal.signal(sig, handler)


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


def _fmt_bytes(n: float) -> str:
    for unit, div in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= div:
            return f"{n / div:.1f} {unit}"
    return f"{n:.0f} B"


def _data_line(name: str, path: str, data: TokenizedData) -> str:
    c = data.counts
    formats = ", ".join(f"{k[7:]} {v}" for k, v in c.items() if k.startswith("format_"))
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
            f"not enough disk space in {probe}: {_fmt_bytes(free)} free, but two checkpoints "
            f"need about {_fmt_bytes(2 * per_ckpt)} ({_fmt_bytes(per_ckpt)} each); free some "
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


def run_training(cfg: TrainingConfig, opts: RunOptions) -> RunResult:
    """Train (or resume) one run as configured; see the module docstring for the steps."""
    stamp = timestamp()
    log_file = setup_logging(stamp, opts.console)
    try:
        return _run(cfg, opts, stamp, log_file)
    finally:
        close_logging()


def _run(cfg: TrainingConfig, opts: RunOptions, stamp: str, log_file: Path) -> RunResult:
    started = time.perf_counter()
    cuda = torch.cuda.is_available()
    dtype = resolved_dtype(cfg, cuda)
    out = Path(cfg.output_dir)

    # 1. The checkpoint to resume from, verified before anything slow happens.
    ckpt_path: Path | None = None
    payload = None
    skipped: list[checkpoint.CheckpointInfo] = []
    if opts.resume:
        ckpt_path, skipped = checkpoint.resolve(opts.resume, out)
        payload, _ = checkpoint.load(ckpt_path)

    # 2. Backend, tokenizer and data (every bad record is reported before training).
    backend = select_backend(cfg.backend, opts.no_unsloth)
    tokenizer = load_tokenizer(cfg.model_name_or_path)
    train_data = tokenize_file(
        tokenizer, cfg.train_file, cfg.max_seq_length, cfg.overlong, cfg.train_on
    )
    eval_data: TokenizedData | None = None
    eval_convs: list[Conversation] = []
    if cfg.eval_file:
        eval_data = tokenize_file(
            tokenizer, cfg.eval_file, cfg.max_seq_length, cfg.overlong, cfg.train_on
        )
        eval_convs = read_conversations(cfg.eval_file)
        if cfg.eval_max_samples:
            eval_convs = eval_convs[: cfg.eval_max_samples]

    # 3. Identity and plan; a resume checks the identity and re-plans the tunables.
    accelerator = _make_accelerator(dtype)
    world = accelerator.num_processes
    identity = build_identity(
        cfg,
        base_model_sha256=weights_sha256(cfg.model_name_or_path),
        tokenizer_sha256=tokenizer_sha256(tokenizer),
        data_fingerprint=train_data.fingerprint,
        dtype=dtype,
        world_size=world,
    )
    global_batch = cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps * world
    n_train = len(train_data)
    planned = total_steps(n_train, global_batch, cfg.num_train_epochs, cfg.max_steps)
    state = TrainState()
    notes: list[str] = []
    if payload is not None:
        notes += check_identity(payload.identity, identity, opts.allow_data_change)
        ts = payload.trainer_state
        state = TrainState(
            global_step=int(ts["global_step"]),
            samples_seen=int(ts["samples_seen"]),
            tokens_seen=int(ts.get("tokens_seen", 0)),
            label_tokens_seen=int(ts.get("label_tokens_seen", 0)),
            log_history=list(ts.get("log_history", [])),
            best_metric=ts.get("best_metric"),
            best_model_checkpoint=ts.get("best_model_checkpoint"),
            accuracy_before=ts.get("accuracy_before"),
            resumed_from=list(ts.get("resumed_from", [])) + [int(ts["global_step"])],
        )
        old_schedule = Schedule.from_dict(payload.scheduler_state["schedule"])
        plan = plan_schedule(old_schedule, state.global_step, cfg.learning_rate, planned)
        schedule = plan.schedule
        for key, was, now in config_overrides(payload.training_args, cfg):
            notes.append(f"override {key}: {was!r} -> {now!r}")
        for key, was, now in ignored_changes(payload.training_args, cfg):
            notes.append(f"kept {key}={was!r} from the checkpoint (config says {now!r})")
        if plan.changed:
            notes.append(
                f"LR at step {state.global_step}: {plan.lr_before:.3g} -> {plan.lr_after:.3g}; "
                f"decay now ends at step {schedule.total_steps}"
            )
    else:
        schedule = build_schedule(
            cfg.lr_scheduler_type, cfg.learning_rate, planned, cfg.warmup_steps, cfg.warmup_ratio
        )
    newer = [
        c.path for c in checkpoint.scan(out) if payload is not None and c.step > state.global_step
    ]

    # 4. Model with a LoRA adapter (seeded init; a resume overwrites it below).
    rng.seed_everything(cfg.seed)
    compute_dtype = torch.float32 if dtype == "float32" or not cuda else torch.bfloat16
    peft_model = load_lora_model(
        cfg.model_name_or_path, cfg.lora, backend, compute_dtype, cfg.max_seq_length
    )
    params = trainable_parameters(peft_model)
    n_trainable = sum(p.numel() for p in params)
    n_total = sum(p.numel() for p in peft_model.parameters())
    per_ckpt = _check_disk(out, params)

    # 5. Summary and confirmation.
    lines = [
        "sftrun: LoRA fine-tuning",
        f"  {'model':<12} {cfg.model_name_or_path} (backend {backend.name}: {backend.reason})",
        (
            f"  {'trainable':<12} {_fmt_count(n_trainable)} of {_fmt_count(n_total)} parameters; "
            f"LoRA r={cfg.lora.r} alpha={cfg.lora.alpha:g} dropout={cfg.lora.dropout:g} on "
            f"{', '.join(cfg.lora.target_modules)}"
        ),
        _data_line("train data", cfg.train_file, train_data),
    ]
    if eval_data is not None and cfg.eval_file:
        lines.append(_data_line("eval data", cfg.eval_file, eval_data))
    lines += [
        (
            f"  {'batch':<12} {cfg.per_device_train_batch_size} per device x "
            f"{cfg.gradient_accumulation_steps} accumulation x {world} process(es) = "
            f"{global_batch} examples per step; max_seq_length {cfg.max_seq_length}; {dtype}"
        ),
        (
            f"  {'length':<12} {planned} steps = {planned * global_batch / n_train:.2f} epochs; "
            f"LR {schedule.peak_lr:g} {schedule.kind}, warm-up {schedule.warmup_steps} steps"
        ),
        (
            f"  {'checkpoints':<12} {out}/checkpoint-<step> every {cfg.save_steps} steps and at "
            f"the end, about {_fmt_bytes(per_ckpt)} each"
            + (f", keeping {cfg.save_total_limit}" if cfg.save_total_limit else "")
        ),
    ]
    if ckpt_path is not None:
        epoch = state.samples_seen / n_train
        planned_epochs = planned * global_batch / n_train
        lines.append(
            f"  {'resume':<12} from {ckpt_path}: step {state.global_step}/{planned}, epoch "
            f"{epoch:.2f}/{planned_epochs:.2f} ({100 * epoch / planned_epochs:.1f}%)"
        )
        for info in skipped:
            lines.append(f"  {'skipped':<12} {info.path.name}: {info.problem}")
        if newer:
            lines.append(
                f"  {'move aside':<12} {', '.join(p.name for p in newer)} are newer than the "
                "resume step; they will be moved into a superseded-<timestamp>/ folder"
            )
    lines += [f"  {'note':<12} {n}" for n in notes]
    lines.append(f"  {'logs':<12} {log_file}")
    summary = "\n".join(lines)
    log.info("%s", summary)
    log.info("resolved config: %s", config_to_dict(cfg))
    if not opts.yes:
        confirm = opts.confirm or _default_confirm
        if not confirm(summary):
            log.info("cancelled; nothing was changed")
            return RunResult(state.global_step, planned, None, log_file, None, cancelled=True)

    # 6. Housekeeping that changes the output folder, only after confirmation.
    if accelerator.is_main_process:
        for tmp in checkpoint.remove_temp_folders(out):
            log.info("removed unfinished save %s", tmp)
        moved = checkpoint.move_aside(out, newer)
        if moved is not None:
            log.info("moved %s into %s", ", ".join(p.name for p in newer), moved)

    # 7. Optimizer; restore weights, optimizer, RNG from the checkpoint.
    optimizer = torch.optim.AdamW(
        params,
        lr=schedule.lr(state.global_step),
        betas=(cfg.adam_beta1, cfg.adam_beta2),
        eps=cfg.adam_epsilon,
        weight_decay=cfg.weight_decay,
    )
    if payload is not None:
        _restore_adapter(peft_model, payload.adapter_state, ckpt_path)
        optimizer.load_state_dict(payload.optimizer_state)
        for group in optimizer.param_groups:
            group["weight_decay"] = cfg.weight_decay  # tunable; the rest comes from the checkpoint
        log.info(
            "restored from %s: adapter (%d tensors), optimizer, schedule, step %d, "
            "%d samples seen, RNG states",
            ckpt_path,
            len(payload.adapter_state),
            state.global_step,
            state.samples_seen,
        )
    loss_module, optimizer = accelerator.prepare(LabelOnlyLoss(peft_model), optimizer)
    device = accelerator.device

    board = Board(stamp) if accelerator.is_main_process else None
    if board is not None:
        board.text("config", f"```\n{summary}\n```", state.global_step)
        log.info(
            "TensorBoard: tensorboard --logdir %s (this run: %s)", C.TENSORBOARD_DIR, board.path
        )

    # 8. Accuracy before training (fresh runs; a resume reports the first run's value).
    if payload is None and eval_convs and cfg.eval_accuracy != "none":
        before = _accuracy(peft_model, tokenizer, eval_convs, cfg, device)
        state.accuracy_before = before.accuracy
        log.info(
            "held-out accuracy before training: %.1f%% (%d/%d)",
            100 * before.accuracy,
            before.correct,
            before.total,
        )

    # 9. The loop. The RNG is (re)set last so step 0, or the resume step, starts from a
    #    defined state whatever setup consumed.
    if payload is not None:
        rng.restore(payload.rng_state)
    else:
        rng.seed_everything(cfg.seed)
    ctx = _LoopContext(
        cfg,
        opts,
        accelerator,
        loss_module,
        optimizer,
        peft_model,
        schedule,
        train_data,
        eval_data,
        identity,
        state,
        board,
        planned,
        global_batch,
    )
    stopper = StopRequest()
    with stopper.installed():
        last = _train_loop(ctx, stopper)

    # 10. Final evaluation (only when the run reached its end).
    result = RunResult(
        state.global_step,
        planned,
        last,
        log_file,
        board.path if board else None,
        accuracy_before=state.accuracy_before,
        stopped_by=stopper.signal_name,
    )
    result.seconds = time.perf_counter() - started
    result.tokens_per_second = ctx.tokens_per_second()
    if stopper.signal_name is None and eval_convs and cfg.eval_accuracy != "none":
        after = _accuracy(peft_model, tokenizer, eval_convs, cfg, device)
        result.accuracy_after = after.accuracy
        before_txt = (
            f"{100 * state.accuracy_before:.1f}%" if state.accuracy_before is not None else "n/a"
        )
        log.info(
            "held-out accuracy after training: %.1f%% (%d/%d); before training: %s",
            100 * after.accuracy,
            after.correct,
            after.total,
            before_txt,
        )
        for sample in after.samples[:3]:
            log.info(
                "  example: %s\n    reference:  %s\n    prediction: %s",
                sample["prompt"],
                sample["reference"],
                sample["prediction"],
            )
        if board is not None:
            board.scalars(state.global_step, {"eval/accuracy": after.accuracy})
    if board is not None:
        board.close()
    return result


def _accuracy(
    peft_model: Any,
    tokenizer: Any,
    convs: list[Conversation],
    cfg: TrainingConfig,
    device: torch.device,
) -> AccuracyResult:
    return generation_accuracy(
        peft_model,
        tokenizer,
        convs,
        cfg.eval_accuracy,
        cfg.eval_max_new_tokens,
        cfg.per_device_eval_batch_size,
        device,
    )


def _restore_adapter(peft_model: Any, state: dict[str, torch.Tensor], path: Path | None) -> None:
    from peft import get_peft_model_state_dict, set_peft_model_state_dict

    expected = set(get_peft_model_state_dict(peft_model))
    if set(state) != expected:
        missing = sorted(expected - set(state))[:3]
        extra = sorted(set(state) - expected)[:3]
        raise SftrunError(
            f"{path}: the adapter tensors do not match this model's LoRA layers "
            f"(missing {missing}, unexpected {extra}); use the config the checkpoint was made with"
        )
    set_peft_model_state_dict(peft_model, state)


@dataclass
class _LoopContext:
    cfg: TrainingConfig
    opts: RunOptions
    accelerator: Any
    loss_module: Any
    optimizer: Any
    peft_model: Any
    schedule: Schedule
    train_data: TokenizedData
    eval_data: TokenizedData | None
    identity: dict[str, Any]
    state: TrainState
    board: Board | None
    planned: int
    global_batch: int
    train_seconds: float = 0.0
    train_tokens: int = 0

    def tokens_per_second(self) -> float:
        return self.train_tokens / self.train_seconds if self.train_seconds else 0.0


def _train_loop(ctx: _LoopContext, stopper: StopRequest) -> Path | None:
    cfg, state, acc = ctx.cfg, ctx.state, ctx.accelerator
    micro = cfg.per_device_train_batch_size
    accum = cfg.gradient_accumulation_steps
    rank, world = acc.process_index, acc.num_processes
    pad_id = _pad_id(ctx.peft_model)
    n_train = len(ctx.train_data)
    params = [p for p in ctx.loss_module.parameters() if p.requires_grad]
    max_norm = cfg.max_grad_norm if cfg.max_grad_norm > 0 else math.inf
    window: dict[str, float] = {"loss": 0.0, "steps": 0, "tokens": 0, "seconds": 0.0}
    last_saved: Path | None = None
    bar = progress_bar(ctx.planned, state.global_step)
    try:
        while state.global_step < ctx.planned:
            t0 = time.perf_counter()
            step = state.global_step
            lr = ctx.schedule.lr(step)
            for group in ctx.optimizer.param_groups:
                group["lr"] = lr
            # This step's samples: the next global batch of the stream, this rank's share.
            indices = step_indices(cfg.seed, n_train, state.samples_seen, ctx.global_batch)
            mine = indices[rank * micro * accum : (rank + 1) * micro * accum]
            batches = [
                collate(ctx.train_data, mine[i * micro : (i + 1) * micro], pad_id)
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
            ctx.optimizer.step()
            ctx.optimizer.zero_grad(set_to_none=True)
            loss = float(acc.reduce(loss_total, "sum")) / max(1, n_labels)
            step_tokens = sum(int(b["attention_mask"].sum()) for b in batches) * world

            state.global_step += 1
            state.samples_seen += ctx.global_batch
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
            if gs % cfg.logging_steps == 0 or gs == ctx.planned:
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
                    ctx.planned,
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
            do_eval = ctx.eval_data is not None and (
                (cfg.eval_steps and gs % cfg.eval_steps == 0) or gs == ctx.planned
            )
            if do_eval:
                _evaluate(ctx, pad_id)
            if gs % cfg.save_steps == 0 or gs == ctx.planned or stopper.signal_name:
                last_saved = _save(ctx)
            if stopper.signal_name:
                log.warning(
                    "stopped by %s at step %d; resume with: python run_model_training.py "
                    "--resume %s -y",
                    stopper.signal_name,
                    gs,
                    last_saved,
                )
                break
    finally:
        bar.close()
    return last_saved


def _pad_id(peft_model: Any) -> int:
    cfg = peft_model.get_base_model().config
    pad = cfg.pad_token_id if cfg.pad_token_id is not None else cfg.eos_token_id
    if isinstance(pad, list):
        pad = pad[0]
    return int(pad) if pad is not None else 0


def _evaluate(ctx: _LoopContext, pad_id: int) -> None:
    assert ctx.eval_data is not None
    state = ctx.state
    value = eval_loss(
        ctx.loss_module,
        ctx.eval_data,
        ctx.cfg.per_device_eval_batch_size,
        pad_id,
        ctx.accelerator.device,
    )
    epoch = state.samples_seen / len(ctx.train_data)
    state.log_history.append(
        {"step": state.global_step, "epoch": round(epoch, 4), "eval_loss": value}
    )
    log.info("step %d eval_loss %.4f", state.global_step, value)
    if ctx.board is not None:
        ctx.board.scalars(state.global_step, {"eval/loss": value})
    if state.best_metric is None or value < state.best_metric:
        state.best_metric = value
        state.best_model_checkpoint = str(
            checkpoint.checkpoint_path(ctx.cfg.output_dir, state.global_step)
        )


def _trainer_state(ctx: _LoopContext) -> dict[str, Any]:
    cfg, state = ctx.cfg, ctx.state
    n_train = len(ctx.train_data)
    return {
        # Hugging Face TrainerState keys
        "global_step": state.global_step,
        "epoch": state.samples_seen / n_train,
        "max_steps": ctx.planned,
        "num_train_epochs": ctx.planned * ctx.global_batch / n_train,
        "logging_steps": cfg.logging_steps,
        "save_steps": cfg.save_steps,
        "eval_steps": cfg.eval_steps,
        "train_batch_size": cfg.per_device_train_batch_size,
        "log_history": state.log_history,
        "best_metric": state.best_metric,
        "best_model_checkpoint": state.best_model_checkpoint,
        "num_input_tokens_seen": state.tokens_seen,
        # sftrun's own
        "samples_seen": state.samples_seen,
        "tokens_seen": state.tokens_seen,
        "label_tokens_seen": state.label_tokens_seen,
        "num_examples": n_train,
        "global_batch_size": ctx.global_batch,
        "gradient_accumulation_steps": cfg.gradient_accumulation_steps,
        "accuracy_before": state.accuracy_before,
        "resumed_from": state.resumed_from,
    }


def _save(ctx: _LoopContext) -> Path:
    from peft import get_peft_model_state_dict

    acc = ctx.accelerator
    acc.wait_for_everyone()
    path = checkpoint.checkpoint_path(ctx.cfg.output_dir, ctx.state.global_step)
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
                "schedule": ctx.schedule.to_dict(),
                "step": ctx.state.global_step,
                "last_lr": ctx.schedule.lr(max(0, ctx.state.global_step - 1)),
            },
            trainer_state=_trainer_state(ctx),
            training_args={**config_to_dict(ctx.cfg), "world_size": acc.num_processes},
            rng_state=rng.capture(),
            identity=ctx.identity,
        )
        path = checkpoint.save(
            ctx.cfg.output_dir, ctx.state.global_step, payload, hook=ctx.opts.save_hook
        )
        protect = (
            {Path(ctx.state.best_model_checkpoint)} if ctx.state.best_model_checkpoint else set()
        )
        removed = checkpoint.rotate(ctx.cfg.output_dir, ctx.cfg.save_total_limit, protect)
        log.info(
            "saved %s (%s, %.2f s)%s",
            path,
            _fmt_bytes(checkpoint.dir_size(path)),
            time.perf_counter() - t0,
            f"; removed {', '.join(p.name for p in removed)}" if removed else "",
        )
    acc.wait_for_everyone()
    return path
