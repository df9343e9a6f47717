"""A resume's part of the plan: which checkpoint (a path, ``latest``/``auto``, or the mirror's
newer copy), whether it may be resumed (identity, global batch, float16's scaler), and what
the current config changes (overrides, kept settings, the run's length, the LR curve).

Everything here checks or fills in a ``plan.RunPlan``; a preview collects the refusals instead
of raising (``refuse``). Reads a checkpoint only through ``snapshot``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sftrun import checkpoint, integrity, mirror, runfolder
from sftrun import constants as C
from sftrun.config import TrainingConfig
from sftrun.encoding import data_fingerprint
from sftrun.errors import CheckpointError, SftrunError
from sftrun.oom import split_of, with_split
from sftrun.resume import (
    RENDER_KEYS,
    SchedulePlan,
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


@dataclass(frozen=True)
class Request:
    """What this launch asks of a resume: the config and what planning derived from it."""

    cfg: TrainingConfig
    identity: dict[str, Any]
    world: int
    n_train: int
    global_batch: int
    planned: int  # steps the config plans
    schedule: Schedule  # the config's fresh schedule
    dtype: str
    ckpt_path: Path | None
    length_set: bool  # num_train_epochs or max_steps given on the command line
    auto: bool  # --resume auto: at or past the end is a finished run
    allow_data_change: bool


@dataclass(frozen=True)
class Facts:
    """What the decision needs from outside the checkpoint, gathered first (the only I/O)."""

    same_content: bool  # the data rendered with the checkpoint's settings has its fingerprint
    folder_run_ids: tuple[str, ...]  # the run ids the output folder's checkpoints name


@dataclass
class Decision:
    """How the resume applies each setting (``resume.IDENTITY``/``TUNABLE``/``KEPT``): the
    config and length it trains with, the restored state and schedule, what it notes, and
    what refuses it (``blocking`` identity differences first, then ``errors``)."""

    cfg: TrainingConfig
    planned: int
    schedule: Schedule
    state: TrainState
    blocking: list[tuple[str, Any, Any]] = field(default_factory=list)
    batch_fix: str = ""
    errors: list[SftrunError] = field(default_factory=list)
    lr_plan: SchedulePlan | None = None
    overrides: list[tuple[str, Any, Any]] = field(default_factory=list)
    kept: list[tuple[str, Any, Any]] = field(default_factory=list)
    complete: bool = False
    notes: list[str] = field(default_factory=list)


def decide(saved: RunSnapshot, req: Request, facts: Facts) -> Decision:
    """The whole resume decision, as a pure function of the checkpoint, the request and the
    facts: the run's length (:func:`_keep_run_length`), identity, the state, float16's scaler,
    a finished run, the LR curve, a split adapted after running out of memory, overrides and
    kept settings. Reads and writes nothing; ``plan_resume`` applies it."""
    d = Decision(
        cfg=req.cfg,
        planned=req.planned,
        schedule=req.schedule,
        state=TrainState.from_dict(saved.state),
    )
    if not req.length_set:
        _keep_run_length(d, saved, req)
    _check_identity(d, saved, req, facts)
    step = d.state.global_step
    d.state.resumed_from.append(step)
    if saved.run_id is None and len(facts.folder_run_ids) == 1:
        # A checkpoint from before run ids joins the one run its folder holds.
        d.state.run_id = facts.folder_run_ids[0]
    if req.dtype == "float16" and not isinstance(saved.scaler, dict):
        d.errors.append(
            CheckpointError(
                f"{req.ckpt_path}: {C.SCHEDULER_FILE} has no loss-scaler state, which a "
                "float16 run needs to resume exactly; resume from a checkpoint written by "
                "this float16 run"
            )
        )
    if step == d.planned or (req.auto and step > d.planned):
        d.complete = True  # the checkpoint's run is finished (or past what is asked)
        if step > d.planned:
            d.notes.append(
                f"the checkpoint is at step {step}, past the planned end (step {d.planned})"
            )
        return d
    try:
        d.lr_plan = plan_schedule(
            Schedule.from_dict(saved.schedule), step, d.cfg.learning_rate, d.planned
        )
        d.schedule = d.lr_plan.schedule
    except CheckpointError as exc:
        d.errors.append(exc)
    _keep_adapted_split(d)
    d.overrides = config_overrides(saved.args, d.cfg)
    d.kept = kept_changes(saved.args, d.cfg)
    d.notes += [f"override {k}: {was!r} -> {now!r}" for k, was, now in d.overrides]
    d.notes += [
        f"kept {k}={was!r} from the checkpoint (config says {now!r})" for k, was, now in d.kept
    ]
    if d.lr_plan is not None and d.lr_plan.changed:
        d.notes.append(d.lr_plan.describe(step))
    if saved.world_size != req.world:
        d.notes.append(
            f"written by {saved.world_size} process(es), resumed on {req.world}: the same "
            "samples in the same order with the same optimizer and LR state; random states "
            "are re-derived per process, so the numbers are not bit-identical to an "
            "uninterrupted run"
        )
    return d


def _keep_run_length(d: Decision, saved: RunSnapshot, req: Request) -> None:
    """The config file lengthens a run but never shortens it: when it plans fewer steps than
    the checkpoint's run (as its start or its last "train longer" resume set them), the run
    keeps the checkpoint's length. Only num_train_epochs/max_steps given as KEY=VALUE set a
    shorter end. So a retry loop with the original config finishes an extended run, and
    "continue at a lower LR" after "train longer" continues the longer run."""
    saved_end = int(saved.state.get("max_steps") or 0)
    if d.planned >= saved_end:
        return
    old = saved.args
    cfg = d.cfg.model_copy(update={k: old[k] for k in LENGTH_KEYS if k in old})
    planned = total_steps(req.n_train, req.global_batch, cfg.num_train_epochs, cfg.max_steps)
    if planned != saved_end:
        return  # other data or batch: the identity check names the difference
    d.notes.append(
        f"the config plans {d.planned} steps; this run was planned to step {saved_end} "
        "(by its start or a resume that trained longer) and keeps that end (set "
        "num_train_epochs or max_steps on the command line to change it)"
    )
    d.cfg, d.planned = cfg, planned
    d.schedule = build_schedule(
        cfg.lr_scheduler_type, cfg.learning_rate, planned, cfg.warmup_steps, cfg.warmup_ratio
    )


def saved_world(saved: RunSnapshot | None) -> int:
    """For a preview: the process count the checkpoint was written with."""
    return saved.world_size if saved is not None else 1


def _check_identity(d: Decision, saved: RunSnapshot, req: Request, facts: Facts) -> None:
    """Every identity difference (``d.blocking``), with the setting that keeps the global batch
    when that is one of them; notes what --allow-data-change accepts."""
    cfg, old_args = d.cfg, saved.args
    old_render, new_render = _renders(old_args, cfg)
    diffs = identity_differences(
        saved.identity, req.identity, old_render, new_render, facts.same_content
    )
    blocking, notes = split_identity(diffs, req.allow_data_change)
    d.notes += notes
    d.blocking = [_with_factors(x, old_args, cfg, req.world) for x in blocking]
    saved_batch = saved.identity.get("global_batch_size")
    if isinstance(saved_batch, int):
        d.batch_fix = keep_batch(saved_batch, cfg.per_device_train_batch_size, req.world)


def _renders(
    old_args: dict[str, Any], cfg: TrainingConfig
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The settings that shape the tokens (``resume.RENDER_KEYS``): the checkpoint's, now."""
    return {k: old_args.get(k) for k in RENDER_KEYS}, {k: getattr(cfg, k) for k in RENDER_KEYS}


