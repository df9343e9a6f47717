"""sftrun against TRL's SFTTrainer, side by side on this machine.

Same model (the bundled SmolLM2-135M-Instruct), same data (the sample task), same LoRA (r=16,
alpha 32, dropout 0.05, all 7 linear projections), same optimizer (AdamW, lr 2e-4, cosine),
micro-batch 4 x accumulation 2, max length 256, fp32, no gradient checkpointing, the same
number of optimizer steps. Each configuration runs in its own process (so peak RSS is its own),
and the order alternates between rounds. Reported: trained (non-padding) input tokens/s and
seconds per optimizer step over the timed steps (the first step is warm-up and not timed),
peak RSS, and the ratios against the best TRL configuration.

Also: checkpoint save time and size (sftrun's atomic commit vs the HF Trainer's
``_save_checkpoint``), resume start-up time (process start to the first optimizer step done)
from an early and a late checkpoint, and the achieved model FLOP/s against this machine's
measured fp32 matrix-multiply peak.

    python bench/vs_trl.py                 # the full comparison (about 15 minutes on 2 cores)
    python bench/vs_trl.py --steps 4 --rounds 1 --skip-resume   # a quick look

Needs TRL (bench only): ``make bench`` installs it and runs this script.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import common
from common import (
    ACCUM,
    LR,
    MAX_LEN,
    MICRO,
    MODEL,
    REPO,
    TRAIN,
    StepClock,
    full_head_loss,
    matmul_peak,
    model_flops,
    sftrun_overrides,
    trl_lora,
    trl_settings,
    write_examples,
)

CONFIGS = [
    "trl-plain",
    "trl-packing",
    "trl-padding_free",
    "sftrun",
    "sftrun-fullhead",
    "sftrun-pefttorch",
]


# --- children: one configuration each, printing one JSON line --------------------------------


def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _timed(step_times: dict[int, float], tokens: dict[int, int], steps: int) -> dict[str, Any]:
    """Steps 2..steps+1 (0-based 1..steps): the first step is warm-up."""
    seconds = step_times[steps + 1] - step_times[1]
    n_tokens = sum(tokens[k] for k in range(1, steps + 1))
    return {
        "seconds": seconds,
        "tokens": n_tokens,
        "tokens_per_s": n_tokens / seconds,
        "s_per_step": seconds / steps,
    }


def child_trl(kind: str, steps: int, examples: int, work: Path) -> dict[str, Any]:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    rows = [json.loads(line) for line in TRAIN.read_text().splitlines()[:examples]]
    dataset = Dataset.from_list([{"messages": r["messages"]} for r in rows])
    tokenizer = AutoTokenizer.from_pretrained(MODEL)
    model = AutoModelForCausalLM.from_pretrained(MODEL, dtype=torch.float32)
    args = SFTConfig(
        **trl_settings(work, steps + 1),
        # TRL refuses max_length when padding-free without packing; no example is that long.
        max_length=None if kind == "trl-padding_free" else MAX_LEN,
        packing=kind == "trl-packing",
        padding_free=kind == "trl-padding_free",
    )
    peft_config = trl_lora()
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=peft_config,
    )
    tokens: dict[int, int] = defaultdict(int)
    ends: dict[int, float] = {}
    collate = trainer.data_collator

    def counting(features: list[dict[str, Any]]) -> dict[str, Any]:
        batch = collate(features)
        mask = batch.get("attention_mask")
        n = int(mask.sum()) if mask is not None else int(batch["input_ids"].numel())
        tokens[trainer.state.global_step] += n
        return batch

    class Clock(TrainerCallback):
        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            ends[state.global_step] = time.perf_counter()

    trainer.data_collator = counting
    trainer.add_callback(Clock())
    trainer.train()
    # HF numbers steps by completion: the end of step k is the start of (0-based) step k.
    result = _timed(ends, tokens, steps)
    result["timed_steps"] = steps
    if kind == "trl-plain":
        t0 = time.perf_counter()
        trainer._save_checkpoint(trainer.model, trial=None)
        result["save_seconds"] = time.perf_counter() - t0
        saved = next((work / "trl").glob("checkpoint-*"))
        result["save_bytes"] = sum(f.stat().st_size for f in saved.rglob("*") if f.is_file())
    result["peak_rss"] = _peak_rss()
    return result


def child_sftrun(kind: str, steps: int, examples: int, work: Path) -> dict[str, Any]:
    from sftrun.config import load_config
    from sftrun.hooks import RunHooks
    from sftrun.trainer import RunOptions, run_training

    os.chdir(work)
    data = write_examples(work / "train.jsonl", examples)
    cfg = load_config(None, sftrun_overrides(data, steps + 2))
    clock = StepClock()
    starts, tokens = clock.starts, clock.tokens

    hooks = RunHooks(
        on_step_start=clock.on_step_start,
        on_batch=clock.on_batch,
        make_loss=full_head_loss if kind == "sftrun-fullhead" else None,
        # Ablation: PEFT's own LoRA forward and nn.Dropout (one Bernoulli draw per element).
        fast_lora=kind != "sftrun-pefttorch",
    )
    run_training(cfg, RunOptions(yes=True, console=False, hooks=hooks))
    result = _timed(starts, tokens, steps)
    result["timed_steps"] = steps
    result["peak_rss"] = _peak_rss()
    return result


def child_save(work: Path) -> dict[str, Any]:
    """Median time of sftrun's atomic checkpoint commit for the benchmark's LoRA."""
    import torch
    from peft import get_peft_model_state_dict

    from sftrun import checkpoint, integrity, rng
    from sftrun.config import LoraSettings
    from sftrun.modeling import load_lora_model, select_backend, trainable_parameters

    model = load_lora_model(
        MODEL,
        LoraSettings(r=16, alpha=32, dropout=0.05),
        select_backend("plain", True),
        torch.float32,
        MAX_LEN,
    )
    params = trainable_parameters(model)
    optimizer = torch.optim.AdamW(params, lr=LR)
    for p in params:
        p.grad = torch.randn_like(p)
    optimizer.step()
    times = []
    for step in range(1, 6):
        payload = checkpoint.CheckpointPayload(
            adapter_state=get_peft_model_state_dict(model),
            adapter_config={"r": 16},
            optimizer_state=optimizer.state_dict(),
            scheduler_state={},
            trainer_state={},
            training_args={},
            rng_state=rng.capture(),
            identity={},
        )
        t0 = time.perf_counter()
        path = checkpoint.save(work / "ckpts", step, payload)
        times.append(time.perf_counter() - t0)
    return {"save_seconds": statistics.median(times), "save_bytes": integrity.dir_size(path)}


# --- the parent: runs children, prints the tables ------------------------------------------


def run_child(args: list[str]) -> dict[str, Any]:
    return common.run_child(__file__, args, TOKENIZERS_PARALLELISM="false")


def resume_startup(examples: int, late: int) -> dict[str, float]:
    """Seconds from process start to the first resumed step, from step 2 and from ``late``."""
    work = Path(tempfile.mkdtemp(prefix="sftrun-bench-resume-"))
    data = work / "train.jsonl"
    write_examples(data, examples)
    common = [
        f"model_name_or_path={MODEL}",
        f"train_file={data}",
        "eval_file=null",
        "eval_accuracy=none",
        "logging_steps=1",
        f"max_steps={late + 1}",
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    for extra in (
        [f"save_steps={late}", f"max_steps={late}"],
        ["save_steps=2", "max_steps=2", "output_dir=early"],
    ):
        subprocess.run(
            _train_cmd(*common, *extra), cwd=work, env=env, check=True, capture_output=True
        )
    out: dict[str, float] = {}
    for name, step, out_dir in (("early", 2, "early"), ("late", late, "checkpoints/sft_model")):
        samples = []
        for _ in range(3):
            logs_before = set(work.glob("outputs/logs/*.log"))
            t0 = time.perf_counter()
            proc = subprocess.Popen(
                _train_cmd(
                    "--resume",
                    f"{out_dir}/checkpoint-{step}",
                    *common,
                    f"output_dir={out_dir}",
                    f"max_steps={step + 1}",
                    "save_steps=100000",
                ),
                cwd=work,
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
            )
            samples.append(_wait_for_log_line(work, logs_before, f"step {step + 1}/", proc) - t0)
            assert proc.wait() == 0, proc.stderr.read() if proc.stderr else ""
            # Put the folder back as it was: drop the step the resume added.
            shutil.rmtree(work / out_dir / f"checkpoint-{step + 1}")
        out[name] = statistics.median(samples)
    return out


def _train_cmd(*args: str) -> list[str]:
    config = str(REPO / "configs/training_config.yaml")
    return [sys.executable, "-m", "sftrun", "train", "-y", "--config", config, *args]


def _wait_for_log_line(work: Path, before: set[Path], needle: str, proc: Any) -> float:
    while True:
        for log in set(work.glob("outputs/logs/*.log")) - before:
            if needle in log.read_text():
                return time.perf_counter()
        if proc.poll() is not None:
            raise SystemExit(f"resume ended before {needle!r} was logged")
        time.sleep(0.005)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=8, help="timed optimizer steps")
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds")
    parser.add_argument("--examples", type=int, default=160)
    parser.add_argument("--late", type=int, default=24, help="step of the 'late' checkpoint")
    parser.add_argument("--skip-resume", action="store_true")
    parser.add_argument("--json", type=Path, help="also write the raw results here")
    parser.add_argument(
        "--configs",
        default=",".join(CONFIGS),
        help=f"comma-separated subset of {','.join(CONFIGS)} (at least one trl-* for ratios)",
    )
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child:
        work = Path(tempfile.mkdtemp(prefix="sftrun-bench-"))
        if args.child.startswith("trl"):
            result = child_trl(args.child, args.steps, args.examples, work)
        elif args.child.startswith("sftrun"):
            result = child_sftrun(args.child, args.steps, args.examples, work)
        elif args.child == "save":
            result = child_save(work)
        else:
            result = matmul_peak()
        print(json.dumps(result))
        return

    if not (MODEL / "config.json").is_file():
        raise SystemExit("run `make model` (sftrun model prepare) first")
    print(
        f"machine: {os.cpu_count()} CPUs; {args.steps} timed steps x {args.rounds} rounds, "
        f"{args.examples} examples, micro {MICRO} x accumulation {ACCUM}, max_length {MAX_LEN}"
    )
    configs = [c for c in args.configs.split(",") if c]
    unknown = sorted(set(configs) - set(CONFIGS))
    if unknown or not any(c.startswith("trl") for c in configs):
        parser.error(f"--configs: choose from {','.join(CONFIGS)}, at least one trl-*")
    results: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in range(args.rounds):
        order = configs if r % 2 == 0 else list(reversed(configs))
        for config in order:
            res = run_child(
                ["--child", config, "--steps", str(args.steps), "--examples", str(args.examples)]
            )
            results[config].append(res)
            print(
                f"  round {r + 1} {config:<17} {res['tokens_per_s']:7.1f} tokens/s  "
                f"{res['s_per_step']:6.2f} s/step  {res['peak_rss'] / 2**30:5.2f} GiB",
                flush=True,
            )

    med = {
        c: {
            k: statistics.median(x[k] for x in rs)
            for k in ("tokens_per_s", "s_per_step", "peak_rss")
        }
        for c, rs in results.items()
    }
    trl = [c for c in med if c.startswith("trl")]
    best_tps = max(med[c]["tokens_per_s"] for c in trl)
    low_rss = min(med[c]["peak_rss"] for c in trl)
    print("\nthroughput (medians)")
    print(
        f"{'configuration':<18} {'tokens/s':>9} {'s/step':>7} {'peak RSS':>9}  "
        f"{'x best TRL tok/s':>16}  {'RSS / lowest TRL':>16}"
    )
    for c, m in med.items():
        print(
            f"{c:<18} {m['tokens_per_s']:9.1f} {m['s_per_step']:7.2f} "
            f"{m['peak_rss'] / 2**30:7.2f} G  {m['tokens_per_s'] / best_tps:16.2f}  "
            f"{m['peak_rss'] / low_rss:16.2f}"
        )
    # This shared machine drifts by tens of percent over a run; a ratio between runs of the
    # same round (minutes apart) is steadier than a ratio of medians taken across rounds.
    per_round: dict[str, list[float]] = {}
    for c in med:
        if not c.startswith("trl"):
            per_round[c] = [
                results[c][r]["tokens_per_s"] / max(results[t][r]["tokens_per_s"] for t in trl)
                for r in range(args.rounds)
            ]
            print(
                f"{c:<18} x best TRL of the same round: "
                + ", ".join(f"{x:.2f}" for x in per_round[c])
                + f"  (median {statistics.median(per_round[c]):.2f})"
            )

    save = run_child(["--child", "save"])
    trl_save = [x for x in results["trl-plain"] if "save_seconds" in x]
    print("\ncheckpoint save (LoRA r=16 on SmolLM2-135M)")
    print(
        f"  sftrun atomic commit (fsync + sha256 manifest): {save['save_seconds']:.3f} s "
        f"median of 5, {save['save_bytes'] / 1e6:.1f} MB"
    )
    if trl_save:
        ts = statistics.median(x["save_seconds"] for x in trl_save)
        tb = statistics.median(x["save_bytes"] for x in trl_save)
        print(
            f"  HF Trainer _save_checkpoint (TRL):              {ts:.3f} s, {tb / 1e6:.1f} MB"
            f"  -> sftrun takes {save['save_seconds'] / ts:.2f}x the time"
        )

    peak = run_child(["--child", "peak"])
    label_share = 10457 / 31147  # sample task: tokens with loss / all tokens (sftrun data prepare)
    print(
        f"\nmodel FLOP/s against the measured fp32 matmul peak "
        f"({peak['flops_per_s'] / 1e9:.1f} GFLOP/s, {peak['threads']} threads)"
    )
    for c in med:
        if c in ("sftrun-fullhead", "sftrun-pefttorch"):
            continue
        tps = med[c]["tokens_per_s"]
        f = model_flops(tps, tps * (label_share if c == "sftrun" else 1.0))
        print(f"  {c:<18} {f / 1e9:6.1f} GFLOP/s = {100 * f / peak['flops_per_s']:5.1f}% of peak")

    startup = {}
    if not args.skip_resume:
        startup = resume_startup(args.examples, args.late)
        print(
            f"\nresume start-up (process start to first step done, median of 3): early "
            f"{startup['early']:.2f} s, late (step {args.late}) {startup['late']:.2f} s, "
            f"ratio {startup['late'] / startup['early']:.2f}"
        )
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "runs": results,
                    "medians": med,
                    "per_round_ratio_to_best_trl": per_round,
                    "save": save,
                    "peak": peak,
                    "resume_startup": startup,
                },
                indent=2,
            )
        )


if __name__ == "__main__":
    main()
