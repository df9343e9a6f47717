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
from pathlib import Path
from typing import Any

from sftrun import constants as C
from sftrun.cli_ckpt import HELP, add_ckpt_parsers, config_args, sub_parser
from sftrun.errors import SftrunError
from sftrun.hooks import RunHooks


def _quiet_libraries() -> None:
    # No network at run time; models and data come from local folders.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    # bitsandbytes (QLoRA) on an AVX512-BF16 CPU tries to fetch an optional 4-bit GEMM kernel
    # from the Hugging Face hub as it is imported, and warns "Failed to load CPU
    # gemm_4bit_forward ... pip install kernels" when it cannot (always, offline); it then
    # uses its own CPU path, which is what sftrun's QLoRA tests run. docs/models.md says so.
    import logging

    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    # accelerate 1.15 calls a transformers 5.23 property that is being renamed.
    warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated")
    hf_logging.disable_progress_bar()


def _settings_args(args: argparse.Namespace) -> list[str]:
    """The arguments that set up a run, to repeat in the printed resume command."""
    out = [] if args.config == C.DEFAULT_CONFIG_PATH else ["--config", args.config]
    out += ["--no-unsloth"] * args.no_unsloth + ["--allow-data-change"] * args.allow_data_change
    return out + list(args.overrides)


def cmd_train(args: argparse.Namespace) -> int:
    """``sftrun train`` (and ``run_model_training.py``): one run, its log file from the first
    instant, and its last line (done, stopped by a signal, complete or cancelled)."""
    import logging

    from sftrun.config import load_config
    from sftrun.distributed import launched_rank, stop
    from sftrun.monitor import (
        close_logging,
        file_away_untrained,
        setup_logging,
        timestamp,
        to_log_file,
    )
    from sftrun.trainer import RunOptions, run_training

    # The log file exists from the first instant and receives every error and the last line;
    # a command that trains nothing moves it aside at the end (monitor.file_away_untrained).
    stamp = timestamp()
    try:
        log_file = setup_logging(stamp, rank=launched_rank())
    except OSError as exc:
        raise SftrunError(
            f"cannot write the run's log in {C.LOG_DIR} ({exc.strerror or exc}); run from a "
            f"writable working folder (every run writes {C.OUTPUTS_DIR}/ there)"
        ) from None
    opts: RunOptions | None = None
    try:
        cfg = load_config(args.config, args.overrides)
        opts = RunOptions(
            resume=args.resume,
            yes=args.yes,
            no_unsloth=args.no_unsloth,
            allow_data_change=args.allow_data_change,
            settings_args=_settings_args(args),
            hooks=args.hooks,
        )
        result = run_training(cfg, opts, log_started=(stamp, log_file))
        if result.cancelled:
            line, code = "cancelled: nothing was trained", 1
        elif result.complete:
            name = result.last_checkpoint.name if result.last_checkpoint else "?"
            line, code = f"run complete at step {result.global_step} ({name}); nothing to train", 0
        elif result.stopped_by:
            line = f"stopped by {result.stopped_by} at step {result.global_step}"
            code = 128 + int(signal.Signals[result.stopped_by])
        else:
            line = (
                f"done: step {result.global_step}/{result.total_steps}, last checkpoint "
                f"{result.last_checkpoint}, {result.seconds:.0f} s, "
                f"{result.tokens_per_second:.0f} tokens/s; log {result.log_file}"
            )
            code = 0
        if launched_rank() == 0:
            print(line, file=sys.stdout if code == 0 else sys.stderr)
        to_log_file(logging.INFO if code == 0 else logging.WARNING, line)
        return code
    except SftrunError as exc:
        to_log_file(logging.ERROR, f"error: {exc}")
        raise
    except KeyboardInterrupt:
        to_log_file(logging.ERROR, "aborted by a second Ctrl-C")
        raise
    finally:
        stop()  # the process group, before the interpreter tears down (see distributed.stop)
        close_logging()
        if opts is None or not opts.trained:
            file_away_untrained(log_file)


