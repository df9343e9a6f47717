"""The cost of ``mirror_to`` to the training loop: the same run with and without it.

Same model (the bundled SmolLM2-135M-Instruct), same data, same steps, a checkpoint every
``--save-every`` steps on both sides; one side also copies each checkpoint to a local folder
through the background uploader. Both sides do identical training work, so the difference in
optimizer steps per second (saves included, warm-up step excluded) is the uploader's cost.
Each side runs in its own process; the order alternates between rounds.

    python bench/mirror.py                 # 8 timed steps, a save every 2, 3 rounds
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import MODEL, write_examples


def child(steps: int, save_every: int, mirrored: bool) -> None:
    from sftrun.config import load_config
    from sftrun.hooks import RunHooks
    from sftrun.trainer import RunOptions, run_training

    work = Path(tempfile.mkdtemp(prefix="sftrun-bench-mirror-"))
    os.chdir(work)
    data = write_examples(work / "train.jsonl", 160)
    overrides = [
        f"model_name_or_path={MODEL}",
        f"train_file={data}",
        "eval_file=null",
        "eval_accuracy=none",
        f"max_steps={steps + 1}",
        f"save_steps={save_every}",
        "logging_steps=1",
    ]
    if mirrored:
        overrides.append(f"mirror_to={work / 'mirror'}")
    starts: dict[int, float] = {}
    hooks = RunHooks(on_step_start=lambda step: starts.__setitem__(step, time.perf_counter()))
    run_training(load_config(None, overrides), RunOptions(yes=True, console=False, hooks=hooks))
    end = time.perf_counter()  # after the last save and the wait for the last upload
    print(json.dumps({"steps_per_s": steps / (end - starts[1])}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--save-every", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--child", choices=["plain", "mirrored"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.steps, args.save_every, args.child == "mirrored")
        return
    if not (MODEL / "config.json").is_file():
        raise SystemExit("run `make model` (sftrun model prepare) first")
    print(
        f"machine: {os.cpu_count()} CPUs; {args.steps} timed steps, a checkpoint every "
        f"{args.save_every}, {args.rounds} alternating rounds; mirror_to a local folder"
    )
    results: dict[str, list[float]] = {"plain": [], "mirrored": []}
    for r in range(args.rounds):
        for kind in ("plain", "mirrored") if r % 2 == 0 else ("mirrored", "plain"):
            cmd = [sys.executable, __file__, "--child", kind, "--steps", str(args.steps)]
            cmd += ["--save-every", str(args.save_every)]
            env = {**os.environ, "HF_HUB_OFFLINE": "1"}
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
            if proc.returncode != 0:
                raise SystemExit(f"{kind} failed:\n{proc.stderr[-3000:]}")
            results[kind].append(json.loads(proc.stdout.strip().splitlines()[-1])["steps_per_s"])
            print(f"  round {r + 1} {kind:<8} {results[kind][-1]:.3f} steps/s", flush=True)
    ratios = [m / p for p, m in zip(results["plain"], results["mirrored"], strict=True)]
    print(
        f"median steps/s: without {statistics.median(results['plain']):.3f}, with mirror_to "
        f"{statistics.median(results['mirrored']):.3f}; with/without per round "
        + ", ".join(f"{x:.3f}" for x in ratios)
        + f" (median {statistics.median(ratios):.3f}, overhead "
        f"{100 * (1 - statistics.median(ratios)):.1f}%)"
    )


if __name__ == "__main__":
    main()
