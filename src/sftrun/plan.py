"""Planning a run: everything decided before the model is built, for training and for
``sftrun ckpt inspect`` alike.

Owns ``RunPlan`` and ``make_plan``: preflight, folder ownership, the data, the identity, the
run's length and LR schedule; a resume's part (the checkpoint, identity and batch checks,
overrides, kept settings, what will be moved aside) is ``resumeplan``'s. Applies the policy
of ``resume`` to what ``checkpoint`` and ``datastage`` read; never writes a checkpoint and
never builds the model. Training calls it strictly (the first refusal is raised); a preview
collects every refusal instead.
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from sftrun import constants as C
from sftrun import distributed, fs, hardware, hfckpt, mirror, runfolder, snapshot
from sftrun.config import TrainingConfig
from sftrun.data import Conversation, check_data_file, read_conversations
from sftrun.datastage import prepare_data
from sftrun.encoding import TokenizedData
from sftrun.errors import CheckpointError, ConfigError
from sftrun.modeling import (
    Backend,
    load_tokenizer,
    select_backend,
    tokenizer_sha256,
    weights_sha256,
)
from sftrun.resume import (
    SchedulePlan,
    build_identity,
    check_folder_owner,
    global_batch_size,
    resolved_dtype,
)
from sftrun.resumeplan import (
    LENGTH_KEYS,
    checkpoint_to_resume,
    plan_resume,
    refuse,
    saved_world,
)
from sftrun.sampler import total_steps
from sftrun.schedule import Schedule, build_schedule
from sftrun.snapshot import RunSnapshot
from sftrun.state import TrainState

log = logging.getLogger("sftrun")


@dataclass(kw_only=True)
class RunPlan:
    """What a run will do, all of it checked (a preview lists its ``refusals`` instead)."""

    cfg: TrainingConfig
    dtype: str
    dtype_why: str = ""  # how ``auto`` was resolved (the summary says it); "" when configured
    # ``oom`` resolved: on an out-of-memory error, halve the micro-batch and redo the step.
    oom_adapt: bool = False
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
    snapshot: RunSnapshot | None = None  # the checkpoint resumed from, not yet applied
    skipped: list[runfolder.CheckpointInfo] = field(default_factory=list)
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
        fd, name = fs.ops().mkstemp(prefix=".sftrun-write-test-", dir=probe)
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


def sets_length(overrides: list[str]) -> bool:
    """Whether KEY=VALUE ``overrides`` set the run's length (the config file alone never
    shortens a resumed run: ``resumeplan._keep_run_length``)."""
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
    max_steps was given on the command line (see ``resumeplan._keep_run_length``).
    """
    out = Path(cfg.output_dir)
    if cfg.init_adapter:
        hfckpt.refuse_output_inside(cfg.output_dir, Path(cfg.init_adapter), "init_adapter")
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
        lambda: checkpoint_to_resume(out, resume, refusals, cfg.mirror_to)
    )
    try:
        plan = _make_plan(cfg, out, ckpt_path, skipped, refusals, processes, no_unsloth, preview)
        plan.staging = staging
        if resume == C.RESUME_AUTO and ckpt_path is None:
            plan.notes.append(f"--resume auto: no checkpoint in {out}, so this is a new run")
        _check_parallel(plan, refusals, preview)
        if plan.snapshot is not None:
            auto = resume == C.RESUME_AUTO
            plan_resume(plan, plan.snapshot, allow_data_change, refusals, auto, length_set)
    except BaseException:
        mirror.discard(staging)  # a refused resume leaves the run folder as it was
        raise
    return plan


def _make_plan(
    cfg: TrainingConfig,
    out: Path,
    ckpt_path: Path | None,
    skipped: list[runfolder.CheckpointInfo],
    refusals: list[str] | None,
    processes: Any,
    no_unsloth: bool,
    preview: bool,
) -> RunPlan:
    """The plan of a fresh run from ``cfg`` (with the checkpoint's snapshot, not yet applied)."""
    saved = snapshot.load(ckpt_path) if ckpt_path is not None else None

    tokenizer = load_tokenizer(cfg.model_name_or_path, cfg.chat_template)
    tok_sha = tokenizer_sha256(tokenizer)
    with processes.main_process_first() if processes else contextlib.nullcontext():
        train_data, eval_data = prepare_data(
            cfg, tokenizer, tok_sha, report=not preview and distributed.rank() == 0
        )
    world = processes.num_processes if processes else saved_world(saved)
    saved_dtype = saved.identity.get("dtype") if saved is not None else None
    cuda = torch.cuda.is_available()
    cpu = None if cuda else hardware.cpu_bf16()
    dtype, dtype_why = resolved_dtype(cfg, cuda, cpu, saved_dtype)
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
        dtype_why=dtype_why,
        # One process only: with several, the others would wait for the failed one in the
        # gradient all-reduce (``_check_parallel`` refuses an explicit ``adapt`` there).
        oom_adapt=cfg.oom == "adapt" or (cfg.oom == "auto" and cuda and world == 1),
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
        snapshot=saved,
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
        refuse(
            refusals,
            ConfigError(
                "parallel: fsdp cannot shard a quantized base; use parallel: ddp with "
                "quantization, or remove quantization"
            ),
        )
    if plan.world > 1 and plan.cfg.oom == "adapt":
        refuse(
            refusals,
            ConfigError(
                f"oom: adapt redoes a step in one process, and this launch has {plan.world} "
                "(the others would wait for it in the gradient all-reduce); use oom: stop or "
                "auto, or launch one process"
            ),
        )
    if plan.world > 1 and plan.backend.name == "unsloth":
        refuse(
            refusals,
            ConfigError(
                f"Unsloth trains in one process, and this launch has {plan.world}; pass "
                "--no-unsloth (or backend: plain), or launch one process"
            ),
        )


def recheck_folder(plan: RunPlan) -> None:
    """Under the folder's lock: the folder is still as planned (no run committed between
    planning and locking). Raises CheckpointError otherwise."""
    owner = plan.snapshot.run_id if plan.snapshot is not None else None
    check_folder_owner(
        plan.out,
        runfolder.owners(plan.out),
        runfolder.superseded_folders(plan.out) if plan.ckpt_path is None else [],
        plan.ckpt_path,
        owner,
    )
    if plan.ckpt_path is not None:
        newer = runfolder.newer_than(plan.out, plan.state.global_step)
        if [p.name for p in newer] != [p.name for p in plan.newer]:
            raise CheckpointError(
                f"{plan.out} changed while this run was starting (another process wrote "
                f"{', '.join(p.name for p in newer)}); start it again"
            )
