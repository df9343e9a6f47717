"""sftrun against TRL's SFTTrainer doing the same work: the same token ids, labels and batches.

Two pairings, each with one objective on both sides:

- ``assistant``: sftrun's default (loss on the assistant tokens) against TRL given those very
  tokens and labels (TRL's completion-only loss);
- ``all``: sftrun with ``train_on=all`` against TRL training on every token.

TRL gets a pre-tokenized dataset (``input_ids`` and ``labels``, from sftrun's own tokenizer
pass over the sample task) laid out in the order sftrun's sampler consumes it, and samples it
sequentially, so optimizer step k of both sides trains on the same samples, the same
micro-batches, the same label tokens. The first step's loss proves it: LoRA B starts at zero,
so both sides' first loss is the base model's loss on the same batch, and the two must agree.
Both: the bundled SmolLM2-135M-Instruct, fp32, LoRA r=16 alpha 32 dropout 0.05 on the seven
projections, AdamW lr 2e-4 cosine, micro-batch 4 x accumulation 2, max length 256, no
gradient checkpointing, the same number of steps, and the same save protocol: one checkpoint
(adapter, optimizer, scheduler, RNG) after the last step, outside the timed steps and inside
the RSS window. TRL samples with ``train_sampling_strategy="sequential"`` (length grouping
would reorder the batches, so it is out on both sides).

Four sides per pairing, each run its own process, one after another (not in turns step by
step: on this virtual machine a paused process pays again for its memory, bench/README.md),
the order alternating between rounds:
``sftrun``; ``stock``, the ablation with the LM head over every position and PEFT's own LoRA
forward together (what sftrun's loop alone is worth); ``trl`` (TRL's defaults); ``trl-compile``
(TRL with ``torch_compile=True``; its compile falls in the warm-up step; ``--no-trl-compile``
skips it). sftrun has no compile option: bench/profile_step.py's ``--compile`` measurements,
given in bench/README.md, kept torch.compile out. And a ceiling, ``floor``: sftrun's step on
the same batches with only the time inside its matrix multiplies and attention kernels counted
(bench/profile_step.py's ``floor``), the most any implementation running those kernels at this
machine's rates could reach (``--no-floor`` skips it).

Reported per round: trained (non-padding) tokens/s over the timed steps (the first is warm-up),
counted from the batches each side trained on (sftrun's batches through its hooks, TRL's
through the trainer's own ``num_input_tokens_seen``); the ratio to the fastest TRL side of the
same round and to TRL's defaults; the training-peak RSS (sampled from the first step on)
separately from the load peak; the process's user and kernel (sys) CPU seconds over the
timed steps; the model FLOP/s against this machine's fp32 matmul peak,
measured before and after the rounds (the higher of the two is used). The headline is the
median of the per-round ratios of sftrun to the fastest TRL side, with min and max; the floor's
ratio to the same TRL side and its share of the matmul peak say what is left to gain.

    python bench/fair_trl.py --json bench/fair_results.json   # 6 timed steps x 3 rounds
    python bench/fair_trl.py --steps 3 --rounds 1 --no-trl-compile
    python bench/fair_trl.py --report bench/fair_results.json # the summary of a saved run
    python bench/fair_trl.py --report a.json b.json           # rounds of runs pooled
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import platform
import statistics
import subprocess
import tempfile
import threading
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
    SEED,
    StepClock,
    full_head_loss,
    matmul_peak,
    model_flops,
    trl_lora,
    trl_settings,
    write_examples,
)
from profile_step import floor

PAIRINGS = ("assistant", "all")


class PeakRss:
    """The largest resident size seen from ``start()`` on, sampled every 5 ms."""

    def __init__(self) -> None:
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    @staticmethod
    def now() -> int:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def start(self) -> None:
        if not self._thread.is_alive():
            self._thread.start()

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.now())
            time.sleep(0.005)

    def stop(self) -> int:
        self._stop.set()
        return self.peak


def _load_peak() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _rate(clock: StepClock, tokens: dict[int, int], steps: int) -> dict[str, Any]:
    """Tokens/s over steps 1..``steps``, and the process's CPU seconds in them: user, and
    kernel (page faults, memory mapping: what the operating system does for the step)."""
    seconds = clock.starts[steps + 1] - clock.starts[1]
    n = sum(tokens[k] for k in range(1, steps + 1))
    (user0, sys0), (user1, sys1) = clock.cpu[1], clock.cpu[steps + 1]
    return {
        "tokens": n,
        "seconds": seconds,
        "tokens_per_s": n / seconds,
        "user_seconds": user1 - user0,
        "sys_seconds": sys1 - sys0,
    }


def child_sftrun(
    pairing: str, steps: int, examples: int, work: Path, stock: bool = False, dtype: str = "float32"
) -> dict[str, Any]:
    """One sftrun run; ``stock`` is the ablation with the LM head over every position and
    PEFT's own LoRA forward (``nn.Dropout``) together: what sftrun's loop alone is worth."""
    from sftrun.config import load_config
    from sftrun.hooks import RunHooks
    from sftrun.trainer import RunOptions, run_training

    os.chdir(work)
    data = write_examples(work / "train.jsonl", examples)
    clock, rss = StepClock(), PeakRss()
    load_peak: list[int] = []

    def on_step_start(step: int) -> None:
        if step == 0:
            load_peak.append(_load_peak())
            rss.start()
        clock.on_step_start(step)

    settings = [
        f"model_name_or_path={MODEL}",
        f"train_file={data}",
        "eval_file=null",
        f"max_seq_length={MAX_LEN}",
        f"max_steps={steps + 2}",
        f"learning_rate={LR}",
        "lr_scheduler_type=cosine",
        "warmup_ratio=0",
        f"per_device_train_batch_size={MICRO}",
        f"gradient_accumulation_steps={ACCUM}",
        "logging_steps=1",
        "save_steps=100000",
        "eval_accuracy=none",
        "report_to=[]",
        f"seed={SEED}",
        f"train_on={pairing}",
        f"dtype={dtype}",  # bfloat16: the frozen base in bf16 under autocast, LoRA in fp32
        "lora.r=16",
        "lora.alpha=32",
        "lora.dropout=0.05",
    ]
    hooks = RunHooks(
        on_step_start=on_step_start,
        on_batch=clock.on_batch,
        make_loss=full_head_loss if stock else None,
        fast_lora=not stock,
    )
    run_training(load_config(None, settings), RunOptions(yes=True, console=False, hooks=hooks))
    saved = list(work.glob("checkpoints/sft_model/checkpoint-*/trainer_state.json"))
    history = json.loads(saved[0].read_text())["log_history"]
    # Rows the LM head ran on: labelled positions only, or every position in the ablation.
    head_rows = sum((clock.tokens if stock else clock.labels)[k] for k in range(1, steps + 1))
    return {
        **_rate(clock, clock.tokens, steps),
        "head_rows": head_rows,
        "saved_checkpoints": len(saved),
        "first_loss": history[0]["loss"],
        "train_peak_rss": rss.stop(),
        "load_peak_rss": load_peak[0],
    }


def child_trl(
    pairing: str,
    steps: int,
    examples: int,
    work: Path,
    compile_model: bool = False,
    dtype: str = "float32",
) -> dict[str, Any]:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from sftrun.encoding import tokenize_file
    from sftrun.modeling import load_tokenizer
    from sftrun.sampler import step_indices

    tokenizer = load_tokenizer(MODEL)
    data = tokenize_file(
        tokenizer, write_examples(work / "train.jsonl", examples), MAX_LEN, "truncate", pairing
    )
    batch = MICRO * ACCUM
    order = [i for s in range(steps + 2) for i in step_indices(SEED, len(data), s * batch, batch)]
    rows = [{"input_ids": data.input_ids[i], "labels": data.labels[i]} for i in order]

    # bfloat16: as sftrun does it and as TRL's users do, the base loaded in bf16 and
    # bf16=True (accelerate's autocast); PEFT keeps the LoRA weights in fp32.
    model = AutoModelForCausalLM.from_pretrained(MODEL, dtype=getattr(torch, dtype))
    settings = trl_settings(work, steps + 2)
    settings["bf16"] = dtype == "bfloat16"
    # The same save protocol as sftrun's side: one checkpoint (adapter, optimizer, scheduler,
    # RNG) after the last step, inside the RSS window and outside the timed steps.
    settings |= {"save_strategy": "steps", "save_steps": steps + 2}
    args = SFTConfig(
        **settings,
        max_length=MAX_LEN,
        warmup_steps=0,
        torch_compile=compile_model,
        include_num_input_tokens_seen="non_padding",  # counted from the batches it trains on
        train_sampling_strategy="sequential",  # the dataset is laid out in sftrun's order
    )
    peft = trl_lora()
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
        peft_config=peft,
    )
    clock = StepClock()
    seen: dict[int, int] = {}  # the trainer's own count of non-padding tokens, per step
    rss = PeakRss()
    load_peak: list[int] = []

    class Clock(TrainerCallback):
        def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if state.global_step == 0:
                load_peak.append(_load_peak())
                rss.start()
            clock.on_step_start(state.global_step)
            seen[state.global_step] = state.num_input_tokens_seen

        def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            clock.on_step_start(state.global_step)
            seen[state.global_step] = state.num_input_tokens_seen

    trainer.add_callback(Clock())
    trainer.train()
    first_loss = next(e["loss"] for e in trainer.state.log_history if "loss" in e)
    tokens = {k: seen[k + 1] - seen[k] for k in range(steps + 1)}
    saved = list((work / "trl").glob("checkpoint-*/optimizer.pt"))
    return {
        **_rate(clock, tokens, steps),
        "head_rows": sum(tokens[k] for k in range(1, steps + 1)),  # every position
        "saved_checkpoints": len(saved),
        "first_loss": first_loss,
        "train_peak_rss": rss.stop(),
        "load_peak_rss": load_peak[0],
    }


def run_child(args: list[str]) -> dict[str, Any]:
    return common.run_child(__file__, args)


def _versions() -> dict[str, str]:
    from importlib.metadata import version

    names = ("torch", "transformers", "peft", "accelerate", "trl", "datasets")
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=REPO
    ).stdout.strip()
    return {**{n: version(n) for n in names}, "sftrun_commit": commit}


def _ratios(ours: list[dict[str, Any]], theirs: list[list[dict[str, Any]]]) -> dict[str, Any]:
    """Per-round tokens/s ratios of ``ours`` to the fastest of ``theirs`` in the same round."""
    ratios = [
        a["tokens_per_s"] / max(t[r]["tokens_per_s"] for t in theirs) for r, a in enumerate(ours)
    ]
    return {
        "per_round": ratios,
        "median": statistics.median(ratios),
        "min": min(ratios),
        "max": max(ratios),
    }


def _same_work(rs: list[dict[str, Any]], trl: list[dict[str, Any]]) -> bool:
    """Whether every round of ``rs`` trained TRL's batches: the same first loss and tokens."""
    return all(
        abs(a["first_loss"] - b["first_loss"]) < 1e-3 and a["tokens"] == b["tokens"]
        for a, b in zip(rs, trl, strict=True)
    )


