"""The training loop: optimizer steps until the planned end or a stop signal, with the
metrics, evaluations and checkpoint saves that fall due between them.

Owns one optimizer step over a global batch (loss normalised over the whole step, NaN/inf
stops before anything is applied), the log line and dashboards of each logging window, the
held-out evaluations, the save of a step (every process's random state gathered to the one
writer, then rotation and the mirror upload) and the messages that end a run early.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from sftrun import checkpoint, distributed, integrity, mirror, oom, rng, runfolder
from sftrun import constants as C
from sftrun.config import TrainingConfig, config_to_dict
from sftrun.encoding import collate
from sftrun.errors import DivergenceError, SftrunError
from sftrun.evaluate import eval_loss, generation_accuracy
from sftrun.hooks import RunHooks
from sftrun.metrics import MetricsWindow, StepStats, log_metrics
from sftrun.monitor import (
    fmt_bytes,
    progress_bar,
)
from sftrun.oom import split_of
from sftrun.plan import RunPlan
from sftrun.sampler import step_indices
from sftrun.snapshot import RunSnapshot
from sftrun.trackers import Dashboards

if TYPE_CHECKING:
    from sftrun.trainer import RunOptions, StopRequest

log = logging.getLogger("sftrun")


@dataclass
class Loop:
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


def _due(step: int, every: int, last: int) -> bool:
    """True at every ``every``-th step (0: never) and at the run's last step."""
    return (every > 0 and step % every == 0) or step == last


def train_loop(ctx: Loop, stopper: StopRequest) -> None:
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
                log_metrics(ctx, window, stats)
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
        # ctx.cfg: the split in use now (``oom.adapt`` may have changed it)
        raise SftrunError(oom.message(ctx.cfg, state.global_step, plan.global_batch)) from None
    finally:
        bar.close()


def _optimizer_step(ctx: Loop) -> StepStats:
    """One optimizer step over the next global batch (this process's share of it).

    The loss is normalised by the label tokens of the whole step (all micro-batches, all
    processes), so every token weighs the same whatever micro-batch it landed in. A NaN or
    infinite loss or gradient norm stops the run before the optimizer applies anything.
    """
    cfg, plan, acc = ctx.cfg, ctx.plan, ctx.acc
    t0 = time.perf_counter()
    state = plan.state
    step = state.global_step
    lr = plan.schedule.lr(step)
    for group in ctx.optimizer.param_groups:
        group["lr"] = lr
    seed = cfg.seed if state.data_seed is None else state.data_seed
    samples = step_indices(
        seed, len(plan.train_data), state.samples_seen, plan.global_batch, state.data_order
    )
    ctx.hooks.on_samples(step, samples)
    # With ``oom: adapt`` the step may be redone from its start: the dropout masks then come
    # from the same random state, as in a run that had the smaller split all along.
    at_start = rng.capture() if plan.oom_adapt else None
    while True:
        try:
            batches, n_labels, loss_total = _accumulate(ctx, samples)
            break
        except torch.OutOfMemoryError:
            smaller = oom.halved_split(*split_of(ctx.cfg)) if plan.oom_adapt else None
            if smaller is None:
                raise  # train_loop's message: the split to resume with, or what else to change
        # Out of the except block, so the failed attempt's tensors are unreachable: free them.
        assert at_start is not None and smaller is not None
        oom.adapt(ctx, step + 1, smaller, at_start)
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


def _accumulate(
    ctx: Loop, samples: list[int]
) -> tuple[list[dict[str, torch.Tensor]], int, torch.Tensor]:
    """Forward and backward over this process's micro-batches of the step; gradients are
    accumulated in the adapter, nothing is applied. Returns the batches, the label tokens of
    the whole step (all processes) and the summed loss of this process."""
    acc = ctx.acc
    micro, accum = split_of(ctx.cfg)
    pad_id = _pad_id(ctx.peft_model)
    batches = [
        collate(ctx.plan.train_data, ids, pad_id)
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
    return batches, n_labels, loss_total


def _count(ctx: Loop, stats: StepStats) -> None:
    state = ctx.plan.state
    state.global_step += 1
    state.samples_seen += ctx.plan.global_batch
    state.tokens_seen += stats.tokens
    state.label_tokens_seen += stats.label_tokens
    ctx.train_seconds += stats.seconds
    ctx.train_tokens += stats.tokens


def _resume_advice(ctx: Loop) -> str:
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


def _divergence_message(ctx: Loop, step: int, loss: float, grad_norm: float) -> str:
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


def _pad_id(peft_model: Any) -> int:
    cfg = peft_model.get_base_model().config
    pad = cfg.pad_token_id if cfg.pad_token_id is not None else cfg.eos_token_id
    if isinstance(pad, list):
        pad = pad[0]
    return int(pad) if pad is not None else 0


def report_accuracy(ctx: Loop, when: str) -> float | None:
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


def _evaluate(ctx: Loop) -> None:
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


def _save(ctx: Loop) -> Path:
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
            _snapshot(ctx, rng_states).to_payload(),
            hook=lambda name: hooks.after_file(step, name),
        )
        hooks.after_commit(step, path)
        best = state.best_model_checkpoint
        # By name inside the run folder: a moved or copied run protects the same folder.
        protect = {Path(best).name} if best else set()
        removed = runfolder.rotate(
            ctx.cfg.output_dir, ctx.cfg.save_total_limit, protect, state.run_id, ctx.cannot_delete
        )
        if ctx.uploader is not None:  # in the background: the next step does not wait
            ctx.uploader.submit(path, runfolder.names(ctx.cfg.output_dir))
        log.info(
            "saved %s (%s, %.2f s)%s",
            path,
            fmt_bytes(integrity.dir_size(path)),
            time.perf_counter() - t0,
            f"; removed {', '.join(p.name for p in removed)}" if removed else "",
        )
    acc.wait_for_everyone()
    return path


def _snapshot(ctx: Loop, rng_states: list[dict[str, Any]]) -> RunSnapshot:
    """The run as it stands after this step; ``rng_states`` has every process's."""
    plan = ctx.plan
    return RunSnapshot.capture(
        ctx.peft_model,
        ctx.optimizer,
        ctx.scaler,
        schedule=plan.schedule.to_dict(),
        state=plan.state.to_dict(
            ctx.cfg,
            n_train=len(plan.train_data),
            planned=plan.planned,
            global_batch=plan.global_batch,
        ),
        config=config_to_dict(ctx.cfg),
        rng_states=rng_states,
        identity=plan.identity,
    )
