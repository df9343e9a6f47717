"""Checkpoint tools: ``sftrun ckpt list | inspect | verify | prune``.

Owns how checkpoints are presented to a person (tables, JSON, ``ckpt inspect``'s report and
resume dry run) and the prune policy's user-facing side. Reads folders only through
``checkpoint`` (``scan``, ``peek``, ``verify``, ``delete``); never writes a checkpoint.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sftrun import checkpoint, integrity, runfolder
from sftrun.errors import CheckpointError
from sftrun.monitor import fmt_bytes

if TYPE_CHECKING:
    from sftrun.plan import RunPlan


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
    view = integrity.peek(path)
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
    rows = [_row(i.path, "checkpoint", i.step, i.problem) for i in runfolder.scan(out)]
    valid = [r for r in rows if r.valid]
    if valid:
        valid[-1].newest = True
        best = integrity.peek(Path(valid[-1].path)).get("state", {}).get("best_model_checkpoint")
        for r in rows:
            r.best = best is not None and Path(best).name == r.name
    for folder in runfolder.superseded_folders(out):  # real folders only, never a link
        for info in runfolder.scan(folder):
            rows.append(_row(info.path, "superseded", info.step, info.problem))
    for tmp in checkpoint.temp_folders(out):
        rows.append(_row(tmp, "temporary", None, "unfinished save (removed at the next start)"))
    return rows


def _num(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def render_table(rows: list[Row], output_dir: str | Path) -> str:
    """``ckpt list``'s table of ``rows``."""
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
    """``ckpt list --json``'s rows."""
    return [asdict(r) for r in rows]


@dataclass
class PruneResult:
    """What ``ckpt prune`` deleted, kept and left alone."""

    removed: list[tuple[Path, int]]  # deleted folder, bytes freed
    kept: list[Path]  # valid checkpoints kept
    left: list[tuple[Path, str]]  # entries not touched because they are not intact


def prune(output_dir: str | Path, keep: int, keep_best: bool) -> PruneResult:
    """Delete all but the newest ``keep`` valid checkpoints (and the best, if asked).

    Never deletes the newest valid checkpoint, a damaged folder, a symbolic link or a
    superseded one; deletion goes through ``runfolder.delete`` (real folders directly
    inside ``output_dir`` only). A folder holding intact checkpoints of two runs is refused
    whole. Everything is decided before the first deletion.
    """
    infos = runfolder.scan(output_dir)
    valid = [i for i in infos if i.valid]
    runs = sorted({i.run_id for i in valid if i.run_id is not None})
    if len(runs) > 1:
        # Rotation deletes only its own run's checkpoints; prune cannot know which run the
        # user means, and keeping "the newest" could keep a foreign copy and delete the run.
        listing = "; ".join(
            f"run {r[:8]}: {', '.join(i.path.name for i in valid if i.run_id == r)}" for r in runs
        )
        raise CheckpointError(
            f"{output_dir} holds checkpoints of {len(runs)} runs ({listing}); prune works on one "
            "run's folder: move the other run's checkpoints into their own folder first; "
            "nothing was deleted"
        )
    spared = {i.path for i in valid[-max(keep, 1) :]}
    if keep_best and valid:
        best = integrity.peek(valid[-1].path).get("state", {}).get("best_model_checkpoint")
        if best:
            spared |= {i.path for i in valid if i.path.name == Path(best).name}
    doomed = [i.path for i in valid if i.path not in spared]
    removed = [(path, runfolder.delete(path)) for path in doomed]
    return PruneResult(
        removed,
        [i.path for i in valid if i.path in spared],
        [(i.path, i.problem or "") for i in infos if not i.valid],
    )


