"""Where an sftrun optimizer step spends its time: the bench's step, profiled by kind of work.

Builds the step bench/fair_trl.py times (the bundled SmolLM2-135M-Instruct, fp32, LoRA r=16 /
alpha 32 / dropout 0.05 on the seven projections, micro-batch 4 x accumulation 2 of the sample
task in sftrun's sampler order, sftrun's loss and LoRA fast path) from sftrun's own parts, runs
one warm-up step, then profiles ``--steps`` steps with torch.profiler and prints, per step:

- matrix multiplies by kind (frozen base projections, LoRA adapters, LM head) with the FLOP/s
  each reaches, against the fp32 matmul peak measured in the same process;
- attention, element-wise work (norms, rotary, activations, residual adds, cross-entropy), the
  LoRA dropout and its bookkeeping, and the rest;
- what the step would take if only its matrix multiplies remained (the ceiling for any fusion
  of the rest), as model FLOP/s against the peak (bench/common.py's definition).

``--compile peft`` or ``--compile fast`` first compiles every decoder layer with
torch.compile (``dynamic=True``), with PEFT's own LoRA forward or with sftrun's fast path, and
reports how long the warm-up step (the compile) took: the measurement that kept torch.compile
out of sftrun (bench/README.md).

    python bench/profile_step.py              # 2 profiled steps, assistant-only loss
    python bench/profile_step.py --train-on all --steps 3
    python bench/profile_step.py --compile fast
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

from common import (
    ACCUM,
    MAX_LEN,
    MICRO,
    MODEL,
    SEED,
    kernel_clock,
    matmul_peak,
    model_flops,
    write_examples,
)

ELEMENTWISE = {
    "mul", "add", "copy", "fill", "silu", "silu_backward", "sum", "pow", "cat", "div", "sub",
    "neg", "rsqrt", "mean", "tanh", "where", "masked_fill", "index", "clone", "zero",
    "_log_softmax", "_log_softmax_backward_data", "nll_loss_forward", "nll_loss_backward",
    "index_put", "embedding_dense_backward",
}  # fmt: skip
DROPOUT = {"index_fill", "uniform", "log", "cumsum", "floor", "rsub", "searchsorted", "rand"}
MATMUL = {"aten::mm", "aten::addmm", "aten::addmm_"}


def build(
    train_on: str, examples: int, work: Path, fast_lora: bool = True, n_steps: int = 8
) -> tuple[Any, list[list[dict[str, Any]]]]:
    """sftrun's loss module on a fresh adapter, and the first ``n_steps`` optimizer steps'
    micro-batches (sftrun's sampler order, cut as its loop cuts them on one process)."""
    import torch

    from sftrun.config import LoraSettings
    from sftrun.encoding import collate, tokenize_file
    from sftrun.loss import LabelOnlyLoss
    from sftrun.modeling import load_lora_model, load_tokenizer, select_backend
    from sftrun.sampler import step_indices

    torch.manual_seed(SEED)
    tokenizer = load_tokenizer(MODEL)
    data = tokenize_file(
        tokenizer, write_examples(work / "train.jsonl", examples), MAX_LEN, "truncate", train_on
    )
    lora = LoraSettings(r=16, alpha=32, dropout=0.05)
    model = load_lora_model(
        MODEL, lora, select_backend("peft", True), torch.float32, MAX_LEN, fast_lora=fast_lora
    )
    batch = MICRO * ACCUM
    steps = []
    for s in range(n_steps):
        ids = step_indices(SEED, len(data), s * batch, batch)
        chunks = [ids[i * MICRO : (i + 1) * MICRO] for i in range(ACCUM)]
        steps.append([collate(data, c, tokenizer.pad_token_id) for c in chunks])
    return LabelOnlyLoss(model), steps


def run_step(loss_module: Any, batches: list[dict[str, Any]]) -> float:
    """Forward and backward of one optimizer step, the loss normalised as sftrun's loop does
    (by the step's label tokens); returns that loss. No optimizer update."""
    labels = sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches)
    total = 0.0
    for b in batches:
        loss_sum, _ = loss_module(**b)
        (loss_sum / max(1, labels)).backward()
        total += float(loss_sum)
    loss_module.zero_grad(set_to_none=True)
    return total / max(1, labels)


def counts(steps: list[list[dict[str, Any]]]) -> tuple[int, int]:
    """(trained tokens, rows the LM head runs on: labelled positions) over these steps."""
    tokens = sum(int(b["attention_mask"].sum()) for s in steps for b in s)
    heads = sum(int((b["labels"][:, 1:] != -100).sum()) for s in steps for b in s)
    return tokens, heads


