"""How conversations become training tokens: the chat template rendered, labels only where
the run trains (train_on), overlong examples truncated or dropped, the data's fingerprint,
and the padded micro-batches the loop feeds the model.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from sftrun.constants import IGNORE_INDEX
from sftrun.data import Conversation, data_sources, read_conversations
from sftrun.errors import DataError


@dataclass
class TokenizedData:
    """Token ids and labels for every kept example, plus what happened to the rest."""

    input_ids: list[list[int]]
    labels: list[list[int]]
    fingerprint: str
    counts: dict[str, int] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def num_tokens(self) -> int:
        return sum(len(x) for x in self.input_ids)

    @property
    def num_label_tokens(self) -> int:
        return sum(sum(1 for t in lab if t != IGNORE_INDEX) for lab in self.labels)


def file_sha256(path: str | Path) -> str:
    """The sha256 of a file's bytes, read in blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def source_sha256(path: Path) -> str:
    """The bytes of a data file, or of every file of a saved-dataset folder (with names)."""
    if not path.is_dir():
        return file_sha256(path)
    files = sorted(f for f in path.rglob("*") if f.is_file())
    listing = [(str(f.relative_to(path)), file_sha256(f)) for f in files]
    return hashlib.sha256(json.dumps(listing).encode()).hexdigest()


def data_fingerprint(value: str | Path | list[str], render: dict[str, Any]) -> str:
    """Content hash of the data source(s) plus the settings that turn them into tokens.
    (One file hashes as it always has, so older checkpoints keep matching.)"""
    sources = data_sources(value)
    hashes: Any = [source_sha256(p) for p in sources]
    if not isinstance(value, list) and not sources[0].is_dir():
        hashes = hashes[0]
    payload = json.dumps({"sha256": hashes, "render": render}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()


def _render(
    tokenizer: Any, messages: list[dict[str, str]], generation_prompt: bool, source: str
) -> str:
    import jinja2

    try:
        text = tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=generation_prompt
        )
    except jinja2.TemplateError as exc:  # raise_exception(...) in the template, or a bad name
        raise DataError(
            f"{source}: the chat template refused this record ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else 'no detail'}); fix the record or the "
            "template (chat_template)"
        ) from None
    assert isinstance(text, str)
    return text


def assistant_spans(tokenizer: Any, conv: Conversation) -> tuple[str, list[tuple[int, int]]]:
    """Render a conversation and return the character spans of each assistant reply.

    A span runs from the end of the generation prompt to the end of that reply as the
    template renders it (so it includes the end-of-turn token the model must learn).
    """
    if not tokenizer.chat_template:
        raise DataError(
            f"{conv.source}: a chat record, but the model's tokenizer has no chat template; "
            "set chat_template: chatml (or a path to a Jinja file), or use text or plain "
            "prompt-completion records"
        )
    full = _render(tokenizer, conv.messages, False, conv.source)
    spans = []
    for i, msg in enumerate(conv.messages):
        if msg["role"] != "assistant" or i < conv.first_trained:
            continue
        prompt = _render(tokenizer, conv.messages[:i], True, conv.source)
        upto = _render(tokenizer, conv.messages[: i + 1], False, conv.source)
        if not (upto.startswith(prompt) and full.startswith(upto)):
            raise DataError(
                f"{conv.source}: the chat template does not render conversations "
                "prefix by prefix, so assistant tokens cannot be located; use a template "
                "whose output for the first k turns is a prefix of the output for k+1"
            )
        spans.append((len(prompt), len(upto)))
    return full, spans


def encode(tokenizer: Any, conv: Conversation, train_on: str) -> tuple[list[int], list[int]]:
    """Token ids and labels (IGNORE_INDEX where no loss) for one record.

    Chat records render through the chat template and learn the assistant replies. Raw-text
    records (``text``, plain prompt-completion) are tokenized as they are, with the
    tokenizer's own special tokens (a BOS where the model expects one), then the
    end-of-sequence token; they learn the completion (all of ``text``) and that EOS.
    """
    if conv.text is None:
        text, spans = assistant_spans(tokenizer, conv)
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        eos: list[int] = []
    else:
        prompt, completion = conv.text
        spans = [(len(prompt), len(prompt) + len(completion))]
        enc = tokenizer(prompt + completion, return_offsets_mapping=True)
        eos = [] if tokenizer.eos_token_id is None else [int(tokenizer.eos_token_id)]
    ids: list[int] = list(enc["input_ids"])
    if train_on == "all":
        return ids + eos, ids + eos
    labels = []
    for tok_id, (start, end) in zip(ids, enc["offset_mapping"], strict=True):
        inside = any(a <= start < b for a, b in spans) and end > start
        labels.append(tok_id if inside else IGNORE_INDEX)
    return ids + eos, labels + eos


def tokenize_file(
    tokenizer: Any,
    path: str | Path | list[str],
    max_seq_length: int,
    overlong: str = "truncate",
    train_on: str = "assistant",
    fingerprint: str | None = None,
) -> TokenizedData:
    """Read, validate and tokenize a data file; count truncated and dropped examples.
    ``fingerprint`` is ``data_fingerprint`` of these settings when the caller has it."""
    convs = read_conversations(path)
    render = {"max_seq_length": max_seq_length, "overlong": overlong, "train_on": train_on}
    counts = {"records": len(convs), "truncated": 0, "dropped": 0}
    for conv in convs:
        counts[f"format_{conv.fmt}"] = counts.get(f"format_{conv.fmt}", 0) + 1
    all_ids: list[list[int]] = []
    all_labels: list[list[int]] = []
    for conv in convs:
        ids, labels = encode(tokenizer, conv, train_on)
        if len(ids) > max_seq_length:
            if overlong == "drop":
                counts["dropped"] += 1
                continue
            ids, labels = ids[:max_seq_length], labels[:max_seq_length]
            # Label i is predicted from position i-1, so a label at position 0 never counts.
            if all(t == IGNORE_INDEX for t in labels[1:]):
                counts["dropped"] += 1
                continue
            counts["truncated"] += 1
        all_ids.append(ids)
        all_labels.append(labels)
    if not all_ids:
        raise DataError(
            f"{path}: every example was dropped (longer than max_seq_length={max_seq_length} "
            "with no assistant tokens left); raise max_seq_length"
        )
    fingerprint = fingerprint or data_fingerprint(path, render)
    return TokenizedData(all_ids, all_labels, fingerprint, counts)


def collate(data: TokenizedData, indices: list[int], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad the chosen examples into one batch."""
    width = max(len(data.input_ids[i]) for i in indices)
    n = len(indices)
    input_ids = torch.full((n, width), pad_token_id, dtype=torch.long)
    labels = torch.full((n, width), IGNORE_INDEX, dtype=torch.long)
    attention = torch.zeros((n, width), dtype=torch.long)
    for row, i in enumerate(indices):
        ids = data.input_ids[i]
        input_ids[row, : len(ids)] = torch.tensor(ids)
        labels[row, : len(ids)] = torch.tensor(data.labels[i])
        attention[row, : len(ids)] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention}