def render_inspect(path: Path, problem: str | None, view: dict[str, Any]) -> str:
    """``ckpt inspect``'s report of one folder: status, manifest, identity and progress."""
    manifest, state = view.get("manifest", {}), view.get("state", {})
    lines = [f"{path}: {'valid' if problem is None else 'INVALID: ' + problem}"]
    if manifest:
        lines.append(
            f"  written      {manifest.get('created')}  (format {manifest.get('format_version')})"
        )
        versions = ", ".join(f"{k} {v}" for k, v in manifest.get("versions", {}).items())
        lines.append(f"  versions     {versions}")
        if manifest.get("run_id"):
            lines.append(f"  run          {manifest['run_id']}")
        for name, entry in sorted(manifest.get("files", {}).items()):
            lines.append(
                f"  file         {name:<26} {fmt_bytes(entry['size']):>9}  "
                f"sha256 {entry['sha256'][:12]}"
            )
        lines += [f"  identity     {k} = {v}" for k, v in manifest.get("identity", {}).items()]
    if state:
        planned = state.get("num_train_epochs") or 0
        epoch = state.get("epoch") or 0
        progress = f" ({100 * epoch / planned:.1f}%)" if planned else ""
        lines.append(
            f"  progress     step {state.get('global_step')}/{state.get('max_steps')}, epoch "
            f"{epoch:.2f}/{planned:.2f}{progress}, {state.get('samples_seen')} samples, "
            f"{state.get('tokens_seen')} tokens"
        )
        loss = _last(state.get("log_history", []), "loss")
        lr = _last(state.get("log_history", []), "learning_rate")
        if loss is not None and lr is not None:
            lines.append(f"  last log     loss {loss:.4f}, lr {lr:.3e}")
        if state.get("resumed_from"):
            lines.append(f"  resumed at   steps {state['resumed_from']}")
    return "\n".join(lines)


def render_preview(plan: RunPlan, config_path: str) -> str:
    """``ckpt inspect``'s dry run: what resuming with this config would do or refuse."""
    lines = [f"resume with {config_path}:"]
    if plan.snapshot is not None:
        from sftrun.resume import keep_batch

        world = plan.world
        other = 1 if world > 1 else 2
        saved = int(plan.snapshot.identity.get("global_batch_size") or plan.global_batch)
        micro = plan.cfg.per_device_train_batch_size
        lines.append(
            f"  processes    {world}, as the checkpoint was written (a launch on another count "
            f"keeps the global batch {saved} with its own settings, e.g. {other} process(es): "
            f"{keep_batch(saved, micro, other)})"
        )
    if plan.refusals:
        lines += [f"  would refuse {line}" for line in plan.refusals]
    else:
        lines.append(f"  allowed      {plan.steps_left} steps left (to step {plan.planned})")
    lines += [f"  override     {k}: {was!r} -> {now!r}" for k, was, now in plan.overrides]
    lines += [
        f"  kept         {k}={was!r} from the checkpoint (config says {now!r})"
        for k, was, now in plan.kept
    ]
    if plan.lr_plan is not None:
        lines.append(
            f"  LR at step   {plan.state.global_step}: {plan.lr_plan.lr_before:.3g} -> "
            f"{plan.lr_plan.lr_after:.3g}; decay ends at step {plan.schedule.total_steps}"
        )
    return "\n".join(lines)


def render_remote(url: str) -> str:
    """``ckpt list <url>``: the checkpoints on a mirror, from their manifests (not hashed)."""
    from sftrun.mirror import Remote

    remote = Remote(url)
    lines = []
    for name in remote.names():
        manifest = remote.manifest(name)
        if manifest is None:
            lines.append(f"{name:<16} incomplete: no manifest (an upload that did not finish)")
            continue
        size = sum(int(e.get("size", 0)) for e in manifest.get("files", {}).values())
        lines.append(
            f"{name:<16} step {manifest.get('step')}  {fmt_bytes(size):>9}  "
            f"written {str(manifest.get('created', '-'))[:19].replace('T', ' ')}  complete "
            f"(run {str(manifest.get('run_id'))[:8]})"
        )
    return "\n".join(lines) if lines else f"no checkpoints in {url}"