def cmd_model_prepare(args: argparse.Namespace) -> int:
    """``sftrun model prepare``: the bundled GGUF model as a Hugging Face folder, checked."""
    from sftrun.modeling import prepare_default_model

    report = prepare_default_model(args.out, force=args.force)
    print(
        f"wrote {report['path']}; check prompt {report['check_prompt']!r} -> "
        f"{report['check_reply']!r} (same tokens as the GGUF model)"
    )
    return 0


def cmd_data_sample(args: argparse.Namespace) -> int:
    """``sftrun data sample``: write the sample task's training and held-out files."""
    from sftrun.sample_task import write_sample_data

    train, held_out = write_sample_data(args.out, args.train, args.eval, args.seed)
    print(f"wrote {train} ({args.train} examples) and {held_out} ({args.eval} examples)")
    return 0


def cmd_data_validate(args: argparse.Namespace) -> int:
    """``sftrun data validate``: every bad record of each file named; exit 1 if any."""
    from sftrun.data import format_counts, validate_file

    bad = 0
    for path in args.files:
        convs, errors = validate_file(path)
        for message in errors:
            print(message)
        bad += len(errors)
        counts: dict[str, int] = {}
        for conv in convs:
            counts[f"format_{conv.fmt}"] = counts.get(f"format_{conv.fmt}", 0) + 1
        summary = format_counts(counts) or "none"
        state = "OK" if not errors else f"{len(errors)} bad"
        print(f"{path}: {len(convs)} good records ({summary}); {state}")
    return 1 if bad else 0


