"""What the benchmark scripts share: the bundled model, the sample data, and the one sftrun
configuration they all time (bench/vs_trl.py's settings)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
MODEL = REPO / "model/models"
TRAIN = REPO / "data/sample/train.jsonl"
MICRO, ACCUM, MAX_LEN, LR, SEED = 4, 2, 256, 2e-4, 42


def write_examples(target: Path, examples: int) -> Path:
    """The first ``examples`` records of the sample task, as a JSONL file."""
    target.write_text("\n".join(TRAIN.read_text().splitlines()[:examples]) + "\n")
    return target


def sftrun_overrides(data: Path, max_steps: int, micro: int = MICRO) -> list[str]:
    """KEY=VALUE settings of the timed sftrun run: no eval, no saves, one log line a step."""
    return [
        f"model_name_or_path={MODEL}",
        f"train_file={data}",
        "eval_file=null",
        f"max_seq_length={MAX_LEN}",
        f"max_steps={max_steps}",
        f"learning_rate={LR}",
        "lr_scheduler_type=cosine",
        f"per_device_train_batch_size={micro}",
        f"gradient_accumulation_steps={ACCUM}",
        "logging_steps=1",
        "save_steps=100000",
        "eval_accuracy=none",
        f"seed={SEED}",
        "lora.r=16",
        "lora.alpha=32",
        "lora.dropout=0.05",
    ]


def trl_settings(work: Path, max_steps: int) -> dict[str, Any]:
    """SFTConfig keywords both TRL comparisons share: the settings of ``sftrun_overrides``
    (fp32 on the CPU, no checkpointing, no saves, a log line a step)."""
    return {
        "output_dir": str(work / "trl"),
        "per_device_train_batch_size": MICRO,
        "gradient_accumulation_steps": ACCUM,
        "max_steps": max_steps,
        "learning_rate": LR,
        "lr_scheduler_type": "cosine",
        "logging_steps": 1,
        "save_strategy": "no",
        "report_to": [],
        "use_cpu": True,
        "seed": SEED,
        "dataloader_num_workers": 0,
        "gradient_checkpointing": False,
        "bf16": False,
        "fp16": False,
        "disable_tqdm": True,
    }


class StepClock:
    """Start time and trained (non-padding) tokens of every optimizer step, through hooks."""

    def __init__(self) -> None:
        self.starts: dict[int, float] = {}
        self.tokens: dict[int, int] = {}
        self._step = 0

    def on_step_start(self, step: int) -> None:
        import time

        self._step = step
        self.starts[step] = time.perf_counter()

    def on_batch(self, batch: dict[str, Any]) -> None:
        count = int(batch["attention_mask"].sum())
        self.tokens[self._step] = self.tokens.get(self._step, 0) + count
