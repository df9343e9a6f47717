"""Checkpoint tools: ``sftrun ckpt list | inspect | verify | prune``.

Owns how checkpoints are presented to a person (tables, JSON) and the prune policy's
user-facing side. Reads folders only through ``checkpoint`` (``scan``, ``peek``, ``verify``,
``delete``); never writes a checkpoint.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from sftrun import checkpoint
from sftrun.monitor import fmt_bytes


@dataclass
class Row:
    """One line of ``ckpt list``."""

    name: str
    path: str
    kind: str  # checkpoint | temporary | superseded
    step: int | None
    epoch: float | None
    progress: float | None  # percent of the planned epochs
    train_loss: float | None
    eval_loss: float | None
    learning_rate: float | None
    size: int | None
    written: str | None
    valid: bool
    problem: str | None
    newest: bool = False
    best: bool = False


def _last(history: list[dict[str, Any]], key: str) -> float | None:
    for entry in reversed(history):
        if key in entry:
            return float(entry[key])
    return None


def _row(path: Path, kind: str, step: int | None, problem: str | None) -> Row:
    view = checkpoint.peek(path)
    state = view.get("state", {})
    history = state.get("log_history", [])
    epoch = state.get("epoch")
    planned = state.get("num_train_epochs")
    written = view.get("manifest", {}).get("created")
    if written is None and "mtime" in view:
        written = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(view["mtime"]))
    return Row(
        name=path.name if kind != "superseded" else f"{path.parent.name}/{path.name}",
        path=str(path),
        kind=kind,
        step=step,
        epoch=epoch,
        progress=100 * epoch / planned if epoch is not None and planned else None,
        train_loss=_last(history, "loss"),
        eval_loss=_last(history, "eval_loss"),
        learning_rate=_last(history, "learning_rate"),
        size=view.get("size"),
        written=written,
        valid=problem is None,
        problem=problem,
    )


def list_rows(output_dir: str | Path) -> list[Row]:
    """Every checkpoint, superseded checkpoint and unfinished save under ``output_dir``."""
    out = Path(output_dir)
    rows = [_row(i.path, "checkpoint", i.step, i.problem) for i in checkpoint.scan(out)]
    valid = [r for r in rows if r.valid]
    if valid:
        valid[-1].newest = True
        best = checkpoint.peek(Path(valid[-1].path)).get("state", {}).get("best_model_checkpoint")
        for r in rows:
            r.best = best is not None and Path(best).name == r.name
    for folder in checkpoint.superseded_folders(out):  # real folders only, never a link
        for info in checkpoint.scan(folder):
            rows.append(_row(info.path, "superseded", info.step, info.problem))
    for tmp in checkpoint.temp_folders(out):
        rows.append(_row(tmp, "temporary", None, "unfinished save (removed at the next start)"))
    return rows


def _num(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def render_table(rows: list[Row], output_dir: str | Path) -> str:
    if not rows:
        return f"no checkpoints in {output_dir}"
    header = (
        "checkpoint",
        "step",
        "epoch",
        "progress",
        "loss",
        "eval_loss",
        "lr",
        "size",
        "written",
        "status",
    )
    lines = [header]
    for r in rows:
        if r.kind == "temporary":
            status = "temporary: unfinished save"
        elif not r.valid:
            status = f"INVALID: {r.problem.split(': ', 1)[-1] if r.problem else ''}"
        else:
            status = "valid" if r.kind == "checkpoint" else "valid (superseded)"
        marks = [m for m, on in (("newest", r.newest), ("best", r.best)) if on]
        if marks:
            status += f" [{', '.join(marks)}]"
        lines.append(
            (
                r.name,
                "-" if r.step is None else str(r.step),
                _num(r.epoch, ".2f"),
                "-" if r.progress is None else f"{r.progress:.1f}%",
                _num(r.train_loss, ".4f"),
                _num(r.eval_loss, ".4f"),
                _num(r.learning_rate, ".2e"),
                fmt_bytes(r.size),
                (r.written or "-")[:19].replace("T", " "),
                status,
            )
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(header) - 1)]
    text = []
    for line in lines:
        cells = [cell.ljust(w) for cell, w in zip(line[:-1], widths, strict=True)]
        text.append("  ".join(cells + [line[-1]]).rstrip())
    return "\n".join(text)


def rows_as_dicts(rows: list[Row]) -> list[dict[str, Any]]:
    return [asdict(r) for r in rows]


@dataclass
class PruneResult:
    removed: list[tuple[Path, int]]  # deleted folder, bytes freed
    kept: list[Path]  # valid checkpoints kept
    left: list[tuple[Path, str]]  # entries not touched because they are not intact


def prune(output_dir: str | Path, keep: int, keep_best: bool) -> PruneResult:
    """Delete all but the newest ``keep`` valid checkpoints (and the best, if asked).

    Never deletes the newest valid checkpoint, a damaged folder, a symbolic link or a
    superseded one; deletion goes through ``checkpoint.delete`` (real folders directly
    inside ``output_dir`` only). Everything is decided before the first deletion.
    """
    infos = checkpoint.scan(output_dir)
    valid = [i for i in infos if i.valid]
    spared = {i.path for i in valid[-max(keep, 1) :]}
    if keep_best and valid:
        best = checkpoint.peek(valid[-1].path).get("state", {}).get("best_model_checkpoint")
        if best:
            spared |= {i.path for i in valid if i.path.name == Path(best).name}
    doomed = [i.path for i in valid if i.path not in spared]
    removed = [(path, checkpoint.delete(path)) for path in doomed]
    return PruneResult(
        removed,
        [i.path for i in valid if i.path in spared],
        [(i.path, i.problem or "") for i in infos if not i.valid],
    )
