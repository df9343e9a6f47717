"""The ``sftrun ckpt`` commands (list, inspect, verify, prune) and the argument helpers every
command's parser shares.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from sftrun import constants as C
from sftrun.errors import SftrunError

HELP = argparse.ArgumentDefaultsHelpFormatter


def sub_parser(parent: Any, name: str, text: str) -> argparse.ArgumentParser:
    """A subcommand whose help shows each option's default."""
    parser: argparse.ArgumentParser = parent.add_parser(
        name, help=text, description=text, formatter_class=HELP
    )
    return parser


def config_args(p: argparse.ArgumentParser) -> None:
    """``--config`` and the ``KEY=VALUE`` overrides a command takes."""
    p.add_argument("--config", default=C.DEFAULT_CONFIG_PATH, help="YAML config")
    p.add_argument(
        "overrides",
        nargs="*",
        metavar="KEY=VALUE",
        help="override config keys, e.g. learning_rate=1e-4 lora.r=8",
    )


def _dir_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("dir", nargs="?", help="checkpoint folder (default: output_dir of --config)")
    p.add_argument("--config", default=C.DEFAULT_CONFIG_PATH, help="YAML config for output_dir")


def _output_dir(args: argparse.Namespace) -> str:
    if args.dir and "://" in str(args.dir):
        return str(args.dir)  # a mirror (list and verify read it; nothing writes there)
    if args.dir:
        if not os.path.isdir(args.dir):
            hint = (
                "; this command takes a folder, not KEY=VALUE (use --config to pick the config)"
                if "=" in str(args.dir)
                else ""
            )
            raise SftrunError(f"{args.dir} is not a folder{hint}")
        return str(args.dir)
    from sftrun.config import load_config

    path = args.config if os.path.exists(args.config) else None
    return load_config(path).output_dir


def cmd_ckpt_list(args: argparse.Namespace) -> int:
    """``sftrun ckpt list``: every checkpoint of a run folder (or mirror), as a table or JSON."""
    import json

    from sftrun.inventory import list_rows, render_table, rows_as_dicts

    out = _output_dir(args)
    if "://" in out:
        from sftrun.inventory import render_remote

        print(render_remote(out))
        return 0
    rows = list_rows(out)
    if args.json:
        print(json.dumps(rows_as_dicts(rows), indent=2))
    else:
        print(render_table(rows, out))
    return 0


def cmd_ckpt_inspect(args: argparse.Namespace) -> int:
    """``sftrun ckpt inspect``: one checkpoint, and a dry run of resuming it with the config
    (every refusal listed, nothing written); exit 1 when the checkpoint is not intact."""
    from sftrun import integrity
    from sftrun.config import load_config
    from sftrun.inventory import render_inspect, render_preview
    from sftrun.plan import make_plan, sets_length

    path = Path(args.checkpoint)
    problem = integrity.verify(path)
    print(render_inspect(path, problem, integrity.peek(path)))
    if problem is not None:
        return 1
    cfg = load_config(args.config if os.path.exists(args.config) else None, args.overrides)
    plan = make_plan(
        cfg,
        resume=str(path),
        allow_data_change=args.allow_data_change,
        preview=True,
        length_set=sets_length(args.overrides),
    )
    print(render_preview(plan, args.config))
    return 0


def cmd_ckpt_import(args: argparse.Namespace) -> int:
    """``sftrun ckpt import``: a Hugging Face Trainer / TRL / Unsloth checkpoint becomes the
    first checkpoint of a new sftrun run in output_dir (the source folder is only read)."""
    import shlex

    from sftrun import distributed
    from sftrun.config import load_config
    from sftrun.hfimport import import_checkpoint

    cfg = load_config(args.config if os.path.exists(args.config) else None, args.overrides)
    try:
        done = import_checkpoint(cfg, Path(args.source))
    finally:
        distributed.stop()  # planning may have formed the process group, as train's does
    for note in done.notes:
        print(f"note: {note}")
    settings = ["--config", args.config] if os.path.exists(args.config) else []
    again = shlex.join(["sftrun", "train", "--resume", str(done.path), "-y", *settings])
    print(f"imported step {done.step} of {done.planned} into {done.path}")
    print(f"continue it with: {again} {shlex.join(args.overrides)}".rstrip())
    return 0


