"""``sftrun ckpt import``: continue a Hugging Face Trainer / TRL / Unsloth run in sftrun.

An HF checkpoint (read by ``hfckpt``) becomes a verified sftrun checkpoint of a new run in the
config's ``output_dir``, the source folder untouched. What each piece becomes:

- adapter: the same PEFT tensors (r, alpha, dropout, target modules and base model checked);
- optimizer: HF Trainer's AdamW state (a weight-decay and a no-decay group, parameters numbered
  in model order) mapped onto sftrun's AdamW by parameter *name*, every moment shape-checked;
- schedule: the config's, which must give the LR the source run's scheduler is at (and logged);
- data position: HF Trainer's order (``sampler.HF_TRAINER``: accelerate's seedable sampler) at
  the epoch and batch the source run reached, recorded in ``trainer_state.json`` and kept on
  every later resume;
- random states: re-seeded from (seed, step) when ``rng_state.pth`` needs unpickling.
Every difference is refused by name before anything is written (docs/resume.md, "Coming from
HF Trainer / TRL / Unsloth").
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from sftrun import checkpoint, distributed, rng, runlock, sampler
from sftrun.config import TrainingConfig, config_to_dict
from sftrun.constants import IGNORE_INDEX
from sftrun.errors import CheckpointError
from sftrun.hfckpt import (
    FORMAT,
    HfCheckpoint,
    fit_problems,
    lora_problems,
    refuse_output_inside,
)
from sftrun.hfckpt import read as read_hf
from sftrun.hooks import RunHooks
from sftrun.modeling import restore_adapter, weights_sha256
from sftrun.placement import build_model, new_optimizer
from sftrun.plan import RunPlan, make_plan, recheck_folder
from sftrun.snapshot import RunSnapshot
from sftrun.state import TrainState

log = logging.getLogger("sftrun")

# transformers' schedule names that sftrun's schedules reproduce (after any warm-up).
SCHEDULES = {"linear": "linear", "cosine": "cosine", "constant": "constant"}
SCHEDULES["constant_with_warmup"] = "constant"
ADAMW = ("adamw_torch", "adamw_torch_fused")  # HF `optim` values whose state is torch AdamW's
ADAM_STATE = {"step", "exp_avg", "exp_avg_sq"}


@dataclass
class Imported:
    """What an import wrote, and what it noticed on the way."""

    path: Path
    step: int
    planned: int
    notes: list[str] = field(default_factory=list)


def import_checkpoint(cfg: TrainingConfig, source: Path, hooks: RunHooks | None = None) -> Imported:
    """Convert the HF checkpoint at ``source`` into a new sftrun run under ``cfg.output_dir``."""
    refuse_output_inside(cfg.output_dir, source, "the checkpoint being imported")
    hf = read_hf(source)
    cfg = _with_source_adam(cfg, hf)
    plan = make_plan(cfg)  # a fresh run's checks: output folder, data, model, ownership
    notes = list(hf.ignored)
    problems = _check_run(hf, plan, notes)
    _raise(source, problems)
    model = build_model(plan, hooks or RunHooks())
    peft_model = model.peft_model
    _raise(source, fit_problems(hf.adapter_config, hf.adapter, peft_model))
    restore_adapter(peft_model, hf.adapter, source)
    optimizer = new_optimizer(plan, peft_model)
    optimizer.load_state_dict(map_optimizer(hf, peft_model, optimizer, cfg, notes))
    state = _state(hf, plan)
    snap = RunSnapshot.capture(
        peft_model,
        optimizer,
        None,
        schedule=plan.schedule.to_dict(),
        state=state.to_dict(
            cfg, n_train=len(plan.train_data), planned=plan.planned, global_batch=plan.global_batch
        ),
        config=config_to_dict(cfg),
        rng_states=[_rng_state(hf, cfg.seed)],
        identity=plan.identity,
    )
    lock = runlock.acquire(plan.out)
    try:
        recheck_folder(plan)
        path = checkpoint.save(plan.out, hf.step, snap.to_payload())
    finally:
        lock.release()
    return Imported(path, hf.step, plan.planned, notes)


def _raise(source: Path, problems: list[str]) -> None:
    if problems:
        raise CheckpointError(
            f"{source}: cannot continue this run as configured: {'; '.join(problems)}"
        )


def _with_source_adam(cfg: TrainingConfig, hf: HfCheckpoint) -> TrainingConfig:
    """Adam's constants are the source optimizer's (its moments were built with them)."""
    groups = [g for g in hf.optimizer.get("param_groups", []) if g.get("params")]
    if not groups or not isinstance(groups[0].get("betas"), list | tuple):
        return cfg
    beta1, beta2 = (float(b) for b in groups[0]["betas"])
    eps = float(groups[0].get("eps", cfg.adam_epsilon))
    return cfg.model_copy(update={"adam_beta1": beta1, "adam_beta2": beta2, "adam_epsilon": eps})


def _differs(a: float, b: float, rel: float = 1e-6) -> bool:
    return not math.isclose(a, b, rel_tol=rel, abs_tol=1e-12)


def _check_run(hf: HfCheckpoint, plan: RunPlan, notes: list[str]) -> list[str]:
    """Every way the config would not continue the source run, each naming the setting."""
    cfg, args = plan.cfg, hf.args
    ac = hf.adapter_config
    problems = lora_problems(ac, cfg.lora)
    problems += _check_base(ac.get("base_model_name_or_path"), plan, notes)
    problems += _check_batch(hf, plan)
    problems += _check_schedule(hf, plan)
    optim = args.get("optim")
    if optim is not None and optim not in ADAMW:
        problems.append(
            f"optim: the source run used {optim!r}; sftrun continues torch AdamW runs "
            f"({' or '.join(ADAMW)}) only"
        )
    if hf.data_seed is None:
        notes.append(
            f"the source run's seed is unknown: its data order is taken as seed={cfg.seed}"
        )
    return problems


def _check_base(name: Any, plan: RunPlan, notes: list[str]) -> list[str]:
    """The adapter's base model, when it names a folder here, must hold the same weights."""
    if not isinstance(name, str) or not name:
        return []
    folder = Path(name)
    ours = Path(plan.cfg.model_name_or_path)
    if not folder.is_dir():
        notes.append(
            f"the adapter names base model {name!r}, not a folder here: taken to be "
            f"{ours} (the tensor shapes are checked)"
        )
        return []
    if folder.resolve() == ours.resolve():
        return []
    if weights_sha256(folder) != plan.identity["base_model_sha256"]:
        return [f"model_name_or_path: the adapter was trained on {folder}, the config names {ours}"]
    return []