def cmd_data_prepare(args: argparse.Namespace) -> int:
    """``sftrun data prepare``: stage 1 alone (validate, tokenize, cache, statistics)."""
    from sftrun import constants as C
    from sftrun.config import load_config
    from sftrun.datastage import prepare_data
    from sftrun.modeling import load_tokenizer, tokenizer_sha256

    cfg = load_config(args.config, args.overrides)
    tokenizer = load_tokenizer(cfg.model_name_or_path, cfg.chat_template)
    train, held_out = prepare_data(cfg, tokenizer, tokenizer_sha256(tokenizer))
    for name, data in (("train", train), ("eval", held_out)):
        if data is not None:
            c = data.counts
            print(
                f"{name}: {len(data)} examples, {data.num_tokens:,} tokens, "
                f"{data.num_label_tokens:,} with loss; truncated {c['truncated']}, "
                f"dropped {c['dropped']}"
            )
    print(f"wrote {C.DATA_STAGE_DIR}/stats.md, stats.json and the tokenized cache")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    """``sftrun eval``: stage 4, held-out accuracy of a checkpoint against its base model."""
    from sftrun.config import load_config
    from sftrun.report import run_eval

    cfg = load_config(args.config, args.overrides)
    if not cfg.eval_file:
        raise SftrunError("eval_file is not set in the config; set eval_file=PATH")
    ckpt = Path(args.checkpoint) if args.checkpoint else None
    out, results = run_eval(cfg, ckpt, args.base, args.name)
    for name, r in results.items():
        acc = (
            f", accuracy {100 * r['accuracy']:.1f}% ({r['correct']}/{r['scored']})"
            if "accuracy" in r
            else ""
        )
        print(f"{name}: eval_loss {r['eval_loss']:.4f}, perplexity {r['perplexity']:.3f}{acc}")
    print(f"wrote {out}/report.md, metrics.json" + (", training_curves.png" if ckpt else ""))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    """``sftrun export`` (and ``sftrun merge``, its float32 HF form): stage 5, the adapter
    merged into the base as an HF folder or a GGUF file, read back by a reader we did not
    write before it lands."""
    from sftrun.export import export
    from sftrun.exportdir import default_export_dir, precision_of

    fmt = args.format
    precision = precision_of(fmt, args.dtype, args.quant)
    out = args.out or default_export_dir(args.checkpoint, fmt, precision)
    report = export(
        args.checkpoint,
        out,
        fmt,
        dtype=args.dtype,
        quant=args.quant,
        base=args.base,
        hooks=args.hooks,
    )
    what = "merged model + tokenizer" if fmt == "hf" else report["gguf"]
    what += " + Modelfile" if report.get("modelfile") else ""
    line = (
        f"wrote {report['path']}: {what}; reloaded with {report['reader']}, max logit "
        f"difference to the adapter model {report['max_abs_logit_diff']:.1e}"
    )
    if fmt == "gguf":
        line += f", same next token at {100 * report['top1_agreement']:.0f}% of positions"
        if report["not_quantized"]:
            line += (
                f"; kept in f16 (rows not a multiple of the block): {len(report['not_quantized'])}"
            )
        line += f"\nserve: llama-server -m {report['path']}/{report['gguf']}"
        if report["modelfile"]:
            line += f"  or  cd {report['path']} && ollama create NAME -f Modelfile"
    print(line)
    for note in (report["note"], report.get("modelfile_note")):
        if note:
            print(note)
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    """``sftrun chat``: one prompt, or a conversation, with a checkpoint's model."""
    from sftrun.export import chat, load_adapter_model

    loaded = load_adapter_model(args.checkpoint, args.base)
    if args.prompt is None:
        print("chat with the fine-tuned model; /reset clears the history, /exit leaves")
    chat(loaded, args.prompt, args.system, args.max_new_tokens, args.temperature)
    return 0


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    """The train command's options (also those of ``run_model_training.py``)."""
    p.add_argument("-y", "--yes", action="store_true", help="start without the confirmation prompt")
    p.add_argument(
        "--resume",
        metavar="DIR",
        help=f"resume from a checkpoint folder; '{C.RESUME_LATEST}' for the newest valid one in "
        f"output_dir; '{C.RESUME_AUTO}' for the same, or a new run when there is none (for "
        "retry loops and schedulers) (default: start a new run)",
    )
    p.add_argument("--no-unsloth", action="store_true", help="use plain transformers, not Unsloth")
    p.add_argument(
        "--allow-data-change",
        action="store_true",
        help="resume even though the training data differs from the checkpoint's",
    )
    config_args(p)
    p.set_defaults(func=cmd_train, interrupted="aborted: the last committed checkpoint is intact")


def _data_parsers(sub: Any) -> None:
    data = sub.add_parser("data", help="data tools").add_subparsers(
        dest="data_command", required=True
    )
    sample = sub_parser(data, "sample", "write the bundled sample task's data")
    sample.add_argument("--out", default="data/sample", help="destination folder")
    sample.add_argument("--train", type=int, default=320, help="training examples")
    sample.add_argument("--eval", type=int, default=40, help="held-out examples")
    sample.add_argument("--seed", type=int, default=1234, help="seed of the generator")
    sample.set_defaults(func=cmd_data_sample)
    validate = sub_parser(data, "validate", "check data files and name every bad line")
    validate.add_argument("files", nargs="+", help="JSONL or JSON data files")
    validate.set_defaults(func=cmd_data_validate)
    prepare = sub_parser(data, "prepare", "validate and tokenize the configured data")
    config_args(prepare)
    prepare.set_defaults(func=cmd_data_prepare)


