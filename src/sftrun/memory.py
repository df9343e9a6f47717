"""Peak training memory, estimated before the first step, against what the device has.

Owns the estimate the summary prints: the loaded weights (measured: their bytes as loaded,
quantized or not), the adapter with its gradients and AdamW moments, the activations a
decoder layer keeps for the backward pass at the chosen micro-batch and sequence length
(all layers, or one layer's plus every layer's input with gradient checkpointing), and the
LM head's float32 logits at the label positions. Never measures at run time; tests hold the
estimate against measured peaks (tests/test_memory.py).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch

from sftrun.monitor import fmt_bytes
from sftrun.oom import halved_split, split_of

# Activations a Llama-style decoder layer keeps for backward, per token, in units of the
# hidden size h and the MLP width i: norm inputs and outputs, q/k/v, the attention output and
# o_proj input, the residual stream (about 10 h), and gate, up, act(gate), act(gate)*up
# (4 i). LoRA adds its dropped-out input per adapted layer (h each). Attention through SDPA
# keeps no sequence-squared matrix.
HIDDEN_TERMS = 10
MLP_TERMS = 4
BACKWARD_LAYERS = 2
WARN_SHARE = 0.9  # warn above this share of the device's memory


@dataclass(frozen=True)
class MemoryEstimate:
    """The estimated peak memory of one training process, by part, in bytes."""

    weights: int
    adapter: int  # weights, gradients and AdamW's two moments, all float32
    activations: int
    logits: int
    capacity: int | None  # bytes the device has (None: unknown)
    device: str

    @property
    def total(self) -> int:
        return self.weights + self.adapter + self.activations + self.logits

    def fits(self) -> bool:
        return self.capacity is None or self.total <= WARN_SHARE * self.capacity


def estimate(
    model: Any,
    *,
    micro_batch: int,
    seq_len: int,
    compute_bytes: int,
    checkpointing: bool,
    device: torch.device,
) -> MemoryEstimate:
    """The peak of one training step of ``model`` (a PEFT model, as loaded)."""
    config = model.get_base_model().config
    h = int(config.hidden_size)
    i = int(getattr(config, "intermediate_size", None) or 4 * h)
    layers = int(config.num_hidden_layers)
    vocab = int(config.vocab_size)
    weights = sum(p.numel() * p.element_size() for p in model.parameters() if not p.requires_grad)
    weights += sum(b.numel() * b.element_size() for b in model.buffers())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    adapted = sum(1 for n, _ in model.named_modules() if n.endswith("lora_dropout.default"))
    per_layer_token = (HIDDEN_TERMS * h + MLP_TERMS * i) + adapted / max(1, layers) * h
    tokens = micro_batch * seq_len
    one_layer = int(tokens * per_layer_token * compute_bytes)
    # Backward also holds one layer's activation gradients and its temporaries (measured
    # on the CPU: about two layers' worth), with or without checkpointing.
    working = BACKWARD_LAYERS * one_layer
    if checkpointing:  # every layer's input, plus one layer recomputed at a time
        activations = layers * tokens * h * compute_bytes + one_layer + working
    else:
        activations = layers * one_layer + working
    logits = tokens * vocab * 4 * 2  # float32 logits and their gradient, at most every token
    return MemoryEstimate(
        weights, trainable * 16, activations, logits, device_capacity(device), _name(device)
    )


def device_capacity(device: torch.device) -> int | None:
    """Bytes of memory the device has (the machine's RAM for the CPU); None if unknown."""
    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).total_memory)
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def _name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "system RAM"


def advice(e: MemoryEstimate, cfg: Any) -> str:
    """Which setting to change first, by what dominates the estimate."""
    if e.activations + e.logits >= e.weights:
        smaller = halved_split(*split_of(cfg))
        steps = (
            [
                f"per_device_train_batch_size={smaller[0]} with "
                f"gradient_accumulation_steps={smaller[1]} (same global batch)"
            ]
            if smaller is not None
            else []
        )
        if not cfg.gradient_checkpointing:
            steps.insert(0, "gradient_checkpointing: true")
        steps.append("a lower max_seq_length")
        return "; or ".join(steps)
    if cfg.quantization is None:
        return "quantization: {bits: 4} (QLoRA), or parallel: fsdp over several devices"
    return "parallel: fsdp over several devices, or a smaller model"


def summary_line(e: MemoryEstimate, checkpointing: bool) -> str:
    """The summary's memory line."""
    where = f" of {fmt_bytes(e.capacity)} {e.device}" if e.capacity else ""
    return (
        f"about {fmt_bytes(e.total)} at peak per process{where}: weights "
        f"{fmt_bytes(e.weights)}, adapter with gradients and AdamW {fmt_bytes(e.adapter)}, "
        f"activations {fmt_bytes(e.activations)}"
        f"{' (gradient checkpointing)' if checkpointing else ''}, logits {fmt_bytes(e.logits)}"
    )
