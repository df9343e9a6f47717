"""Planning a run: everything decided before the model is built, for training and for
``sftrun ckpt inspect`` alike.

Owns ``RunPlan`` and ``make_plan``: preflight, the checkpoint to resume, folder ownership, the
data, the identity check, the run's length and LR schedule, overrides and kept settings, and
what will be moved aside. Applies the policy of ``resume`` to what ``checkpoint`` and
``datastage`` read; never writes a checkpoint and never builds the model. Training calls it
strictly (the first refusal is raised); a preview collects every refusal instead.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from sftrun import checkpoint, distributed, mirror
from sftrun import constants as C
from sftrun.config import TrainingConfig
from sftrun.data import (
    Conversation,
    TokenizedData,
    check_data_file,
    data_fingerprint,
    read_conversations,
)
from sftrun.datastage import prepare_data
from sftrun.errors import CheckpointError, ConfigError, SftrunError
from sftrun.modeling import (
    Backend,
    load_tokenizer,
    select_backend,
    tokenizer_sha256,
    weights_sha256,
)
from sftrun.resume import (
    RENDER_KEYS,
    SchedulePlan,
    build_identity,
    check_folder_owner,
    config_overrides,
    describe_difference,
    global_batch_size,
    identity_differences,
    identity_error,
    keep_batch,
    kept_changes,
    plan_schedule,
    resolved_dtype,
    split_identity,
)
from sftrun.sampler import total_steps
from sftrun.schedule import Schedule, build_schedule
from sftrun.state import TrainState

log = logging.getLogger("sftrun")


@dataclass(kw_only=True)
class RunPlan:
    """What a run will do, all of it checked (a preview lists its ``refusals`` instead)."""

    cfg: TrainingConfig
    dtype: str
    out: Path
    backend: Backend
    tokenizer: Any
    train_data: TokenizedData
    eval_data: TokenizedData | None
    eval_convs: list[Conversation]
    identity: dict[str, Any]
    world: int
    global_batch: int
    planned: int
    state: TrainState
    schedule: Schedule
    ckpt_path: Path | None = None
    payload: checkpoint.CheckpointPayload | None = None
    skipped: list[checkpoint.CheckpointInfo] = field(default_factory=list)
    newer: list[Path] = field(default_factory=list)
    overrides: list[tuple[str, Any, Any]] = field(default_factory=list)
    kept: list[tuple[str, Any, Any]] = field(default_factory=list)
    lr_plan: SchedulePlan | None = None
    complete: bool = False  # the checkpoint is the run's last step: nothing to train
    # A checkpoint downloaded from a mirror waits here (beside ``out``) until the run holds
    # its folder's lock; ``trainer`` then moves it in, and a refused or cancelled run leaves
    # ``out`` as it was (``mirror.discard``).
    staging: Path | None = None
    notes: list[str] = field(default_factory=list)
    refusals: list[str] = field(default_factory=list)

    @property
    def steps_left(self) -> int:
        return max(0, self.planned - self.state.global_step)

    @property
    def sharded(self) -> bool:
        """FSDP shards the frozen base (``parallel: fsdp`` with several processes)."""
        return self.cfg.parallel == "fsdp" and self.world > 1

    @property
    def epochs(self) -> float:
        return self.planned * self.global_batch / len(self.train_data)


def _refuse(plan_refusals: list[str] | None, error: SftrunError) -> None:
    """Raise ``error`` when planning strictly; note it when previewing."""
    if plan_refusals is None:
        raise error
    plan_refusals.append(str(error))


def check_output_dir(out: Path, key: str = "output_dir") -> None:
    """Raise ConfigError unless ``out`` is (or can be created as) a writable folder.

    Checked by writing and removing a probe file, before any model is loaded, so a bad
    folder is found before the first save rather than after the steps up to it.
    """
    if out.is_symlink() and not out.exists():
        raise ConfigError(
            f"{key} {out} is a symbolic link to a missing folder ({os.readlink(out)}); "
            f"create that folder or set {key} elsewhere"
        )
    probe = out
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise ConfigError(f"{key} {out}: {probe} is a file, not a folder; set {key} to a folder")
    try:
        fd, name = tempfile.mkstemp(prefix=".sftrun-write-test-", dir=probe)
        os.close(fd)
        os.unlink(name)
    except OSError as exc:
        raise ConfigError(
            f"{key} {out}: cannot write in {probe} ({exc.strerror}); set {key} to a writable folder"
        ) from None


def check_stage_folders(cfg: TrainingConfig) -> None:
    """The folders a run writes besides ``output_dir``: the data cache and, with TensorBoard,
    its runs. Their names are fixed under the working folder, so the fix is to run from a
    writable one (or to remove what is in the way)."""
    folders = [(Path(C.DATA_STAGE_DIR), "the tokenized data cache")]
    if "tensorboard" in cfg.report_to:
        folders.append((Path(C.TENSORBOARD_DIR), "TensorBoard's runs"))
    for folder, what in folders:
        try:
            check_output_dir(folder, key=f"{what} folder")
        except ConfigError as exc:
            raise ConfigError(
                f"{exc}; or run from another working folder (remove a file or link in its place)"
            ) from None


LENGTH_KEYS = ("num_train_epochs", "max_steps")


def sets_length(overrides: list[str]) -> bool:
    """Whether KEY=VALUE ``overrides`` set the run's length (see :func:`_keep_run_length`)."""
    return any(o.partition("=")[0] in LENGTH_KEYS for o in overrides if "=" in o)