def build_parser() -> argparse.ArgumentParser:
    """Every command and its options (``sftrun --help``)."""
    parser = argparse.ArgumentParser(
        prog="sftrun",
        description="LoRA supervised fine-tuning with crash-safe checkpoints and exact resume.",
        formatter_class=HELP,
    )
    parser.set_defaults(interrupted="interrupted")
    sub = parser.add_subparsers(dest="command", required=True)

    add_train_arguments(sub_parser(sub, "train", "train or resume a LoRA adapter"))

    model = sub.add_parser("model", help="base model tools").add_subparsers(
        dest="model_command", required=True
    )
    prep = sub_parser(model, "prepare", "build the bundled SmolLM2-135M-Instruct folder")
    prep.add_argument("--out", default=C.DEFAULT_MODEL_DIR, help="destination folder")
    prep.add_argument("--force", action="store_true", help="rebuild an existing folder")
    prep.set_defaults(func=cmd_model_prepare)

    _data_parsers(sub)
    add_ckpt_parsers(sub)
    ev = sub_parser(sub, "eval", "held-out loss, perplexity, accuracy, report and plots")
    which = ev.add_mutually_exclusive_group()
    which.add_argument("--checkpoint", help="evaluate this checkpoint's adapter")
    ev.add_argument("--base", action="store_true", help="evaluate the base model (too)")
    ev.add_argument("--name", help="report folder name under outputs/4_evaluation/")
    config_args(ev)
    ev.set_defaults(func=cmd_eval)

    for name, text in (
        ("export", "the adapter merged into the base: an HF folder or a GGUF file (stage 5)"),
        ("merge", "the same as export --format hf --dtype float32"),
    ):
        mg = sub_parser(sub, name, text)
        mg.add_argument("--checkpoint", required=True, help="checkpoint folder")
        if name == "export":
            mg.add_argument("--format", choices=("hf", "gguf"), default="hf", help="what to write")
            mg.add_argument(
                "--quant",
                choices=("f32", "f16", "bf16", "q8_0", "q4_0"),
                default="q8_0",
                help="GGUF tensor type (1-D tensors stay f32)",
            )
        mg.add_argument(
            "--dtype",
            choices=("float32", "bfloat16", "float16"),
            default="float32",
            help="HF weights' precision" if name == "export" else argparse.SUPPRESS,
        )
        mg.add_argument(
            "--out",
            help="destination: a new or empty folder, or an earlier export of the same "
            f"checkpoint in the same format (default: {C.EXPORT_DIR}/<run id>-checkpoint-<step>"
            "[-<format>-<precision>])",
        )
        mg.add_argument("--base", help="base model folder (default: the one it was trained on)")
        mg.set_defaults(func=cmd_export, format="hf", quant="q8_0")

    ch = sub_parser(sub, "chat", "chat with the fine-tuned model")
    ch.add_argument("--checkpoint", required=True, help="checkpoint folder")
    ch.add_argument("--prompt", help="one message, one reply, then exit (default: interactive)")
    ch.add_argument("--system", help="system message")
    ch.add_argument("--max-new-tokens", type=int, default=256, help="reply length limit")
    ch.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    ch.add_argument("--base", help="base model folder (default: the one it was trained on)")
    ch.set_defaults(func=cmd_chat, interrupted="")
    return parser


def main(argv: Sequence[str] | None = None, hooks: RunHooks | None = None) -> int:
    """Run the CLI; return the exit code (0 ok, non-zero with one line on stderr).

    ``hooks`` reach into a training run (tests and benchmarks; see ``sftrun.hooks``)."""
    parser = build_parser()
    # KEY=VALUE overrides may follow options that follow a positional argument
    # (`ckpt inspect DIR --config c.yaml lr=1`), which plain argparse cannot interleave.
    args, extra = parser.parse_known_args(argv)
    if extra:
        if "overrides" in vars(args) and all("=" in e and not e.startswith("-") for e in extra):
            args.overrides = [*args.overrides, *extra]
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    _quiet_libraries()
    try:
        args.hooks = hooks or RunHooks()
        return int(args.func(args))
    except SftrunError as exc:
        rank = int(os.environ.get("RANK", "0"))  # a multi-process launch: say which process
        print(f"{f'rank {rank}: ' if rank else ''}error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        message = args.interrupted
        print(f"\n{message}" if message else "", file=sys.stderr)
        return 130


def train_main(argv: Sequence[str] | None = None) -> int:
    """``run_model_training.py``: the same as ``sftrun train``."""
    return main(["train", *(sys.argv[1:] if argv is None else argv)])
