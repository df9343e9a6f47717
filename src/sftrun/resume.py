"""Resume policy: what must match a checkpoint, what may change, and how changes apply.

Owns the identity of a run (the settings that define the model and the data it sees), the
comparison against a checkpoint's identity, the list of tunable overrides, and the schedule a
resumed run follows. Never reads or writes files; ``checkpoint`` does that.

Contract (docs/resume.md states it for users). Every config key is in exactly one group
(a test holds the union to the config's fields):
- :data:`IDENTITY` must match, or resume is refused with every difference named once;
- :data:`TUNABLE` may change; each change is reported as an override;
- :data:`KEPT` keep the checkpoint's value (the LR schedule's kind and warm-up, Adam's
  constants), and the summary says so (docs/resume.md's table and the config file's
  comments are generated from these groups);
- a longer run stretches the old decay, unless the old decay had (nearly) ended: then the
  extension decays afresh from ``learning_rate`` (:data:`RESTART_BELOW`);
- a run owns its output folder: a fresh start refuses a folder that holds checkpoints, and
  a resume refuses a folder that holds another run's (:func:`check_folder_owner`).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from sftrun.config import TrainingConfig
from sftrun.errors import CheckpointError
from sftrun.hardware import CpuBf16
from sftrun.schedule import Schedule, retarget

# An extension restarts the decay when the LR at the resume step is below this share of the
# run's peak: stretching a curve that has reached ~0 would train the new steps at ~0.
RESTART_BELOW = 0.1

# The three groups below are the whole policy: planning applies them, and docs/resume.md's
# table and the config file's "[resume: ...]" comments are generated from them
# (:func:`policy_table`, :func:`config_rule`; tests/test_structure.py holds them equal).

# Settings a checkpoint is bound to: a difference refuses the resume, as (key, what is compared).
IDENTITY = {
    "model_name_or_path": "the base model's weights and config (sha256), wherever the folder is",
    "train_file": "the data's content (sha256); accepted with `--allow-data-change`, "
    "which is logged",
    "max_seq_length": "equal",
    "overlong": "equal; named as the setting (`overlong: 'truncate' -> 'drop'`), not also as "
    "changed data",
    "train_on": "equal; named as the setting, not also as changed data",
    "seed": "equal",
    "dtype": "the resolved precision (`float32`, `bfloat16`, `float16`); `auto` takes the "
    "checkpoint's on any machine (a CPU without native bf16 runs a bf16 run slower, never "
    "refused); a float16 checkpoint also carries its loss scaler's state, restored exactly "
    "(missing: refused)",
    "lora": "every LoRA setting (`r`, `alpha`, `dropout`, `target_modules`)",
    "chat_template": "the template text (part of the tokenizer's sha256)",
    "quantization": "every setting (bits, type, double quantization, compute dtype), and "
    "k-bit preparation ran alike; named per setting (`quantization.bits: 4 -> 8`)",
}
# What else a checkpoint is bound to that is not one config key, as (what, what is compared).
DERIVED_IDENTITY = {
    "the tokenizer": "vocabulary, special tokens and chat template (sha256)",
    "the global batch": "micro-batch x accumulation x processes; the refusal names the "
    "`gradient_accumulation_steps` that keeps it",
    "Unsloth's version": "equal when both runs use Unsloth (switching between Unsloth and the "
    "plain backend is allowed)",
}
# Settings that shape the tokens the data becomes; a change is reported as itself, not also
# as changed data.
RENDER_KEYS = ("max_seq_length", "overlong", "train_on")

# Settings that may take a new value on resume, as (key, what happens); each change is listed
# as an override in the summary.
TUNABLE = {
    "eval_file": "new held-out data from the resume step on",
    "output_dir": "checkpoints from the resume step on go to the new folder",
    "num_train_epochs": "the run's length is re-planned: the LR keeps its value at the resume "
    "step and the rest of the decay is stretched (or squeezed) to the new end, unless the LR "
    'there is below 10% of its peak (see "Training longer"); the config file never shortens '
    "a run, `num_train_epochs=` on the command line does",
    "max_steps": "as `num_train_epochs`",
    "learning_rate": "the LR curve is scaled to the new peak from the resume step on",
    "logging_steps": "new interval from the resume step on",
    "report_to": "each listed tracker continues its own run from the checkpoint's step "
    "(docs/trackers.md)",
    "save_steps": "new interval from the resume step on",
    "eval_steps": "new interval from the resume step on",
    "save_total_limit": "new limit at the next save",
    "metric_for_best_model": "new value from the resume step on",
    "per_device_train_batch_size": "only with the same global batch (micro-batch x "
    "accumulation x processes): the same examples per step and data position; LoRA dropout "
    "masks are drawn per micro-batch, so with dropout > 0 the numbers are no longer "
    "bit-identical",
    "gradient_accumulation_steps": "as `per_device_train_batch_size`",
    "oom": "new value for this launch; a split the run adapted to after running out of memory "
    "is kept on resume while the config still gives the split it started with (set both "
    "batch settings on the command line to choose another)",
    "weight_decay": "new value from the resume step on",
    "max_grad_norm": "new value from the resume step on",
    "eval_accuracy": "new value for the final evaluation",
    "eval_max_new_tokens": "new value for the final evaluation",
    "eval_max_samples": "new value for the final evaluation",
    "per_device_eval_batch_size": "new value for evaluation",
    "backend": "new value (the same weights either way)",
    "ddp_timeout": "new value for this launch",
    "gradient_checkpointing": "new value from the resume step on (the same numbers either way: "
    "checkpointing replays the random state)",
    "parallel": "new value for this launch (the same adapter and optimizer files either way: "
    "FSDP leaves the adapter whole)",
    "mirror_to": "checkpoints from the resume step on are copied there",
    "init_adapter": "read only when a new run starts; a resume continues from the checkpoint's "
    "own adapter",
}

# Settings that keep the checkpoint's value whatever the config now says, as (key, why); the
# summary says when the config differs.
KEPT = {
    "lr_scheduler_type": "the checkpoint's LR curve continues",
    "warmup_ratio": "the checkpoint's LR curve continues",
    "warmup_steps": "the checkpoint's LR curve continues",
    "adam_beta1": "the optimizer's moments were built with it",
    "adam_beta2": "the optimizer's moments were built with it",
    "adam_epsilon": "the optimizer's moments were built with it",
}

RULES = {"must match": IDENTITY, "may change": TUNABLE, "kept": KEPT}


def config_rule(key: str) -> str:
    """A config key's rule on resume, as the config file's comment says it."""
    return next(rule for rule, group in RULES.items() if key in group)


def policy_table() -> str:
    """docs/resume.md's table of every setting's rule, generated from the groups above."""
    rows = ["| setting | on resume | what is compared, or what happens |", "|---|---|---|"]
    for rule, group in RULES.items():
        rows += [f"| `{key}` | {rule} | {text} |" for key, text in group.items()]
        if rule == "must match":
            rows += [f"| {what} | must match | {text} |" for what, text in DERIVED_IDENTITY.items()]
    return "\n".join(rows) + "\n"


def resolved_dtype(
    cfg: TrainingConfig, cuda: bool, cpu: CpuBf16 | None = None, saved: str | None = None
) -> tuple[str, str]:
    """The precision ``dtype`` means for this run, and why.

    ``auto``: the checkpoint's resolved precision when resuming (``saved``: a resume on
    another machine keeps it, slower there rather than refused); else bf16 autocast on CUDA
    and on a CPU with native bf16 (``cpu``, see ``hardware``), fp32 on any other CPU. An
    explicit value is itself (and must match the checkpoint's, as before)."""
    if cfg.dtype != "auto":
        return cfg.dtype, ""  # as configured: nothing to explain
    if saved in ("float32", "bfloat16", "float16"):
        return saved, "auto, kept from the checkpoint"
    if cuda:
        return "bfloat16", "auto: CUDA"
    if cpu is not None and cpu.native:
        return "bfloat16", f"auto: the CPU computes bf16 natively ({cpu.why})"
    why = f" ({cpu.why})" if cpu is not None else ""
    return "float32", f"auto: the CPU has no native bf16{why}"


def global_batch_size(cfg: TrainingConfig, world_size: int) -> int:
    """Examples per optimizer step: micro-batch x accumulation x processes (the one formula)."""
    return cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps * world_size


def keep_batch(global_batch: int, micro: int, world: int) -> str:
    """The settings that give ``global_batch`` on ``world`` processes (the accumulation with
    the same micro-batch when it divides, else a micro-batch of 1)."""
    if global_batch % (micro * world) == 0:
        return f"gradient_accumulation_steps={global_batch // (micro * world)}"
    if global_batch % world == 0:
        return f"per_device_train_batch_size=1 gradient_accumulation_steps={global_batch // world}"
    return f"a process count that divides {global_batch}"


def build_identity(
    cfg: TrainingConfig,
    *,
    base_model_sha256: str,
    tokenizer_sha256: str,
    data_fingerprint: str,
    dtype: str,
    world_size: int,
    unsloth_version: str | None = None,
) -> dict[str, Any]:
    """The settings a checkpoint is bound to; all must match on resume. ``unsloth_version``
    (the Unsloth backend's) is compared only when both runs used Unsloth: an Unsloth update
    between save and resume changed its users' losses (unsloth#5037)."""
    return {
        "base_model": cfg.model_name_or_path,
        "base_model_sha256": base_model_sha256,
        "tokenizer_sha256": tokenizer_sha256,
        "lora": cfg.lora.model_dump(mode="json"),
        # Absent (None) without quantization, as in checkpoints written before it existed.
        "quantization": (
            {**cfg.quantization.model_dump(mode="json"), "kbit_prepared": True}
            if cfg.quantization is not None
            else None
        ),
        "max_seq_length": cfg.max_seq_length,
        "dtype": dtype,
        "packing": False,
        "seed": cfg.seed,
        "global_batch_size": global_batch_size(cfg, world_size),
        "data_fingerprint": data_fingerprint,
        "unsloth_version": unsloth_version,
    }


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested settings as dotted keys: {"lora": {"r": 8}} -> {"lora.r": 8}."""
    flat: dict[str, Any] = {}
    for key, value in d.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _short(value: Any) -> str:
    if isinstance(value, str) and " x " in value:  # a global batch with its factors
        return value
    text = repr(value)
    if isinstance(value, str) and len(value) == 64:  # a sha256
        return text[:13] + "…'"
    return text


def identity_differences(
    old: dict[str, Any],
    new: dict[str, Any],
    old_render: dict[str, Any] | None = None,
    new_render: dict[str, Any] | None = None,
    same_content: bool = False,
) -> list[tuple[str, Any, Any]]:
    """Every identity setting that differs, as (key, old, new), each change named once.

    When only rendering settings changed (``same_content``: the data fingerprint under the
    checkpoint's rendering equals the checkpoint's), those settings are listed instead of a
    changed data fingerprint.
    """
    a, b = flatten(old), flatten(new)
    diffs = [(k, a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
    # Switching the backend is allowed (TUNABLE); two Unsloth versions are not.
    diffs = [d for d in diffs if d[0] != "unsloth_version" or None not in d[1:]]
    if same_content and old_render is not None and new_render is not None:
        diffs = [d for d in diffs if d[0] != "data_fingerprint"]
        named = {k for k, _, _ in diffs}
        diffs += [
            (k, old_render.get(k), new_render.get(k))
            for k in RENDER_KEYS
            if k not in named and old_render.get(k) != new_render.get(k)
        ]
    return sorted(diffs)


IDENTITY_LABELS = {
    "data_fingerprint": "training data (content or rendering settings)",
    "base_model_sha256": "base model weights",
    "tokenizer_sha256": "tokenizer or chat template",
    "global_batch_size": "global batch size (micro-batch x accumulation x processes)",
}


def describe_difference(key: str, was: Any, now: Any) -> str:
    """One identity difference, as the refusal names it."""
    return f"{IDENTITY_LABELS.get(key, key)}: {_short(was)} -> {_short(now)}"


def identity_error(blocking: list[tuple[str, Any, Any]], batch_fix: str = "") -> CheckpointError:
    """The one refusal that names every blocking identity difference and the fix."""
    fix = (
        "; pass --allow-data-change to accept changed data"
        if any(k == "data_fingerprint" for k, _, _ in blocking)
        else ""
    )
    if batch_fix and any(k == "global_batch_size" for k, _, _ in blocking):
        fix += f"; to keep the global batch on this process count, set {batch_fix}"
    return CheckpointError(
        "the model is not compatible with the checkpoint: "
        + "; ".join(describe_difference(*d) for d in blocking)
        + "; put these settings back to the checkpoint's values, or start a new run with "
        "another output_dir" + fix
    )


def split_identity(
    diffs: list[tuple[str, Any, Any]], allow_data_change: bool
) -> tuple[list[tuple[str, Any, Any]], list[str]]:
    """(blocking differences, notes for the ones ``--allow-data-change`` accepts)."""
    if allow_data_change and any(k == "data_fingerprint" for k, _, _ in diffs):
        notes = ["training data changed since the checkpoint; accepted (--allow-data-change)"]
        return [d for d in diffs if d[0] != "data_fingerprint"], notes
    return diffs, []


def config_overrides(old_args: dict[str, Any], cfg: TrainingConfig) -> list[tuple[str, Any, Any]]:
    """Tunable settings whose value differs from the checkpoint's, as (key, old, new)."""
    new = cfg.model_dump(mode="json")
    return [
        (k, old_args.get(k), new[k]) for k in TUNABLE if k in old_args and old_args.get(k) != new[k]
    ]


def kept_changes(old_args: dict[str, Any], cfg: TrainingConfig) -> list[tuple[str, Any, Any]]:
    """KEPT settings the config changes, as (key, checkpoint's, config's): the checkpoint wins."""
    new = cfg.model_dump(mode="json")
    return [(k, old_args.get(k), new[k]) for k in KEPT if k in old_args and old_args[k] != new[k]]


@dataclass(frozen=True)
class SchedulePlan:
    """The LR schedule a resumed run follows, and how it differs from the checkpoint's."""

    schedule: Schedule
    lr_before: float  # LR the checkpoint's schedule gives the resume step
    lr_after: float  # LR the resumed run uses at the resume step
    changed: bool
    restarted: bool = False  # the extension decays afresh from the peak (see RESTART_BELOW)

    def describe(self, step: int) -> str:
        line = f"LR at step {step}: {self.lr_before:.3g} -> {self.lr_after:.3g}"
        if self.restarted:
            line += (
                f" (the old decay had ended: below {RESTART_BELOW:.0%} of its peak, so the "
                "extension decays afresh from learning_rate)"
            )
        return f"{line}; decay now ends at step {self.schedule.total_steps}"


def plan_schedule(old: Schedule, step: int, peak_lr: float, total_steps: int) -> SchedulePlan:
    """The schedule a resume at ``step`` follows (unchanged config: exactly the old one).

    A longer run stretches the rest of the old decay to the new end (no jump in the LR),
    except when the LR at ``step`` is already below ``RESTART_BELOW`` x the old peak (the run
    finished or nearly so): then the new steps decay from ``peak_lr`` at ``step`` to zero at
    the new end, so that "train longer" trains.
    """
    if total_steps <= step:
        raise CheckpointError(
            f"the checkpoint is at step {step} but the configured run ends at step "
            f"{total_steps}; raise num_train_epochs or max_steps to train further"
        )
    before = old.lr(step)
    if peak_lr == old.peak_lr and total_steps == old.total_steps:
        return SchedulePlan(old, before, before, False)
    if (
        total_steps > old.total_steps
        and step >= old.warmup_steps
        and before < RESTART_BELOW * (old.peak_lr)
    ):
        new = replace(
            old,
            peak_lr=peak_lr,
            total_steps=total_steps,
            decay_from_step=step,
            decay_from_progress=0.0,
        )
        return SchedulePlan(new, before, new.lr(step), True, restarted=True)
    new = retarget(old, step, peak_lr, total_steps)
    return SchedulePlan(new, before, new.lr(step), True)


def _short_run(run_id: str | None) -> str:
    return "(no run id: written before run ids)" if run_id is None else run_id[:8]


def _listing(paths: list[Path], limit: int = 4) -> str:
    names = [p.name for p in paths]
    return ", ".join(names[:limit]) + (
        f" and {len(names) - limit} more" if len(names) > limit else ""
    )


def check_folder_owner(
    out: Path | str,
    owners: dict[str | None, list[Path]],
    superseded: list[Path],
    resume: Path | None,
    resume_run: str | None,
    key: str = "output_dir",
) -> None:
    """Refuse a run that would write into a folder owned by another run.

    ``owners`` maps each run id found in ``out``'s checkpoint manifests to its folders
    (``None``: no readable run id). A fresh start (``resume`` None) needs a folder with no
    checkpoints at all; a resume needs every run id in the folder to be the checkpoint's.
    Checkpoints written before run ids (None) belong to whichever run resumes among them.
    """
    found = [p for paths in owners.values() for p in paths]
    if resume is None:
        if not found and not superseded:
            return
        what = _listing(found) if found else _listing(superseded)
        ids = sorted(_short_run(r) for r in owners if r is not None)
        of_run = f" of run {', '.join(ids)}" if ids else ""
        raise CheckpointError(
            f"{key} {out} already holds checkpoints{of_run} ({what}); continue that run "
            f"with --resume latest, or start a new run in another folder, e.g. "
            f"{key}={out}-2 (sftrun never writes a new run over an old one)"
        )
    foreign = {r: paths for r, paths in owners.items() if r is not None and r != resume_run}
    if foreign:
        other, paths = next(iter(sorted(foreign.items())))
        # The run folder of the checkpoint is the fix for output_dir; a mirror is never
        # suggested as a path of the run's own folder (check_separate forbids the overlap).
        fix = (
            f"resume with {key}={resume.parent}, or give this run an empty {key}"
            if key == "output_dir"
            else f"set {key} to this run's own mirror, or leave {key} out"
        )
        raise CheckpointError(
            f"{resume} belongs to run {_short_run(resume_run)}, but {key} {out} holds "
            f"checkpoints of run {_short_run(other)} ({_listing(paths)}); {fix}"
        )
