"""Training data: read records and normalise them into conversations.

Owns the input files (JSONL/JSON read here, line by line; Parquet, CSV, Arrow and
``Dataset.save_to_disk`` folders read through the ``datasets`` library; a list of them), the
record formats (``messages``; ShareGPT ``conversations``; Alpaca ``instruction``/``output``;
``prompt``/``completion``, plain or conversational; ``text``) and their validation; the
tokens they become are ``encoding``'s (template, loss mask, over-long handling, fingerprint,
collation). Never decides data order (see ``sampler``) and never touches checkpoints. Every
malformed record is reported as ``file:line`` (``file:row N`` for tables) before training.
"""

from __future__ import annotations

import csv
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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
    """One normalised record: chat messages (or raw text) plus where it came from."""

    messages: list[dict[str, str]]
    source: str  # "file:line" or "file:row N"
    fmt: str  # messages | sharegpt | alpaca | prompt-completion | text
    # Assistant turns from this message index on carry the loss (prompt-completion: the
    # completion's turns only).
    first_trained: int = 0
    # Raw-text formats, rendered without a chat template: (prompt, completion); the loss is
    # on the completion (and the end-of-sequence token added after it). ``text``: ("", text).
    text: tuple[str, str] | None = None


def format_counts(counts: dict[str, int]) -> str:
    """'messages 300, alpaca 20' from the ``format_*`` entries of ``TokenizedData.counts``."""
    return ", ".join(
        f"{k.removeprefix('format_')} {v}" for k, v in counts.items() if k.startswith("format_")
    )


# One record (a JSONL line, a whole .json array file, a table row's text) larger than this is
# refused before it is parsed: parsing and rendering a record costs many times its size.
MAX_RECORD_BYTES = 16 << 20


# Read through the ``datasets`` library, by suffix (a folder is a ``save_to_disk`` dataset).
TABLE_SUFFIXES = (".parquet", ".csv", ".arrow")


def data_sources(value: str | Path | list[str]) -> list[Path]:
    """The paths of a ``train_file``/``eval_file`` setting: one path or a list of them."""
    return [Path(v) for v in value] if isinstance(value, list) else [Path(value)]


def describe_sources(value: str | Path | list[str]) -> str:
    """The data files a ``train_file`` value names, for messages."""
    return ", ".join(str(p) for p in data_sources(value))


def _is_saved_dataset(p: Path) -> bool:
    return (p / "state.json").is_file() and (p / "dataset_info.json").is_file()


def check_data_file(value: str | Path | list[str], key: str = "train_file") -> list[Path]:
    """Raise DataError unless every source of ``value`` exists and is readable as data
    (a file, or a folder written by ``Dataset.save_to_disk``); return the paths."""
    sources = data_sources(value)
    if not sources:
        raise DataError(f"{key} is an empty list; name at least one data file")
    for p in sources:
        if not p.exists():
            raise DataError(f"data file not found: {p}; check {key} in the config")
        if p.is_dir() and (p / "dataset_dict.json").is_file():
            splits = sorted(c.name for c in p.iterdir() if _is_saved_dataset(c))
            raise DataError(
                f"{key} {p} holds several splits ({', '.join(splits) or 'none'}); "
                f"name one of them, e.g. {p / (splits[0] if splits else 'train')}"
            )
        if p.is_dir() and not _is_saved_dataset(p):
            raise DataError(
                f"{key} {p} is a folder but not one written by Dataset.save_to_disk (no "
                "state.json/dataset_info.json); point it at a data file or such a folder"
            )
        if not p.is_dir() and not p.is_file():
            raise DataError(f"{key} {p} is not a regular file; point it at a data file")
    return sources


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


def json_problem(text: str | bytes) -> tuple[Any, str | None]:
    """``json.loads(text)`` and None, or None and what is wrong, in words: invalid JSON, nesting
    deeper than Python's parser goes, or an integer longer than Python converts (4300 digits)."""
    try:
        return json.loads(text), None
    except json.JSONDecodeError as exc:
        return None, f"not valid JSON ({exc.msg} at column {exc.colno})"
    except RecursionError:
        return None, "JSON nested too deeply (over ~1000 levels)"
    except ValueError as exc:  # int_max_str_digits
        return None, f"a JSON number is too long ({str(exc).split(';')[0].split(':')[-1].strip()})"


def _parse_line(path: Path, lineno: int, text: str, lenient: bool) -> Any:
    value, problem = json_problem(text)
    if problem is None:
        return value
    error = DataError(f"{path}:{lineno}: {problem}; each line must be one JSON object")
    if lenient:
        return error
    raise error from None


