"""Command line: ``sftrun train|model|data``; ``run_model_training.py`` is ``sftrun train``.

Owns argument parsing and turning SftrunError into one line on stderr and an exit code.
Each subcommand is a plain function; the work lives in the modules they call.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import warnings
from collections.abc import Sequence

from sftrun import constants as C
from sftrun.errors import SftrunError


def _quiet_libraries() -> None:
    # No network at run time; models and data come from local folders.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    # accelerate 1.15 calls a transformers 5.23 property that is being renamed.
    warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated")
    hf_logging.disable_progress_bar()


def cmd_train(args: argparse.Namespace) -> int:
    from sftrun.config import load_config
    from sftrun.trainer import RunOptions, run_training

    cfg = load_config(args.config, args.overrides)
    result = run_training(
        cfg,
        RunOptions(
            resume=args.resume,
            yes=args.yes,
            no_unsloth=args.no_unsloth,
            allow_data_change=args.allow_data_change,
        ),
    )
    if result.cancelled:
        print("cancelled: nothing was trained", file=sys.stderr)
        return 1
    if result.stopped_by:
        return 128 + int(signal.Signals[result.stopped_by])
    print(
        f"done: step {result.global_step}/{result.total_steps}, last checkpoint "
        f"{result.last_checkpoint}, {result.seconds:.0f} s, "
        f"{result.tokens_per_second:.0f} tokens/s; log {result.log_file}"
    )
    return 0


def cmd_model_prepare(args: argparse.Namespace) -> int:
    from sftrun.modeling import prepare_default_model

    report = prepare_default_model(args.out, force=args.force)
    print(
        f"wrote {report['path']}; check prompt {report['check_prompt']!r} -> "
        f"{report['check_reply']!r} (same tokens as the GGUF model)"
    )
    return 0


def cmd_data_sample(args: argparse.Namespace) -> int:
    from sftrun.sample_task import write_sample_data

    train, held_out = write_sample_data(args.out, args.train, args.eval, args.seed)
    print(f"wrote {train} ({args.train} examples) and {held_out} ({args.eval} examples)")
    return 0


def cmd_data_validate(args: argparse.Namespace) -> int:
    from sftrun.data import read_conversations

    for path in args.files:
        convs = read_conversations(path)
        formats: dict[str, int] = {}
        for conv in convs:
            formats[conv.fmt] = formats.get(conv.fmt, 0) + 1
        print(
            f"{path}: {len(convs)} records OK ({', '.join(f'{k} {v}' for k, v in formats.items())})"
        )
    return 0


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("-y", "--yes", action="store_true", help="start without the confirmation prompt")
    p.add_argument(
        "--resume",
        metavar="DIR",
        help=f"resume from a checkpoint folder, or '{C.RESUME_LATEST}' for the newest valid one",
    )
    p.add_argument("--no-unsloth", action="store_true", help="use plain transformers, not Unsloth")
    p.add_argument(
        "--allow-data-change",
        action="store_true",
        help="resume even though the training data differs from the checkpoint's",
    )
    p.add_argument(
        "--config",
        default=C.DEFAULT_CONFIG_PATH,
        help=f"YAML config (default {C.DEFAULT_CONFIG_PATH})",
    )
    p.add_argument(
        "overrides",
        nargs="*",
        metavar="KEY=VALUE",
        help="override config keys, e.g. learning_rate=1e-4 lora.r=8",
    )
    p.set_defaults(func=cmd_train)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sftrun",
        description="LoRA supervised fine-tuning with crash-safe checkpoints and exact resume.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    add_train_arguments(sub.add_parser("train", help="train or resume a LoRA adapter"))

    model = sub.add_parser("model", help="base model tools").add_subparsers(
        dest="model_command", required=True
    )
    prep = model.add_parser("prepare", help="build the bundled SmolLM2-135M-Instruct folder")
    prep.add_argument("--out", default=C.DEFAULT_MODEL_DIR, help="destination folder")
    prep.add_argument("--force", action="store_true", help="rebuild an existing folder")
    prep.set_defaults(func=cmd_model_prepare)

    data = sub.add_parser("data", help="data tools").add_subparsers(
        dest="data_command", required=True
    )
    sample = data.add_parser("sample", help="write the bundled sample task's data")
    sample.add_argument("--out", default="data/sample")
    sample.add_argument("--train", type=int, default=320, help="training examples")
    sample.add_argument("--eval", type=int, default=40, help="held-out examples")
    sample.add_argument("--seed", type=int, default=1234)
    sample.set_defaults(func=cmd_data_sample)
    validate = data.add_parser("validate", help="check data files and name every bad line")
    validate.add_argument("files", nargs="+")
    validate.set_defaults(func=cmd_data_validate)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; return the exit code (0 ok, non-zero with one line on stderr)."""
    args = build_parser().parse_args(argv)
    _quiet_libraries()
    try:
        return int(args.func(args))
    except SftrunError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("aborted: the last committed checkpoint is intact", file=sys.stderr)
        return 130


def train_main(argv: Sequence[str] | None = None) -> int:
    """``run_model_training.py``: the same as ``sftrun train``."""
    return main(["train", *(sys.argv[1:] if argv is None else argv)])
