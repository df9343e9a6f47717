"""Using a trained adapter: load it from a checkpoint, merge it into the base (stage 5), chat.

Owns ``sftrun export`` (an HF folder in float32/bf16/fp16, or a GGUF file through
``gguf_export``), ``sftrun merge`` (its float32 HF form) and ``sftrun chat``. Reads checkpoints
only through ``snapshot.load`` (verified, no unpickling), checks that the base model is the one
the adapter was trained on, and reads every export back with transformers before it lands in
its folder (``exportdir``: the marker, the claim of a new folder, replacing only its own files).
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from sftrun import constants as C
from sftrun import fs, gguf_export, snapshot
from sftrun.config import LoraSettings
from sftrun.errors import DiskSpaceError, ModelError
from sftrun.exportdir import check_export_target, export_marker, precision_of, readable, replace
from sftrun.hooks import RunHooks
from sftrun.modeling import (
    Backend,
    load_lora_model,
    load_tokenizer,
    restore_adapter,
    weights_sha256,
)
from sftrun.monitor import fmt_bytes
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


# How far the reloaded export's logits may be from the adapter model's, as a share of the
# largest logit, per precision (a quantized GGUF is reported, not judged: its error is the
# quantization's). f16 rounds to 11 significant bits, bf16 to 8.
TOLERANCE = {"float32": 1e-5, "float16": 1e-2, "bfloat16": 5e-2}
GGUF_FLOAT = {"f32": "float32", "f16": "float16", "bf16": "bfloat16"}  # the same precisions
TOLERANCE |= {quant: TOLERANCE[dtype] for quant, dtype in GGUF_FLOAT.items()}


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
    model's, then moved into place (see :func:`replace`). Refusals (architecture, folder)
    come before the slow part.
    """
    target = Path(out)
    precision = precision_of(fmt, dtype, quant)
    marker = {**export_marker(ckpt), "format": fmt, "precision": precision}
    fresh = check_export_target(target, marker, ckpt)  # before the slow part
    loaded = load_adapter_model(ckpt, base)
    if fmt == "gguf":
        gguf_export.check_exportable(loaded.model.get_base_model().config, loaded.tokenizer)
    _check_room(target, loaded.model, fmt, precision)
    probe = (
        loaded.tokenizer.apply_chat_template(
            [{"role": "user", "content": "Check the merge."}],
            add_generation_prompt=True,
            return_tensors="pt",
            return_dict=True,
        )
        if loaded.tokenizer.chat_template  # a run on plain text may have none (HF folders)
        else loaded.tokenizer("Check the merge.", return_tensors="pt")
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
        readable(tmp)
        (hooks or RunHooks()).before_export_lands(target)
        replace(tmp, target, marker, ckpt, fresh)
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
BYTES_PER_WEIGHT = {
    "float32": 4.0,
    "float16": 2.0,
    "bfloat16": 2.0,
    "q8_0": 34 / 32,
    "q4_0": 18 / 32,
}
BYTES_PER_WEIGHT |= {quant: BYTES_PER_WEIGHT[dtype] for quant, dtype in GGUF_FLOAT.items()}


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
    reloaded = AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32)
    diff, _ = _compare(reloaded, probe, want, dtype, "the merged model")
    return {"max_abs_logit_diff": diff, "reader": "transformers"}


def _compare(
    reloaded: Any, probe: Any, want: torch.Tensor, precision: str, what: str
) -> tuple[float, float]:
    """The reloaded export's largest logit difference to the adapter model and the share of
    positions with the same next token; refused past the precision's :data:`TOLERANCE`."""
    with torch.no_grad():
        got = reloaded.eval()(**probe).logits
    diff = float((got - want).abs().max())
    if precision in TOLERANCE and diff > TOLERANCE[precision] * max(1.0, float(want.abs().max())):
        raise ModelError(
            f"{what}'s logits differ from the adapter's by {diff:.2e} in {precision}, more "
            f"than {TOLERANCE[precision]:g} of the largest logit; export in float32 and "
            "report this"
        )
    return diff, float((got.argmax(-1) == want.argmax(-1)).float().mean())


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
    ollama, ollama_note = gguf_export.modelfile(path.name, template)
    if ollama is not None:
        (tmp / "Modelfile").write_text(ollama)
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
    diff, agree = _compare(reloaded, probe, want, quant, path.name)
    return {
        "max_abs_logit_diff": diff,
        "top1_agreement": agree,
        "reader": "transformers' GGUF loader",
        "gguf": path.name,
        "not_quantized": written["not_quantized"],
        "modelfile": ollama is not None,
        "modelfile_note": ollama_note,
    }


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
