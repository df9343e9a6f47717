"""Watching a run: the log file, console lines, TensorBoard events and the progress bar.

Owns ``outputs/logs/sft_trainer_<timestamp>.log`` and ``outputs/3_training/runs/<timestamp>/``.
Never decides anything about training; it only records what the loop reports.
"""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from sftrun import constants as C

log = logging.getLogger("sftrun")


def timestamp() -> str:
    return time.strftime(C.TIMESTAMP_FORMAT)


def fmt_bytes(n: float | None) -> str:
    """Human-readable size in decimal units; "-" when unknown."""
    if n is None:
        return "-"
    for unit, div in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= div:
            return f"{n / div:.1f} {unit}"
    return f"{n:.0f} B"


def unique_path(parent: Path, name: str) -> Path:
    """``parent/name``, or ``name_1``, ``name_2``... when two runs start within one second."""
    path = parent / name
    stem, suffix = Path(name).stem, Path(name).suffix
    n = 1
    while path.exists():
        path = parent / f"{stem}_{n}{suffix}"
        n += 1
    return path


class _TqdmHandler(logging.Handler):
    """Console output that does not tear the progress bar."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            tqdm.write(self.format(record), file=sys.stdout)
        except Exception:  # noqa: BLE001 - logging must never break training
            self.handleError(record)


def setup_logging(stamp: str, console: bool = True) -> Path:
    """Log to ``outputs/logs/sft_trainer_<stamp>.log`` (and the console); return the file."""
    log_dir = Path(C.LOG_DIR)
    log_dir.mkdir(parents=True, exist_ok=True)
    path = unique_path(log_dir, C.LOG_FILE_PATTERN.format(timestamp=stamp))
    for handler in list(log.handlers):
        log.removeHandler(handler)
        handler.close()
    log.setLevel(logging.INFO)
    log.propagate = False
    file_handler = logging.FileHandler(path, encoding="utf-8")
    file_handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    log.addHandler(file_handler)
    if console:
        handler = _TqdmHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(handler)
    return path


def to_log_file(level: int, message: str) -> None:
    """Write ``message`` to the run's log file only (the console already shows it)."""
    record = log.makeRecord(log.name, level, __file__, 0, "%s", (message,), None)
    for handler in log.handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)


def close_logging() -> None:
    for handler in list(log.handlers):
        log.removeHandler(handler)
        handler.close()


class Board:
    """TensorBoard writer for one run folder; steps are global optimizer steps."""

    def __init__(self, stamp: str) -> None:
        from torch.utils.tensorboard import SummaryWriter

        root = Path(C.TENSORBOARD_DIR)
        root.mkdir(parents=True, exist_ok=True)
        self.path = unique_path(root, stamp)
        self.writer = SummaryWriter(log_dir=str(self.path))

    def scalars(self, step: int, values: dict[str, float]) -> None:
        for key, value in values.items():
            self.writer.add_scalar(key, value, step)
        self.writer.flush()

    def text(self, tag: str, body: str, step: int) -> None:
        self.writer.add_text(tag, body, step)

    def close(self) -> None:
        self.writer.close()


def progress_bar(total: int, initial: int) -> Any:
    """Step bar with ETA; hidden when stderr is not a terminal (the log has the metrics)."""
    return tqdm(
        total=total,
        initial=initial,
        desc="train",
        unit="step",
        dynamic_ncols=True,
        disable=not sys.stderr.isatty(),
    )