def make_plan(
    cfg: TrainingConfig,
    *,
    resume: str | None = None,
    no_unsloth: bool = False,
    allow_data_change: bool = False,
    preview: bool = False,
    length_set: bool = False,
) -> RunPlan:
    """Plan a fresh run, or the resume from ``resume`` (a folder or 'latest').

    Order: preflight (output folder, data files), the checkpoint (verified), ownership of the
    output folder, then the slower steps (tokenizer, data, identity hashes). Raises the first
    refusal (SftrunError) unless ``preview``, which collects them in ``refusals`` and raises
    only when the checkpoint itself cannot be read. ``length_set``: num_train_epochs or
    max_steps was given on the command line (see :func:`_keep_run_length`).
    """
    out = Path(cfg.output_dir)
    refusals: list[str] | None = [] if preview else None
    if cfg.mirror_to:
        mirror.check_separate(cfg.mirror_to, out)
    # Every process of a launch joins the group first, so that a missing one fails here.
    processes = None if preview else distributed.start(cfg.ddp_timeout)
    if not preview:
        check_output_dir(out)
        check_stage_folders(cfg)
    for key in ("train_file", "eval_file"):
        if getattr(cfg, key):
            check_data_file(getattr(cfg, key), key)
    # Rank 0 alone looks for the checkpoint (and the folder's owner); every rank then loads
    # the verified bytes of the folder it chose.
    ckpt_path, skipped, staging = distributed.decided_by_main(
        lambda: _checkpoint_to_resume(out, resume, refusals, cfg.mirror_to)
    )
    try:
        plan = _make_plan(cfg, out, ckpt_path, skipped, refusals, processes, no_unsloth, preview)
        plan.staging = staging
        if resume == C.RESUME_AUTO and ckpt_path is None:
            plan.notes.append(f"--resume auto: no checkpoint in {out}, so this is a new run")
        _check_parallel(plan, refusals, preview)
        if plan.payload is not None:
            if not length_set:
                _keep_run_length(plan, plan.payload)
            _plan_resume(plan, plan.payload, allow_data_change, refusals, resume == C.RESUME_AUTO)
    except BaseException:
        mirror.discard(staging)  # a refused resume leaves the run folder as it was
        raise
    return plan


def _make_plan(
    cfg: TrainingConfig,
    out: Path,
    ckpt_path: Path | None,
    skipped: list[checkpoint.CheckpointInfo],
    refusals: list[str] | None,
    processes: Any,
    no_unsloth: bool,
    preview: bool,
) -> RunPlan:
    """The plan of a fresh run from ``cfg`` (with the checkpoint's payload, not yet applied)."""
    payload = checkpoint.load(ckpt_path)[0] if ckpt_path is not None else None

    tokenizer = load_tokenizer(cfg.model_name_or_path, cfg.chat_template)
    tok_sha = tokenizer_sha256(tokenizer)
    with processes.main_process_first() if processes else contextlib.nullcontext():
        train_data, eval_data = prepare_data(
            cfg, tokenizer, tok_sha, report=not preview and distributed.rank() == 0
        )
    world = processes.num_processes if processes else _saved_world(payload)
    dtype = resolved_dtype(cfg, torch.cuda.is_available())
    identity = build_identity(
        cfg,
        base_model_sha256=weights_sha256(cfg.model_name_or_path),
        tokenizer_sha256=tok_sha,
        data_fingerprint=train_data.fingerprint,
        dtype=dtype,
        world_size=world,
        unsloth_version=(backend := select_backend(cfg.backend, no_unsloth)).version,
    )
    batch = global_batch_size(cfg, world)
    planned = total_steps(len(train_data), batch, cfg.num_train_epochs, cfg.max_steps)
    plan = RunPlan(
        cfg=cfg,
        dtype=dtype,
        out=out,
        backend=backend,
        tokenizer=tokenizer,
        train_data=train_data,
        eval_data=eval_data,
        eval_convs=_eval_convs(cfg),
        identity=identity,
        world=world,
        global_batch=batch,
        planned=planned,
        state=TrainState(),
        schedule=build_schedule(
            cfg.lr_scheduler_type, cfg.learning_rate, planned, cfg.warmup_steps, cfg.warmup_ratio
        ),
        ckpt_path=ckpt_path,
        payload=payload,
        skipped=skipped,
        refusals=refusals if refusals is not None else [],
    )
    return plan


