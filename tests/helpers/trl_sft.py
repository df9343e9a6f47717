"""TRL's own SFTTrainer on the tests' tiny model and sample data, in its own process.

Usage: trl_sft.py MODEL TRAIN_JSONL OUTPUT_DIR [RESUME_FROM]. Trains 12 steps (global batch
2 x 2, linear LR from 5e-3 without warm-up, LoRA r=4/alpha 8/dropout 0 on q_proj and v_proj,
seed 11), saving at steps 6 and 12, and prints the per-step log records as JSON on its last
line. TRL gets sftrun's own token ids and labels (loss on the assistant tokens, its
completion-only objective) so that both sides train on the same tokens; the data order,
loss normalisation (label tokens of the whole step) and AdamW are TRL's and transformers'.
"""

from __future__ import annotations

import json
import sys

import torch
from datasets import Dataset
from peft import LoraConfig
from transformers import AutoModelForCausalLM
from trl import SFTConfig, SFTTrainer

from sftrun.encoding import tokenize_file
from sftrun.modeling import load_tokenizer

# The settings the tests' sftrun config mirrors (tests/test_import.py).
SETTINGS = {
    "per_device_train_batch_size": 2,
    "gradient_accumulation_steps": 2,
    "max_steps": 12,
    "learning_rate": 5e-3,
    "lr_scheduler_type": "linear",
    "warmup_steps": 0,
    "weight_decay": 0.0,
    "max_grad_norm": 1.0,
    "seed": 11,
    "logging_steps": 1,
    "save_strategy": "steps",
    "save_steps": 6,
}


def main() -> None:
    model_dir, train_file, output_dir = sys.argv[1:4]
    resume = sys.argv[4] if len(sys.argv) > 4 else None
    tokenizer = load_tokenizer(model_dir)
    data = tokenize_file(tokenizer, train_file, 160, "truncate", "assistant")
    rows = [
        {"input_ids": ids, "labels": labels}
        for ids, labels in zip(data.input_ids, data.labels, strict=True)
    ]
    args = SFTConfig(
        output_dir=output_dir,
        **SETTINGS,
        max_length=160,
        report_to=[],
        use_cpu=True,
        dataloader_num_workers=0,
        bf16=False,
        fp16=False,
        disable_tqdm=True,
    )
    trainer = SFTTrainer(
        model=AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32),
        args=args,
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
        peft_config=LoraConfig(
            r=4,
            lora_alpha=8,
            lora_dropout=0.0,
            target_modules=["q_proj", "v_proj"],
            task_type="CAUSAL_LM",
        ),
    )
    trainer.train(resume_from_checkpoint=resume)
    print(json.dumps([h for h in trainer.state.log_history if "loss" in h]))


if __name__ == "__main__":
    main()
