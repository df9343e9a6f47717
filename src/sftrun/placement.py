"""Placement and precision: the model with its adapter, the optimizer, the loss scaler and
accelerate's wrapping, on the devices this launch has.

Owns building the base model with LoRA (seeded), the disk check before anything is written,
the memory estimate line, DDP/FSDP placement, AdamW (restored from the snapshot when
resuming) and float16's GradScaler.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from sftrun import distributed, fs, hfckpt, memory, rng
from sftrun.config import TrainingConfig
from sftrun.errors import ConfigError, DiskSpaceError
from sftrun.hooks import RunHooks
from sftrun.modeling import load_lora_model, restore_adapter, trainable_parameters
from sftrun.monitor import fmt_bytes
from sftrun.plan import RunPlan

log = logging.getLogger("sftrun")


def make_accelerator(dtype: str) -> Any:
    """accelerate's Accelerator for this precision (bf16 autocast, or none)."""
    from accelerate import Accelerator

    return Accelerator(
        cpu=not torch.cuda.is_available(),
        mixed_precision="bf16" if dtype == "bfloat16" else "no",
    )


def memory_line(plan: RunPlan, model: Model, acc: Any) -> str:
    """The summary's memory line; a warning (with the setting to change) if it may not fit."""
    cfg = plan.cfg
    e = memory.estimate(
        model.peft_model,
        micro_batch=cfg.per_device_train_batch_size,
        seq_len=cfg.max_seq_length,
        compute_bytes=4 if plan.dtype == "float32" else 2,
        checkpointing=cfg.gradient_checkpointing,
        device=acc.device,
    )
    if not e.fits():
        log.warning(
            "the estimated peak memory (%s) is more than %d%% of %s (%s); to fit, set %s",
            fmt_bytes(e.total),
            int(memory.WARN_SHARE * 100),
            e.device,
            fmt_bytes(e.capacity or 0),
            memory.advice(e, cfg),
        )
    return memory.summary_line(e, cfg.gradient_checkpointing)


@dataclass
class Model:
    """The base model with its adapter, and what the summary says of it."""

    peft_model: Any
    params: list[torch.nn.Parameter]
    n_total: int
    checkpoint_bytes: int


def build_model(plan: RunPlan, hooks: RunHooks) -> Model:
    """Base model with a LoRA adapter; its init is seeded (a resume overwrites it)."""
    cfg = plan.cfg
    rng.seed_everything(cfg.seed)
    compute_dtype = getattr(torch, plan.dtype)  # the frozen base; LoRA weights stay fp32
    peft_model = load_lora_model(
        cfg.model_name_or_path,
        cfg.lora,
        plan.backend,
        compute_dtype,
        cfg.max_seq_length,
        fast_lora=hooks.fast_lora,
        gradient_checkpointing=cfg.gradient_checkpointing,
        quantization=cfg.quantization,
    )
    if cfg.init_adapter and plan.snapshot is None:  # a resume has the checkpoint's adapter
        start_from_adapter(peft_model, cfg)
    params = trainable_parameters(peft_model)
    n_total = sum(p.numel() for p in peft_model.parameters())
    return Model(peft_model, params, n_total, _check_disk(plan.out, params))


def start_from_adapter(peft_model: Any, cfg: TrainingConfig) -> None:
    """``init_adapter``: a new run's adapter starts from another run's (same LoRA shape)."""
    folder = Path(str(cfg.init_adapter))
    adapter_config, tensors = hfckpt.read_adapter(folder)
    problems = hfckpt.lora_problems(adapter_config, cfg.lora)
    problems = problems or hfckpt.fit_problems(adapter_config, tensors, peft_model)
    if problems:
        raise ConfigError(
            f"init_adapter {folder}: {'; '.join(problems)}; set the config's lora settings as "
            "the adapter was trained, or start without init_adapter"
        )
    restore_adapter(peft_model, tensors, folder)
    log.info("started from the adapter in %s (%d tensors)", folder, len(tensors))


def _check_disk(output_dir: Path, params: list[torch.nn.Parameter]) -> int:
    """Refuse to start when the free space cannot hold two checkpoints; return one's estimate."""
    # Adapter weights + AdamW's two moments, all fp32-sized, plus small JSON/RNG files.
    per_ckpt = sum(p.numel() * 4 for p in params) * 3 + 256 * 1024
    probe = output_dir
    while not probe.exists():
        probe = probe.parent
    free = fs.ops().disk_usage(probe).free
    if free < 2 * per_ckpt:
        raise DiskSpaceError(
            f"not enough disk space in {probe}: {fmt_bytes(free)} free, but two checkpoints "
            f"need about {fmt_bytes(2 * per_ckpt)} ({fmt_bytes(per_ckpt)} each); free some "
            "space or set output_dir to a larger disk"
        )
    return per_ckpt


def place(plan: RunPlan, acc: Any, model: Model, make_loss: Any) -> tuple[Any, Any, Any]:
    """The loss module, the optimizer and float16's loss scaler, on the device; when resuming,
    adapter, optimizer and scaler are restored from the snapshot before accelerate wraps them.

    DDP (and one process): accelerate places and wraps the whole model. FSDP: the frozen
    decoder layers are sharded over the processes first; the adapter stays whole, so the
    optimizer is the same as under DDP, and the loop averages its gradients itself.
    """
    if plan.sharded:
        base = model.peft_model.get_base_model()
        layers = distributed.shard_frozen_layers(base, acc.device, set(model.params))
        log.info("FSDP: %d decoder layers sharded over %d processes", layers, plan.world)
    optimizer = new_optimizer(plan, model.peft_model)
    # float16 only (accelerate has no fp16 on the CPU, so torch's scaler is used directly);
    # planning refused a float16 checkpoint without its scaler, before anything was touched.
    scaler = torch.amp.GradScaler(acc.device.type) if plan.dtype == "float16" else None
    if plan.snapshot is not None:
        plan.snapshot.restore(model.peft_model, optimizer, scaler, plan.ckpt_path)
        for group in optimizer.param_groups:
            group["weight_decay"] = plan.cfg.weight_decay  # tunable; betas/eps stay saved
        log.info(
            "restored from %s: adapter (%d tensors), optimizer, schedule, step %d, "
            "%d samples seen, RNG states",
            plan.ckpt_path,
            len(plan.snapshot.adapter),
            plan.state.global_step,
            plan.state.samples_seen,
        )
    if plan.sharded:
        return make_loss(model.peft_model), acc.prepare(optimizer), scaler
    loss_module, optimizer = acc.prepare(make_loss(model.peft_model), optimizer)
    return loss_module, optimizer, scaler


def new_optimizer(plan: RunPlan, peft_model: Any) -> torch.optim.Optimizer:
    """AdamW over the adapter, with this run's settings."""
    cfg = plan.cfg
    return torch.optim.AdamW(
        trainable_parameters(peft_model),
        lr=plan.schedule.lr(plan.state.global_step),
        betas=(cfg.adam_beta1, cfg.adam_beta2),
        eps=cfg.adam_epsilon,
        weight_decay=cfg.weight_decay,
    )
