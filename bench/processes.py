"""One process against two (torchrun, gloo; DDP and FSDP) on this machine, the same work.

Same model (the bundled SmolLM2-135M-Instruct), same data (the first 160 examples of the
sample task), same LoRA and optimizer as bench/vs_trl.py, and the same global batch of 8:
one process runs micro-batch 4 x accumulation 2 with all CPU threads, two processes run
micro-batch 2 x accumulation 2 each with the threads split between them. Every optimizer
step trains on exactly the same 8 samples on both sides (sftrun's data position is global),
so the loss objective and the batches are identical; only the parallelism differs. Two
processes run twice: DDP (each holds the whole model) and FSDP (`parallel=fsdp`: each holds
half of every decoder layer and gathers it as it runs; the adapter is replicated).
Reported: trained (non-padding) tokens/s over the timed steps (the first step is warm-up),
per round and as medians, and the ratio to one process within each round.

    python bench/processes.py              # 6 timed steps x 3 alternating rounds
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

from common import ACCUM, MODEL, StepClock, sftrun_overrides, write_examples

GLOBAL_BATCH = 8  # 1 process: 4 x 2; 2 processes: 2 x 2 each


def child(steps: int, examples: int, out: Path, parallel: str) -> None:
    """Train ``steps + 1`` steps in this process (one rank of a launch) and write its timings."""
    from sftrun.config import load_config
    from sftrun.distributed import launched_rank, launched_world_size
    from sftrun.hooks import RunHooks
    from sftrun.trainer import RunOptions, run_training

    world, rank = launched_world_size(), launched_rank()
    work = out.parent
    data = work / "train.jsonl"
    if rank == 0:
        write_examples(data, examples)
    while not data.exists():
        time.sleep(0.05)
    os.chdir(work)
    overrides = sftrun_overrides(data, steps + 1, GLOBAL_BATCH // ACCUM // world)
    cfg = load_config(None, [*overrides, f"parallel={parallel}"])
    clock = StepClock()
    starts, tokens = clock.starts, clock.tokens

    hooks = RunHooks(on_step_start=clock.on_step_start, on_batch=clock.on_batch)
    run_training(cfg, RunOptions(yes=True, console=False, hooks=hooks))
    starts[steps + 1] = time.perf_counter()
    timed = range(1, steps + 1)  # step 0 is warm-up
    result = {
        "seconds": starts[steps + 1] - starts[1],
        "tokens": sum(tokens.get(s, 0) for s in timed),
    }
    (out.parent / f"{out.name}.rank{rank}").write_text(json.dumps(result))


def run(processes: int, parallel: str, steps: int, examples: int) -> float:
    """Tokens/s of one launch with ``processes`` processes (all ranks' tokens)."""
    work = Path(tempfile.mkdtemp(prefix="sftrun-bench-proc-"))
    out = work / "result"
    args = [str(Path(__file__).resolve()), "--child", str(out)]
    args += ["--steps", str(steps), "--examples", str(examples), "--parallel", parallel]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    threads = max(1, (os.cpu_count() or 1) // processes)
    env["OMP_NUM_THREADS"] = str(threads)
    if processes == 1:
        cmd = [sys.executable, *args]
    else:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={processes}"]
        cmd += ["--master_addr=127.0.0.1", f"--master_port={port}", *args]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=work)
    if proc.returncode != 0:
        raise SystemExit(f"{processes} process(es) failed:\n{proc.stderr[-3000:]}")
    parts = [json.loads((work / f"result.rank{r}").read_text()) for r in range(processes)]
    # Every rank waits for the others at each step, so the slowest rank's time is the step's.
    return sum(p["tokens"] for p in parts) / max(p["seconds"] for p in parts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6, help="timed optimizer steps")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--examples", type=int, default=160)
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--parallel", default="ddp", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.steps, args.examples, args.child, args.parallel)
        return
    if not (MODEL / "config.json").is_file():
        raise SystemExit("run `make model` (sftrun model prepare) first")
    print(
        f"machine: {os.cpu_count()} CPUs; {args.steps} timed steps x {args.rounds} rounds; "
        f"global batch {GLOBAL_BATCH} (1 process: 4 x {ACCUM}; 2 processes: 2 x {ACCUM} each)"
    )
    sides = [(1, "ddp"), (2, "ddp"), (2, "fsdp")]
    results: dict[tuple[int, str], list[float]] = defaultdict(list)
    for r in range(args.rounds):
        for n, parallel in sides[r % 3 :] + sides[: r % 3]:  # each side leads once in 3 rounds
            results[n, parallel].append(run(n, parallel, args.steps, args.examples))
            print(
                f"  round {r + 1} {n} process(es) {parallel}: "
                f"{results[n, parallel][-1]:7.1f} tokens/s",
                flush=True,
            )
    one = results[1, "ddp"]
    print(f"median tokens/s: 1 process {statistics.median(one):.1f}")
    for side in sides[1:]:
        ratios = [x / base for base, x in zip(one, results[side], strict=True)]
        print(
            f"  2 processes {side[1]}: {statistics.median(results[side]):.1f}; "
            "ratio to 1 per round "
            + ", ".join(f"{x:.2f}" for x in ratios)
            + f" (median {statistics.median(ratios):.2f})"
        )


if __name__ == "__main__":
    main()
