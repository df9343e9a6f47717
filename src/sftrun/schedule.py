"""Learning-rate schedule as a pure function of the step.

Owns warm-up and decay. There is no hidden scheduler state: the LR of any step is computed
from a ``Schedule`` (plain numbers, saved in ``scheduler.pt``) and the step index. Never
touches the optimizer; the loop writes the value into the optimizer's param groups.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Any


@dataclass(frozen=True)
class Schedule:
    """Warm-up then decay to zero at ``total_steps``.

    ``lr(step)`` is the LR used by the optimizer step that takes the run from ``step`` to
    ``step + 1`` optimizer steps done. Warm-up rises linearly and reaches ``peak_lr`` at
    the last warm-up step (so step 0 already trains, unlike a warm-up that starts at 0).
    """

    kind: str
    peak_lr: float
    warmup_steps: int
    total_steps: int
    # The decay reaches progress ``decay_from_progress`` at step ``decay_from_step`` and 1.0 at
    # ``total_steps``. A fresh run decays from (warmup_steps, 0.0); a resume that changes the
    # run's length re-anchors at the resume step so the LR continues without a jump.
    decay_from_step: int = -1  # -1: the end of warm-up
    decay_from_progress: float = 0.0

    def progress(self, step: int) -> float:
        """Position on the decay curve (0 = peak, 1 = end) of a step after warm-up."""
        start = self.warmup_steps if self.decay_from_step < 0 else self.decay_from_step
        span = max(1, self.total_steps - start)
        frac = min(1.0, max(0.0, (step - start) / span))
        return self.decay_from_progress + (1.0 - self.decay_from_progress) * frac

    def lr(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.peak_lr * (step + 1) / self.warmup_steps
        if self.kind == "constant":
            return self.peak_lr
        progress = self.progress(step)
        if self.kind == "linear":
            return self.peak_lr * (1.0 - progress)
        if self.kind == "cosine":
            return self.peak_lr * 0.5 * (1.0 + math.cos(math.pi * progress))
        raise ValueError(f"unknown schedule kind {self.kind!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Schedule:
        return cls(
            kind=str(data["kind"]),
            peak_lr=float(data["peak_lr"]),
            warmup_steps=int(data["warmup_steps"]),
            total_steps=int(data["total_steps"]),
            decay_from_step=int(data.get("decay_from_step", -1)),
            decay_from_progress=float(data.get("decay_from_progress", 0.0)),
        )


def build_schedule(
    kind: str, peak_lr: float, total_steps: int, warmup_steps: int, warmup_ratio: float
) -> Schedule:
    """The schedule a fresh run uses; ``warmup_steps`` wins over ``warmup_ratio``."""
    warmup = warmup_steps if warmup_steps > 0 else math.ceil(warmup_ratio * total_steps)
    return Schedule(kind, peak_lr, min(warmup, total_steps), total_steps)


def retarget(old: Schedule, step: int, peak_lr: float, total_steps: int) -> Schedule:
    """The schedule a resume at ``step`` follows when the peak LR or the length changed.

    - A new peak scales the whole curve: the LR at ``step`` becomes old_lr * new/old peak.
    - A new length keeps the LR at ``step`` (times that scale) and stretches or squeezes the
      rest of the old curve, from its position at ``step`` to 1.0 at the new end: no jump.
    - Resuming inside warm-up keeps the warm-up and decays over the new length afterwards.
    Kind and warm-up length always come from ``old``.
    """
    if total_steps == old.total_steps:
        return replace(old, peak_lr=peak_lr)
    if step < old.warmup_steps:
        return replace(old, peak_lr=peak_lr, total_steps=total_steps)
    return replace(
        old,
        peak_lr=peak_lr,
        total_steps=total_steps,
        decay_from_step=step,
        decay_from_progress=old.progress(step),
    )
