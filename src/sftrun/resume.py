"""Resume policy: what must match a checkpoint, what may change, and how changes apply.

Owns the identity of a run (the settings that define the model and the data it sees), the
comparison against a checkpoint's identity, the list of tunable overrides, and the schedule a
resumed run follows. Never reads or writes files; ``checkpoint`` does that.

Contract (docs/resume.md states it for users):
- identity must match, or resume is refused with every difference named;
- ``num_train_epochs``/``max_steps``, ``learning_rate``, ``logging_steps``, ``save_steps``,
  ``eval_steps``, ``save_total_limit`` and the split of the same global batch into
  micro-batch x accumulation may change; each change is reported as an override;
- the LR schedule's kind and warm-up always come from the checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sftrun.config import TrainingConfig
from sftrun.errors import CheckpointError
from sftrun.schedule import Schedule, retarget

# Settings that may take a new value on resume, as (key, what happens).
TUNABLE = {
    "num_train_epochs": "the run's length is re-planned; the LR decay is stretched to the new end",
    "max_steps": "the run's length is re-planned; the LR decay is stretched to the new end",
    "learning_rate": "the LR curve is scaled to the new peak from the resume step on",
    "logging_steps": "new interval from the resume step on",
    "save_steps": "new interval from the resume step on",
    "eval_steps": "new interval from the resume step on",
    "save_total_limit": "new limit at the next save",
    "metric_for_best_model": "new value from the resume step on",
    "per_device_train_batch_size": "same global batch split differently; same data position",
    "gradient_accumulation_steps": "same global batch split differently; same data position",
    "weight_decay": "new value from the resume step on",
    "max_grad_norm": "new value from the resume step on",
    "eval_accuracy": "new value for the final evaluation",
    "eval_max_new_tokens": "new value for the final evaluation",
    "eval_max_samples": "new value for the final evaluation",
    "per_device_eval_batch_size": "new value for evaluation",
    "backend": "new value (same weights either way)",
}

# Settings that keep the checkpoint's value whatever the config now says.
KEPT = (
    "lr_scheduler_type",
    "warmup_ratio",
    "warmup_steps",
    "adam_beta1",
    "adam_beta2",
    "adam_epsilon",
)


def resolved_dtype(cfg: TrainingConfig, cuda: bool) -> str:
    if cfg.dtype == "auto":
        return "bfloat16" if cuda else "float32"
    return cfg.dtype


def build_identity(
    cfg: TrainingConfig,
    *,
    base_model_sha256: str,
    tokenizer_sha256: str,
    data_fingerprint: str,
    dtype: str,
    world_size: int,
) -> dict[str, Any]:
    """The settings a checkpoint is bound to; all must match on resume."""
    return {
        "base_model": cfg.model_name_or_path,
        "base_model_sha256": base_model_sha256,
        "tokenizer_sha256": tokenizer_sha256,
        "lora": cfg.lora.model_dump(mode="json"),
        "max_seq_length": cfg.max_seq_length,
        "dtype": dtype,
        "packing": False,
        "seed": cfg.seed,
        "global_batch_size": cfg.per_device_train_batch_size
        * cfg.gradient_accumulation_steps
        * world_size,
        "data_fingerprint": data_fingerprint,
    }


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in d.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _short(value: Any) -> str:
    text = repr(value)
    if isinstance(value, str) and len(value) == 64:  # a sha256
        return text[:13] + "…'"
    return text


def identity_differences(old: dict[str, Any], new: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    a, b = _flatten(old), _flatten(new)
    return [(k, a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


IDENTITY_LABELS = {
    "data_fingerprint": "training data (content or rendering settings)",
    "base_model_sha256": "base model weights",
    "tokenizer_sha256": "tokenizer or chat template",
    "global_batch_size": "global batch size (micro-batch x accumulation x processes)",
}


def describe_difference(key: str, was: Any, now: Any) -> str:
    return f"{IDENTITY_LABELS.get(key, key)}: {_short(was)} -> {_short(now)}"


def check_identity(old: dict[str, Any], new: dict[str, Any], allow_data_change: bool) -> list[str]:
    """Raise CheckpointError listing every identity difference; return notes for allowed ones."""
    notes = []
    blocking = []
    for key, was, now in identity_differences(old, new):
        if key == "data_fingerprint" and allow_data_change:
            notes.append(
                "training data changed since the checkpoint; accepted (--allow-data-change)"
            )
        else:
            blocking.append((key, was, now))
    if blocking:
        fix = (
            "; pass --allow-data-change to accept changed data"
            if any(k == "data_fingerprint" for k, _, _ in blocking)
            else ""
        )
        raise CheckpointError(
            "the model is not compatible with the checkpoint: "
            + "; ".join(describe_difference(*d) for d in blocking)
            + "; put these settings back to the checkpoint's values, or start a new run with "
            "another output_dir" + fix
        )
    return notes


def config_overrides(old_args: dict[str, Any], cfg: TrainingConfig) -> list[tuple[str, Any, Any]]:
    """Tunable settings whose value differs from the checkpoint's, as (key, old, new)."""
    new = cfg.model_dump(mode="json")
    return [
        (k, old_args.get(k), new[k]) for k in TUNABLE if k in old_args and old_args.get(k) != new[k]
    ]


def ignored_changes(old_args: dict[str, Any], cfg: TrainingConfig) -> list[tuple[str, Any, Any]]:
    new = cfg.model_dump(mode="json")
    return [(k, old_args.get(k), new[k]) for k in KEPT if k in old_args and old_args[k] != new[k]]


@dataclass(frozen=True)
class SchedulePlan:
    schedule: Schedule
    lr_before: float  # LR the checkpoint's schedule gives the resume step
    lr_after: float  # LR the resumed run uses at the resume step
    changed: bool


def plan_schedule(old: Schedule, step: int, peak_lr: float, total_steps: int) -> SchedulePlan:
    """The schedule a resume at ``step`` follows (unchanged config: exactly the old one)."""
    if total_steps <= step:
        raise CheckpointError(
            f"the checkpoint is at step {step} but the configured run ends at step "
            f"{total_steps}; raise num_train_epochs or max_steps to train further"
        )
    if peak_lr == old.peak_lr and total_steps == old.total_steps:
        return SchedulePlan(old, old.lr(step), old.lr(step), False)
    new = retarget(old, step, peak_lr, total_steps)
    return SchedulePlan(new, old.lr(step), new.lr(step), True)
