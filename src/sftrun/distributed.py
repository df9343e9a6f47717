"""Processes: the process group, who decides, and how ranks agree.

Owns setting up torch.distributed through accelerate (gloo on CPU, NCCL on CUDA) with a
timeout, the "rank 0 decides, every rank follows" pattern (the checkpoint to resume, the
answer to the prompt, errors), the stop signal agreed after each step, the gathering of every
rank's random state for the one writer, the per-rank seed, which samples of a step each
rank and micro-step takes (a pure function), and FSDP's sharding of the frozen base with the
adapter's gradients averaged across processes. Never reads or writes files.

One process is the degenerate case of all of it: no collective is issued, nothing changes.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from datetime import timedelta
from typing import Any, TypeVar

import torch

from sftrun.errors import SftrunError

T = TypeVar("T")


def launched_world_size() -> int:
    """Processes in this launch, from the launcher's environment (torchrun, accelerate)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def launched_rank() -> int:
    """This process's rank, from the launcher's environment (0 without one)."""
    return int(os.environ.get("RANK", "0"))


def start(timeout_s: int) -> Any:
    """accelerate's process state (created once per process), the group formed.

    Raises SftrunError when the group does not form within ``timeout_s`` (a rank that never
    started, a wrong MASTER_ADDR/MASTER_PORT), instead of waiting forever.
    """
    from accelerate import PartialState

    try:
        return PartialState(cpu=not torch.cuda.is_available(), timeout=timedelta(seconds=timeout_s))
    except (RuntimeError, ValueError, OSError) as exc:
        if launched_world_size() <= 1:
            raise
        where = f"{os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')}"
        raise SftrunError(
            f"the group of {launched_world_size()} processes did not form within {timeout_s} s "
            f"(this is rank {launched_rank()}, waiting at {where}: "
            f"{str(exc).splitlines()[0][:160]}); check that every rank was started with the "
            "same MASTER_ADDR/MASTER_PORT, or raise ddp_timeout"
        ) from None


def stop() -> None:
    """Release the process group while the interpreter is still whole.

    A process that exits with the group alive leaves gloo's worker threads holding tensors
    that are freed during interpreter teardown, which can abort the process (SIGABRT, seen
    as a failed rank after a run that succeeded; pytorch/pytorch PR 179291). Local: no
    collective, so a rank that stops early never waits for the others here.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def world_size() -> int:
    """Processes in the formed group (1 when there is none)."""
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    """This process's rank in the formed group (0 when there is none)."""
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _broadcast(value: Any) -> Any:
    import torch.distributed as dist

    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def decided_by_main(decide: Callable[[], T]) -> T:
    """Rank 0 runs ``decide``; every rank returns its result, or raises its SftrunError.

    Used where ranks could otherwise disagree (the newest valid checkpoint while a save is
    under way, the prompt's answer) and where only one process should look at the disk.
    """
    if world_size() == 1:
        return decide()
    outcome: tuple[str, Any]
    if rank() == 0:
        try:
            outcome = ("ok", decide())
        except SftrunError as exc:
            outcome = ("error", (type(exc).__name__, str(exc), exc.exit_code))
            _broadcast(outcome)
            raise
    else:
        outcome = ("", None)
    outcome = _broadcast(outcome)
    if outcome[0] == "error":
        name, message, code = outcome[1]
        error = SftrunError(message)
        error.exit_code = code
        raise error
    return outcome[1]


def agreed_signal(local: int, device: torch.device | str = "cpu") -> int:
    """The stop signal every rank acts on after this step: the highest number any rank got
    (0 when none did), so all ranks stop after the same step. ``device`` is where the
    backend reduces (the GPU for NCCL)."""
    if world_size() == 1:
        return local
    import torch.distributed as dist

    flag = torch.tensor([local], dtype=torch.int64, device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return int(flag.item())


def gather_to_main(value: Any) -> list[Any] | None:
    """Every rank's ``value`` on rank 0 (in rank order); None on the other ranks."""
    if world_size() == 1:
        return [value]
    import torch.distributed as dist

    out: list[Any] | None = [None] * world_size() if rank() == 0 else None
    dist.gather_object(value, out, dst=0)
    return out


def rank_seed(seed: int, step: int, rank_: int) -> int:
    """The seed of rank ``rank_`` from step ``step`` on: ``seed`` itself for rank 0 at step 0
    (one process is unchanged), distinct for every other (step, rank)."""
    return (seed + 1_000_003 * step + 7_919 * rank_) % 2**32


def micro_batches(
    step_samples: list[int], rank_: int, micro: int, accumulation: int
) -> list[list[int]]:
    """The micro-batches of rank ``rank_`` in one optimizer step.

    ``step_samples`` is the step's whole global batch (processes x micro x accumulation
    sample ids); rank r takes the r-th contiguous share and cuts it into ``accumulation``
    micro-batches of ``micro``. Any factorisation of the same global batch therefore trains
    on exactly the same samples in every step.
    """
    share = micro * accumulation
    mine = step_samples[rank_ * share : (rank_ + 1) * share]
    return [mine[i * micro : (i + 1) * micro] for i in range(accumulation)]


def shard_frozen_layers(model: torch.nn.Module, device: torch.device, keep: set[Any]) -> int:
    """FSDP2: shard every decoder layer of ``model`` over the processes; return how many.

    The layers are the module classes the model names in ``_no_split_modules`` (the unit
    transformers and accelerate also shard by). Each process then holds 1/N of those frozen
    weights and gathers one layer at a time while it runs. The parameters in ``keep`` (the
    adapter) stay whole, ordinary tensors on every process: the optimizer, the checkpoint
    files and the resume contract stay those of DDP. They are moved to ``device`` here, since
    FSDP leaves them where they are; their gradients are averaged by :func:`average_gradients`.
    Embeddings, the final norm and the LM head are not in a layer and stay whole.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    layer_types = set(getattr(model, "_no_split_modules", None) or [])
    layers = [m for m in model.modules() if type(m).__name__ in layer_types]
    if not layers:
        raise SftrunError(
            f"parallel: fsdp needs the model's decoder layers, but {type(model).__name__} "
            "names none (_no_split_modules); use parallel: ddp"
        )
    mesh = init_device_mesh(torch.device(device).type, (world_size(),))
    for layer in layers:
        # Resharded after every forward, always: each layer is its own FSDP root here, and
        # a root would otherwise stay gathered after a no-grad forward (an evaluation) until
        # something reshards it, such as the writer's state_dict(), on one process only;
        # the next forward then gathers on some processes and not on others, and hangs.
        fully_shard(layer, mesh=mesh, ignored_params=keep, reshard_after_forward=True)
    for param in keep:
        param.data = param.data.to(device)
    return len(layers)


def average_gradients(params: list[torch.nn.Parameter]) -> None:
    """Average the gradients of ``params`` over every process in one all-reduce (what DDP
    does for a wrapped model; here for the adapter that FSDP leaves whole)."""
    if world_size() == 1:
        return
    import torch.distributed as dist

    grads = [p.grad for p in params if p.grad is not None]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= world_size()
    offset = 0
    for grad in grads:
        grad.copy_(flat[offset : offset + grad.numel()].view_as(grad))
        offset += grad.numel()