def _source_split(hf: HfCheckpoint, cfg: TrainingConfig) -> tuple[Any, Any]:
    """The source run's micro-batch and accumulation (per process), as its files say."""
    micro = hf.train_batch_size or hf.args.get("per_device_train_batch_size")
    return micro, hf.args.get("gradient_accumulation_steps", cfg.gradient_accumulation_steps)


def _hf_epoch(step: int, n: int, global_batch: int, micro: int, accum: int) -> tuple[int, int, int]:
    """Where HF Trainer is after ``step`` optimizer steps: (whole epochs, steps into the epoch
    in progress, micro-batches per process per epoch)."""
    per_process = math.ceil(n * micro / global_batch)
    epoch, in_epoch = divmod(step, math.ceil(per_process / accum))
    return epoch, in_epoch, per_process


def _check_batch(hf: HfCheckpoint, plan: RunPlan) -> list[str]:
    """The global batch: HF's micro-batch x accumulation x processes, the last confirmed by
    the epoch its state reached."""
    n = len(plan.train_data)
    micro, accum = _source_split(hf, plan.cfg)
    if not isinstance(micro, int) or not isinstance(accum, int) or micro < 1 or accum < 1:
        return ["the source run's batch size is unknown (trainer_state.json, training_args.bin)"]
    world, rest = divmod(plan.global_batch, micro * accum)
    epoch, in_epoch, per_process = _hf_epoch(hf.step, n, plan.global_batch, micro, accum)
    # HF's fractional epoch: micro-batches done over micro-batches per epoch.
    if world < 1 or rest or _differs(epoch + in_epoch * accum / per_process, hf.epoch, 1e-6):
        return [
            f"global batch: the source run trained {micro} x {accum} per process (epoch "
            f"{hf.epoch:.6g} at step {hf.step} on {n} examples), which does not give this run's "
            f"{plan.global_batch}; set per_device_train_batch_size and "
            "gradient_accumulation_steps as the source run had them (and the same train_file)"
        ]
    return []


