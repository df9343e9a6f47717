"""Watching a run: the log file, console lines, TensorBoard events and the progress bar.

Owns ``outputs/logs/sft_trainer_<timestamp>.log`` and ``outputs/3_training/runs/<timestamp>/``.
Never decides anything about training; it only records what the loop reports.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tqdm.auto import tqdm

from sftrun import constants as C
from sftrun.data import describe_sources, format_counts
from sftrun.encoding import TokenizedData

if TYPE_CHECKING:
    from sftrun.plan import RunPlan

log = logging.getLogger("sftrun")


def timestamp() -> str:
    """Now, as the run's log and TensorBoard folder names use it."""
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


def setup_logging(stamp: str, console: bool = True, rank: int = 0) -> Path:
    """Log to ``outputs/logs/sft_trainer_<stamp>.log`` (and the console); return the file.

    Only process 0 of a multi-process launch has the file and the console lines; the others
    print warnings and errors only, marked with their rank.
    """
    log_dir = Path(C.LOG_DIR)
    path = log_dir / C.LOG_FILE_PATTERN.format(timestamp=stamp)
    for handler in list(log.handlers):
        log.removeHandler(handler)
        handler.close()
    log.propagate = False
    if rank != 0:
        log.setLevel(logging.WARNING)
        quiet = logging.StreamHandler(sys.stderr)
        quiet.setFormatter(logging.Formatter(f"rank {rank}: %(message)s"))
        log.addHandler(quiet)
        return path
    log.setLevel(logging.INFO)
    log_dir.mkdir(parents=True, exist_ok=True)
    path = unique_path(log_dir, C.LOG_FILE_PATTERN.format(timestamp=stamp))
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
    """Close the run's log handlers (the log file is complete after this)."""
    for handler in list(log.handlers):
        log.removeHandler(handler)
        handler.close()


def file_away_untrained(log_file: Path) -> Path | None:
    """Move the log of a command that trained nothing (a refusal, "run complete", a
    cancelled start) into ``outputs/logs/not_trained/``, so that the newest
    ``sft_trainer_*.log`` stays the last run that trained (the README's ``tail -f`` recipe);
    return its new path (None if it could not be moved; it then stays where it was)."""
    if not log_file.is_file():
        return None
    folder = log_file.parent / C.UNTRAINED_LOG_DIR
    try:
        folder.mkdir(exist_ok=True)
        target = unique_path(folder, log_file.name)
        os.rename(log_file, target)
    except OSError:
        return None
    return target


def own_board(root: Path, name: str) -> Path | None:
    """``root/name`` when it is a TensorBoard run folder sftrun made (a timestamp name, a
    real folder, not a link); None otherwise."""
    folder = root / name
    if re.fullmatch(r"[0-9_]+", name) and folder.is_dir() and not folder.is_symlink():
        return folder
    return None


class Board:
    """TensorBoard writer for one run folder; steps are global optimizer steps.

    ``resume`` is ``(folder name, step)`` when a resume continues a run whose TensorBoard
    folder is still in place: the same folder is written again, and TensorBoard's purge
    hides what it holds from ``step + 1`` on (what the stopped run drew after its
    checkpoint), so every step is shown once.
    """

    def __init__(self, stamp: str, resume: tuple[str, int] | None = None) -> None:
        from torch.utils.tensorboard import SummaryWriter

        root = Path(C.TENSORBOARD_DIR)
        root.mkdir(parents=True, exist_ok=True)
        name, step = resume if resume is not None else ("", 0)
        folder = own_board(root, name)
        self.continued = folder is not None
        self.path = folder if folder is not None else unique_path(root, stamp)
        purge = step + 1 if self.continued else None
        self.writer = SummaryWriter(log_dir=str(self.path), purge_step=purge)

    def scalars(self, step: int, values: dict[str, float]) -> None:
        for key, value in values.items():
            self.writer.add_scalar(key, value, step)
        self.writer.flush()

    def text(self, tag: str, body: str, step: int) -> None:
        self.writer.add_text(tag, body, step)

    def close(self) -> None:
        self.writer.close()


# Without a terminal (make train piped, a batch job), one progress line this often.
PROGRESS_EVERY_S = 60.0


class ProgressLines:
    """The progress bar's stand-in when stderr is not a terminal: a log line (console and log
    file) after the first step and then every ``every`` seconds, with step/total, the share
    done, tokens/s over the steps since the last line, and the ETA. Same calls as tqdm's."""

    def __init__(self, total: int, initial: int, every: float = PROGRESS_EVERY_S) -> None:
        self.total, self.step, self.every = total, initial, every
        self.started = self.last = time.monotonic()
        self.first = initial
        self.postfix: dict[str, Any] = {}

    def set_postfix(self, **values: Any) -> None:
        self.postfix = values

    def update(self, n: int = 1) -> None:
        self.step += n
        now = time.monotonic()
        if self.step - self.first == 1 or now - self.last >= self.every or self.step == self.total:
            done = self.step - self.first
            per_step = (now - self.started) / max(1, done)
            eta = per_step * (self.total - self.step)
            extra = " ".join(f"{k} {v}" for k, v in self.postfix.items())
            log.info(
                "progress: step %d/%d (%.0f%%) %s; ETA %s",
                self.step,
                self.total,
                100 * self.step / max(1, self.total),
                extra,
                _duration(eta),
            )
            self.last = now

    def close(self) -> None:
        return None


def _duration(seconds: float) -> str:
    minutes, secs = divmod(int(seconds + 0.5), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}"


