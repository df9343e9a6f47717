"""A resume's part of the plan: which checkpoint (a path, ``latest``/``auto``, or the mirror's
newer copy), whether it may be resumed (identity, global batch, float16's scaler), and what
the current config changes (overrides, kept settings, the run's length, the LR curve).

Everything here checks or fills in a ``plan.RunPlan``; a preview collects the refusals instead
of raising (``refuse``). Reads a checkpoint only through ``snapshot``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sftrun import checkpoint, integrity, mirror, runfolder
from sftrun import constants as C
from sftrun.config import TrainingConfig
from sftrun.encoding import data_fingerprint
from sftrun.errors import CheckpointError, SftrunError
from sftrun.oom import split_of
from sftrun.resume import (
    RENDER_KEYS,
    check_folder_owner,
    config_overrides,
    describe_difference,
    identity_differences,
    identity_error,
    keep_batch,
    kept_changes,
    plan_schedule,
    split_identity,
)
from sftrun.sampler import total_steps
from sftrun.schedule import Schedule, build_schedule
from sftrun.snapshot import RunSnapshot
from sftrun.state import TrainState

if TYPE_CHECKING:
    from sftrun.plan import RunPlan

log = logging.getLogger("sftrun")


def refuse(plan_refusals: list[str] | None, error: SftrunError) -> None:
    """Raise ``error`` when planning strictly; note it when previewing."""
    if plan_refusals is None:
        raise error
    plan_refusals.append(str(error))


LENGTH_KEYS = ("num_train_epochs", "max_steps")


def checkpoint_to_resume(
    out: Path, resume: str | None, refusals: list[str] | None, mirror_to: str | None
) -> tuple[Path | None, list[runfolder.CheckpointInfo], Path | None]:
    """The verified checkpoint (with the newer folders skipped) and the staging folder it
    waits in when it came from a mirror, after the ownership checks.

    A URL is downloaded into a staging folder beside ``out``; ``latest``/``auto`` take the
    mirror's copy when it is newer than ``out``'s newest valid checkpoint (a new machine, a
    lost disk, a local folder behind its mirror)."""
    ckpt_path: Path | None = None
    skipped: list[runfolder.CheckpointInfo] = []
    staging = None
    try:
        if resume is not None and mirror.is_url(resume):
            staging = mirror.staging_folder(out)
            ckpt_path = mirror.fetch(resume, staging)
            log.warning("downloaded %s (it joins %s once the resume is accepted)", resume, out)
        elif resume is not None:
            ckpt_path, skipped, staging = _resolve_or_mirror(resume, out, mirror_to)
        run_id = integrity.run_id_of(ckpt_path) if ckpt_path is not None else None
        try:
            owners = runfolder.owners(out)
            check_folder_owner(out, owners, runfolder.superseded_folders(out), ckpt_path, run_id)
            if mirror_to:  # the mirror is the run's too: the same rule, and its marker
                remote = mirror.readable_owners(mirror_to)
                check_folder_owner(mirror_to, remote, [], ckpt_path, run_id, key="mirror_to")
                mirror.check_owner(mirror_to, run_id)
        except CheckpointError as exc:
            refuse(refusals, exc)
    except BaseException:
        mirror.discard(staging)
        raise
    return ckpt_path, skipped, staging


def _with_factors(
    diff: tuple[str, Any, Any], old_args: dict[str, Any], cfg: TrainingConfig, world: int
) -> tuple[str, Any, Any]:
    """A global-batch difference names its three factors on both sides."""
    key, was, now = diff
    if key != "global_batch_size":
        return diff
    old = (
        f"{old_args.get('per_device_train_batch_size')} x "
        f"{old_args.get('gradient_accumulation_steps')} x {old_args.get('world_size', 1)}"
    )
    new = f"{cfg.per_device_train_batch_size} x {cfg.gradient_accumulation_steps} x {world}"
    return key, f"{was} ({old})", f"{now} ({new})"


def _resolve_or_mirror(
    resume: str, out: Path, mirror_to: str | None
) -> tuple[Path | None, list[runfolder.CheckpointInfo], Path | None]:
    """``runfolder.resolve``; with a mirror, 'latest'/'auto' take the mirror's newest copy
    of the same run when it is newer than the newest valid local checkpoint (downloaded into
    a staging folder, verified, returned with that folder)."""
    if not mirror_to or resume not in (C.RESUME_LATEST, C.RESUME_AUTO):
        return (*runfolder.resolve(resume, out), None)
    # Newest first, stopping at the first intact one, as a plain 'latest' does.
    local, skipped = runfolder.resolve(C.RESUME_AUTO, out)
    above = checkpoint.step_of(local) if local is not None else -1
    run_id = integrity.run_id_of(local) if local is not None else None
    staging = mirror.staging_folder(out)
    try:
        fetched, passed_over = mirror.newest(mirror_to, staging, above, run_id)
    except BaseException:
        mirror.discard(staging)
        raise
    for line in passed_over:
        log.warning("skipped on the mirror: %s", line)
    if fetched is None:
        mirror.discard(staging)
        if local is None:
            return (*runfolder.resolve(resume, out), None)  # latest: its error; auto: new run
        return local, skipped, None
    if local is None:
        log.warning("no valid checkpoint in %s: resumed from the mirror's %s", out, fetched.name)
    else:
        log.warning(
            "the mirror's %s is newer than the newest valid checkpoint in %s (%s): resuming "
            "from the mirror's copy",
            fetched.name,
            out,
            local.name,
        )
    return fetched, skipped, staging


def keep_run_length(plan: RunPlan, saved: RunSnapshot) -> None:
    """The config file lengthens a run but never shortens it: when it plans fewer steps than
    the checkpoint's run (as its start or its last "train longer" resume set them), the run
    keeps the checkpoint's length. Only num_train_epochs/max_steps given as KEY=VALUE set a
    shorter end. So a retry loop with the original config finishes an extended run, and
    "continue at a lower LR" after "train longer" continues the longer run."""
    saved_end = int(saved.state.get("max_steps") or 0)
    if plan.planned >= saved_end:
        return
    old = saved.args
    cfg = plan.cfg.model_copy(update={k: old[k] for k in LENGTH_KEYS if k in old})
    planned = total_steps(
        len(plan.train_data), plan.global_batch, cfg.num_train_epochs, cfg.max_steps
    )
    if planned != saved_end:
        return  # other data or batch: the identity check names the difference
    plan.notes.append(
        f"the config plans {plan.planned} steps; this run was planned to step {saved_end} "
        "(by its start or a resume that trained longer) and keeps that end (set "
        "num_train_epochs or max_steps on the command line to change it)"
    )
    plan.cfg, plan.planned = cfg, planned
    plan.schedule = build_schedule(
        cfg.lr_scheduler_type, cfg.learning_rate, planned, cfg.warmup_steps, cfg.warmup_ratio
    )


def saved_world(saved: RunSnapshot | None) -> int:
    """For a preview: the process count the checkpoint was written with."""
    return saved.world_size if saved is not None else 1


def _check_identity(
    plan: RunPlan,
    saved: RunSnapshot,
    allow_data_change: bool,
    refusals: list[str] | None,
) -> None:
    """Refuse (or, previewing, list) every identity difference, with the setting that keeps
    the global batch when that is one of them; note what --allow-data-change accepts."""
    cfg, old_args = plan.cfg, saved.args
    old_render = {k: old_args.get(k) for k in RENDER_KEYS}
    new_render = {k: getattr(cfg, k) for k in RENDER_KEYS}
    same_content = old_render != new_render and (
        data_fingerprint(cfg.train_file, old_render) == saved.identity.get("data_fingerprint")
    )
    diffs = identity_differences(
        saved.identity, plan.identity, old_render, new_render, same_content
    )
    blocking, notes = split_identity(diffs, allow_data_change)
    plan.notes += notes
    blocking = [_with_factors(d, old_args, cfg, plan.world) for d in blocking]
    saved_batch = saved.identity.get("global_batch_size")
    batch_fix = (
        keep_batch(saved_batch, cfg.per_device_train_batch_size, plan.world)
        if isinstance(saved_batch, int)
        else ""
    )
    if blocking:
        if refusals is None:
            raise identity_error(blocking, batch_fix)
        refusals += [describe_difference(*d) for d in blocking]
        if batch_fix and any(k == "global_batch_size" for k, _, _ in blocking):
            refusals.append(
                f"to keep the global batch on {plan.world} process(es), set {batch_fix}"
            )


def _keep_adapted_split(plan: RunPlan) -> TrainingConfig:
    """The split a run moved to after running out of memory (``loop``), kept while the config
    still gives the split the run started with; returns the config the resume trains with."""
    split, cfg = plan.state.adapted_split, plan.cfg
    if not split or split_of(cfg) != tuple(split["configured"]):
        return cfg  # none, or a split chosen for this resume (the global batch is checked)
    micro, accum = split["adapted"]
    plan.cfg = cfg.model_copy(
        update={"per_device_train_batch_size": micro, "gradient_accumulation_steps": accum}
    )
    plan.notes.append(
        f"kept micro-batch {micro} x accumulation {accum}, which this run adapted to when it "
        f"ran out of memory at step {split['step']} (the config says "
        f"{split['configured'][0]} x {split['configured'][1]}; set both on the command line to "
        "choose another split of the same global batch)"
    )
    return plan.cfg


def plan_resume(
    plan: RunPlan,
    saved: RunSnapshot,
    allow_data_change: bool,
    refusals: list[str] | None,
    auto: bool = False,
) -> None:
    """Check identity, restore the trainer state and re-plan what the config changed.

    With ``auto`` (``--resume auto``, the retry loop's command), a checkpoint at or past the
    planned end is a complete run, never an error: no exit code makes a retry loop spin."""
    _check_identity(plan, saved, allow_data_change, refusals)
    cfg, old_args = plan.cfg, saved.args
    plan.state = TrainState.from_dict(saved.state)
    step = plan.state.global_step
    plan.state.resumed_from.append(step)
    if saved.run_id is None:
        # A checkpoint from before run ids joins the one run its folder holds, if any.
        known = [r for r in runfolder.owners(plan.out) if r is not None]
        if len(known) == 1:
            plan.state.run_id = known[0]
    if plan.dtype == "float16" and not isinstance(saved.scaler, dict):
        refuse(
            refusals,
            CheckpointError(
                f"{plan.ckpt_path}: {C.SCHEDULER_FILE} has no loss-scaler state, which a "
                "float16 run needs to resume exactly; resume from a checkpoint written by "
                "this float16 run"
            ),
        )
    old = Schedule.from_dict(saved.schedule)
    if step == plan.planned or (auto and step > plan.planned):
        plan.complete = True  # the checkpoint's run is finished (or past what is asked)
        if step > plan.planned:
            plan.notes.append(
                f"the checkpoint is at step {step}, past the planned end (step {plan.planned})"
            )
        return
    try:
        plan.lr_plan = plan_schedule(old, step, cfg.learning_rate, plan.planned)
        plan.schedule = plan.lr_plan.schedule
    except CheckpointError as exc:
        refuse(refusals, exc)
    cfg = _keep_adapted_split(plan)
    plan.overrides = config_overrides(old_args, cfg)
    plan.kept = kept_changes(old_args, cfg)
    plan.notes += [f"override {k}: {was!r} -> {now!r}" for k, was, now in plan.overrides]
    plan.notes += [
        f"kept {k}={was!r} from the checkpoint (config says {now!r})" for k, was, now in plan.kept
    ]
    if plan.lr_plan is not None and plan.lr_plan.changed:
        plan.notes.append(plan.lr_plan.describe(step))
    plan.newer = runfolder.newer_than(plan.out, step)
    saved_world = saved.world_size
    if saved_world != plan.world:
        plan.notes.append(
            f"written by {saved_world} process(es), resumed on {plan.world}: the same samples "
            "in the same order with the same optimizer and LR state; random states are "
            "re-derived per process, so the numbers are not bit-identical to an uninterrupted run"
        )