def cmd_ckpt_verify(args: argparse.Namespace) -> int:
    """``sftrun ckpt verify``: hash every file against its manifest; exit 1 if any fails."""
    from sftrun import integrity, runfolder

    paths: list[Path | str]  # a str is a copy on a mirror
    if args.all or not args.checkpoints:
        paths = [i.path for i in runfolder.scan(_output_dir(args))]
    else:
        paths = [Path(p) if "://" not in p else p for p in args.checkpoints]
    if not paths:
        print("no checkpoints to verify", file=sys.stderr)
        return 1
    failed = 0
    for path in paths:
        if isinstance(path, str):  # a copy on a mirror: downloaded to a temporary folder
            from sftrun.mirror import verify_remote

            problem = verify_remote(path)
            failed += problem is not None
            print(f"OK      {path}" if problem is None else f"FAILED  {problem}")
            continue
        problem = integrity.verify(path)
        failed += problem is not None
        print(f"OK      {path}" if problem is None else f"FAILED  {problem}")
        if problem is not None and "is a file" in problem:
            print(f"        (pass the checkpoint folder, e.g. {path.parent})")
    return 1 if failed else 0


def cmd_ckpt_prune(args: argparse.Namespace) -> int:
    """``sftrun ckpt prune``: delete a run's older checkpoints under its lock, never the newest."""
    from sftrun.inventory import prune
    from sftrun.monitor import fmt_bytes

    if args.keep < 1:
        raise SftrunError(
            f"--keep {args.keep}: prune always keeps the newest valid checkpoint; pass --keep 1 "
            "or more (delete the whole folder yourself to remove a run)"
        )
    from sftrun import runfolder, runlock

    folder = Path(_output_dir(args))
    # Only a folder that holds checkpoints is locked (nothing is created anywhere else).
    lock = runlock.acquire(folder) if runfolder.names(folder) else None
    try:
        result = prune(folder, args.keep, args.keep_best)
    finally:
        if lock is not None:
            lock.release()
    for path, size in result.removed:
        print(f"deleted {path} ({fmt_bytes(size)})")
    total = sum(size for _, size in result.removed)
    kept = ", ".join(p.name for p in result.kept) or "none"
    print(f"freed {fmt_bytes(total)}; kept {len(result.kept)}: {kept}")
    for path, why in result.left:
        print(f"left    {path.name}: {why}")
    return 0


def add_ckpt_parsers(sub: Any) -> None:
    """The ``ckpt`` subcommands and their options."""
    ckpt = sub.add_parser("ckpt", help="checkpoint tools").add_subparsers(
        dest="ckpt_command", required=True
    )
    lst = sub_parser(ckpt, "list", "table of every checkpoint")
    _dir_arg(lst)
    lst.add_argument("--json", action="store_true", help="machine-readable output")
    lst.set_defaults(func=cmd_ckpt_list)
    inspect = sub_parser(ckpt, "inspect", "one checkpoint, and a dry run of resuming it")
    inspect.add_argument("checkpoint", help="checkpoint folder")
    inspect.add_argument(
        "--allow-data-change", action="store_true", help="as train's flag, for the dry run"
    )
    config_args(inspect)
    inspect.set_defaults(func=cmd_ckpt_inspect)
    imp = sub_parser(
        ckpt,
        "import",
        "continue a Hugging Face Trainer / TRL / Unsloth LoRA checkpoint: write it into "
        "output_dir as a new run's checkpoint (adapter, optimizer, LR position, data order)",
    )
    imp.add_argument("source", help="the HF checkpoint-<step> folder (only read)")
    config_args(imp)
    imp.set_defaults(func=cmd_ckpt_import)
    verify = sub_parser(ckpt, "verify", "check files against the manifest (exit 0/1)")
    verify.add_argument("checkpoints", nargs="*", help="checkpoint folders (default: --all)")
    verify.add_argument("--all", action="store_true", help="every checkpoint in output_dir")
    verify.add_argument("--dir", help="checkpoint folder for --all (default: output_dir)")
    verify.add_argument("--config", default=C.DEFAULT_CONFIG_PATH, help="YAML config")
    verify.set_defaults(func=cmd_ckpt_verify)
    prune = sub_parser(ckpt, "prune", "delete older checkpoints (never the newest)")
    _dir_arg(prune)
    prune.add_argument("--keep", type=int, required=True, help="how many newest to keep (>= 1)")
    prune.add_argument("--keep-best", action="store_true", help="also keep the best one")
    prune.set_defaults(func=cmd_ckpt_prune)
