"""What one optimizer step did and what the log shows of it: the step's numbers, the window of
steps averaged into one ``log_history`` entry, the log line and the dashboards' scalars.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from sftrun.loop import Loop

log = logging.getLogger("sftrun")


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


def log_metrics(ctx: Loop, window: MetricsWindow, last: StepStats) -> None:
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