def _summarise(runs: dict[str, list[dict[str, Any]]], pairing: str, peak: float) -> dict[str, Any]:
    """For every side: per-round ratios to TRL's default and to the fastest TRL configuration
    of the round (the headline), whether it did TRL's work, peak RSS and model FLOP/s."""
    sides = [k.split("/")[1] for k in runs if k.startswith(f"{pairing}/")]
    trl_sides = [runs[f"{pairing}/{x}"] for x in sides if x.startswith("trl")]
    out: dict[str, Any] = {}
    if "floor" in sides:
        out["floor"] = _summarise_floor(
            runs[f"{pairing}/floor"], runs[f"{pairing}/trl"], trl_sides, peak
        )
    for side in (x for x in sides if x != "floor"):
        rs = runs[f"{pairing}/{side}"]
        trl = runs[f"{pairing}/trl"]
        flops = [model_flops(x["tokens"], x["head_rows"]) / x["seconds"] for x in rs]
        out[side] = {
            "to_trl_default": _ratios(rs, [trl]),
            "to_best_trl": _ratios(rs, trl_sides),
            "same_tokens_and_first_loss_as_trl": _same_work(rs, trl),
            "train_peak_rss": statistics.median(x["train_peak_rss"] for x in rs),
            "lowest_train_peak_rss": min(x["train_peak_rss"] for x in rs),
            "load_peak_rss": statistics.median(x["load_peak_rss"] for x in rs),
            "model_flops_per_s": statistics.median(flops),
            "share_of_matmul_peak": statistics.median(flops) / peak,
        }
        if all("sys_seconds" in x for x in rs):  # recorded since 2026-11-29 22:30
            out[side]["sys_share_of_cpu"] = statistics.median(
                x["sys_seconds"] / (x["user_seconds"] + x["sys_seconds"]) for x in rs
            )
    return out