def _read_records(path: Path, lenient: bool = False) -> list[tuple[str, Any]]:
    """("file:line" or "file:row N", parsed record) pairs from one data source.

    The one reader behind training and ``sftrun data validate``. JSONL/JSON: accepts a UTF-8
    BOM; a line that is not UTF-8, or longer than MAX_RECORD_BYTES, is an error naming
    file:line. With ``lenient``, a record that does not parse becomes a DataError entry.
    """
    check_data_file(path)
    if path.is_dir() or path.suffix in TABLE_SUFFIXES:
        return _read_table(path, lenient)
    return [(f"{path}:{n}", obj) for n, obj in _read_json(path, lenient)]


def _load_table(path: Path, cache: str) -> Any:
    """A ``datasets.Dataset`` of the file or folder (CSV cells read as text, unchanged)."""
    import datasets

    datasets.disable_progress_bars()
    if path.is_dir():
        return datasets.load_from_disk(str(path), keep_in_memory=True)
    if path.suffix == ".arrow":
        return datasets.Dataset.from_file(str(path), in_memory=True)
    if path.suffix == ".parquet":
        return datasets.Dataset.from_parquet(str(path), cache_dir=cache, keep_in_memory=True)
    with open(path, encoding="utf-8-sig", newline="") as fh:  # every column is text
        header = next(csv.reader(fh), [])
    features = datasets.Features({name: datasets.Value("string") for name in header})
    return datasets.Dataset.from_csv(
        str(path),
        cache_dir=cache,
        keep_in_memory=True,
        features=features,
        keep_default_na=False,
        encoding="utf-8-sig",
    )


# Columns that hold a list of turns; in a CSV file they are JSON text.
TURN_COLUMNS = ("messages", "conversations")


def _text_size(value: Any) -> int:
    """Bytes of text in a table row (its strings, UTF-8), counted without copying them."""
    if isinstance(value, str):
        return len(value) if value.isascii() else len(value.encode("utf-8", "surrogatepass"))
    if isinstance(value, bytes):
        return len(value)
    if isinstance(value, dict):
        return sum(_text_size(k) + _text_size(v) for k, v in value.items())
    if isinstance(value, list | tuple):
        return sum(_text_size(v) for v in value)
    return 8


def _read_table(path: Path, lenient: bool) -> list[tuple[str, Any]]:
    """Rows of a Parquet/CSV/Arrow file or a save_to_disk folder, as records.

    A missing value (null; an empty CSV cell) is an absent key, as in a JSONL record that
    leaves it out. Rows are named by their 0-based index (``dataset[N]``).
    """
    kind = "a saved dataset" if path.is_dir() else path.suffix.lstrip(".").upper()
    with tempfile.TemporaryDirectory(prefix="sftrun-datasets-") as cache:
        try:
            rows = _load_table(path, cache).to_list()
        except Exception as exc:  # pyarrow, pandas and datasets each raise their own
            reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
            raise DataError(
                f"{path}: cannot be read as {kind} ({reason}); check that the file is complete"
            ) from None
    is_csv = path.suffix == ".csv"
    records: list[tuple[str, Any]] = []
    for i, row in enumerate(rows):
        where = f"{path}:row {i}"
        record = {k: v for k, v in row.items() if v is not None and not (is_csv and v == "")}
        try:
            if (size := _text_size(record)) > MAX_RECORD_BYTES:
                raise DataError(
                    f"{where}: a record of {size >> 20} MiB of text is over the "
                    f"{MAX_RECORD_BYTES >> 20} MiB limit; split or shorten it"
                )
            for key in TURN_COLUMNS if is_csv else ():
                if key in record:
                    record[key] = _parse_cell(record[key], where, key)
        except DataError as exc:
            if not lenient:
                raise
            records.append((where, exc))
            continue
        records.append((where, record))
    return records


def _parse_cell(text: str, where: str, key: str) -> Any:
    value, problem = json_problem(text)
    if problem is not None:
        raise DataError(
            f"{where}: the {key!r} cell is {problem}; in CSV a list of turns is written as "
            "JSON text"
        ) from None
    return value


def _read_json(path: Path, lenient: bool) -> list[tuple[int, Any]]:
    """(line-or-item number, parsed object) pairs from a JSONL or JSON-array file."""
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
            except (ValueError, RecursionError):  # too deep, or a number too long
                raise DataError(f"{path}: {json_problem(text)[1]}") from None
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
    """Turn one parsed record into a Conversation, or raise DataError naming ``where``."""
    if not isinstance(record, dict):
        raise DataError(f"{where}: a record must be a JSON object, got {type(record).__name__}")
    if "messages" in record:
        messages = _turns(record["messages"], where, "messages", "role", "content")
        return _chat(messages, where, "messages")
    if "conversations" in record:
        messages = _turns(record["conversations"], where, "conversations", "from", "value")
        return _chat(messages, where, "sharegpt")
    if "prompt" in record or "completion" in record:
        return _prompt_completion(record, where)
    if "instruction" in record:
        return _alpaca(record, where)
    if "text" in record:
        text = _as_text(record["text"], where, "text")
        if not text.strip():
            raise DataError(f"{where}: 'text' is empty, so there is nothing to learn from")
        return Conversation([], where, "text", text=("", text))
    keys = ", ".join(sorted(record)) or "none"
    raise DataError(
        f"{where}: unknown record format (keys: {keys}); expected 'messages', "
        "'conversations' (ShareGPT), 'prompt'/'completion', 'instruction'/'output' (Alpaca) "
        "or 'text'"
    )


