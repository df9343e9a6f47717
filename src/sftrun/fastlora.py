"""LoRA training on the CPU at the cost of its matmuls, not of its dropout.

PEFT computes ``base(x) + lora_B(lora_A(dropout(x))) * scaling``. On the CPU two things in that
line cost more than the adapter's matmuls (measured in bench/README.md):

- ``nn.Dropout`` draws one Bernoulli variable per element, serially (about 5 ns an element),
  and writes a masked copy of ``x`` for every adapter: about a fifth of a SmolLM2-135M step.
- The masked copy, the ``* scaling`` and the final ``+`` each pass over a full activation.

Two replacements, used only where they give the same result:

- :class:`SparseDropout` draws the *gaps* between dropped elements. Gaps between the successes
  of i.i.d. Bernoulli(p) trials are i.i.d. geometric(p), so the dropped set has exactly
  ``nn.Dropout``'s distribution, from about p·n random numbers instead of n.
- :func:`use_fast_lora` gives each PEFT ``lora.Linear`` a forward that makes one copy of ``x``
  with the dropped elements zeroed (``index_fill_``, no scaling pass): ``lora_A(dropout(x)) =
  s·(x with zeros)·Aᵀ`` with ``s = 1/(1-p)``. The scales fold into the r-wide intermediate and
  the sum into one in-place ``addmm_`` on the base layer's output. Its backward is written out
  below. (Subtracting a sparse correction ``x_D·Aᵀ`` instead of copying was measured and lost:
  its backward gather cost more than the copy, bench/README.md.)

Random numbers come from torch's default CPU generator, which checkpoints save, so a resume
stays bit-exact. Other devices (CUDA has fused dropout kernels), evaluation, merged or disabled
adapters, several active adapters, LoRA variants (DoRA, ...) and p above :data:`SPARSE_MAX_P`
keep PEFT's own code. Saved adapters are untouched: only the training arithmetic changes.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

# Above this the gap method draws too many variables to beat torch's Bernoulli kernel
# (2-core bench machine, forward+backward of a 4x100x576 activation: 1.9x faster at p=0.05,
# 1.6x at 0.3, 1.2x at 0.5).
SPARSE_MAX_P = 0.3


def dropped_positions(numel: int, p: float) -> torch.Tensor:
    """Sorted flat indices of the elements a Bernoulli(p) dropout drops, from geometric gaps."""
    log_keep = math.log1p(-p)
    mean = numel * p
    # Enough gaps to pass the end with overwhelming probability; top up in the rare other case.
    count = int(mean + 6.0 * math.sqrt(mean) + 16)
    ends: list[torch.Tensor] = []
    last = -1.0
    while last < numel - 1:
        # Geometric(p) on {1, 2, ...}: floor(log U / log(1-p)) + 1, U uniform on (0, 1].
        u = 1.0 - torch.rand(count, dtype=torch.float64)
        gaps = u.log_().div_(log_keep).floor_().add_(1.0)
        pos = gaps.cumsum_(0).add_(last)
        ends.append(pos)
        last = float(pos[-1])
    positions = (ends[0] if len(ends) == 1 else torch.cat(ends)).to(torch.int64)
    return positions[: int(torch.searchsorted(positions, numel))]


class _ZeroAt(torch.autograd.Function):
    """``x * scale`` with zeros at ``positions`` (flat, logical order); same in backward."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, positions: torch.Tensor, scale: float) -> torch.Tensor:
        out = x.mul(scale).contiguous()
        out.view(-1).index_fill_(0, positions, 0.0)
        ctx.save_for_backward(positions)
        ctx.scale = scale
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        (positions,) = ctx.saved_tensors
        grad_in = grad.mul(ctx.scale).contiguous()
        grad_in.view(-1).index_fill_(0, positions, 0.0)
        return grad_in, None, None


class SparseDropout(nn.Module):
    """Inverted dropout with probability p, sampled by gaps on the CPU (module docstring)."""

    def __init__(self, p: float) -> None:
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"dropout probability must be in [0, 1), got {p}")
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0 or x.numel() == 0:
            return x
        if x.device.type != "cpu" or self.p > SPARSE_MAX_P:
            return nn.functional.dropout(x, self.p, training=True)
        positions = dropped_positions(x.numel(), self.p)
        result: torch.Tensor = _ZeroAt.apply(x, positions, 1.0 / (1.0 - self.p))
        return result

    def extra_repr(self) -> str:
        return f"p={self.p}"