def _summarise_floor(
    rs: list[dict[str, Any]], trl: list[dict[str, Any]], trl_sides: list[Any], peak: float
) -> dict[str, Any]:
    """The ceiling: sftrun's step timed by its matmul and attention kernels alone."""
    flops = [model_flops(x["tokens"], x["head_rows"]) for x in rs]
    only_mm = [{"tokens_per_s": x["tokens"] / x["matmul_seconds"]} for x in rs]
    return {
        "to_best_trl": _ratios(rs, trl_sides),
        "matmul_only_to_best_trl": _ratios(only_mm, trl_sides),
        "same_tokens_and_first_loss_as_trl": _same_work(rs, trl),
        "share_of_matmul_peak": statistics.median(
            f / x["seconds"] / peak for f, x in zip(flops, rs, strict=True)
        ),
        "matmul_share_of_matmul_peak": statistics.median(
            f / x["matmul_seconds"] / peak for f, x in zip(flops, rs, strict=True)
        ),
    }


def _print_floor(pairing: str, f: dict[str, Any]) -> None:
    ratios = f["to_best_trl"]
    print(
        f"{pairing:<9} {'floor':<11} matmul + attention kernels alone x fastest TRL of the round "
        + ", ".join(f"{x:.2f}" for x in ratios["per_round"])
        + f" (median {ratios['median']:.2f}); matmuls alone: median "
        f"{f['matmul_only_to_best_trl']['median']:.2f}; same work as TRL: "
        f"{f['same_tokens_and_first_loss_as_trl']}; model FLOP/s at that floor "
        f"{100 * f['share_of_matmul_peak']:.1f}% of the peak (matmuls alone "
        f"{100 * f['matmul_share_of_matmul_peak']:.1f}%)"
    )


