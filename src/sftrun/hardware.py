"""What this machine computes natively, for ``dtype: auto``.

Owns one question: does this CPU multiply bf16 matrices in hardware (x86 AVX512-BF16 or AMX,
Arm's BF16 extension)? Where it does, a bf16 matmul runs several times faster than fp32 (one
measurement on a Xeon with AMX: 3.4x), so ``auto`` trains with bf16 autocast there; where it
does not, bf16 is emulated and slower, so ``auto`` stays fp32. The answer is read once per
run and recorded in the checkpoint (as the resolved ``dtype``); a resume keeps it on any
machine. Never reads or writes files other than ``/proc/cpuinfo``.
"""

from __future__ import annotations

import contextlib
import platform
from collections.abc import Iterator
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class CpuBf16:
    """Whether the CPU has native bf16 matrix multiplies, and what says so."""

    native: bool
    why: str  # the feature found, or what the CPU has instead


_assumed: CpuBf16 | None = None


def cpu_bf16() -> CpuBf16:
    """This CPU's bf16 support (torch's own feature detection on x86, the kernel's flags
    on Arm)."""
    if _assumed is not None:
        return _assumed
    cpu = getattr(torch, "cpu", None)
    checks = (("_is_amx_tile_supported", "AMX"), ("_is_avx512_bf16_supported", "AVX512-BF16"))
    for name, feature in checks:
        probe = getattr(cpu, name, None)
        if probe is not None and probe():
            return CpuBf16(True, feature)
    if platform.machine() in ("aarch64", "arm64") and "bf16" in _arm_features():
        return CpuBf16(True, "Arm BF16")
    has = torch.backends.cpu.get_cpu_capability()
    return CpuBf16(False, f"no AVX512-BF16, AMX or Arm BF16 (the CPU has {has})")


def _arm_features() -> set[str]:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
            text = fh.read(1 << 20)
    except OSError:
        return set()
    return {
        flag
        for line in text.splitlines()
        if line.lower().startswith("features")
        for flag in line.partition(":")[2].split()
    }


@contextlib.contextmanager
def assumed(native: bool) -> Iterator[None]:
    """Within the block, answer as a CPU with (or without) native bf16 would: for tests of
    ``dtype: auto`` on machines of the other kind."""
    global _assumed
    before = _assumed
    _assumed = CpuBf16(native, "AVX512-BF16 (assumed)" if native else "none (assumed)")
    try:
        yield
    finally:
        _assumed = before