def _keep_adapted_split(d: Decision) -> None:
    """The split a run moved to after running out of memory (``oom``), kept while the config
    still gives the split the run started with."""
    split, cfg = d.state.adapted_split, d.cfg
    if not split or split_of(cfg) != tuple(split["configured"]):
        return  # none, or a split chosen for this resume (the global batch is checked)
    micro, accum = split["adapted"]
    d.cfg = with_split(cfg, (micro, accum))
    d.notes.append(
        f"kept micro-batch {micro} x accumulation {accum}, which this run adapted to when it "
        f"ran out of memory at step {split['step']} (the config says "
        f"{split['configured'][0]} x {split['configured'][1]}; set both on the command line to "
        "choose another split of the same global batch)"
    )


def plan_resume(
    plan: RunPlan,
    saved: RunSnapshot,
    allow_data_change: bool,
    refusals: list[str] | None,
    auto: bool = False,
    length_set: bool = False,
) -> None:
    """Gather the facts, :func:`decide`, and apply the decision to ``plan``: raise its first
    refusal, or (previewing) list every one.

    With ``auto`` (``--resume auto``, the retry loop's command), a checkpoint at or past the
    planned end is a complete run, never an error: no exit code makes a retry loop spin."""
    cfg = plan.cfg
    old_render, new_render = _renders(saved.args, cfg)
    same_content = old_render != new_render and (
        data_fingerprint(cfg.train_file, old_render) == saved.identity.get("data_fingerprint")
    )
    owners = runfolder.owners(plan.out) if saved.run_id is None else {}
    facts = Facts(same_content, tuple(r for r in owners if r is not None))
    request = Request(
        cfg=cfg,
        identity=plan.identity,
        world=plan.world,
        n_train=len(plan.train_data),
        global_batch=plan.global_batch,
        planned=plan.planned,
        schedule=plan.schedule,
        dtype=plan.dtype,
        ckpt_path=plan.ckpt_path,
        length_set=length_set,
        auto=auto,
        allow_data_change=allow_data_change,
    )
    d = decide(saved, request, facts)
    if d.blocking:
        if refusals is None:
            raise identity_error(d.blocking, d.batch_fix)
        refusals += [describe_difference(*x) for x in d.blocking]
        if d.batch_fix and any(k == "global_batch_size" for k, _, _ in d.blocking):
            refusals.append(
                f"to keep the global batch on {plan.world} process(es), set {d.batch_fix}"
            )
    for error in d.errors:
        refuse(refusals, error)
    plan.cfg, plan.planned, plan.schedule, plan.state = d.cfg, d.planned, d.schedule, d.state
    plan.lr_plan, plan.overrides, plan.kept = d.lr_plan, d.overrides, d.kept
    plan.complete = d.complete
    plan.notes += d.notes
    if not d.complete:
        plan.newer = runfolder.newer_than(plan.out, d.state.global_step)
