"""Seams into a run, for tests and benchmarks: time steps, count tokens, slow or crash a save,
script eval losses, swap the loss.

Owns ``RunHooks``, one small object passed into ``run_training`` (and ``cli.main``). Every
default does nothing, so a run without hooks behaves exactly as one with ``RunHooks()``.
Nothing in sftrun is changed by assigning module attributes; this is the only way in.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # torch is imported by the run itself, not by `sftrun --help`
    import torch
    from torch import nn


def _nothing(*args: Any) -> None:
    return None


def _same(step: int, value: float) -> float:
    return value


@dataclass
class RunHooks:
    """Called by the training loop at fixed points; see each field."""

    # Before step ``k`` (optimizer steps done so far) builds its batches.
    on_step_start: Callable[[int], None] = _nothing
    # The sample ids of step ``k``'s whole global batch, on every process: (k, ids).
    on_samples: Callable[[int, list[int]], None] = _nothing
    # Each micro-batch as collated, before its forward pass (token counts, injected errors).
    on_batch: Callable[[dict[str, torch.Tensor]], None] = _nothing
    # After each checkpoint file of step ``k`` is written and fsynced: (k, file name).
    # Raising here is a failed save; the commit protocol must keep earlier checkpoints.
    after_file: Callable[[int, str], None] = _nothing
    # After checkpoint ``k`` is committed (renamed into place): (k, its folder).
    after_commit: Callable[[int, Path], None] = _nothing
    # Each held-out loss at step ``k``: returns the value the run records (default: as is).
    on_eval: Callable[[int, float], float] = _same
    # Builds the loss module from the PEFT model; None means ``loss.LabelOnlyLoss``.
    make_loss: Callable[[Any], nn.Module] | None = None
    # sftrun's CPU LoRA fast path (``fastlora``); False runs PEFT's own forward.
    fast_lora: bool = True
    # ``merge``: after the export is written and checked, just before it is put at ``--out``
    # (its target folder): another command may land there first.
    before_export_lands: Callable[[Path], None] = _nothing