def floor(train_on: str, steps: int, examples: int, work: Path) -> dict[str, Any]:
    """The time sftrun's step spends inside matrix multiplies and attention kernels alone.

    The same batches as bench/fair_trl.py's sides (one warm-up step, then ``steps`` timed
    ones), forward and backward through sftrun's loss module and LoRA fast path, each kernel
    timed by :func:`common.kernel_clock`. Whatever else a step does (element-wise work, dropout,
    the optimizer, Python) adds to this, so tokens over these seconds bound the tokens/s of
    any implementation that runs the same kernels at the rates they reach here.
    """
    loss_module, batches = build(train_on, examples, work, n_steps=steps + 2)
    first_loss = run_step(loss_module, batches[0])
    timed = batches[1 : 1 + steps]
    with kernel_clock() as clock:
        for step in timed:
            run_step(loss_module, step)
    tokens, head_rows = counts(timed)
    # The floor's rate: as if every other part of the step took no time.
    seconds = clock.seconds["matmul"] + clock.seconds["attention"]
    return {
        "tokens": tokens,
        "head_rows": head_rows,
        "first_loss": first_loss,
        "matmul_seconds": clock.seconds["matmul"],
        "attention_seconds": clock.seconds["attention"],
        "seconds": seconds,
        "tokens_per_s": tokens / seconds,
    }


def _matmul_kind(shapes: list[Any]) -> tuple[str, float] | None:
    """(kind, FLOPs of one call) from an mm/addmm's input shapes."""
    dims = [s for s in shapes if isinstance(s, list) and len(s) == 2]
    if len(dims) < 2:
        return None
    (m, k), (_, n) = dims[-2], dims[-1]
    if 49152 in (k, n) or max(m, k, n) > 10000:
        return "LM head", 2.0 * m * k * n
    return ("LoRA adapters" if 16 in (m, k, n) else "base projections"), 2.0 * m * k * n


def _category(key: str) -> str:
    if "scaled_dot_product" in key:
        return "attention"
    name = key.split("::")[-1].rstrip("_")
    if "Lora" in key or name in DROPOUT:
        return "LoRA dropout and bookkeeping"
    if name in ELEMENTWISE:
        return "element-wise"
    return "other (views, allocation, autograd)"


def main() -> None:
    import tempfile

    import torch
    from torch.profiler import ProfilerActivity, profile

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=2, help="profiled optimizer steps")
    parser.add_argument("--train-on", default="assistant", choices=("assistant", "all"))
    parser.add_argument("--examples", type=int, default=160)
    parser.add_argument(
        "--compile", default="off", choices=("off", "fast", "peft", "decoder-fast", "decoder-peft")
    )
    args = parser.parse_args()
    if not 1 <= args.steps <= 7:
        parser.error("--steps: 1 to 7")
    peak = matmul_peak()["flops_per_s"]
    work = Path(tempfile.mkdtemp())
    fast = not args.compile.endswith("peft")
    loss_module, steps = build(args.train_on, args.examples, work, fast)
    decoder = loss_module.peft_model.get_base_model().get_decoder()
    if args.compile.startswith("decoder"):  # the whole decoder, torch.compile's defaults
        decoder.compile()
    elif args.compile != "off":
        for layer in decoder.layers:
            layer.compile(dynamic=True)
    t0 = time.perf_counter()
    run_step(loss_module, steps[0])
    print(f"warm-up step {time.perf_counter() - t0:.1f} s (compile: {args.compile})")
    timed = steps[1 : 1 + args.steps]
    t0 = time.perf_counter()
    for batches in timed:
        run_step(loss_module, batches)
    wall = (time.perf_counter() - t0) / args.steps
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        t0 = time.perf_counter()
        for batches in timed:
            run_step(loss_module, batches)
        profiled = (time.perf_counter() - t0) / args.steps
    seconds: dict[str, float] = defaultdict(float)
    flops: dict[str, float] = defaultdict(float)
    for e in prof.key_averages(group_by_input_shape=True):
        spent = e.self_cpu_time_total / 1e6 / args.steps
        kind = _matmul_kind(e.input_shapes) if e.key in MATMUL else None
        if kind is None:
            seconds[_category(e.key)] += spent
            continue
        seconds[f"matmul: {kind[0]}"] += spent
        flops[f"matmul: {kind[0]}"] += kind[1] * e.count / args.steps
    tokens, heads = counts(steps[1 : 1 + args.steps])
    useful = model_flops(tokens, heads) / args.steps
    print(f"fp32 matmul peak {peak / 1e9:.1f} GFLOP/s, {torch.get_num_threads()} threads")
    print(f"{wall:.3f} s/step ({profiled:.3f} under the profiler); model FLOP/s "
          f"{useful / wall / 1e9:.1f} G = {100 * useful / wall / peak:.1f}% of the peak "
          f"({args.train_on} tokens); shares are of the profiled step")  # fmt: skip
    for name, s in sorted(seconds.items(), key=lambda x: -x[1]):
        if s < 0.005 * profiled:
            continue
        rate = f"  {flops[name] / s / 1e9:6.1f} GFLOP/s" if name in flops else ""
        print(f"  {name:<40} {s:7.3f} s  {100 * s / profiled:5.1f}%{rate}")
    only_mm = sum(s for name, s in seconds.items() if name.startswith("matmul"))
    print(f"matrix multiplies alone: {only_mm:.3f} s/step -> model FLOP/s at most "
          f"{100 * useful / only_mm / peak:.1f}% of the peak")  # fmt: skip


if __name__ == "__main__":
    main()
