"""One matmul for the frozen q/k/v (and gate/up) projections against one per projection.

Times the frozen base's share of a decoder layer's forward and backward at the shapes of the
bench step (SmolLM2-135M: hidden 576, q 576, k/v 192 each, gate/up 1536 each; about 400 tokens
per micro-batch), both ways, alternating, and prints medians and the ratio:

- separate: ``y_i = x @ W_iᵀ`` for each projection; backward ``dx = Σ g_i @ W_i``;
- fused: ``Y = x @ [W_1; W_2; ...]ᵀ`` split into per-projection outputs; backward
  ``dx = [g_1, g_2, ...] @ [W_1; W_2; ...]``. The split and the concatenation are timed both
  as copies (what the per-projection LoRA updates in place need) and as free views (a lower
  bound, had every consumer taken strided outputs).

    python bench/fused_gemm.py
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

GROUPS = {"q/k/v": (576, 192, 192), "gate/up": (1536, 1536)}
HIDDEN = 576


def _time(fn: Callable[[], object], reps: int) -> float:
    fn()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t0) / reps


def _sides(x: torch.Tensor, outs: tuple[int, ...]) -> dict[str, Callable[[], object]]:
    """The three ways to run one group's frozen forward and activation gradient."""
    ws = [torch.randn(n, HIDDEN) * 0.02 for n in outs]
    wcat = torch.cat(ws)
    gs = [torch.randn(x.shape[0], n) for n in outs]
    gcat = torch.cat(gs, dim=1)
    cuts = [int(c) for c in torch.tensor(outs).cumsum(0)[:-1]]

    def separate() -> None:
        [x @ w.t() for w in ws]
        dx = gs[0] @ ws[0]
        for g, w in zip(gs[1:], ws[1:], strict=True):
            dx += g @ w

    def fused_copies() -> None:
        [y.contiguous() for y in torch.tensor_split(x @ wcat.t(), cuts, dim=1)]
        torch.cat(gs, dim=1) @ wcat

    def fused_views() -> None:
        torch.tensor_split(x @ wcat.t(), cuts, dim=1)
        gcat @ wcat

    return {"separate": separate, "fused + copies": fused_copies, "fused, views": fused_views}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=400, help="rows of a micro-batch")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--reps", type=int, default=20)
    args = parser.parse_args()
    torch.manual_seed(0)
    x = torch.randn(args.tokens, HIDDEN)
    print(f"{torch.get_num_threads()} threads, {args.tokens} tokens, medians of {args.rounds}")
    for name, outs in GROUPS.items():
        sides = _sides(x, outs)
        times: dict[str, list[float]] = {k: [] for k in sides}
        for r in range(args.rounds):
            order = list(sides) if r % 2 == 0 else list(reversed(sides))
            for k in order:
                times[k].append(_time(sides[k], args.reps))
        base = statistics.median(times["separate"])
        for k, v in times.items():
            m = statistics.median(v)
            print(f"  {name:<8} {k:<15} {m * 1e3:7.3f} ms  ratio to separate {m / base:5.3f}")


if __name__ == "__main__":
    main()
