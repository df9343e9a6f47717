"""Pipeline stage 1 (``outputs/1_data/``): validated, tokenized data, its cache and stats.

Owns the tokenized cache (one safetensors file per data fingerprint + tokenizer, so that
repeated runs and resumes do not re-tokenize) and the stats report. Never decides data order
or touches checkpoints. The cache holds integers only (safetensors); nothing in it can run code,
and it carries the sha256 of its tokens: a cache that was rewritten or damaged is rebuilt,
never trained on.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

import safetensors.torch
import torch

from sftrun import constants as C
from sftrun import fs
from sftrun.config import TrainingConfig
from sftrun.constants import IGNORE_INDEX
from sftrun.data import check_data_file, describe_sources, format_counts
from sftrun.encoding import TokenizedData, data_fingerprint, tokenize_file
from sftrun.errors import DataError, DiskSpaceError

CACHE_DIR = Path(C.DATA_STAGE_DIR) / "cache"
log = logging.getLogger("sftrun")


def cache_key(fingerprint: str, tokenizer_sha: str) -> str:
    """The cache file's name: the data fingerprint with the tokenizer's."""
    return hashlib.sha256(f"{fingerprint}:{tokenizer_sha}".encode()).hexdigest()[:32]


def _save_cache(target: Path, data: TokenizedData) -> None:
    lengths = torch.tensor([len(x) for x in data.input_ids], dtype=torch.int64)
    tensors = {
        "lengths": lengths,
        "input_ids": torch.tensor([t for x in data.input_ids for t in x], dtype=torch.int64),
        "labels": torch.tensor([t for x in data.labels for t in x], dtype=torch.int64),
    }
    meta = {
        "fingerprint": data.fingerprint,
        "counts": json.dumps(data.counts),
        "sha256": _tensors_sha256(tensors),
    }
    tmp = target.with_suffix(f".tmp{os.getpid()}")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fs.ops().save_tensors(tensors, tmp, metadata=meta)
        os.replace(tmp, target)  # atomic: a reader sees the old file, the new one, or none
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        if exc.errno == errno.ENOSPC:
            raise DiskSpaceError(
                f"disk full while writing the tokenized data cache {target}; the partial "
                f"file was removed; free space on that disk and start again"
            ) from None
        raise DataError(
            f"could not write the tokenized data cache {target} ({exc.strerror}); make "
            f"{CACHE_DIR} writable"
        ) from None


def _tensors_sha256(tensors: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for key in ("lengths", "input_ids", "labels"):
        digest.update(key.encode())
        digest.update(tensors[key].contiguous().numpy().tobytes())
    return digest.hexdigest()


def _load_cache(target: Path, fingerprint: str) -> TokenizedData | None:
    """The cached tokens, or None (tokenize again) when the file is missing, unreadable, for
    other data, or does not match the checksum written with it (a changed or damaged cache is
    never trained on)."""
    if not target.exists():
        return None
    try:
        with safetensors.safe_open(str(target), framework="pt") as fh:
            meta = fh.metadata() or {}
            tensors = {k: fh.get_tensor(k) for k in ("lengths", "input_ids", "labels")}
        counts = json.loads(meta["counts"])
        problem = None
        if meta.get("fingerprint") != fingerprint:
            problem = "it was written for other data"
        elif meta.get("sha256") != _tensors_sha256(tensors):
            problem = "its tokens do not match its checksum (changed or damaged)"
        elif int(tensors["lengths"].sum()) != len(tensors["input_ids"]) or len(
            tensors["input_ids"]
        ) != len(tensors["labels"]):
            problem = "its lengths do not add up"
    except (OSError, safetensors.SafetensorError, KeyError, ValueError, TypeError):
        problem = "it cannot be read"
    if problem is not None:
        log.warning("tokenized data cache %s: %s; tokenizing again", target, problem)
        return None
    ids, labels = [], []
    start = 0
    flat_ids, flat_labels = tensors["input_ids"].tolist(), tensors["labels"].tolist()
    for n in tensors["lengths"].tolist():
        ids.append(flat_ids[start : start + n])
        labels.append(flat_labels[start : start + n])
        start += n
    return TokenizedData(ids, labels, meta["fingerprint"], counts)


def load_or_tokenize(
    tokenizer: Any,
    tokenizer_sha: str,
    path: str | Path | list[str],
    max_seq_length: int,
    overlong: str,
    train_on: str,
) -> tuple[TokenizedData, bool]:
    """Tokenized data from the cache when present; return it and whether the cache served it."""
    check_data_file(path)
    render = {"max_seq_length": max_seq_length, "overlong": overlong, "train_on": train_on}
    fingerprint = data_fingerprint(path, render)  # hashed once: the key and the data's own
    target = CACHE_DIR / f"{cache_key(fingerprint, tokenizer_sha)}.safetensors"
    cached = _load_cache(target, fingerprint)
    if cached is not None:
        return cached, True
    data = tokenize_file(tokenizer, path, max_seq_length, overlong, train_on, fingerprint)
    _save_cache(target, data)
    return data, False


def stats(data: TokenizedData) -> dict[str, Any]:
    """Counts, token-length histogram (power-of-two bins) and the share of loss tokens."""
    lengths = [len(x) for x in data.input_ids]
    hist: dict[str, int] = {}
    for n in lengths:
        upper = 1 << max(0, (n - 1).bit_length())
        key = f"{upper // 2 + 1}-{upper}"
        hist[key] = hist.get(key, 0) + 1
    return {
        "examples": len(data),
        "counts": data.counts,
        "tokens": data.num_tokens,
        "label_tokens": data.num_label_tokens,
        "assistant_token_share": data.num_label_tokens / max(1, data.num_tokens),
        "length_min": min(lengths),
        "length_mean": sum(lengths) / len(lengths),
        "length_max": max(lengths),
        "length_histogram": dict(sorted(hist.items(), key=lambda kv: int(kv[0].split("-")[0]))),
        "fingerprint": data.fingerprint,
        "label_ignore_index": IGNORE_INDEX,
    }


def write_report(reports: dict[str, tuple[str, dict[str, Any]]]) -> tuple[Path, Path]:
    """Write ``stats.json`` and ``stats.md`` for {split: (file, stats)}; return both paths."""
    out = Path(C.DATA_STAGE_DIR)
    try:
        return _write_report(out, reports)
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            raise DiskSpaceError(
                f"disk full while writing the data stats in {out}; free space on that disk "
                "and start again"
            ) from None
        raise DataError(
            f"could not write the data stats in {out} ({exc.strerror}); make it writable"
        ) from None


def _write_report(out: Path, reports: dict[str, tuple[str, dict[str, Any]]]) -> tuple[Path, Path]:
    out.mkdir(parents=True, exist_ok=True)
    (out / "stats.json").write_text(
        json.dumps({k: {"file": f, **s} for k, (f, s) in reports.items()}, indent=2) + "\n"
    )
    lines = ["# Data stats", ""]
    for split, (file, st) in reports.items():
        c = st["counts"]
        formats = format_counts(c)
        lines += [
            f"## {split}: `{file}`",
            "",
            f"- examples: {st['examples']} kept of {c['records']} records ({formats})",
            f"- truncated: {c['truncated']}, dropped: {c['dropped']}",
            f"- tokens: {st['tokens']:,}; with loss: {st['label_tokens']:,} "
            f"({100 * st['assistant_token_share']:.1f}%)",
            f"- length: min {st['length_min']}, mean {st['length_mean']:.1f}, "
            f"max {st['length_max']}",
            "",
            "| tokens | examples |",
            "|---|---|",
            *[f"| {k} | {v} |" for k, v in st["length_histogram"].items()],
            "",
        ]
    (out / "stats.md").write_text("\n".join(lines))
    return out / "stats.json", out / "stats.md"


def prepare_data(
    cfg: TrainingConfig, tokenizer: Any, tok_sha: str, report: bool = True
) -> tuple[TokenizedData, TokenizedData | None]:
    """Stage 1: validated, tokenized train/eval data (from the cache when it is current).

    ``tok_sha`` is ``tokenizer_sha256(tokenizer)``, part of the cache key. With ``report``,
    also writes ``outputs/1_data/stats.json`` and ``stats.md``.
    """
    splits = {"train": cfg.train_file, **({"eval": cfg.eval_file} if cfg.eval_file else {})}
    names = {split: describe_sources(value) for split, value in splits.items()}
    loaded: dict[str, TokenizedData] = {}
    for split, path in splits.items():
        data, cached = load_or_tokenize(
            tokenizer, tok_sha, path, cfg.max_seq_length, cfg.overlong, cfg.train_on
        )
        log.info(
            "%s data %s: %s", split, names[split], "tokenized cache hit" if cached else "tokenized"
        )
        loaded[split] = data
    if report:
        write_report({k: (names[k], stats(v)) for k, v in loaded.items()})
    return loaded["train"], loaded.get("eval")
