"""Using a trained adapter: load it from a checkpoint, merge it into the base (stage 5), chat.

Owns ``sftrun merge`` and ``sftrun chat``. Reads checkpoints only through ``checkpoint.load``
(verified, no unpickling), and checks that the base model is the one the adapter was trained
on before using it. An export folder carries a marker (``.sftrun-export.json``) naming the
checkpoint it came from and the files the export wrote; merge replaces only those files of an
earlier export of the same checkpoint (a file the user added stays), never deletes a folder,
and of two merges racing for one new folder only one succeeds.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from sftrun import constants as C
from sftrun import fs, gguf_export, integrity, snapshot
from sftrun.config import LoraSettings
from sftrun.errors import CheckpointError, DiskSpaceError, ModelError
from sftrun.hooks import RunHooks
from sftrun.modeling import (
    Backend,
    load_lora_model,
    load_tokenizer,
    restore_adapter,
    weights_sha256,
)
from sftrun.monitor import fmt_bytes
from sftrun.safefile import read_json_object
from sftrun.snapshot import MODEL_PATH_ABSOLUTE

PLAIN = Backend("plain", "inference")


@dataclass
class Loaded:
    """A checkpoint's model ready for inference, with what it was trained with."""

    model: Any  # PeftModel in eval mode
    tokenizer: Any
    base_path: str
    args: dict[str, Any]  # the training config the checkpoint was made with
    trainer_state: dict[str, Any]


def load_adapter_model(ckpt: str | Path, base: str | None = None) -> Loaded:
    """The base model with the checkpoint's adapter; refuses a base with other weights."""
    saved = snapshot.load(Path(ckpt))
    args = saved.args
    want = saved.identity.get("base_model_sha256")
    base_path = base or _base_model_path(args, want, ckpt)
    if base and want and weights_sha256(base_path) != want:
        raise ModelError(
            f"{base_path} is not the base model {ckpt} was trained on (weights differ); "
            "pass --base with the original model folder"
        )
    tokenizer = load_tokenizer(base_path, args.get("chat_template"))
    model = load_lora_model(
        base_path, LoraSettings(**args["lora"]), PLAIN, torch.float32, args["max_seq_length"]
    )
    restore_adapter(model, saved.adapter, Path(ckpt))
    model.eval()
    return Loaded(model, tokenizer, base_path, args, saved.state)


def _base_model_path(args: dict[str, Any], want: str | None, ckpt: str | Path) -> str:
    """The base model folder a checkpoint names: as configured (relative to the current
    folder) if it is there and holds the same weights, else the absolute path recorded at
    training time."""
    candidates = [str(args.get("model_name_or_path", ""))]
    if args.get(MODEL_PATH_ABSOLUTE):
        candidates.append(str(args[MODEL_PATH_ABSOLUTE]))
    for path in candidates:
        if path and (Path(path) / "config.json").is_file():
            if want is None or weights_sha256(path) == want:
                return path
    raise ModelError(
        f"the base model {ckpt} was trained on is not at {' or '.join(candidates)}; pass "
        "--base with that model folder"
    )


def load_base_model(
    config_lora: LoraSettings, base_path: str, max_seq_length: int, chat_template: str | None
) -> Loaded:
    """The base model behind a fresh adapter (LoRA B = 0), which computes exactly the base."""
    tokenizer = load_tokenizer(base_path, chat_template)
    model = load_lora_model(base_path, config_lora, PLAIN, torch.float32, max_seq_length)
    model.eval()
    return Loaded(model, tokenizer, base_path, {}, {})


FORMATS = ("hf", "gguf")
DTYPES = ("float32", "bfloat16", "float16")
# How far the reloaded export's logits may be from the adapter model's, as a share of the
# largest logit, per precision (a quantized GGUF is reported, not judged: its error is the
# quantization's). f16 rounds to 11 significant bits, bf16 to 8.
TOLERANCE = {"float32": 1e-5, "float16": 1e-2, "bfloat16": 5e-2}
TOLERANCE |= {"f32": TOLERANCE["float32"], "f16": TOLERANCE["float16"], "bf16": 5e-2}


def merge(
    ckpt: str | Path, out: str | Path, base: str | None = None, hooks: RunHooks | None = None
) -> dict[str, Any]:
    """``sftrun merge``: the float32 Hugging Face export (see :func:`export`)."""
    return export(ckpt, out, "hf", base=base, hooks=hooks)