def report(record: dict[str, Any]) -> None:
    """Print a run's summary (from ``main`` or a saved ``--json`` file)."""
    peaks = record["matmul_peak_flops_per_s"]
    peak = max(peaks)  # the higher measurement, so drift does not flatter the share
    meta = record["meta"]
    dtype = meta.get("dtype", "float32")
    print(
        f"{dtype} matmul peak before / after the rounds: "
        f"{peaks[0] / 1e9:.1f} / {peaks[1] / 1e9:.1f} GFLOP/s"
        + (
            f" (float32: {meta['float32_matmul_peak_flops_per_s'] / 1e9:.1f} GFLOP/s; the CPU "
            f"{'has' if meta['cpu_native_bf16'] else 'has no'} native bf16: "
            f"{meta['cpu_bf16_why']})"
            if "float32_matmul_peak_flops_per_s" in meta
            else ""
        )
    )
    for pairing in (p for p in PAIRINGS if any(k.startswith(f"{p}/") for k in record["runs"])):
        by_side = _summarise(record["runs"], pairing, peak)
        record.setdefault("summary", {})[pairing] = by_side
        for side, s in by_side.items():
            if side == "floor":
                _print_floor(pairing, s)
                continue
            best, default = s["to_best_trl"], s["to_trl_default"]
            print(
                f"{pairing:<9} {side:<11} x fastest TRL of the round "
                + ", ".join(f"{x:.2f}" for x in best["per_round"])
                + f" (median {best['median']:.2f}, min {best['min']:.2f}, max {best['max']:.2f});"
                f" x TRL default: median {default['median']:.2f}; same work as TRL: "
                f"{s['same_tokens_and_first_loss_as_trl']}; training-peak RSS median "
                f"{s['train_peak_rss'] / 2**30:.2f} GiB, lowest "
                f"{s['lowest_train_peak_rss'] / 2**30:.2f}; model FLOP/s "
                f"{s['model_flops_per_s'] / 1e9:.1f} G = {100 * s['share_of_matmul_peak']:.1f}% "
                "of the peak"
                + (
                    f"; kernel (sys) share of its CPU time {100 * s['sys_share_of_cpu']:.1f}%"
                    if "sys_share_of_cpu" in s
                    else ""
                )
            )


