"""Held-out evaluation: loss over labelled tokens and accuracy of generated replies.

Owns the scorers (exact text, JSON equality) and batched greedy generation. Never changes
the model's weights, and never consumes the global RNG (so evaluating during training cannot
change what training does next).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from sftrun.data import Conversation
from sftrun.encoding import TokenizedData, collate


def score_exact(pred: str, ref: str) -> bool:
    """True when the prediction equals the reference, ignoring surrounding white space."""
    return pred.strip() == ref.strip()


def score_json(pred: str, ref: str) -> bool:
    """True when both parse as JSON and are equal (key order and spacing do not matter)."""
    try:
        return bool(json.loads(pred) == json.loads(ref))
    except (ValueError, TypeError, RecursionError):  # not JSON, too deep, a number too long
        return False


SCORERS = {"exact": score_exact, "json": score_json}


@dataclass
class AccuracyResult:
    """Held-out generation accuracy, with each sample's prediction."""

    accuracy: float
    correct: int
    total: int
    samples: list[dict[str, Any]]  # prompt, reference, prediction, correct


def split_prompt(conv: Conversation, tokenizer: Any) -> tuple[str, str, str] | None:
    """(text to generate from, prompt as shown, reference) for one held-out record.

    Chat records: everything before the last assistant reply, through the chat template, and
    that reply. Plain prompt-completion records: the prompt as it is, and the completion.
    ``text`` records have no reply to score: None.
    """
    if conv.text is not None:
        prompt, completion = conv.text
        if not prompt:
            return None
        # As in training, where the tokenizer adds its special tokens to raw text.
        bos = tokenizer.bos_token_id
        added = tokenizer("", add_special_tokens=True)["input_ids"]
        lead = tokenizer.bos_token if bos is not None and added[:1] == [bos] else ""
        return lead + prompt, prompt[-200:], completion
    last = max(i for i, m in enumerate(conv.messages) if m["role"] == "assistant")
    text = tokenizer.apply_chat_template(
        conv.messages[:last], tokenize=False, add_generation_prompt=True
    )
    return text, conv.messages[last - 1]["content"], conv.messages[last]["content"]


@torch.no_grad()
def generation_accuracy(
    model: Any,
    tokenizer: Any,
    convs: list[Conversation],
    scorer: str,
    max_new_tokens: int,
    batch_size: int,
    device: torch.device,
    synced: bool = False,
) -> AccuracyResult:
    """Greedy-generate a reply for each held-out prompt and score it against the reference
    (records with nothing to score, ``text``, are left out).

    ``synced``: every process runs this together (a sharded model); each keeps stepping until
    all have finished, as a sharded forward needs every process.
    """
    score = SCORERS[scorer]
    tasks = [t for t in (split_prompt(c, tokenizer) for c in convs) if t is not None]
    was_training = model.training
    model.eval()
    samples = []
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # generation continues from the right edge
    # Shown on a terminal only (tqdm's disable=None); the slow part of every evaluation.
    bar = tqdm(total=len(tasks), desc="generating", unit="reply", leave=False, disable=None)
    try:
        with torch.random.fork_rng(devices=[]):
            for start in range(0, len(tasks), batch_size):
                chunk = tasks[start : start + batch_size]
                texts, prompts, refs = zip(*chunk, strict=True)
                enc = tokenizer(
                    list(texts), return_tensors="pt", padding=True, add_special_tokens=False
                ).to(device)
                out = model.generate(
                    **enc,
                    max_new_tokens=max_new_tokens,
                    do_sample=False,
                    pad_token_id=tokenizer.pad_token_id,
                    eos_token_id=tokenizer.eos_token_id,
                    synced_gpus=synced,
                )
                new = out[:, enc["input_ids"].shape[1] :]
                for prompt, ref, ids in zip(prompts, refs, new, strict=True):
                    pred = tokenizer.decode(ids, skip_special_tokens=True).strip()
                    samples.append(
                        {
                            "prompt": prompt,
                            "reference": ref,
                            "prediction": pred,
                            "correct": score(pred, ref),
                        }
                    )
                bar.update(len(chunk))
    finally:
        bar.close()
        tokenizer.padding_side = side
        model.train(was_training)
    correct = sum(1 for s in samples if s["correct"])
    return AccuracyResult(correct / max(1, len(samples)), correct, len(samples), samples)


@torch.no_grad()
def eval_loss(
    loss_module: nn.Module, data: TokenizedData, batch_size: int, pad_id: int, device: torch.device
) -> float:
    """Mean cross-entropy per labelled token over the whole held-out set."""
    was_training = loss_module.training
    loss_module.eval()
    total, count = 0.0, 0
    try:
        for start in range(0, len(data), batch_size):
            idx = list(range(start, min(len(data), start + batch_size)))
            batch = {k: v.to(device) for k, v in collate(data, idx, pad_id).items()}
            loss_sum, n = loss_module(**batch)
            total += float(loss_sum)
            count += int(n)
    finally:
        loss_module.train(was_training)
    return total / max(1, count)