class _LoraDelta(torch.autograd.Function):
    """``base_out + c·((x with zeros at positions)·Aᵀ)·Bᵀ``, and its gradients.

    ``positions`` are flat indices into ``x`` (logical order); ``c`` is PEFT's ``scaling``
    over ``1 - p``, applied to the r-wide intermediate instead of a full-width activation.
    The sum is accumulated into ``base_out`` in place (``addmm_``): the base layer's backward
    needs its input, never its output.
    """

    @staticmethod
    def forward(
        ctx: Any,
        base_out: torch.Tensor,
        x: torch.Tensor,
        a: torch.Tensor,
        b: torch.Tensor,
        positions: torch.Tensor,
        c: float,
    ) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1])
        if positions.numel():
            x2 = x2.clone(memory_format=torch.contiguous_format)
            x2.view(-1).index_fill_(0, positions, 0.0)
        h = (x2 @ a.t()).mul_(c)
        base_out.view(-1, base_out.shape[-1]).addmm_(h, b.t())
        ctx.mark_dirty(base_out)
        ctx.save_for_backward(x2, a, b, h, positions)
        ctx.c = c
        ctx.x_shape = x.shape
        return base_out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:
        x2, a, b, h, positions = ctx.saved_tensors
        g2 = grad.reshape(-1, grad.shape[-1])
        need_x, need_a, need_b = ctx.needs_input_grad[1:4]
        dh = (g2 @ b).mul_(ctx.c)
        grad_x = grad_a = grad_b = None
        if need_b:
            grad_b = g2.t() @ h
        if need_a:
            grad_a = dh.t() @ x2
        if need_x:
            grad_x = dh @ a
            grad_x.view(-1).index_fill_(0, positions, 0.0)
            grad_x = grad_x.view(ctx.x_shape)
        return grad, grad_x, grad_a, grad_b, None, None


def _fused_forward_applies(layer: Any, x: torch.Tensor, args: tuple, kwargs: dict) -> bool:
    if args or kwargs or not layer.training or layer.disable_adapters or layer.merged:
        return False
    if len(layer.active_adapters) != 1 or x.device.type != "cpu":
        return False
    name = layer.active_adapters[0]
    if name not in layer.lora_A or name in getattr(layer, "lora_variant", {}):
        return False
    lora_a, lora_b = layer.lora_A[name], layer.lora_B[name]
    if not isinstance(lora_a, nn.Linear) or not isinstance(lora_b, nn.Linear):
        return False
    if lora_a.bias is not None or lora_b.bias is not None:
        return False
    if not x.dtype == lora_a.weight.dtype == lora_b.weight.dtype:
        return False
    dropout = layer.lora_dropout[name]
    return isinstance(dropout, nn.Identity) or (
        isinstance(dropout, SparseDropout) and dropout.p <= SPARSE_MAX_P
    )


def _install_fused_forward(layer: Any) -> None:
    peft_forward = layer.forward

    def forward(x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if not _fused_forward_applies(layer, x, args, kwargs):
            return peft_forward(x, *args, **kwargs)
        name = layer.active_adapters[0]
        p = getattr(layer.lora_dropout[name], "p", 0.0)
        base_out = layer.base_layer(x)
        if base_out.dtype != x.dtype or not base_out.is_contiguous():
            return peft_forward(x, *args, **kwargs)
        positions = (
            dropped_positions(x.numel(), p) if p > 0.0 else torch.empty(0, dtype=torch.int64)
        )
        out: torch.Tensor = _LoraDelta.apply(
            base_out,
            x,
            layer.lora_A[name].weight,
            layer.lora_B[name].weight,
            positions,
            layer.scaling[name] / (1.0 - p),
        )
        return out

    layer.forward = forward


def use_fast_lora(peft_model: nn.Module) -> int:
    """Give every LoRA layer of a PEFT model the CPU fast path; returns how many layers.

    Each ``nn.Dropout`` of an adapter becomes a :class:`SparseDropout` with the same p, and
    each ``lora.Linear`` gets a forward that uses :class:`_LoraDelta` where it applies and
    PEFT's own forward elsewhere.
    """
    from peft.tuners.lora.layer import Linear as LoraLinear

    count = 0
    for module in peft_model.modules():
        holders = getattr(module, "lora_dropout", None)
        if isinstance(holders, nn.ModuleDict):
            for name, layer in list(holders.items()):
                if type(layer) is nn.Dropout:
                    holders[name] = SparseDropout(layer.p)
        if type(module) is LoraLinear:
            _install_fused_forward(module)
            count += 1
    return count