def _code(commit: str, path: str) -> str | None:
    """The AST of ``path`` at ``commit`` without docstrings (comments are not in it), or None
    where the file is absent or not Python."""
    if not path.endswith(".py"):
        return None
    shown = subprocess.run(["git", "show", f"{commit}:{path}"], capture_output=True, cwd=REPO)
    if shown.returncode != 0:
        return None
    tree = ast.parse(shown.stdout)
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if isinstance(body, list) and body and isinstance(body[0], ast.Expr):
            if isinstance(body[0].value, ast.Constant) and isinstance(body[0].value.value, str):
                body.pop(0)
    return ast.dump(tree)


def _same_code(a: str, b: str) -> bool:
    """Whether commits ``a`` and ``b`` hold the same sftrun code: every file under src/ that
    differs differs only in docstrings and comments."""
    diff = subprocess.run(
        ["git", "diff", "--name-only", a, b, "--", "src"], capture_output=True, text=True, cwd=REPO
    )
    if diff.returncode != 0:
        raise SystemExit(
            f"cannot compare the runs' commits {a} and {b} with git ({diff.stderr.strip()}); "
            "pool runs whose commits this clone has"
        )
    for path in diff.stdout.split():
        before = _code(a, path)
        if before is None or before != _code(b, path):
            return False
    return True


