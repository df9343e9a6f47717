"""Out of memory inside an optimizer step: stop with the fix, or (``oom: adapt``) move the
run to a smaller micro-batch with the same global batch and redo the step.

Owns the split to retry with, the adaptation (partial gradients dropped, memory freed, the
step's starting random state put back, the new split recorded in the run's state so that a
resume keeps it) and the message that ends a run which cannot adapt. ``loop`` catches the
error and calls these; ``resumeplan`` keeps the recorded split on resume.
"""

from __future__ import annotations

import gc
import logging
from typing import TYPE_CHECKING, Any

import torch

from sftrun import rng
from sftrun.config import TrainingConfig

if TYPE_CHECKING:
    from sftrun.loop import Loop

log = logging.getLogger("sftrun")


def split_of(cfg: TrainingConfig) -> tuple[int, int]:
    """(micro-batch, accumulation) of ``cfg``."""
    return cfg.per_device_train_batch_size, cfg.gradient_accumulation_steps


def with_split(cfg: TrainingConfig, split: tuple[int, int]) -> TrainingConfig:
    """``cfg`` with (micro-batch, accumulation) ``split``; everything else as it is."""
    micro, accum = split
    return cfg.model_copy(
        update={"per_device_train_batch_size": micro, "gradient_accumulation_steps": accum}
    )


def halved_split(micro: int, accum: int) -> tuple[int, int] | None:
    """The split to retry with after running out of memory: the largest micro-batch that is at
    most half of ``micro`` and divides ``micro x accum`` (so the step keeps its samples), with
    the accumulation that keeps the product; None when the micro-batch is already 1."""
    if micro <= 1:
        return None
    per_process = micro * accum
    smaller = max(d for d in range(1, micro // 2 + 1) if per_process % d == 0)
    return smaller, per_process // smaller


def adapt(ctx: Loop, step: int, split: tuple[int, int], at_start: dict[str, Any]) -> None:
    """After an out-of-memory error in ``step``: drop its partial gradients, free the memory,
    move the run to ``split`` (recorded in the checkpoint and kept on resume) and put the
    random state back to the step's start, so the step is redone from its beginning."""
    plan = ctx.plan
    ctx.optimizer.zero_grad(set_to_none=True)
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    old = split_of(plan.cfg)
    first = plan.state.adapted_split
    plan.state.adapted_split = {
        "configured": list(first["configured"] if first else old),
        "adapted": list(split),
        "step": step,
    }
    plan.cfg = with_split(plan.cfg, split)
    rng.restore(at_start)
    log.warning(
        "step %d: out of memory with micro-batch %d x accumulation %d; redoing the step with "
        "micro-batch %d x accumulation %d (the same %d examples per step, the same samples); "
        "the run keeps this split, also when resumed",
        step,
        *old,
        *split,
        plan.global_batch,
    )
    if ctx.board is not None:
        ctx.board.scalars(step, {"train/micro_batch": float(split[0])})


def message(cfg: TrainingConfig, step: int, global_batch: int) -> str:
    """The one line of a run that ran out of memory in step ``step + 1`` and does not adapt:
    the smaller split to resume with (the same global batch), or what else can change."""
    micro, accum = split_of(cfg)
    smaller = halved_split(micro, accum)
    fix = (
        f"resume with per_device_train_batch_size={smaller[0]} gradient_accumulation_steps="
        f"{smaller[1]} (same global batch {global_batch}, so `--resume latest` continues at the "
        "exact data position)"
        if smaller is not None
        else "lower max_seq_length or use a smaller model (both need a new run)"
    )
    return (
        f"out of GPU memory at step {step + 1} with micro-batch {micro}, accumulation {accum}, "
        f"max_seq_length {cfg.max_seq_length}; {fix}; the last committed checkpoint is intact"
    )