def _eval_convs(cfg: TrainingConfig) -> list[Conversation]:
    """The held-out records generation accuracy scores (``eval_max_samples`` of them)."""
    if not cfg.eval_file:
        return []
    return read_conversations(cfg.eval_file)[: cfg.eval_max_samples or None]


def _check_parallel(plan: RunPlan, refusals: list[str] | None, preview: bool) -> None:
    """``parallel: fsdp``: a note in one process; refused for a quantized base. Unsloth:
    refused with several processes."""
    if plan.cfg.parallel == "fsdp" and plan.world == 1 and not preview:
        plan.notes.append("parallel: fsdp in one process: nothing to shard, trained as usual")
    if plan.sharded and plan.cfg.quantization is not None:
        _refuse(
            refusals,
            ConfigError(
                "parallel: fsdp cannot shard a quantized base; use parallel: ddp with "
                "quantization, or remove quantization"
            ),
        )
    if plan.world > 1 and plan.backend.name == "unsloth":
        _refuse(
            refusals,
            ConfigError(
                f"Unsloth trains in one process, and this launch has {plan.world}; pass "
                "--no-unsloth (or backend: plain), or launch one process"
            ),
        )


def recheck_folder(plan: RunPlan) -> None:
    """Under the folder's lock: the folder is still as planned (no run committed between
    planning and locking). Raises CheckpointError otherwise."""
    owner = plan.payload.run_id if plan.payload is not None else None
    check_folder_owner(
        plan.out,
        checkpoint.owners(plan.out),
        checkpoint.superseded_folders(plan.out) if plan.ckpt_path is None else [],
        plan.ckpt_path,
        owner,
    )
    if plan.ckpt_path is not None:
        newer = checkpoint.newer_than(plan.out, plan.state.global_step)
        if [p.name for p in newer] != [p.name for p in plan.newer]:
            raise CheckpointError(
                f"{plan.out} changed while this run was starting (another process wrote "
                f"{', '.join(p.name for p in newer)}); start it again"
            )


def _checkpoint_to_resume(
    out: Path, resume: str | None, refusals: list[str] | None, mirror_to: str | None
) -> tuple[Path | None, list[checkpoint.CheckpointInfo], Path | None]:
    """The verified checkpoint (with the newer folders skipped) and the staging folder it
    waits in when it came from a mirror, after the ownership checks.

    A URL is downloaded into a staging folder beside ``out``; ``latest``/``auto`` take the
    mirror's copy when it is newer than ``out``'s newest valid checkpoint (a new machine, a
    lost disk, a local folder behind its mirror)."""
    ckpt_path: Path | None = None
    skipped: list[checkpoint.CheckpointInfo] = []
    staging = None
    try:
        if resume is not None and mirror.is_url(resume):
            staging = mirror.staging_folder(out)
            ckpt_path = mirror.fetch(resume, staging)
            log.warning("downloaded %s (it joins %s once the resume is accepted)", resume, out)
        elif resume is not None:
            ckpt_path, skipped, staging = _resolve_or_mirror(resume, out, mirror_to)
        run_id = checkpoint.run_id_of(ckpt_path) if ckpt_path is not None else None
        try:
            owners = checkpoint.owners(out)
            check_folder_owner(out, owners, checkpoint.superseded_folders(out), ckpt_path, run_id)
            if mirror_to:  # the mirror is the run's too: the same rule, and its marker
                remote = mirror.readable_owners(mirror_to)
                check_folder_owner(mirror_to, remote, [], ckpt_path, run_id, key="mirror_to")
                mirror.check_owner(mirror_to, run_id)
        except CheckpointError as exc:
            _refuse(refusals, exc)
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
) -> tuple[Path | None, list[checkpoint.CheckpointInfo], Path | None]:
    """``checkpoint.resolve``; with a mirror, 'latest'/'auto' take the mirror's newest copy
    of the same run when it is newer than the newest valid local checkpoint (downloaded into
    a staging folder, verified, returned with that folder)."""
    if not mirror_to or resume not in (C.RESUME_LATEST, C.RESUME_AUTO):
        return (*checkpoint.resolve(resume, out), None)
    # Newest first, stopping at the first intact one, as a plain 'latest' does.
    local, skipped = checkpoint.resolve(C.RESUME_AUTO, out)
    above = checkpoint.step_of(local) if local is not None else -1
    run_id = checkpoint.run_id_of(local) if local is not None else None
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
            return (*checkpoint.resolve(resume, out), None)  # latest: its error; auto: new run
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