def _turns(turns: Any, where: str, key: str, role_key: str, text_key: str) -> list[dict[str, str]]:
    """A list of chat turns, validated and with role names normalised."""
    if not isinstance(turns, list) or not turns:
        raise DataError(f"{where}: {key!r} must be a non-empty list of turns")
    messages = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict) or role_key not in turn or text_key not in turn:
            raise DataError(
                f"{where}: turn {i} of {key!r} must be an object with {role_key!r} and {text_key!r}"
            )
        role = ROLE_ALIASES.get(str(turn[role_key]).lower())
        if role is None:
            raise DataError(
                f"{where}: turn {i} of {key!r} has unknown role {turn[role_key]!r}; "
                f"use one of {', '.join(sorted(ROLE_ALIASES))}"
            )
        messages.append({"role": role, "content": _as_text(turn[text_key], where, text_key)})
    return messages


def _chat(messages: list[dict[str, str]], where: str, fmt: str, first: int = 0) -> Conversation:
    if not any(m["role"] == "assistant" for m in messages[first:]):
        what = "no assistant turn in the completion" if first else "no assistant turn"
        raise DataError(f"{where}: {what}, so nothing to learn from this record")
    if messages[0]["role"] == "assistant":
        raise DataError(f"{where}: the first turn is an assistant reply; start with system or user")
    return Conversation(messages, where, fmt, first_trained=first)


def _prompt_completion(record: dict[str, Any], where: str) -> Conversation:
    """TRL's prompt-completion records: both text (no chat template), or both turn lists."""
    for key in ("prompt", "completion"):
        if key not in record:
            raise DataError(f"{where}: a prompt-completion record has no {key!r}")
    prompt, completion = record["prompt"], record["completion"]
    if isinstance(prompt, str) and isinstance(completion, str):
        if not completion:
            raise DataError(f"{where}: 'completion' is empty, so there is nothing to learn from")
        return Conversation([], where, "prompt-completion", text=(prompt, completion))
    if isinstance(prompt, list) and isinstance(completion, list):
        head = _turns(prompt, where, "prompt", "role", "content")
        tail = _turns(completion, where, "completion", "role", "content")
        return _chat(head + tail, where, "prompt-completion", first=len(head))
    raise DataError(
        f"{where}: 'prompt' and 'completion' must both be text or both lists of turns, got "
        f"{type(prompt).__name__} and {type(completion).__name__}"
    )


def _alpaca(record: dict[str, Any], where: str) -> Conversation:
    instruction = _as_text(record["instruction"], where, "instruction")
    extra = _as_text(record.get("input", ""), where, "input")
    if "output" not in record:
        raise DataError(f"{where}: Alpaca record has no 'output'")
    output = _as_text(record["output"], where, "output")
    user = f"{instruction}\n\n{extra}" if extra.strip() else instruction
    messages = [{"role": "user", "content": user}, {"role": "assistant", "content": output}]
    if "system" in record:
        messages.insert(
            0, {"role": "system", "content": _as_text(record["system"], where, "system")}
        )
    return Conversation(messages, where, "alpaca")


def read_conversations(value: str | Path | list[str]) -> list[Conversation]:
    """Read and validate every record of the data source(s); raise DataError at the first
    bad one."""
    convs = []
    for p in check_data_file(value):
        records = _read_records(p)
        if not records:
            raise DataError(f"{p}: no records; the file is empty")
        convs += [normalise(obj, where) for where, obj in records]
    return convs


def validate_file(path: str | Path) -> tuple[list[Conversation], list[str]]:
    """Check every record; return the good conversations and one message per bad record."""
    p = Path(path)
    try:
        records = _read_records(p, lenient=True)
    except DataError as exc:
        return [], [str(exc)]
    good, errors = [], []
    for where, obj in records:
        if isinstance(obj, DataError):
            errors.append(str(obj))
            continue
        try:
            good.append(normalise(obj, where))
        except DataError as exc:
            errors.append(str(exc))
    if not records:
        errors.append(f"{p}: no records; the file is empty")
    return good, errors
