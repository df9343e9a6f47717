"""The GPU check: one command, a few minutes on one CUDA GPU.

1. bf16 run of the bundled SmolLM2-135M-Instruct (the timed settings of bench/vs_trl.py):
   trained tokens/s over the timed steps and the peak CUDA memory, beside the summary's
   estimate.
2. The same with a 4-bit (nf4) QLoRA base.
3. Exactness on CUDA: deterministic algorithms on (CUBLAS_WORKSPACE_CONFIG set), a run
   SIGKILLed right after a checkpoint and resumed must end with the uninterrupted run's
   adapter and optimizer bytes.
4. The Unsloth backend, when it is installed (nothing is downloaded: the machine has no network).
5. TRL's SFTTrainer side by side on the same objective, when TRL is installed: runs
   bench/vs_trl.py (the same model, data, LoRA, optimizer and batches) on this GPU.
6. Out of memory that keeps the run: the process may use only OOM_CAP of the GPU's memory
   (torch.cuda.set_per_process_memory_fraction), and the run asks for a micro-batch of
   OOM_MICRO that cannot fit; `oom: adapt` must halve it (redoing the step) until it fits, and
   the run must finish with the global batch it started with. (On the CPU smoke run the error
   is injected through the hooks seam above a micro-batch of 4, as the tests do.)

Prints one JSON line per check and a summary table; exit 1 if the exactness check fails.

    python bench/gpu_check.py                    # on a machine with one CUDA GPU
    python bench/gpu_check.py --allow-cpu --steps 2   # a smoke run of the script on a CPU
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import MODEL, REPO, StepClock, sftrun_overrides, write_examples

OOM_CAP = 3 * 2**30  # bytes of GPU memory the oom check's process may use
OOM_MICRO = 64  # its micro-batch: 64 x 256 tokens of float32 logits alone is 3.2 GB


def child(kind: str, work: Path, steps: int, kill_after: int, resume: bool) -> None:
    """One run in this process; writes ``result.json`` into ``work``."""
    import torch

    from sftrun.config import load_config
    from sftrun.hooks import RunHooks
    from sftrun.trainer import RunOptions, run_training

    torch.use_deterministic_algorithms(True)
    os.chdir(work)
    data = write_examples(work / "train.jsonl", 64)
    settings = sftrun_overrides(data, steps + 1)
    settings += [
        "save_steps=2",
        "report_to=[]",
        "dtype=bfloat16" if torch.cuda.is_available() else "dtype=float32",
    ]
    if kind == "qlora":
        settings += ["quantization.bits=4"]
    if kind == "unsloth":
        settings += ["backend=unsloth"]
    if kind == "oom":
        # One global batch of OOM_MICRO examples asked for in one micro-batch.
        settings += [f"per_device_train_batch_size={OOM_MICRO}", "gradient_accumulation_steps=1"]
        settings += ["oom=adapt", f"max_steps={min(steps, 4)}"]
    clock = StepClock()
    on_batch = clock.on_batch
    if kind == "oom" and torch.cuda.is_available():
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, OOM_CAP / total))
    elif kind == "oom":

        def on_batch(batch: dict) -> None:
            clock.on_batch(batch)
            if len(batch["input_ids"]) > 4:
                raise torch.OutOfMemoryError("injected: the CPU smoke run of the oom check")

    def after_commit(step: int, path: Path) -> None:
        if kill_after and step == kill_after:
            os.kill(os.getpid(), signal.SIGKILL)

    hooks = RunHooks(
        on_step_start=clock.on_step_start, on_batch=on_batch, after_commit=after_commit
    )
    cfg = load_config(None, settings)
    options = RunOptions(yes=True, console=False, hooks=hooks, resume="latest" if resume else None)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    result = run_training(cfg, options)
    timed = [s for s in range(1, steps + 1) if s in clock.starts and s + 1 in clock.starts]
    seconds = sum(clock.starts[s + 1] - clock.starts[s] for s in timed)
    out = {
        "kind": kind,
        "tokens_per_second": sum(clock.tokens.get(s, 0) for s in timed) / seconds if seconds else 0,
        "peak_cuda_bytes": torch.cuda.max_memory_allocated() if torch.cuda.is_available() else 0,
        "last_checkpoint": str(result.last_checkpoint),
        "log": str(result.log_file),
    }
    if kind == "oom":
        state = json.loads((result.last_checkpoint / "trainer_state.json").read_text())
        out["adapted_split"] = state.get("adapted_split")
        out["global_batch_size"] = state.get("global_batch_size")
        out["finished"] = state["global_step"] == min(steps, 4)
    (work / "result.json").write_text(json.dumps(out))


def _run(kind: str, work: Path, steps: int, kill_after: int = 0, resume: bool = False) -> int:
    args = [sys.executable, str(Path(__file__).resolve()), "--child", kind, "--work", str(work)]
    args += ["--steps", str(steps), "--kill-after", str(kill_after)]
    args += ["--resume"] if resume else []
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "CUBLAS_WORKSPACE_CONFIG": ":4096:8"}
    return subprocess.run(args, env=env, cwd=REPO).returncode


def _result(work: Path) -> dict:
    return json.loads((work / "result.json").read_text())


def _same_bytes(a: Path, b: Path) -> bool:
    names = ("adapter_model.safetensors", "optimizer.pt", "scheduler.pt")
    return all((a / n).read_bytes() == (b / n).read_bytes() for n in names)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20, help="timed optimizer steps per run")
    parser.add_argument("--allow-cpu", action="store_true", help="smoke-run without a GPU")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--kill-after", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--resume", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.work, args.steps, args.kill_after, args.resume)
        return 0
    import torch

    if not torch.cuda.is_available() and not args.allow_cpu:
        print("gpu_check needs a CUDA GPU (or --allow-cpu for a smoke run)")
        return 2
    if not (MODEL / "config.json").is_file():
        raise SystemExit("run `make model` (sftrun model prepare) first")
    root = Path(tempfile.mkdtemp(prefix="sftrun-gpu-check-"))
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU (smoke run)"
    print(f"device: {device}; {args.steps} timed steps per run; work in {root}")
    results: list[dict] = []
    kinds = ["bf16", "qlora"]
    if importlib.util.find_spec("unsloth") is not None:
        kinds.append("unsloth")
    else:
        print(json.dumps({"kind": "unsloth", "skipped": "not installed"}))
    for kind in kinds:
        work = root / kind
        work.mkdir()
        t0 = time.perf_counter()
        code = _run(kind, work, args.steps)
        entry = _result(work) if code == 0 else {"kind": kind, "failed": code}
        entry["wall_seconds"] = round(time.perf_counter() - t0, 1)
        print(json.dumps(entry), flush=True)
        results.append(entry)

    # Exactness: the bf16 run above is the reference; kill a second one after checkpoint 2.
    work = root / "exact"
    work.mkdir()
    killed = _run("bf16", work, args.steps, kill_after=2)
    resumed = _run("bf16", work, args.steps, resume=True)
    end = f"checkpoints/sft_model/checkpoint-{args.steps + 1}"
    exact = killed == -9 and resumed == 0 and _same_bytes(root / "bf16" / end, work / end)
    print(
        json.dumps(
            {"kind": "kill -9 + resume", "killed": killed, "resumed": resumed, "bit_exact": exact}
        ),
        flush=True,
    )

    # Out of memory: the micro-batch that cannot fit is adapted and the run finishes.
    work = root / "oom"
    work.mkdir()
    code = _run("oom", work, args.steps)
    oom = _result(work) if code == 0 else {"kind": "oom", "failed": code}
    split = oom.get("adapted_split") or {}
    adapted = bool(
        oom.get("finished")
        and split.get("configured") == [OOM_MICRO, 1]
        and oom.get("global_batch_size") == OOM_MICRO
    )
    print(json.dumps({**oom, "adapted": adapted}), flush=True)

    if importlib.util.find_spec("trl") is not None and torch.cuda.is_available():
        steps = str(min(args.steps, 10))
        cmd = [sys.executable, str(REPO / "bench/vs_trl.py"), "--steps", steps, "--rounds", "1"]
        subprocess.run([*cmd, "--skip-resume"], cwd=REPO)
    else:
        print(json.dumps({"kind": "TRL side by side", "skipped": "TRL or CUDA missing"}))

    print("\n| run | tokens/s | peak CUDA memory |")
    print("|---|---|---|")
    for r in results:
        if "failed" in r:
            print(f"| {r['kind']} | failed (exit {r['failed']}) | |")
        else:
            peak = r["peak_cuda_bytes"] / 2**30
            print(f"| {r['kind']} | {r['tokens_per_second']:.0f} | {peak:.2f} GiB |")
    print(f"| kill -9 + resume bit-exact | {exact} | |")
    where = f"adapted to {split.get('adapted')}"
    print(f"| micro-batch {OOM_MICRO} out of memory, {where} | {adapted} | |")
    return 0 if exact and adapted else 1


if __name__ == "__main__":
    sys.exit(main())
