"""What the benchmark scripts share: the bundled model, the sample data, and the one sftrun
configuration they all time (bench/vs_trl.py's settings)."""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
MODEL = REPO / "model/models"
TRAIN = REPO / "data/sample/train.jsonl"
MICRO, ACCUM, MAX_LEN, LR, SEED = 4, 2, 256, 2e-4, 42
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def run_child(script: str, args: list[str], **env: str) -> dict[str, Any]:
    """Run ``script`` with ``args`` in its own process (offline, from the repository root) and
    return the JSON object its last output line holds; a failed child ends the benchmark."""
    proc = subprocess.run(
        [sys.executable, str(Path(script).resolve()), *args],
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1", **env},
        cwd=REPO,
    )
    if proc.returncode != 0:
        raise SystemExit(f"child {args} failed:\n{proc.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


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


def trl_lora() -> Any:
    """The LoRA both TRL comparisons give TRL: sftrun's r=16 / alpha 32 / dropout 0.05."""
    from peft import LoraConfig

    return LoraConfig(
        r=16, lora_alpha=32, lora_dropout=0.05, target_modules=TARGETS, task_type="CAUSAL_LM"
    )


class StepClock:
    """Start time, process CPU time (user and kernel, every thread) and trained (non-padding)
    tokens of every optimizer step, through hooks."""

    def __init__(self) -> None:
        self.starts: dict[int, float] = {}
        self.cpu: dict[int, tuple[float, float]] = {}
        self.tokens: dict[int, int] = {}
        self.labels: dict[int, int] = {}
        self._step = 0

    def on_step_start(self, step: int) -> None:
        import resource
        import time

        self._step = step
        self.starts[step] = time.perf_counter()
        usage = resource.getrusage(resource.RUSAGE_SELF)
        self.cpu[step] = (usage.ru_utime, usage.ru_stime)

    def on_batch(self, batch: dict[str, Any]) -> None:
        count = int(batch["attention_mask"].sum())
        self.tokens[self._step] = self.tokens.get(self._step, 0) + count
        # Positions whose next token carries a loss: where sftrun runs the LM head.
        heads = int((batch["labels"][:, 1:] != -100).sum())
        self.labels[self._step] = self.labels.get(self._step, 0) + heads


def full_head_loss(peft_model: Any) -> Any:
    """Ablation loss: the LM head over every position, as a stock causal-LM forward does."""
    import torch

    from sftrun.constants import IGNORE_INDEX
    from sftrun.loss import LabelOnlyLoss

    class FullHead(LabelOnlyLoss):
        def forward(self, input_ids: Any, attention_mask: Any, labels: Any) -> Any:
            logits = self.peft_model(input_ids=input_ids, attention_mask=attention_mask).logits
            targets = labels[:, 1:]
            loss = torch.nn.functional.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                targets.reshape(-1),
                ignore_index=IGNORE_INDEX,
                reduction="sum",
            )
            return loss, (targets != IGNORE_INDEX).sum()

    return FullHead(peft_model)


def matmul_peak(seconds: float = 3.0, dtype: str = "float32") -> dict[str, Any]:
    """This machine's matrix-multiply rate now in ``dtype`` (float32 or bfloat16): 2048 x 2048
    products for ``seconds``. Also says whether the CPU multiplies bf16 natively, by torch's
    own feature detection (``sftrun.hardware.cpu_bf16``: AVX512-BF16, AMX or Arm BF16)."""
    import time

    import torch

    from sftrun.hardware import cpu_bf16

    n = 2048
    kind = getattr(torch, dtype)
    a, b = torch.randn(n, n, dtype=kind), torch.randn(n, n, dtype=kind)
    torch.mm(a, b)
    count, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        torch.mm(a, b)
        count += 1
    cpu = cpu_bf16()
    return {
        "flops_per_s": 2 * n**3 * count / (time.perf_counter() - t0),
        "dtype": dtype,
        "threads": torch.get_num_threads(),
        "cpu_native_bf16": cpu.native,
        "cpu_bf16_why": cpu.why,
    }


@functools.cache
def _matmul_parameters() -> tuple[int, int]:
    """The bundled model's matmul parameters: (decoder projections, LM head)."""
    from transformers import AutoConfig

    c = AutoConfig.from_pretrained(MODEL)
    kv = c.num_key_value_heads * (c.hidden_size // c.num_attention_heads)
    layer = 2 * c.hidden_size**2 + 2 * c.hidden_size * kv + 3 * c.hidden_size * c.intermediate_size
    return layer * c.num_hidden_layers, c.vocab_size * c.hidden_size


def model_flops(tokens: float, head_rows: float) -> float:
    """Model FLOPs of training on ``tokens`` tokens with the LM head run on ``head_rows`` rows:
    4 x (matmul parameters) per row, as LoRA training with a frozen base needs a forward (2)
    and the activation gradients (2). Attention scores and the LoRA matmuls are left out."""
    decoder, head = _matmul_parameters()
    return 4.0 * (decoder * tokens + head * head_rows)


def kernel_clock() -> Any:
    """A dispatch mode that adds up the seconds spent inside matrix multiplies and attention
    kernels, forward and backward, timed one call at a time (``.seconds["matmul"]``,
    ``.seconds["attention"]``). Only the kernels are timed: the mode's own Python cost falls
    between them, so the sums hold while the wall time around them does not."""
    import time

    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    aten = torch.ops.aten
    matmuls = {aten.mm.default, aten.addmm.default, aten.addmm_.default, aten.bmm.default}

    class KernelClock(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.seconds = {"matmul": 0.0, "attention": 0.0}

        def __torch_dispatch__(
            self, func: Any, types: Any, args: Any = (), kwargs: Any = None
        ) -> Any:
            kind = "matmul" if func in matmuls else None
            if kind is None and "scaled_dot_product" in func.name():
                kind = "attention"
            if kind is None:
                return func(*args, **(kwargs or {}))
            t0 = time.perf_counter()
            out = func(*args, **(kwargs or {}))
            self.seconds[kind] += time.perf_counter() - t0
            return out

    return KernelClock()