def progress_bar(total: int, initial: int) -> Any:
    """Step bar with ETA on a terminal; otherwise periodic progress lines (``ProgressLines``)."""
    if not sys.stderr.isatty():
        return ProgressLines(total, initial)
    return tqdm(total=total, initial=initial, desc="train", unit="step", dynamic_ncols=True)


def mark_superseded_boards(names: set[str], step: int) -> dict[str, str]:
    """Rename TensorBoard runs that drew steps past ``step`` (now superseded) to
    ``<name>.superseded-after-<step>``, so TensorBoard shows them as their own, marked curves
    instead of one line with two versions of those steps. Only timestamp-named real folders
    directly inside the TensorBoard folder are renamed; returns old name -> new name.
    """
    root = Path(C.TENSORBOARD_DIR)
    renamed = {}
    for name in sorted(names):
        source, target = own_board(root, name), root / f"{name}.superseded-after-{step}"
        if source is not None:
            if not target.exists():
                os.rename(source, target)
                renamed[name] = target.name
                log.info("TensorBoard run %s drew steps past %d: renamed to %s", name, step, target)
    return renamed


def fmt_count(n: float) -> str:
    """A count with a unit (``1.2M``)."""
    for unit, div in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.1f}{unit}"
    return f"{n:.0f}"


def _data_line(name: str, value: str | list[str], data: TokenizedData) -> str:
    c = data.counts
    return (
        f"  {name:<12} {describe_sources(value)}: {len(data)} examples ({format_counts(c)}), "
        f"{data.num_tokens:,} tokens, {data.num_label_tokens:,} with loss; truncated "
        f"{c['truncated']}, dropped {c['dropped']}"
    )


def _precision(plan: RunPlan) -> str:
    """The precision actually used, as the summary says it."""
    text = {
        "bfloat16": "bfloat16 (autocast)",
        "float16": "float16 (autocast, loss scaling)",
    }.get(plan.dtype, plan.dtype)
    if plan.dtype_why:
        text += f" [{plan.dtype_why}]"
    q = plan.cfg.quantization
    if q is not None:
        kind = f"{q.bits}-bit {q.quant_type}" if q.bits == 4 else "8-bit"
        text += f"; base {kind} (bitsandbytes)"
    return text + "; LoRA weights float32"


def run_summary(
    plan: RunPlan,
    *,
    trainable: int,
    total: int,
    checkpoint_bytes: int,
    log_file: Path,
    targets: list[str],
    memory: str,
) -> str:
    """The summary printed (and logged) before training starts; ``targets`` are the layers
    the adapter is on."""
    cfg, sched, lora = plan.cfg, plan.schedule, plan.cfg.lora
    on = ", ".join(targets) + (" (all-linear)" if lora.target_modules == "all-linear" else "")
    lines = [
        "sftrun: LoRA fine-tuning",
        f"  {'model':<12} {cfg.model_name_or_path} "
        f"(backend {plan.backend.name}: {plan.backend.reason})",
        f"  {'trainable':<12} {fmt_count(trainable)} of {fmt_count(total)} parameters; LoRA "
        f"r={lora.r} alpha={lora.alpha:g} dropout={lora.dropout:g} on "
        f"{on}" + ("; gradient checkpointing" if cfg.gradient_checkpointing else ""),
        _data_line("train data", cfg.train_file, plan.train_data),
    ]
    if plan.eval_data is not None and cfg.eval_file:
        lines.append(_data_line("eval data", cfg.eval_file, plan.eval_data))
    lines += [
        f"  {'batch':<12} {cfg.per_device_train_batch_size} per device x "
        f"{cfg.gradient_accumulation_steps} accumulation x {plan.world} process(es)"
        f"{' (fsdp: the frozen base sharded over them)' if plan.sharded else ''} = "
        f"{plan.global_batch} examples per step; max_seq_length {cfg.max_seq_length}; "
        f"{_precision(plan)}"
        + ("; out of memory: halve the micro-batch, redo the step" if plan.oom_adapt else ""),
        f"  {'memory':<12} {memory}",
        f"  {'length':<12} {plan.planned} steps = {plan.epochs:.2f} epochs; LR "
        f"{sched.peak_lr:g} {sched.kind}, warm-up {sched.warmup_steps} steps",
        f"  {'checkpoints':<12} {plan.out}/checkpoint-<step> every {cfg.save_steps} steps and "
        f"at the end, about {fmt_bytes(checkpoint_bytes)} each"
        + (f", keeping {cfg.save_total_limit}" if cfg.save_total_limit else ""),
    ]
    if plan.ckpt_path is not None:
        epoch = plan.state.samples_seen / len(plan.train_data)
        lines.append(
            f"  {'resume':<12} from {plan.ckpt_path}: step {plan.state.global_step}/"
            f"{plan.planned}, epoch {epoch:.2f}/{plan.epochs:.2f} "
            f"({100 * epoch / plan.epochs:.1f}%)"
        )
        lines += [f"  {'skipped':<12} {i.path.name}: {i.problem}" for i in plan.skipped]
        if plan.newer:
            lines.append(
                f"  {'move aside':<12} {', '.join(p.name for p in plan.newer)} are newer than "
                "the resume step; they will be moved into a superseded-<timestamp>/ folder"
            )
    lines += [f"  {'note':<12} {n}" for n in plan.notes]
    lines.append(f"  {'logs':<12} {log_file}")
    return "\n".join(lines)
