"""Stage 5 beyond the float32 HF folder: GGUF files for llama.cpp and Ollama, and HF folders
in bf16/fp16, each read back by a reader sftrun did not write (transformers, and its GGUF
loader) before it lands; refusals before anything is written."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest
import torch
from tests.runs import OUT, changed, cli, one_line_error, tree

CK12 = str(OUT / "checkpoint-12")


def _adapter_logits(ckpt: str, ids: torch.Tensor) -> torch.Tensor:
    from sftrun.export import load_adapter_model

    with torch.no_grad():
        return load_adapter_model(ckpt).model(input_ids=ids).logits


@pytest.mark.parametrize(("quant", "atol"), [("f32", 1e-4), ("q8_0", 0.05)])
def test_a_gguf_export_reads_back_in_transformers_with_the_runs_tokens_and_template(
    run: Path, workdir: Path, capsys, quant: str, atol: float
) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    code, out, err = cli(
        capsys, "export", "--checkpoint", CK12, "--format", "gguf", "--quant", quant, "--out", "gg"
    )
    assert code == 0, err
    assert f"model.{quant}.gguf + Modelfile; reloaded with transformers' GGUF loader" in out
    gguf = f"model.{quant}.gguf"
    tokenizer = AutoTokenizer.from_pretrained("gg", gguf_file=gguf)
    from sftrun.export import load_adapter_model

    loaded = load_adapter_model(CK12)
    assert tokenizer.chat_template == loaded.tokenizer.chat_template
    text = loaded.tokenizer.apply_chat_template(
        [{"role": "user", "content": "Order: 3 x lamps, ship to Oslo."}],
        tokenize=False,
        add_generation_prompt=True,
    )
    ids = loaded.tokenizer(text, return_tensors="pt").input_ids
    assert torch.equal(tokenizer(text, return_tensors="pt").input_ids, ids)
    model = AutoModelForCausalLM.from_pretrained("gg", gguf_file=gguf, dtype=torch.float32).eval()
    with torch.no_grad():
        got, want = model(input_ids=ids).logits, loaded.model(input_ids=ids).logits
    assert torch.allclose(got, want, atol=atol), float((got - want).abs().max())
    modelfile = Path("gg/Modelfile").read_text()
    assert modelfile.startswith(f"FROM ./{gguf}\n") and 'PARAMETER stop "<|im_end|>"' in modelfile
    marker = json.loads(Path("gg/.sftrun-export.json").read_text())
    assert marker["format"] == "gguf" and marker["precision"] == quant
    # llama.cpp's name for the tiny tokenizer's split (GPT-2's regex), as gguf reads it back.
    from gguf import GGUFReader

    field = GGUFReader(f"gg/{gguf}").fields["tokenizer.ggml.pre"]
    assert bytes(field.parts[field.data[0]]).decode() == "gpt-2"


@pytest.mark.parametrize(
    ("pre", "model_type", "name"),
    [
        ({"type": "ByteLevel", "use_regex": True}, "llama", "gpt-2"),
        (
            {
                "type": "Sequence",
                "pretokenizers": [
                    {"type": "Digits", "individual_digits": True},
                    {"type": "ByteLevel", "use_regex": True},
                ],
            },
            "llama",
            "smollm",
        ),
        (
            {"type": "Sequence", "pretokenizers": [{"type": "Split"}, {"type": "ByteLevel"}]},
            "qwen2",
            "qwen2",
        ),
        ({"type": "Metaspace"}, "llama", None),
        (
            {"type": "Sequence", "pretokenizers": [{"type": "Split"}, {"type": "ByteLevel"}]},
            "llama",
            None,
        ),
    ],
)
def test_the_gguf_pre_tokenizer_is_named_from_what_the_tokenizer_does(
    pre, model_type, name
) -> None:
    """Named from tokenizer.json's split, not from the model's name (the bundled SmolLM2,
    converted by transformers, splits like GPT-2); a split llama.cpp has no name for here is
    refused rather than served with other tokens than training saw."""
    from sftrun.errors import ModelError
    from sftrun.gguf_export import _pre_tokenizer

    if name is None:
        with pytest.raises(ModelError, match="export it with --format hf"):
            _pre_tokenizer({"pre_tokenizer": pre}, model_type)
    else:
        assert _pre_tokenizer({"pre_tokenizer": pre}, model_type) == name


def test_an_f16_gguf_writes_the_adapter_models_replies_to_the_held_out_prompts(
    run: Path, workdir: Path, sample_dir: Path, capsys
) -> None:
    """Greedy generation through transformers' GGUF loader gives the adapter model's text on
    the sample task's held-out prompts (formatted with the run's chat template)."""
    from transformers import AutoModelForCausalLM

    from sftrun.data import read_conversations
    from sftrun.evaluate import split_prompt
    from sftrun.export import load_adapter_model

    args = ["--checkpoint", CK12, "--format", "gguf", "--quant", "f16", "--out", "gg"]
    code, _, err = cli(capsys, "export", *args)
    assert code == 0, err
    loaded = load_adapter_model(CK12)
    tok = loaded.tokenizer
    served = AutoModelForCausalLM.from_pretrained(
        "gg", gguf_file="model.f16.gguf", dtype=torch.float32
    ).eval()
    convs = read_conversations(sample_dir / "eval.jsonl")
    assert len(convs) == 6
    for conv in convs:
        task = split_prompt(conv, tok)
        assert task is not None
        ids = tok(task[0], return_tensors="pt", add_special_tokens=False).input_ids
        replies = []
        for model in (loaded.model, served):
            with torch.no_grad():
                out = model.generate(
                    input_ids=ids, max_new_tokens=24, do_sample=False, pad_token_id=tok.pad_token_id
                )
            assert out.shape[1] > ids.shape[1]  # it generated something
            replies.append(tok.decode(out[0, ids.shape[1] :]))
        assert replies[0] == replies[1]


def test_only_a_template_translated_faithfully_gets_an_ollama_modelfile() -> None:
    from sftrun.gguf_export import modelfile

    chatml = "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n"
    text, note = modelfile("model.q8_0.gguf", chatml + "{% endfor %}")
    assert text is not None and note == ""
    assert 'PARAMETER stop "<|im_end|>"' in text and "range .Messages" in text
    llama3 = "{% for m in messages %}<|start_header_id|>{{ m.role }}<|end_header_id|>{% endfor %}"
    text, note = modelfile("model.q8_0.gguf", llama3)
    assert text is None
    assert note.startswith("no Ollama Modelfile: the run's chat template ('{% for m in messages")
    assert "is not ChatML" in note


def test_a_gguf_needs_a_chat_template_and_an_end_token() -> None:
    """Checked before the slow part: without them llama.cpp and Ollama could not format a
    conversation the way training did, or would never stop generating."""
    from types import SimpleNamespace

    from sftrun.errors import ModelError
    from sftrun.gguf_export import check_tokenizer

    vocab = {"a": 0, "<|im_end|>": 1}
    good = {"chat_template": "{{ x }}", "eos_token": "<|im_end|>", "eos_token_id": 1}
    check_tokenizer(SimpleNamespace(**good, get_vocab=lambda: vocab))
    for change, said in (
        ({"chat_template": None}, "needs a chat template"),
        ({"eos_token_id": 7}, "eos_token '<|im_end|>' is not in it"),
        ({"eos_token_id": None, "eos_token": None}, "eos_token None is unset"),
    ):
        with pytest.raises(ModelError, match="export with --format hf") as caught:
            check_tokenizer(SimpleNamespace(**(good | change), get_vocab=lambda: vocab))
        assert said in str(caught.value)


def test_q4_0_is_a_quarter_of_f16_and_half_precision_hf_folders_are_group_readable(
    run: Path, workdir: Path, capsys
) -> None:
    for quant in ("f16", "q4_0"):
        assert (
            cli(
                capsys,
                "export",
                "--checkpoint",
                CK12,
                "--format",
                "gguf",
                "--quant",
                quant,
                "--out",
                quant,
            )[0]
            == 0
        )
    f16, q4 = Path("f16/model.f16.gguf").stat().st_size, Path("q4_0/model.q4_0.gguf").stat().st_size
    assert q4 < 0.5 * f16
    code, out, err = cli(
        capsys, "export", "--checkpoint", CK12, "--dtype", "bfloat16", "--out", "hf16"
    )
    assert code == 0, err
    from safetensors import safe_open

    with safe_open("hf16/model.safetensors", framework="pt") as fh:
        assert {fh.get_tensor(k).dtype for k in fh.keys()} == {torch.bfloat16}
    for path in [Path("hf16"), *Path("hf16").iterdir()]:
        assert path.stat().st_mode & stat.S_IRGRP, path


def test_an_architecture_llama_cpp_layout_does_not_cover_is_refused_before_writing(
    tmp_path: Path, sample_dir: Path, capsys, monkeypatch
) -> None:
    from tests.conftest import build_tiny_model, tiny_settings, write_config

    from sftrun.cli import main

    texts = (sample_dir / "train.jsonl").read_text().splitlines()
    gemma = build_tiny_model(tmp_path / "gemma2", texts, "gemma2")
    monkeypatch.chdir(tmp_path)
    settings = tiny_settings(gemma, sample_dir, eval_file=None, max_steps=1)
    write_config(tmp_path / "config.yaml", settings)
    assert main(["train", "-y", "--config", "config.yaml"]) == 0
    capsys.readouterr()
    before = tree(tmp_path)
    ckpt = str(OUT / "checkpoint-1")
    code, _, err = cli(capsys, "export", "--checkpoint", ckpt, "--format", "gguf")
    assert code == 5
    said = one_line_error(err)
    assert "GGUF export supports llama, mistral, qwen2 models; this base is 'gemma2'" in said
    assert changed(before, tree(tmp_path), ignore=("outputs/logs",)) == set()


def test_a_gguf_export_never_replaces_an_hf_export_of_the_same_checkpoint(
    run: Path, workdir: Path, capsys
) -> None:
    assert cli(capsys, "export", "--checkpoint", CK12, "--out", "export")[0] == 0
    before = tree(workdir / "export")
    code, _, err = cli(
        capsys, "export", "--checkpoint", CK12, "--format", "gguf", "--out", "export"
    )
    assert code == 4 and "is not an earlier export of" in one_line_error(err)
    assert tree(workdir / "export") == before


def test_an_export_the_disk_cannot_hold_is_refused_before_anything_is_written(
    run: Path, workdir: Path, capsys
) -> None:
    from sftrun import fs

    usage = fs.ops().disk_usage(workdir)
    before = tree(workdir)
    with fs.replaced(disk_usage=lambda p: usage._replace(free=1000)):
        code, _, err = cli(capsys, "export", "--checkpoint", CK12, "--format", "gguf")
    assert code == 6
    said = one_line_error(err)
    assert "not enough disk space in" in said and "for the gguf export in q8_0" in said
    assert changed(before, tree(workdir), ignore=("outputs/logs",)) == set()