def export(
    ckpt: str | Path,
    out: str | Path,
    fmt: str,
    *,
    dtype: str = "float32",
    quant: str = "q8_0",
    base: str | None = None,
    hooks: RunHooks | None = None,
) -> dict[str, Any]:
    """Write base + adapter as one model: a plain HF folder (with tokenizer and chat
    template) in ``dtype``, or a GGUF file in ``quant`` with an Ollama Modelfile.

    Written in a private folder beside ``out``, reloaded by a reader sftrun did not write
    (transformers, with its GGUF loader for GGUF) and its logits compared with the adapter
    model's, then moved into place (see :func:`_replace`). Refusals (architecture, folder)
    come before the slow part.
    """
    target = Path(out)
    marker = {**_export_marker(ckpt), "format": fmt, "precision": dtype if fmt == "hf" else quant}
    fresh = _check_export_target(target, marker, ckpt)  # before the slow part
    loaded = load_adapter_model(ckpt, base)
    if fmt == "gguf":
        gguf_export.check_exportable(loaded.model.get_base_model().config, loaded.tokenizer)
    _check_room(target, loaded.model, fmt, dtype if fmt == "hf" else quant)
    probe = loaded.tokenizer.apply_chat_template(
        [{"role": "user", "content": "Check the merge."}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    with torch.no_grad():
        want = loaded.model(**probe).logits
    merged = loaded.model.merge_and_unload()
    target.parent.mkdir(parents=True, exist_ok=True)
    # A new private folder beside --out (same disk: the final renames are atomic).
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{target.name}-", dir=target.parent))
    try:
        if fmt == "gguf":
            report = _write_gguf(loaded, merged, tmp, quant, Path(ckpt), probe, want)
        else:
            report = _write_hf(loaded, merged, tmp, dtype, probe, want)
        marker["files"] = sorted(p.name for p in tmp.iterdir())  # what a re-export replaces
        (tmp / C.EXPORT_MARKER_FILE).write_text(json.dumps(marker, indent=2) + "\n")
        _readable(tmp)
        (hooks or RunHooks()).before_export_lands(target)
        _replace(tmp, target, marker, ckpt, fresh)
    finally:
        if tmp.is_dir() and not tmp.is_symlink():
            shutil.rmtree(tmp)  # made above by this call
    quant_base = loaded.args.get("quantization")
    note = (
        f"a QLoRA adapter (trained on a {quant_base.get('bits')}-bit base) merged into the "
        "full-precision base, the usual QLoRA export"
        if isinstance(quant_base, dict)
        else ""
    )
    return {"path": str(target), "note": note, **report}


# Bytes per weight of each output precision (q8_0: 34 bytes per 32 weights; q4_0: 18).
BYTES_PER_WEIGHT = {"float32": 4.0, "f32": 4.0, "float16": 2.0, "bfloat16": 2.0, "f16": 2.0}
BYTES_PER_WEIGHT |= {"bf16": 2.0, "q8_0": 34 / 32, "q4_0": 18 / 32}


def _check_room(target: Path, model: Any, fmt: str, precision: str) -> None:
    """Refuse, before anything is written, an export the disk under ``--out`` cannot hold
    (the new files are written beside it first, so an earlier export does not count)."""
    weights = sum(p.numel() for p in model.parameters())
    need = int(weights * BYTES_PER_WEIGHT[precision] * 1.05) + (64 << 20)  # + tokenizer, slack
    probe = target.parent
    while not probe.exists():
        probe = probe.parent
    free = fs.ops().disk_usage(probe).free
    if free < need:
        raise DiskSpaceError(
            f"not enough disk space in {probe} for the {fmt} export in {precision}: about "
            f"{fmt_bytes(need)} needed, {fmt_bytes(free)} free; free some space or pass --out "
            "on a larger disk"
        )


def _write_hf(
    loaded: Loaded, merged: Any, tmp: Path, dtype: str, probe: Any, want: torch.Tensor
) -> dict[str, Any]:
    from transformers import AutoModelForCausalLM

    merged.to(getattr(torch, dtype)).save_pretrained(tmp)
    loaded.tokenizer.save_pretrained(tmp)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32).eval()
    with torch.no_grad():
        got = reloaded(**probe).logits
    diff = float((got - want).abs().max())
    if diff > TOLERANCE[dtype] * max(1.0, float(want.abs().max())):
        raise ModelError(
            f"the merged model's logits differ from the adapter's by {diff:.2e} in {dtype}, "
            f"more than {TOLERANCE[dtype]:g} of the largest logit; export in float32 and "
            "report this"
        )
    return {"max_abs_logit_diff": diff, "reader": "transformers"}


def _write_gguf(
    loaded: Loaded,
    merged: Any,
    tmp: Path,
    quant: str,
    ckpt: Path,
    probe: Any,
    want: torch.Tensor,
) -> dict[str, Any]:
    """The GGUF file and its Modelfile, then transformers' GGUF loader reads both the
    weights and the tokenizer back: the same token ids and chat template, and logits within
    the precision's tolerance (quantized files: reported)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    name = f"{ckpt.resolve().parent.parent.name}-{ckpt.resolve().name}"
    path = tmp / f"model.{quant}.gguf"
    template = loaded.tokenizer.chat_template
    written = gguf_export.write(merged, loaded.tokenizer, path, quant, name, template)
    (tmp / "Modelfile").write_text(gguf_export.modelfile(path.name, template))
    tokenizer = AutoTokenizer.from_pretrained(tmp, gguf_file=path.name)
    ids = probe["input_ids"]
    text = loaded.tokenizer.decode(ids[0])
    if (
        tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids.tolist()
        != ids.tolist()
    ):
        raise ModelError(f"{path.name}: its tokenizer does not give the training token ids")
    if tokenizer.chat_template != template:
        raise ModelError(f"{path.name}: its chat template is not the one the run trained with")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp, gguf_file=path.name, dtype=torch.float32)
    with torch.no_grad():
        got = reloaded.eval()(**probe).logits
    diff = float((got - want).abs().max())
    agree = float((got.argmax(-1) == want.argmax(-1)).float().mean())
    if quant in TOLERANCE and diff > TOLERANCE[quant] * max(1.0, float(want.abs().max())):
        raise ModelError(
            f"{path.name}: its logits differ from the adapter's by {diff:.2e}, more than "
            f"{TOLERANCE[quant]:g} of the largest logit"
        )
    return {
        "max_abs_logit_diff": diff,
        "top1_agreement": agree,
        "reader": "transformers' GGUF loader",
        "gguf": path.name,
        "not_quantized": written["not_quantized"],
    }


def _readable(folder: Path) -> None:
    """The export as readable as a downloaded model folder: the folder 0755, files 0644
    (mkdtemp made them private), less what the umask withholds."""
    mask = os.umask(0)
    os.umask(mask)
    folder.chmod(0o755 & ~mask)
    for path in folder.iterdir():
        if path.is_file() and not path.is_symlink():
            path.chmod(0o644 & ~mask)


def _export_marker(ckpt: str | Path) -> dict[str, Any]:
    manifest = integrity.read_manifest(Path(ckpt))
    return {
        "checkpoint": str(Path(ckpt).resolve()),
        "run_id": manifest.get("run_id"),
        "step": manifest["step"],
        "adapter_sha256": manifest["files"][C.ADAPTER_WEIGHTS_FILE]["sha256"],
    }


def _read_marker(folder: Path) -> dict[str, Any] | None:
    return read_json_object(folder / C.EXPORT_MARKER_FILE, 1 << 20)


def _same_export(folder: Path, marker: dict[str, Any]) -> bool:
    found = _read_marker(folder)
    keys = ("run_id", "step", "adapter_sha256", "format", "precision")
    # An export from before formats existed is the float32 HF one.
    old = {"format": "hf", "precision": "float32", **(found or {})}
    return found is not None and all(old.get(k) == marker[k] for k in keys)


def _check_export_target(target: Path, marker: dict[str, Any], ckpt: str | Path) -> bool:
    """Refuse an ``--out`` that is not new, empty, or an export of this same checkpoint;
    True when it is new or empty (then it must still be so when the export lands)."""
    if target.is_symlink():
        raise CheckpointError(f"--out {target} is a symbolic link; pass a real folder path")
    if not target.exists():
        return True
    if not target.is_dir():
        raise CheckpointError(f"--out {target} is a file; pass a folder path")
    if not any(target.iterdir()):
        return True
    if not _same_export(target, marker):
        raise CheckpointError(
            f"--out {target} is not empty and is not an earlier export of {ckpt}; sftrun "
            "replaces only its own export of the same checkpoint; pass a new folder"
        )
    return False


@contextlib.contextmanager
def _folder_lock(target: Path, ckpt: str | Path) -> Iterator[None]:
    """An exclusive lock on the export folder itself (no file is added to it)."""
    fd = os.open(target, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise CheckpointError(
                f"--out {target} is being written by another merge of {ckpt}; wait for it, "
                "or pass another folder"
            ) from None
        yield
    finally:
        os.close(fd)


def _replace(
    tmp: Path, target: Path, marker: dict[str, Any], ckpt: str | Path, fresh: bool
) -> None:
    """Put the finished export in place.

    A folder that was new or empty when the merge started is claimed by one rename, which
    fails when anything got there first (of two merges racing for one folder, one succeeds).
    An earlier export of the same checkpoint has the files its marker lists replaced one by
    one, under a lock on the folder; files the user added there are left as they are.
    """
    lost = CheckpointError(
        f"--out {target} was written by another command while this merge ran; it was left "
        "as that command wrote it; pass another folder"
    )
    if fresh:
        try:
            os.rename(tmp, target)  # onto a missing or empty folder only
        except OSError as exc:
            if exc.errno in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR, errno.EISDIR):
                raise lost from None
            raise
        return
    with _folder_lock(target, ckpt):
        if any(target.iterdir()) and not _same_export(target, marker):
            raise lost  # checked before the slow part; changed since
        old = _read_marker(target) or {}
        ours = set(old.get("files") or []) | set(marker["files"])
        for name in marker["files"]:
            os.replace(tmp / name, target / name)
        for name in sorted(ours - set(marker["files"])):  # the old export's, not written now
            path = target / name
            if path.is_file() and not path.is_symlink():
                path.unlink()
        os.replace(tmp / C.EXPORT_MARKER_FILE, target / C.EXPORT_MARKER_FILE)  # last


def default_export_dir(ckpt: str | Path) -> Path:
    """``outputs/5_export/<run id>-checkpoint-<step>``: two runs never share a default."""
    run_id = integrity.run_id_of(Path(ckpt))
    name = Path(ckpt).resolve().name
    prefix = run_id[:8] if run_id else Path(ckpt).resolve().parent.name
    return Path(C.EXPORT_DIR) / f"{prefix}-{name}"


def chat(
    loaded: Loaded,
    prompt: str | None,
    system: str | None,
    max_new_tokens: int,
    temperature: float,
    read: Any = input,
) -> list[dict[str, str]]:
    """One-shot (``prompt``) or interactive chat, streaming tokens; return the conversation.

    Interactive commands: ``/reset`` clears the history, ``/exit`` (or end of input) leaves.
    """
    from transformers import TextStreamer

    tok = loaded.tokenizer
    if not tok.chat_template:
        raise ModelError(
            f"{loaded.base_path}: the tokenizer has no chat template and the run set none "
            "(chat_template); chat needs one"
        )
    history: list[dict[str, str]] = [{"role": "system", "content": system}] if system else []
    streamer = TextStreamer(tok, skip_prompt=True, skip_special_tokens=True)
    turns = [prompt] if prompt is not None else None
    while True:
        if turns is not None:
            if not turns:
                return history
            text = turns.pop(0)
        else:
            try:
                text = read("you> ")
            except EOFError:
                print()
                return history
            if text.strip() == "/exit":
                return history
            if text.strip() == "/reset":
                history = history[:1] if system else []
                print("(history cleared)")
                continue
        history.append({"role": "user", "content": text})
        batch = tok.apply_chat_template(
            history, add_generation_prompt=True, return_tensors="pt", return_dict=True
        )
        if turns is None:
            print("model> ", end="", flush=True)
        with torch.no_grad():
            out = loaded.model.generate(
                **batch,
                max_new_tokens=max_new_tokens,
                do_sample=temperature > 0,
                temperature=temperature if temperature > 0 else None,
                top_p=None,
                top_k=None,
                pad_token_id=tok.pad_token_id,
                streamer=streamer,
            )
        reply = tok.decode(out[0, batch["input_ids"].shape[1] :], skip_special_tokens=True)
        history.append({"role": "assistant", "content": reply.strip()})
        sys.stdout.flush()