def _keep_run_length(plan: RunPlan, payload: checkpoint.CheckpointPayload) -> None:
    """The config file lengthens a run but never shortens it: when it plans fewer steps than
    the checkpoint's run (as its start or its last "train longer" resume set them), the run
    keeps the checkpoint's length. Only num_train_epochs/max_steps given as KEY=VALUE set a
    shorter end. So a retry loop with the original config finishes an extended run, and
    "continue at a lower LR" after "train longer" continues the longer run."""
    saved_end = int(payload.trainer_state.get("max_steps") or 0)
    if plan.planned >= saved_end:
        return
    old = payload.training_args
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


def _saved_world(payload: checkpoint.CheckpointPayload | None) -> int:
    """For a preview: the process count the checkpoint was written with."""
    return int(payload.training_args.get("world_size", 1)) if payload is not None else 1


def _check_identity(
    plan: RunPlan,
    payload: checkpoint.CheckpointPayload,
    allow_data_change: bool,
    refusals: list[str] | None,
) -> None:
    """Refuse (or, previewing, list) every identity difference, with the setting that keeps
    the global batch when that is one of them; note what --allow-data-change accepts."""
    cfg, old_args = plan.cfg, payload.training_args
    old_render = {k: old_args.get(k) for k in RENDER_KEYS}
    new_render = {k: getattr(cfg, k) for k in RENDER_KEYS}
    same_content = old_render != new_render and (
        data_fingerprint(cfg.train_file, old_render) == payload.identity.get("data_fingerprint")
    )
    diffs = identity_differences(
        payload.identity, plan.identity, old_render, new_render, same_content
    )
    blocking, notes = split_identity(diffs, allow_data_change)
    plan.notes += notes
    blocking = [_with_factors(d, old_args, cfg, plan.world) for d in blocking]
    saved_batch = payload.identity.get("global_batch_size")
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


def _plan_resume(
    plan: RunPlan,
    payload: checkpoint.CheckpointPayload,
    allow_data_change: bool,
    refusals: list[str] | None,
    auto: bool = False,
) -> None:
    """Check identity, restore the trainer state and re-plan what the config changed.

    With ``auto`` (``--resume auto``, the retry loop's command), a checkpoint at or past the
    planned end is a complete run, never an error: no exit code makes a retry loop spin."""
    _check_identity(plan, payload, allow_data_change, refusals)
    cfg, old_args = plan.cfg, payload.training_args
    plan.state = TrainState.from_dict(payload.trainer_state)
    step = plan.state.global_step
    plan.state.resumed_from.append(step)
    if payload.run_id is None:
        # A checkpoint from before run ids joins the one run its folder holds, if any.
        known = [r for r in checkpoint.owners(plan.out) if r is not None]
        if len(known) == 1:
            plan.state.run_id = known[0]
    if plan.dtype == "float16" and not isinstance(payload.scheduler_state.get("scaler"), dict):
        _refuse(
            refusals,
            CheckpointError(
                f"{plan.ckpt_path}: {C.SCHEDULER_FILE} has no loss-scaler state, which a "
                "float16 run needs to resume exactly; resume from a checkpoint written by "
                "this float16 run"
            ),
        )
    old = Schedule.from_dict(payload.scheduler_state["schedule"])
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
        _refuse(refusals, exc)
    plan.overrides = config_overrides(old_args, cfg)
    plan.kept = kept_changes(old_args, cfg)
    plan.notes += [f"override {k}: {was!r} -> {now!r}" for k, was, now in plan.overrides]
    plan.notes += [
        f"kept {k}={was!r} from the checkpoint (config says {now!r})" for k, was, now in plan.kept
    ]
    if plan.lr_plan is not None and plan.lr_plan.changed:
        plan.notes.append(plan.lr_plan.describe(step))
    plan.newer = checkpoint.newer_than(plan.out, step)
    saved_world = int(old_args.get("world_size", 1))
    if saved_world != plan.world:
        plan.notes.append(
            f"written by {saved_world} process(es), resumed on {plan.world}: the same samples "
            "in the same order with the same optimizer and LR state; random states are "
            "re-derived per process, so the numbers are not bit-identical to an uninterrupted run"
        )
