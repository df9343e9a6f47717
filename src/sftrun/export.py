"""Using a trained adapter: load it from a checkpoint, merge it into the base (stage 5), chat.

Owns ``sftrun merge`` and ``sftrun chat``. Reads checkpoints only through ``checkpoint.load``
(verified, no unpickling), and checks that the base model is the one the adapter was trained
on before using it.
"""

from __future__ import annotations

import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from sftrun import checkpoint
from sftrun import constants as C
from sftrun.config import LoraSettings
from sftrun.errors import ModelError
from sftrun.modeling import (
    Backend,
    load_lora_model,
    load_tokenizer,
    restore_adapter,
    weights_sha256,
)

PLAIN = Backend("plain", "inference")


@dataclass
class Loaded:
    model: Any  # PeftModel in eval mode
    tokenizer: Any
    base_path: str
    args: dict[str, Any]  # the training config the checkpoint was made with
    trainer_state: dict[str, Any]


def load_adapter_model(ckpt: str | Path, base: str | None = None) -> Loaded:
    """The base model with the checkpoint's adapter; refuses a base with other weights."""
    payload, _ = checkpoint.load(ckpt)
    args = payload.training_args
    base_path = base or args["model_name_or_path"]
    want = payload.identity.get("base_model_sha256")
    if want and weights_sha256(base_path) != want:
        raise ModelError(
            f"{base_path} is not the base model {ckpt} was trained on (weights differ); "
            "pass --base with the original model folder"
        )
    tokenizer = load_tokenizer(base_path)
    model = load_lora_model(
        base_path, LoraSettings(**args["lora"]), PLAIN, torch.float32, args["max_seq_length"]
    )
    restore_adapter(model, payload.adapter_state, Path(ckpt))
    model.eval()
    return Loaded(model, tokenizer, base_path, args, payload.trainer_state)


def load_base_model(config_lora: LoraSettings, base_path: str, max_seq_length: int) -> Loaded:
    """The base model behind a fresh adapter (LoRA B = 0), which computes exactly the base."""
    tokenizer = load_tokenizer(base_path)
    model = load_lora_model(base_path, config_lora, PLAIN, torch.float32, max_seq_length)
    model.eval()
    return Loaded(model, tokenizer, base_path, {}, {})


def merge(ckpt: str | Path, out: str | Path, base: str | None = None) -> dict[str, Any]:
    """Write base + adapter as one plain HF model folder (with tokenizer and chat template).

    The folder is written next to ``out`` and renamed into place; the merged model is reloaded
    with stock transformers and its logits compared with the adapter model's.
    """
    from transformers import AutoModelForCausalLM

    loaded = load_adapter_model(ckpt, base)
    probe = loaded.tokenizer.apply_chat_template(
        [{"role": "user", "content": "Check the merge."}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    with torch.no_grad():
        want = loaded.model(**probe).logits
    merged = loaded.model.merge_and_unload()
    target = Path(out)
    tmp = target.parent / f".tmp-{target.name}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    merged.save_pretrained(tmp)
    loaded.tokenizer.save_pretrained(tmp)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32).eval()
    with torch.no_grad():
        got = reloaded(**probe).logits
    diff = float((got - want).abs().max())
    if diff > 1e-3:
        shutil.rmtree(tmp, ignore_errors=True)
        raise ModelError(f"the merged model's logits differ from the adapter's by {diff:.2e}")
    if target.exists():
        shutil.rmtree(target)
    tmp.rename(target)
    return {"path": str(target), "max_abs_logit_diff": diff}


def default_export_dir(ckpt: str | Path) -> Path:
    return Path(C.OUTPUTS_DIR) / "5_export" / Path(ckpt).resolve().name


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