def pooled(records: list[dict[str, Any]]) -> dict[str, Any]:
    """One record holding every round of ``records``, which must have been made with the same
    sftrun code (:func:`_same_code`). The matmul peak is the highest the runs measured, before
    and after (so drift does not flatter the share)."""
    commits = [r["meta"]["sftrun_commit"] for r in records]
    for commit in commits[1:]:
        if not _same_code(commits[0], commit):
            raise SystemExit(
                f"runs at {commits[0]} and {commit} ran different sftrun code (src/ differs in "
                "more than docstrings); report them one at a time"
            )
    runs: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for record in records:
        for key, rounds in record["runs"].items():
            runs[key].extend(rounds)
    peaks = [max(r["matmul_peak_flops_per_s"][i] for r in records) for i in (0, 1)]
    meta = {**records[0]["meta"], "sftrun_commit": ", ".join(commits)}
    return {"meta": meta, "matmul_peak_flops_per_s": peaks, "runs": runs}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=6, help="timed optimizer steps")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--examples", type=int, default=160)
    parser.add_argument(
        "--no-trl-compile",
        action="store_true",
        help="skip the side with TRL's torch_compile=True (its compile is in the warm-up step)",
    )
    parser.add_argument(
        "--no-floor",
        action="store_true",
        help="skip the ceiling: sftrun's step timed by its matmul and attention kernels alone",
    )
    parser.add_argument(
        "--dtype",
        choices=("float32", "bfloat16"),
        default="float32",
        help="both sides' precision: bfloat16 = the base in bf16 under autocast (sftrun "
        "dtype=bfloat16, TRL bf16=True), LoRA and optimizer fp32; the peak is measured in it",
    )
    parser.add_argument(
        "--force",
        action="store_true",
        help="run a bfloat16 pairing even on a CPU without native bf16 (it times the emulation)",
    )
    parser.add_argument(
        "--pairing",
        dest="pairings",
        choices=PAIRINGS,
        action="append",
        help="run only this pairing (repeatable; default: both)",
    )
    parser.add_argument("--json", type=Path, help="also write the raw results here")
    parser.add_argument(
        "--report",
        type=Path,
        nargs="+",
        help="print the summary of a saved --json run; given several runs of the same sftrun "
        "code (src/ differing at most in docstrings and comments), their rounds are pooled",
    )
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--child-pairing", dest="pairing", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        work = Path(tempfile.mkdtemp(prefix="sftrun-fair-"))
        run_args = (args.pairing, args.steps, args.examples, work)
        dt = args.dtype
        children = {
            "sftrun": lambda: child_sftrun(*run_args, dtype=dt),
            "stock": lambda: child_sftrun(*run_args, stock=True, dtype=dt),
            "trl": lambda: child_trl(*run_args, dtype=dt),
            "trl-compile": lambda: child_trl(*run_args, compile_model=True, dtype=dt),
            "floor": lambda: floor(*run_args),
            "peak": lambda: matmul_peak(dtype=dt),
        }
        print(json.dumps(children[args.child]()))
        return
    if args.report:
        report(pooled([json.loads(p.read_text()) for p in args.report]))
        return
    if not (MODEL / "config.json").is_file():
        raise SystemExit("run `make model` (sftrun model prepare) first")
    threads = os.environ.get("OMP_NUM_THREADS", "unset (torch uses every core)")
    meta = {"machine": f"{os.cpu_count()} CPUs, {platform.machine()}", "omp_threads": threads}
    meta |= _versions()
    meta["dtype"] = args.dtype
    pairings = tuple(args.pairings or PAIRINGS)
    sides = ("sftrun", "stock", "trl") + (() if args.no_trl_compile else ("trl-compile",))
    # The floor's kernel clock times sftrun's fp32 step (bench/profile_step.py).
    sides += () if args.no_floor or args.dtype != "float32" else ("floor",)
    dtype_arg = ["--dtype", args.dtype]
    print(f"{meta}\n{args.steps} timed steps x {args.rounds} rounds, {args.examples} examples")
    first = run_child(["--child", "peak", *dtype_arg])
    peaks = [first["flops_per_s"]]
    meta["cpu_native_bf16"], meta["cpu_bf16_why"] = first["cpu_native_bf16"], first["cpu_bf16_why"]
    if args.dtype != "float32":  # the fp32 peak beside it: what bf16 gains on this CPU
        fp32 = run_child(["--child", "peak"])["flops_per_s"]
        meta["float32_matmul_peak_flops_per_s"] = fp32
        line = (
            f"matmul peak: bfloat16 {peaks[0] / 1e9:.2f} GFLOP/s, float32 {fp32 / 1e9:.1f} "
            f"GFLOP/s ({fp32 / peaks[0]:.0f}x); the CPU has "
            f"{'' if first['cpu_native_bf16'] else 'no '}native bf16 ({first['cpu_bf16_why']})"
        )
        print(line, flush=True)
        if not first["cpu_native_bf16"] and not args.force:
            raise SystemExit(
                "a bf16 pairing on this CPU would time its bf16 emulation, not training; run it "
                "on a CPU with AVX512-BF16, AMX or Arm BF16 (sftrun's dtype: auto trains in "
                "fp32 here), or pass --force"
            )
    runs: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in range(args.rounds):
        for pairing in pairings:
            for side in sides if r % 2 == 0 else reversed(sides):
                child = ["--child", side, "--child-pairing", pairing, "--steps", str(args.steps)]
                res = run_child([*child, "--examples", str(args.examples), *dtype_arg])
                runs[f"{pairing}/{side}"].append(res)
                if side == "floor":
                    print(
                        f"  round {r + 1} {pairing:<9} floor       {res['tokens_per_s']:7.1f} "
                        f"tokens/s over matmul {res['matmul_seconds']:.2f} s + attention "
                        f"{res['attention_seconds']:.2f} s  first loss {res['first_loss']:.5f}",
                        flush=True,
                    )
                    continue
                print(
                    f"  round {r + 1} {pairing:<9} {side:<11} {res['tokens_per_s']:7.1f} tokens/s"
                    f"  first loss {res['first_loss']:.5f}  training peak "
                    f"{res['train_peak_rss'] / 2**30:.2f} GiB (load peak "
                    f"{res['load_peak_rss'] / 2**30:.2f})  CPU user {res['user_seconds']:.1f} s "
                    f"+ sys {res['sys_seconds']:.1f} s",
                    flush=True,
                )
    peaks.append(run_child(["--child", "peak", *dtype_arg])["flops_per_s"])
    record = {"meta": meta, "matmul_peak_flops_per_s": peaks, "runs": runs}
    report(record)
    if args.json:
        args.json.write_text(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
