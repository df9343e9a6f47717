"""Data order and position.

Owns which examples make up each optimizer step. The order of epoch ``e`` is a permutation
of the training examples seeded by ``(seed, e)``; the run's position is the number of
samples seen. A run imported from a Hugging Face Trainer checkpoint keeps that trainer's
order instead (:data:`HF_TRAINER`: accelerate's seedable sampler, ``randperm(n)`` from a
generator seeded with ``seed + e``), so it sees the samples the source run would have seen.
Training walks one endless stream (epoch 0's permutation, then epoch 1's, ...),
``global_batch_size`` samples per step, so a resume starts at the exact next sample in O(1),
however the global batch is split into micro-batches and processes.
Never reads data or touches the model.
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch

# Spreads (seed, epoch) pairs so that nearby seeds do not share permutations.
_EPOCH_STRIDE = 1_000_003

# The orders a run can follow (recorded in trainer_state.json, kept on every resume).
SFTRUN = "sftrun"
HF_TRAINER = "hf-trainer"  # transformers' Trainer through accelerate's SeedableRandomSampler
ORDERS = (SFTRUN, HF_TRAINER)


@lru_cache(maxsize=4)
def epoch_permutation(seed: int, epoch: int, n: int, order: str = SFTRUN) -> tuple[int, ...]:
    """The order of epoch ``epoch``: a permutation of range(n), a pure function of its args."""
    if order not in ORDERS:
        raise ValueError(f"unknown data order {order!r} (known: {', '.join(ORDERS)})")
    gen_seed = seed + epoch if order == HF_TRAINER else seed * _EPOCH_STRIDE + epoch
    gen = torch.Generator().manual_seed(gen_seed)
    return tuple(torch.randperm(n, generator=gen).tolist())


def step_indices(
    seed: int, n: int, samples_seen: int, count: int, order: str = SFTRUN
) -> list[int]:
    """Example indices of the ``count`` samples after position ``samples_seen``."""
    out = []
    for pos in range(samples_seen, samples_seen + count):
        epoch, offset = divmod(pos, n)
        out.append(epoch_permutation(seed, epoch, n, order)[offset])
    return out


def total_steps(num_examples: int, global_batch: int, epochs: float, max_steps: int) -> int:
    """Optimizer steps in the run: ``max_steps`` if set, else enough for ``epochs`` passes."""
    if max_steps > 0:
        return max_steps
    return max(1, math.ceil(epochs * num_examples / global_batch))
