"""Training data: read records, normalise them to chat messages, tokenize with a loss mask.

Owns the three input formats (``messages``; ShareGPT ``conversations``; Alpaca
``instruction``/``input``/``output``), rendering through the tokenizer's chat template, the
assistant-only loss mask, over-long handling, the data fingerprint and batch collation.
Never decides data order (see ``sampler``) and never touches checkpoints. Every malformed
record is reported as ``file:line`` before any training starts.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from sftrun.constants import IGNORE_INDEX
from sftrun.errors import DataError

ROLE_ALIASES = {
    "system": "system",
    "user": "user",
    "human": "user",
    "assistant": "assistant",
    "gpt": "assistant",
    "model": "assistant",
}


@dataclass(frozen=True)
class Conversation:
    """One normalised record: chat messages plus where it came from."""

    messages: list[dict[str, str]]
    source: str  # "file:line"
    fmt: str  # messages | sharegpt | alpaca


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


def format_counts(counts: dict[str, int]) -> str:
    """'messages 300, alpaca 20' from the ``format_*`` entries of ``TokenizedData.counts``."""
    return ", ".join(
        f"{k.removeprefix('format_')} {v}" for k, v in counts.items() if k.startswith("format_")
    )


# One record (a JSONL line, or a whole .json array file) larger than this is refused before
# it is read into memory: parsing and rendering a record costs many times its size.
MAX_RECORD_BYTES = 16 << 20


def check_data_file(path: str | Path, key: str = "train_file") -> Path:
    """Raise DataError unless ``path`` is an existing regular file; return it as a Path."""
    p = Path(path)
    if not p.exists():
        raise DataError(f"data file not found: {p}; check {key} in the config")
    if not p.is_file():
        raise DataError(
            f"{key} {p} is not a file (a folder?); point {key} at a .jsonl or .json file"
        )
    return p


def _decode(raw: bytes, path: Path, lineno: int) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(
            f"{path}:{lineno}: not UTF-8 text (byte 0x{raw[exc.start]:02x} at column "
            f"{exc.start + 1}); save the file as UTF-8"
        ) from None


def _is_array_file(path: Path, head: bytes) -> bool:
    """A JSON array file: ``.json``, or any name but ``.jsonl`` whose text starts with '['."""
    if path.suffix == ".json":
        return True
    return path.suffix != ".jsonl" and head.lstrip(b"\xef\xbb\xbf \t\r\n").startswith(b"[")


def _parse_line(path: Path, lineno: int, text: str, lenient: bool) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        error = DataError(
            f"{path}:{lineno}: not valid JSON ({exc.msg} at column {exc.colno}); "
            "each line must be one JSON object"
        )
        if lenient:
            return error
        raise error from None


def _read_records(path: Path, lenient: bool = False) -> list[tuple[int, Any]]:
    """(line-or-item number, parsed object) pairs from a JSONL or JSON-array file.

    The one reader behind training and ``sftrun data validate``. Accepts a UTF-8 BOM; a
    line that is not UTF-8, or longer than MAX_RECORD_BYTES, is an error naming file:line.
    With ``lenient``, a JSONL line that does not parse becomes a DataError entry instead.
    """
    check_data_file(path)
    with open(path, "rb") as fh:
        head = fh.read(4096)
        fh.seek(0)
        if _is_array_file(path, head):
            size = os.fstat(fh.fileno()).st_size
            if size > MAX_RECORD_BYTES:
                raise DataError(
                    f"{path}: a JSON array file of {size >> 20} MiB is over the "
                    f"{MAX_RECORD_BYTES >> 20} MiB limit; write the records as JSONL instead "
                    "(one object per line)"
                )
            text = _decode(fh.read(), path, 1).removeprefix("\ufeff")
            try:
                items = json.loads(text)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{exc.lineno}: not valid JSON ({exc.msg})") from None
            if not isinstance(items, list):
                raise DataError(f"{path}: a .json data file must hold a list of records")
            # A JSON array has no per-record lines; number records from 1 instead.
            return list(enumerate(items, start=1))
        records = []
        for lineno, raw in enumerate(iter(lambda: fh.readline(MAX_RECORD_BYTES + 1), b""), 1):
            if len(raw) > MAX_RECORD_BYTES:
                raise DataError(
                    f"{path}:{lineno}: a record longer than {MAX_RECORD_BYTES >> 20} MiB; "
                    "remove or shorten it (it could never fit max_seq_length)"
                )
            text = _decode(raw, path, lineno)
            if lineno == 1:
                text = text.removeprefix("\ufeff")
            if text.strip():
                records.append((lineno, _parse_line(path, lineno, text, lenient)))
    return records


def _as_text(value: Any, where: str, key: str) -> str:
    if not isinstance(value, str):
        raise DataError(f"{where}: {key!r} must be a string, got {type(value).__name__}")
    return value


def normalise(record: Any, where: str) -> Conversation:
    """Turn one parsed record into chat messages, or raise DataError naming ``where``."""
    if not isinstance(record, dict):
        raise DataError(f"{where}: a record must be a JSON object, got {type(record).__name__}")
    if "messages" in record:
        fmt, turns, role_key, text_key = "messages", record["messages"], "role", "content"
    elif "conversations" in record:
        fmt, turns, role_key, text_key = "sharegpt", record["conversations"], "from", "value"
    elif "instruction" in record:
        fmt = "alpaca"
        instruction = _as_text(record["instruction"], where, "instruction")
        extra = _as_text(record.get("input", ""), where, "input")
        if "output" not in record:
            raise DataError(f"{where}: Alpaca record has no 'output'")
        output = _as_text(record["output"], where, "output")
        user = f"{instruction}\n\n{extra}" if extra.strip() else instruction
        messages = [{"role": "user", "content": user}, {"role": "assistant", "content": output}]
        if "system" in record:
            system = _as_text(record["system"], where, "system")
            messages.insert(0, {"role": "system", "content": system})
        return Conversation(messages, where, fmt)
    else:
        keys = ", ".join(sorted(record)) or "none"
        raise DataError(
            f"{where}: unknown record format (keys: {keys}); expected 'messages', "
            "'conversations' (ShareGPT) or 'instruction'/'output' (Alpaca)"
        )
    if not isinstance(turns, list) or not turns:
        raise DataError(f"{where}: {fmt!r} must be a non-empty list of turns")
    messages = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict) or role_key not in turn or text_key not in turn:
            raise DataError(
                f"{where}: turn {i} must be an object with {role_key!r} and {text_key!r}"
            )
        role = ROLE_ALIASES.get(str(turn[role_key]).lower())
        if role is None:
            raise DataError(
                f"{where}: turn {i} has unknown role {turn[role_key]!r}; "
                f"use one of {', '.join(sorted(ROLE_ALIASES))}"
            )
        messages.append({"role": role, "content": _as_text(turn[text_key], where, text_key)})
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError(f"{where}: no assistant turn, so nothing to learn from this record")
    if messages[0]["role"] == "assistant":
        raise DataError(f"{where}: the first turn is an assistant reply; start with system or user")
    return Conversation(messages, where, fmt)


def read_conversations(path: str | Path) -> list[Conversation]:
    """Read and validate every record of a data file; raise DataError at the first bad one."""
    p = Path(path)
    records = _read_records(p)
    if not records:
        raise DataError(f"{p}: no records; the file is empty")
    return [normalise(obj, f"{p}:{n}") for n, obj in records]


def validate_file(path: str | Path) -> tuple[list[Conversation], list[str]]:
    """Check every record; return the good conversations and one message per bad record."""
    p = Path(path)
    try:
        records = _read_records(p, lenient=True)
    except DataError as exc:
        return [], [str(exc)]
    good, errors = [], []
    for n, obj in records:
        if isinstance(obj, DataError):
            errors.append(str(obj))
            continue
        try:
            good.append(normalise(obj, f"{p}:{n}"))
        except DataError as exc:
            errors.append(str(exc))
    if not records:
        errors.append(f"{p}: no records; the file is empty")
    return good, errors


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def data_fingerprint(path: str | Path, render: dict[str, Any]) -> str:
    """Content hash of the file plus the settings that turn it into tokens."""
    payload = json.dumps({"sha256": file_sha256(path), "render": render}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()


def _render(tokenizer: Any, messages: list[dict[str, str]], generation_prompt: bool) -> str:
    text = tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=generation_prompt
    )
    assert isinstance(text, str)
    return text


def assistant_spans(tokenizer: Any, conv: Conversation) -> tuple[str, list[tuple[int, int]]]:
    """Render a conversation and return the character spans of each assistant reply.

    A span runs from the end of the generation prompt to the end of that reply as the
    template renders it (so it includes the end-of-turn token the model must learn).
    """
    full = _render(tokenizer, conv.messages, False)
    spans = []
    for i, msg in enumerate(conv.messages):
        if msg["role"] != "assistant":
            continue
        prompt = _render(tokenizer, conv.messages[:i], True)
        upto = _render(tokenizer, conv.messages[: i + 1], False)
        if not (upto.startswith(prompt) and full.startswith(upto)):
            raise DataError(
                f"{conv.source}: the chat template does not render conversations "
                "prefix by prefix, so assistant tokens cannot be located; use a template "
                "whose output for the first k turns is a prefix of the output for k+1"
            )
        spans.append((len(prompt), len(upto)))
    return full, spans


def encode(tokenizer: Any, conv: Conversation, train_on: str) -> tuple[list[int], list[int]]:
    """Token ids and labels (IGNORE_INDEX where no loss) for one conversation."""
    text, spans = assistant_spans(tokenizer, conv)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids: list[int] = list(enc["input_ids"])
    if train_on == "all":
        return ids, list(ids)
    labels = []
    for tok_id, (start, end) in zip(ids, enc["offset_mapping"], strict=True):
        inside = any(a <= start < b for a, b in spans) and end > start
        labels.append(tok_id if inside else IGNORE_INDEX)
    return ids, labels


def tokenize_file(
    tokenizer: Any,
    path: str | Path,
    max_seq_length: int,
    overlong: str = "truncate",
    train_on: str = "assistant",
) -> TokenizedData:
    """Read, validate and tokenize a data file; count truncated and dropped examples."""
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
    return TokenizedData(all_ids, all_labels, data_fingerprint(path, render), counts)


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
