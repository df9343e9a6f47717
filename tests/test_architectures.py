"""The architecture matrix: Llama, Qwen2, Mistral, Gemma 2, Phi-3 and GPT-NeoX, each a tiny
random model built in code with the tiny tokenizer and a chat template. For each: the
label-only loss equals the model's own, training resumes bit-exactly after a SIGKILL, stock
PEFT loads the adapter, and `sftrun merge` exports a model with the same logits.

Also here: gradient checkpointing (same numbers, bit-exact resume) and the base model in
training mode (GPT-NeoX and Qwen2 carry non-zero dropout).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tests.conftest import FAMILIES, build_tiny_model, tiny_settings, write_config
from tests.runs import adapter, assert_same_tensors, run_sftrun

from sftrun.config import LoraSettings
from sftrun.loss import LabelOnlyLoss
from sftrun.modeling import load_lora_model, select_backend

OUT = Path("checkpoints/sft_model")
ALL_LINEAR = {"r": 4, "alpha": 8, "dropout": 0.1, "target_modules": "all-linear"}


@pytest.fixture(scope="module")
def family_models(tmp_path_factory, sample_dir: Path) -> dict[str, Path]:
    texts = (sample_dir / "train.jsonl").read_text().splitlines()
    root = tmp_path_factory.mktemp("families")
    return {f: build_tiny_model(root / f, texts, f) for f in FAMILIES}


def _load(path: Path, lora: dict, **kwargs):
    backend = select_backend("plain", no_unsloth=True)
    return load_lora_model(path, LoraSettings(**lora), backend, torch.float32, 256, **kwargs)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_the_label_only_loss_is_the_models_own_and_the_model_trains_in_training_mode(
    family: str, family_models: dict[str, Path]
) -> None:
    model = _load(family_models[family], ALL_LINEAR)
    assert all(m.training for m in model.modules())  # base dropout on, as HF Trainer has it
    ids = torch.randint(3, 300, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():  # LoRA B is 0, so only the base's own dropout can make these differ
        twice = [model(input_ids=ids).logits for _ in range(2)]
    has_dropout = family in ("qwen2", "gpt_neox")
    assert torch.equal(*twice) != has_dropout, family
    model.eval()
    labels = ids.clone()
    labels[:, :5] = -100
    with torch.no_grad():
        own = model(input_ids=ids, labels=labels).loss
        loss_sum, count = LabelOnlyLoss(model)(ids, torch.ones_like(ids), labels)
    assert torch.allclose(loss_sum / count, own, atol=1e-5), (family, float(loss_sum / count))


def _train(cwd: Path, *args: str, env: dict[str, str] | None = None):
    return run_sftrun(["train", "-y", "--config", "config.yaml", *args], cwd, env, "chaos.py")


@pytest.mark.slow
@pytest.mark.parametrize("family", list(FAMILIES))
def test_each_family_resumes_bit_exactly_loads_in_stock_peft_and_merges(
    family: str, family_models: dict[str, Path], tmp_path: Path, sample_dir: Path
) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model_dir = family_models[family]
    settings = tiny_settings(model_dir, sample_dir, eval_file=None, max_steps=6, lora=ALL_LINEAR)
    ref, cwd = tmp_path / "ref", tmp_path / "killed"
    for folder in (ref, cwd):
        folder.mkdir()
        write_config(folder / "config.yaml", settings)
    first = _train(ref)
    assert first.returncode == 0, first.stderr[-2000:]
    assert "(all-linear)" in first.stdout
    assert _train(cwd, env={"SFTRUN_TEST_KILL_AFTER_STEP": "3"}).returncode == -9
    resumed = _train(cwd, "--resume", "latest")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    ckpt = ref / OUT / "checkpoint-6"
    assert_same_tensors(adapter(ckpt), adapter(cwd / OUT / "checkpoint-6"))
    assert (ckpt / "optimizer.pt").read_bytes() == (
        cwd / OUT / "checkpoint-6/optimizer.pt"
    ).read_bytes()

    stock = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), ckpt).eval()
    ids = torch.randint(3, 300, (2, 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        adapted = stock(input_ids=ids).logits
        with stock.disable_adapter():
            plain = stock(input_ids=ids).logits
    assert not torch.allclose(adapted, plain, atol=1e-6)  # the adapter trained and is applied
    merged_dir = ref / "merged"
    proc = run_sftrun(["merge", "--checkpoint", str(ckpt), "--out", str(merged_dir)], ref)
    assert proc.returncode == 0, proc.stderr[-2000:]
    merged = AutoModelForCausalLM.from_pretrained(merged_dir).eval()
    with torch.no_grad():
        assert torch.allclose(merged(input_ids=ids).logits, adapted, atol=1e-5)


@pytest.mark.slow
def test_gradient_checkpointing_gives_the_same_numbers_and_resumes_bit_exactly(
    tiny_model: Path, sample_dir: Path, tmp_path: Path
) -> None:
    """LoRA dropout 0.1 and accumulation 2: the recomputed forward draws the same masks."""
    settings = tiny_settings(tiny_model, sample_dir, eval_file=None, max_steps=6)
    runs = {}
    for name, extra, env in [
        ("plain", [], None),
        ("checkpointed", ["gradient_checkpointing=true"], None),
        ("killed", ["gradient_checkpointing=true"], {"SFTRUN_TEST_KILL_AFTER_STEP": "3"}),
    ]:
        cwd = tmp_path / name
        cwd.mkdir()
        write_config(cwd / "config.yaml", settings)
        proc = _train(cwd, *extra, env=env)
        if name == "killed":
            assert proc.returncode == -9
            proc = _train(cwd, "--resume", "latest", *extra)
        assert proc.returncode == 0, proc.stderr[-2000:]
        runs[name] = adapter(cwd / OUT / "checkpoint-6")
    assert "gradient checkpointing" in proc.stdout
    assert_same_tensors(runs["checkpointed"], runs["killed"])
    assert_same_tensors(runs["plain"], runs["checkpointed"])


def test_gradient_checkpointing_is_on_in_every_layer(tiny_model: Path) -> None:
    lora = {"r": 4, "alpha": 8, "dropout": 0.1, "target_modules": ["q_proj"]}
    model = _load(tiny_model, lora, gradient_checkpointing=True)
    layers = model.get_base_model().model.layers
    assert all(layer.gradient_checkpointing for layer in layers)
    assert not any(
        layer.gradient_checkpointing
        for layer in _load(tiny_model, lora).get_base_model().model.layers
    )


def _without_template(tiny_model: Path, tmp_path: Path) -> Path:
    import json
    import shutil

    bare = tmp_path / "bare"
    shutil.copytree(tiny_model, bare)
    (bare / "chat_template.jinja").unlink(missing_ok=True)
    config = json.loads((bare / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (bare / "tokenizer_config.json").write_text(json.dumps(config))
    return bare


def test_a_model_without_a_chat_template_needs_one_for_chat_data_only(
    tiny_model: Path, sample_dir: Path, workdir: Path, capsys
) -> None:
    from sftrun.cli import main

    bare = _without_template(tiny_model, workdir)
    write_config(
        workdir / "config.yaml",
        tiny_settings(bare, sample_dir, eval_file=None, max_steps=1),
    )
    assert main(["train", "-y", "--config", "config.yaml"]) == 3
    err = capsys.readouterr().err
    assert "train.jsonl:1: a chat record, but the model's tokenizer has no chat template" in err
    assert "set chat_template: chatml" in err and not (workdir / OUT).exists()
    (workdir / "tmpl.jinja").write_text((tiny_model / "chat_template.jinja").read_text())
    for template in ("chatml", "tmpl.jinja"):
        out = f"checkpoints/{template}"
        args = [f"chat_template={template}", f"output_dir={out}"]
        assert main(["train", "-y", "--config", "config.yaml", *args]) == 0
    # The same template by name or by file: the same tokens, the same adapter.
    assert_same_tensors(
        adapter(workdir / "checkpoints/chatml/checkpoint-1"),
        adapter(workdir / "checkpoints/tmpl.jinja/checkpoint-1"),
    )
    (workdir / "text.jsonl").write_text('{"text": "plain text needs no template"}\n' * 4)
    args = ["train_file=text.jsonl", "output_dir=checkpoints/text"]
    assert main(["train", "-y", "--config", "config.yaml", *args]) == 0
    missing = ["chat_template=nothing.jinja", "output_dir=checkpoints/x"]
    assert main(["train", "-y", "--config", "config.yaml", *missing]) == 5
    assert "chat_template 'nothing.jinja' is neither a file nor a known template" in (
        capsys.readouterr().err
    )


def test_two_unsloth_versions_are_refused_but_switching_the_backend_is_not() -> None:
    from sftrun.resume import identity_differences

    plain = {"seed": 1, "unsloth_version": None}
    old, new = {**plain, "unsloth_version": "2026.1"}, {**plain, "unsloth_version": "2026.3"}
    assert identity_differences(old, new) == [("unsloth_version", "2026.1", "2026.3")]
    assert identity_differences(old, plain) == [] and identity_differences(plain, new) == []


def test_unsloth_in_a_multi_process_launch_is_refused() -> None:
    from types import SimpleNamespace

    from sftrun.modeling import Backend
    from sftrun.plan import _check_parallel

    plan = SimpleNamespace(
        cfg=SimpleNamespace(parallel="ddp", quantization=None, oom="auto"),
        world=2,
        sharded=False,
        backend=Backend("unsloth", "Unsloth imported with CUDA available", "2026.1"),
        notes=[],
    )
    refusals: list[str] = []
    _check_parallel(plan, refusals, preview=False)
    assert refusals == [
        "Unsloth trains in one process, and this launch has 2; pass --no-unsloth (or "
        "backend: plain), or launch one process"
    ]
