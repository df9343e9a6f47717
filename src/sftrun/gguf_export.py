"""A merged model as one GGUF file for llama.cpp and Ollama, written in Python through the
pinned ``gguf`` package (no llama.cpp build at run time).

Owns the mapping of a Hugging Face causal LM to llama.cpp's layout: the architecture (Llama,
and Mistral as Llama; Qwen2), the hyper-parameters, the tensors under llama.cpp's names (the
``gguf`` package's own name map; Llama's query and key rows permuted as llama.cpp expects,
which transformers' GGUF loader undoes), the BPE tokenizer (tokens, token types, merges,
special ids) and the chat template the run trained with. Every other architecture or
tokenizer kind is refused with its name before anything is written. The file is written
where the caller says: ``export`` writes it into its private folder, which lands (or is
removed) as a whole, after it has loaded the file back with transformers' GGUF loader.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from sftrun.errors import ModelError

# Hugging Face model_type -> the gguf package's architecture (llama.cpp runs Mistral as Llama).
ARCHITECTURES = {"llama": "LLAMA", "mistral": "LLAMA", "qwen2": "QWEN2"}
# --quant -> (the tensors' type, the file type llama.cpp reports).
QUANTS = {
    "f32": ("F32", "ALL_F32"),
    "f16": ("F16", "MOSTLY_F16"),
    "bf16": ("BF16", "MOSTLY_BF16"),
    "q8_0": ("Q8_0", "MOSTLY_Q8_0"),
    "q4_0": ("Q4_0", "MOSTLY_Q4_0"),
}


# Types below 8 bits: the embedding and output head stay q8_0 under them (as llama.cpp's own
# quantizer keeps the output head at higher precision), since with a tied embedding the
# head's error lands on every next-token choice.
LOW_BIT = {"Q4_0"}


def check_exportable(model_config: Any, tokenizer: Any) -> str:
    """The gguf architecture for this model; a one-line refusal for what llama.cpp's layout
    here does not cover (another architecture, a tokenizer that is not byte-level BPE)."""
    check_tokenizer(tokenizer)
    return _check(model_config, _tokenizer_json(tokenizer))


def check_tokenizer(tokenizer: Any) -> None:
    """What a served GGUF needs from the tokenizer: a chat template (llama.cpp and Ollama
    format conversations with the one stored in the file) and an end token in the vocabulary
    (else generation never stops)."""
    if not tokenizer.chat_template:
        raise ModelError(
            "GGUF export needs a chat template and this run's tokenizer has none; set "
            "chat_template (for example chatml) in the run's config, or export with --format hf"
        )
    eos, vocab = tokenizer.eos_token_id, tokenizer.get_vocab()
    if eos is None or eos not in set(vocab.values()):
        where = "unset" if eos is None else "not in it"
        raise ModelError(
            f"GGUF export needs an end-of-sequence token in the vocabulary (eos_token "
            f"{getattr(tokenizer, 'eos_token', None)!r} is {where}); fix the base model's "
            "tokenizer_config.json, or export with --format hf"
        )


def _check(model_config: Any, tokenizer_json: dict[str, Any]) -> str:
    kind = getattr(model_config, "model_type", "?")
    if kind not in ARCHITECTURES:
        raise ModelError(
            f"GGUF export supports {', '.join(sorted(ARCHITECTURES))} models; this base is "
            f"{kind!r}; export it with --format hf (transformers, vLLM and TGI read that)"
        )
    model = tokenizer_json.get("model", {})
    if model.get("type") != "BPE":
        raise ModelError(
            f"GGUF export writes byte-level BPE tokenizers; this base's tokenizer is "
            f"{model.get('type', 'unknown')!r}; export it with --format hf"
        )
    _pre_tokenizer(tokenizer_json, kind)  # refused here, before the slow part
    return ARCHITECTURES[kind]


def write(
    model: Any, tokenizer: Any, path: Path, quant: str, name: str, chat_template: str | None
) -> dict[str, Any]:
    """Write ``model`` (merged, float) as GGUF at ``path``; return what was written."""
    import gguf

    tokenizer_json = _tokenizer_json(tokenizer)
    arch = gguf.MODEL_ARCH[_check(model.config, tokenizer_json)]
    tensor_type, file_type = QUANTS[quant]
    cfg = model.config
    merges = tokenizer_json["model"].get("merges", [])
    writer = gguf.GGUFWriter(str(path), gguf.MODEL_ARCH_NAMES[arch])
    try:
        _write_hyperparameters(writer, cfg, name, getattr(gguf.LlamaFileType, file_type))
        pre = _pre_tokenizer(tokenizer_json, cfg.model_type)
        _write_tokenizer(writer, tokenizer, merges, pre, cfg.vocab_size, chat_template)
        kept_f16 = _write_tensors(writer, model, arch, gguf.GGMLQuantizationType[tensor_type])
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()
    return {"path": str(path), "quant": quant, "not_quantized": kept_f16}


def _write_hyperparameters(writer: Any, cfg: Any, name: str, file_type: Any) -> None:
    heads = cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    writer.add_name(name)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(getattr(cfg, "num_key_value_heads", None) or heads)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    rope = getattr(cfg, "rope_theta", None) or (getattr(cfg, "rope_parameters", None) or {}).get(
        "rope_theta", 10000.0
    )
    writer.add_rope_freq_base(float(rope))
    writer.add_rope_dimension_count(head_dim)
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_file_type(file_type)
    writer.add_quantization_version(2)


def _tokenizer_json(tokenizer: Any) -> dict[str, Any]:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    return json.loads(backend.to_str()) if backend is not None else {}


def _pre_tokenizer(tokenizer_json: dict[str, Any], model_type: str) -> str:
    """llama.cpp's name for how the tokenizer splits text before BPE, read from what
    tokenizer.json says it does (not from the model's name: the bundled SmolLM2, converted from
    GGUF by transformers, splits like GPT-2, and training saw that). A split llama.cpp would do
    differently from the tokenizer is refused: the served model would see other tokens."""
    pre = tokenizer_json.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    kinds = [step.get("type") for step in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits"):
        return "smollm"  # digits one by one, then GPT-2's split
    if kinds == ["Split", "ByteLevel"] and model_type == "qwen2":
        return "qwen2"
    raise ModelError(
        "GGUF export names llama.cpp's GPT-2, SmolLM and Qwen2 pre-tokenizers; this tokenizer "
        f"splits text with {' + '.join(str(k) for k in kinds) or 'nothing'}; export it with "
        "--format hf"
    )


def _write_tokenizer(
    writer: Any, tokenizer: Any, merges: list[Any], pre: str, vocab_size: int, template: str | None
) -> None:
    import gguf

    vocab = tokenizer.get_vocab()
    size = max(vocab_size, max(vocab.values()) + 1)
    tokens = [f"[PAD{i}]" for i in range(size)]
    types = [gguf.TokenType.UNUSED] * size
    special = set(tokenizer.all_special_ids)
    added = {t.content for t in tokenizer.added_tokens_decoder.values()}
    for text, index in vocab.items():
        tokens[index] = text
        if index in special:
            types[index] = gguf.TokenType.CONTROL
        elif text in added:
            types[index] = gguf.TokenType.USER_DEFINED
        else:
            types[index] = gguf.TokenType.NORMAL
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])
    ids = {
        writer.add_bos_token_id: tokenizer.bos_token_id,
        writer.add_eos_token_id: tokenizer.eos_token_id,
        writer.add_pad_token_id: tokenizer.pad_token_id,
        writer.add_unk_token_id: tokenizer.unk_token_id,
    }
    for add, index in ids.items():
        if index is not None:
            add(index)
    writer.add_add_bos_token(False)  # the chat template writes every special token itself
    if template:
        writer.add_chat_template(template)


def _permute(weights: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's row order for Llama's query and key projections (rotary halves
    interleaved per head), as its converter writes them."""
    rows = weights.shape[0]
    return (
        weights.reshape(heads, 2, rows // heads // 2, *weights.shape[1:])
        .swapaxes(1, 2)
        .reshape(weights.shape)
    )


def _write_tensors(writer: Any, model: Any, arch: Any, qtype: Any) -> list[str]:
    """Every tensor under its llama.cpp name; returns the matrices kept in f16 because their
    rows do not split into the quantization's blocks."""
    import gguf
    from gguf.quants import quantize

    cfg = model.config
    names = gguf.get_tensor_name_map(arch, cfg.num_hidden_layers)
    heads = cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    tied = bool(getattr(cfg, "tie_word_embeddings", False))
    kept_f16 = []
    for hf_name, tensor in model.state_dict().items():
        if hf_name == "lm_head.weight" and tied:
            continue  # llama.cpp reads the embedding as the output head when there is none
        gguf_name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise ModelError(f"{hf_name} has no llama.cpp name; export with --format hf")
        data = tensor.detach().float().cpu().numpy()
        if arch == gguf.MODEL_ARCH.LLAMA and hf_name.endswith("q_proj.weight"):
            data = _permute(data, heads)
        elif arch == gguf.MODEL_ARCH.LLAMA and hf_name.endswith("k_proj.weight"):
            data = _permute(data, kv_heads)
        kind = qtype if data.ndim == 2 else gguf.GGMLQuantizationType.F32
        if gguf_name in ("token_embd.weight", "output.weight") and kind.name in LOW_BIT:
            kind = gguf.GGMLQuantizationType.Q8_0  # the output head decides every token
        block = gguf.GGML_QUANT_SIZES[kind][0]
        if data.shape[-1] % block:
            kind = gguf.GGMLQuantizationType.F16
            kept_f16.append(gguf_name)
        if kind == gguf.GGMLQuantizationType.F32:
            writer.add_tensor(gguf_name, data.astype(np.float32))
        elif kind == gguf.GGMLQuantizationType.F16:
            writer.add_tensor(gguf_name, data.astype(np.float16))
        else:
            writer.add_tensor(gguf_name, quantize(data, kind), raw_dtype=kind)
    return kept_f16


# Ollama's Go template for ChatML, the format of the bundled model's template.
CHATML_OLLAMA = """{{- range .Messages }}<|im_start|>{{ .Role }}
{{ .Content }}<|im_end|>
{{ end }}<|im_start|>assistant
"""


def modelfile(gguf_name: str, template: str | None) -> tuple[str | None, str]:
    """An Ollama Modelfile for the GGUF beside it (``ollama create NAME -f Modelfile``) and a
    note. ChatML is written in Ollama's template language with its stop token; any other
    template is not translated (a wrong translation would serve other prompts than training
    saw): no Modelfile, and the note names the template."""
    if template and "<|im_start|>" in template and "<|im_end|>" in template:
        lines = [f"FROM ./{gguf_name}", f'TEMPLATE """{CHATML_OLLAMA}"""']
        return "\n".join([*lines, 'PARAMETER stop "<|im_end|>"']) + "\n", ""
    start = " ".join(str(template).split())[:48]
    return None, (
        f"no Ollama Modelfile: the run's chat template ({start!r}...) is not ChatML, the one "
        "template sftrun translates into Ollama's language; llama.cpp reads the template "
        "stored in the GGUF"
    )