def _check_schedule(hf: HfCheckpoint, plan: RunPlan) -> list[str]:
    """The config's schedule must be where the source scheduler is, and continue as it would."""
    cfg, sched, args = plan.cfg, hf.scheduler, hf.args
    problems = []
    kind = args.get("lr_scheduler_type")
    if kind is not None and SCHEDULES.get(kind) != cfg.lr_scheduler_type:
        problems.append(
            f"lr_scheduler_type: the source run used {kind!r}, the config says "
            f"{cfg.lr_scheduler_type!r}"
            + ("" if kind in SCHEDULES else f" (sftrun has {', '.join(sorted(SCHEDULES))})")
        )
    warmup = _source_warmup(args, hf.max_steps)
    if warmup is not None and warmup != plan.schedule.warmup_steps:
        problems.append(
            f"warm-up: the source run warmed up for {warmup} steps, the config gives "
            f"{plan.schedule.warmup_steps} (warmup_steps, warmup_ratio)"
        )
    if hf.max_steps is not None and hf.max_steps != plan.planned:
        problems.append(
            f"max_steps: the source run was planned for {hf.max_steps} steps, the config gives "
            f"{plan.planned}; import with max_steps={hf.max_steps} and extend on resume"
        )
    base = sched.get("base_lrs") or [None]
    if isinstance(base[0], float) and _differs(base[0], cfg.learning_rate):
        problems.append(
            f"learning_rate: the source run's peak was {base[0]:g}, the config says "
            f"{cfg.learning_rate:g}"
        )
    if sched.get("last_epoch") != hf.step:
        problems.append(f"scheduler.pt is at step {sched.get('last_epoch')}, not {hf.step}")
    if problems:
        return problems
    last = (sched.get("_last_lr") or [None])[0]
    logged = [h for h in hf.log_history if "learning_rate" in h and h.get("step", 0) <= hf.step]
    checks = [("its scheduler", hf.step, last)]
    if logged:  # HF logs the LR its step used
        checks.append(("its last log", logged[-1]["step"] - 1, logged[-1]["learning_rate"]))
    for where, step, theirs in checks:
        if isinstance(theirs, float) and _differs(plan.schedule.lr(step), theirs):
            warm = plan.schedule.warmup_steps
            why = (
                f"; inside the {warm}-step warm-up, where HF's LR starts at 0 and sftrun's at "
                "one step's share: import after the warm-up"
                if step < warm
                else "; set lr_scheduler_type, warmup_steps or warmup_ratio as the source run had"
            )
            problems.append(
                f"LR schedule: {where} gives {theirs:.6g} for step {step + 1}, this config "
                f"{plan.schedule.lr(step):.6g}{why}"
            )
            break
    return problems


def _source_warmup(args: dict[str, Any], max_steps: int | None) -> int | None:
    """HF's warm-up length: ``warmup_steps`` when set, else ``warmup_ratio`` of the run
    (None when training_args.bin did not say)."""
    steps, ratio = args.get("warmup_steps"), args.get("warmup_ratio")
    if isinstance(steps, float) and 0 < steps < 1:  # transformers 5: a fraction is a ratio
        steps, ratio = 0, steps
    if isinstance(steps, int | float) and steps >= 1:
        return int(steps)
    if isinstance(ratio, float) and ratio > 0 and max_steps:
        return math.ceil(ratio * max_steps)
    return 0 if isinstance(steps, int | float) else None


def hf_parameter_order(peft_model: Any) -> list[str]:
    """The trainable parameters' names in the order HF Trainer numbers them in optimizer.pt:
    its weight-decay group, then its no-decay group (transformers' own rule splits them)."""
    from transformers import Trainer

    decay = set(Trainer.get_decay_parameter_names(None, peft_model))  # type: ignore[arg-type]
    named = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    return [n for n in named if n in decay] + [n for n in named if n not in decay]


