"""Pipeline stage 4 (``outputs/4_evaluation/<name>/``): ``sftrun eval``.

Owns held-out loss, perplexity and generation accuracy for a checkpoint and/or the base
model, the markdown report, ``metrics.json`` and the PNG plot of the training curves (loss,
eval loss and LR over steps, with resumes marked). Never trains and never writes checkpoints.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

from sftrun import constants as C
from sftrun.config import TrainingConfig
from sftrun.data import read_conversations
from sftrun.encoding import tokenize_file
from sftrun.evaluate import eval_loss, generation_accuracy
from sftrun.export import Loaded, load_adapter_model, load_base_model
from sftrun.loss import LabelOnlyLoss

EVAL_DIR = Path(C.OUTPUTS_DIR) / "4_evaluation"
SAMPLES_IN_REPORT = 5


def evaluate_model(cfg: TrainingConfig, loaded: Loaded, label: str) -> dict[str, Any]:
    """Held-out loss, perplexity, and (unless eval_accuracy is none) generation accuracy."""
    if not cfg.eval_file:
        raise ValueError("eval_file is not set")
    pad = loaded.tokenizer.pad_token_id
    print(f"{label}: held-out loss on {cfg.eval_file}", file=sys.stderr, flush=True)
    data = tokenize_file(
        loaded.tokenizer, cfg.eval_file, cfg.max_seq_length, cfg.overlong, cfg.train_on
    )
    loss = eval_loss(
        LabelOnlyLoss(loaded.model), data, cfg.per_device_eval_batch_size, pad, loaded.model.device
    )
    metrics: dict[str, Any] = {
        "eval_loss": loss,
        "perplexity": math.exp(min(loss, 50.0)),
        "eval_examples": len(data),
    }
    if cfg.eval_accuracy != "none":
        convs = read_conversations(cfg.eval_file)[: cfg.eval_max_samples or None]
        print(f"{label}: generating {len(convs)} replies", file=sys.stderr, flush=True)
        acc = generation_accuracy(
            loaded.model,
            loaded.tokenizer,
            convs,
            cfg.eval_accuracy,
            cfg.eval_max_new_tokens,
            cfg.per_device_eval_batch_size,
            loaded.model.device,
        )
        metrics.update(
            accuracy=acc.accuracy, correct=acc.correct, scored=acc.total, scorer=cfg.eval_accuracy
        )
        metrics["samples"] = acc.samples
    return metrics


def plot_curves(state: dict[str, Any], title: str, target: Path) -> Path:
    """Train loss, eval loss and LR over optimizer steps; resumed steps marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    history = state.get("log_history", [])
    train = [(h["step"], h["loss"]) for h in history if "loss" in h]
    evals = [(h["step"], h["eval_loss"]) for h in history if "eval_loss" in h]
    lrs = [(h["step"], h["learning_rate"]) for h in history if "learning_rate" in h]
    fig, (ax_loss, ax_lr) = plt.subplots(2, 1, figsize=(8, 6.5), sharex=True)
    if train:
        ax_loss.plot(*zip(*train, strict=True), label="train loss", color="tab:blue")
    if evals:
        ax_loss.plot(*zip(*evals, strict=True), "o-", label="eval loss", color="tab:orange")
    ax_loss.set_yscale("log")
    ax_loss.set_ylabel("loss per label token (log scale)")
    ax_loss.set_title(title)
    if lrs:
        ax_lr.plot(*zip(*lrs, strict=True), color="tab:green", label="learning rate")
    ax_lr.set_ylabel("learning rate")
    ax_lr.ticklabel_format(axis="y", style="sci", scilimits=(0, 0))
    ax_lr.set_xlabel("optimizer step")
    for i, step in enumerate(state.get("resumed_from", [])):
        for ax in (ax_loss, ax_lr):
            ax.axvline(
                step,
                color="tab:red",
                linestyle="--",
                linewidth=1,
                label="resumed" if i == 0 else None,
            )
    for ax in (ax_loss, ax_lr):
        ax.grid(alpha=0.3)
        ax.legend(loc="upper right")
    fig.tight_layout()
    target.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(target, dpi=110)
    plt.close(fig)
    return target


def _report_md(name: str, results: dict[str, dict[str, Any]], plot: Path | None) -> str:
    names = list(results)
    lines = [
        f"# Evaluation: {name}",
        "",
        "| metric | " + " | ".join(names) + " |",
        "|---|" + "---|" * len(names),
    ]
    for key, fmt in (("eval_loss", ".4f"), ("perplexity", ".3f"), ("accuracy", ".1%")):
        if all(key in r for r in results.values()):
            lines.append(
                f"| {key} | " + " | ".join(format(r[key], fmt) for r in results.values()) + " |"
            )
    first = results[names[0]]
    if "samples" in first:
        lines += ["", f"## Generations (first {SAMPLES_IN_REPORT})", ""]
        lines.append("| prompt | reference | " + " | ".join(names) + " |")
        lines.append("|---|---|" + "---|" * len(names))
        for i, sample in enumerate(first["samples"][:SAMPLES_IN_REPORT]):
            cells = [sample["prompt"], sample["reference"]]
            for r in results.values():
                s = r["samples"][i]
                cells.append(("✅ " if s["correct"] else "❌ ") + s["prediction"])
            lines.append(
                "| " + " | ".join(c.replace("|", "\\|").replace("\n", " ") for c in cells) + " |"
            )
    if plot is not None:
        lines += ["", "## Training curves", "", f"![training curves]({plot.name})"]
    return "\n".join(lines) + "\n"


def run_eval(
    cfg: TrainingConfig, ckpt: Path | None, with_base: bool, name: str | None
) -> tuple[Path, dict[str, dict[str, Any]]]:
    """Evaluate a checkpoint, the base model, or both; write the stage-4 folder."""
    results: dict[str, dict[str, Any]] = {}
    base_path = cfg.model_name_or_path
    plot_state: dict[str, Any] | None = None
    if ckpt is not None:
        loaded = load_adapter_model(ckpt)
        base_path = loaded.base_path
        plot_state = loaded.trainer_state
        results[ckpt.resolve().name] = evaluate_model(cfg, loaded, ckpt.resolve().name)
    if with_base or ckpt is None:
        results["base"] = evaluate_model(
            cfg, load_base_model(cfg.lora, base_path, cfg.max_seq_length, cfg.chat_template), "base"
        )
    label = name or (ckpt.resolve().name if ckpt is not None else "base")
    out = EVAL_DIR / label
    out.mkdir(parents=True, exist_ok=True)
    plot = None
    if plot_state is not None:
        plot = plot_curves(plot_state, f"training curves of {label}", out / "training_curves.png")
    (out / "metrics.json").write_text(
        json.dumps(
            {k: {m: v for m, v in r.items() if m != "samples"} for k, r in results.items()},
            indent=2,
        )
        + "\n"
    )
    (out / "samples.json").write_text(
        json.dumps({k: r.get("samples", []) for k, r in results.items()}, indent=2) + "\n"
    )
    (out / "report.md").write_text(_report_md(label, results, plot))
    return out, results