def map_optimizer(
    hf: HfCheckpoint,
    peft_model: Any,
    optimizer: torch.optim.Optimizer,
    cfg: TrainingConfig,
    notes: list[str],
) -> dict[str, Any]:
    """HF's AdamW state, renumbered for ``optimizer`` (sftrun's, over the same parameters)."""
    saved = hf.optimizer
    groups = saved["param_groups"]
    order = hf_parameter_order(peft_model)
    ids = [i for g in groups for i in g.get("params", [])]
    problem = None
    if len(ids) != len(order):
        problem = f"it holds {len(ids)} parameters, this adapter has {len(order)}"
    decays = {float(g.get("weight_decay", 0.0)) for g in groups if g.get("params")}
    if problem is None and len(decays) > 1:
        problem = "its groups use different weight decays; sftrun applies one to the adapter"
    by_name = dict(zip(order, ids, strict=False))
    named = dict(peft_model.named_parameters())
    ours = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    state: dict[int, Any] = {}
    for index, name in enumerate(ours):
        if problem is not None:
            break
        moments = saved.get("state", {}).get(by_name.get(name, -1))
        if moments is None:
            continue  # a parameter that never got a gradient: AdamW starts it afresh
        problem = _check_moments(name, moments, named[name].shape, hf.step)
        state[index] = {k: v.clone() for k, v in moments.items()}
    if problem is not None:
        raise CheckpointError(
            f"{hf.path}: optimizer.pt cannot be mapped onto this adapter ({problem}); import "
            "with the LoRA settings and base model the source run used"
        )
    fresh = optimizer.state_dict()
    if decays and _differs(decays.pop(), cfg.weight_decay):
        notes.append(f"weight_decay: the config's {cfg.weight_decay:g} applies from here on")
    return {"state": state, "param_groups": fresh["param_groups"]}


def _check_moments(name: str, moments: Any, shape: torch.Size, step: int) -> str | None:
    if not isinstance(moments, dict) or set(moments) != ADAM_STATE:
        keys = sorted(moments) if isinstance(moments, dict) else type(moments).__name__
        return f"{name} has state {keys}, not AdamW's {sorted(ADAM_STATE)}"
    for key in ("exp_avg", "exp_avg_sq"):
        if tuple(moments[key].shape) != tuple(shape):
            return f"{key} of {name} is {tuple(moments[key].shape)}, not {tuple(shape)}"
    if int(moments["step"]) != step:
        return f"{name} was updated {int(moments['step'])} times, not {step}"
    return None


def _state(hf: HfCheckpoint, plan: RunPlan) -> TrainState:
    """The run's counters at the source step: HF's data position and order, its history."""
    cfg, data = plan.cfg, plan.train_data
    # Whole epochs plus the steps of the epoch in progress (checked in _check_batch). HF's last
    # step of an epoch may be short; sftrun's stream continues into the next epoch's order
    # instead (docs/resume.md).
    epoch, in_epoch, _ = _hf_epoch(hf.step, len(data), plan.global_batch, *_source_split(hf, cfg))
    seen = epoch * len(data) + in_epoch * plan.global_batch
    seed = hf.data_seed if hf.data_seed is not None else cfg.seed
    indices = sampler.step_indices(seed, len(data), 0, seen, sampler.HF_TRAINER)
    keys = ("step", "epoch", "loss", "learning_rate", "grad_norm", "eval_loss")
    history = [
        {k: h[k] for k in keys if k in h}
        for h in hf.log_history
        if isinstance(h.get("step"), int) and ("loss" in h or "eval_loss" in h)
    ]
    return TrainState(
        global_step=hf.step,
        samples_seen=seen,
        tokens_seen=sum(len(data.input_ids[i]) for i in indices),
        # As the loop counts them: positions whose next token carries a loss.
        label_tokens_seen=sum(sum(t != IGNORE_INDEX for t in data.labels[i][1:]) for i in indices),
        log_history=history,
        data_order=sampler.HF_TRAINER,
        data_seed=seed,
        imported_from={"path": str(hf.path.resolve()), "format": FORMAT, "step": hf.step},
    )


def _rng_state(hf: HfCheckpoint, seed: int) -> dict[str, Any]:
    """sftrun's random state for the first continued step: derived from (seed, step), with
    the source's torch CPU generator when it loaded without unpickling."""
    rng.seed_everything(distributed.rank_seed(seed, hf.step, 0))
    state = rng.capture()
    cpu = (hf.rng or {}).get("cpu")
    if isinstance(cpu, torch.Tensor) and cpu.dtype == torch.uint8:
        state["cpu"] = cpu
    return state
