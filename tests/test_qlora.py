"""QLoRA on the CPU: the bundled SmolLM2 with a 4-bit (nf4) base through bitsandbytes trains,
survives a SIGKILL with a bit-exact resume, refuses a resume with 8 bits by name, and merges
into the full-precision base."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from tests.conftest import tiny_settings, write_config
from tests.runs import adapter, assert_same_tensors, run_sftrun, trainer_state
from tests.test_model import REPO, bundled_model  # noqa: F401 - the session fixture

from sftrun.errors import CheckpointError

OUT = "checkpoints/sft_model"


def test_quantization_settings_become_a_bitsandbytes_config() -> None:
    import torch

    from sftrun.config import QuantizationSettings
    from sftrun.modeling import _bnb_config

    pytest.importorskip("bitsandbytes")
    four = _bnb_config(QuantizationSettings(bits=4, quant_type="fp4"), torch.float32)
    assert four.load_in_4bit and four.bnb_4bit_quant_type == "fp4"
    assert four.bnb_4bit_use_double_quant and four.bnb_4bit_compute_dtype == torch.float32
    bf16 = QuantizationSettings(bits=4, compute_dtype="bfloat16")
    assert _bnb_config(bf16, torch.float32).bnb_4bit_compute_dtype == torch.bfloat16
    assert _bnb_config(QuantizationSettings(bits=8), torch.float32).load_in_8bit


@pytest.mark.slow
def test_a_4bit_run_of_the_bundled_model_resumes_bit_exactly_and_merges(
    bundled_model: Path,  # noqa: F811
    tmp_path: Path,
) -> None:
    pytest.importorskip("bitsandbytes")
    data = tmp_path / "data"
    data.mkdir()
    lines = (REPO / "data/sample/train.jsonl").read_text().splitlines()
    (data / "train.jsonl").write_text("\n".join(lines[:8]) + "\n")
    settings = tiny_settings(
        bundled_model,
        data,
        eval_file=None,
        max_seq_length=128,
        max_steps=4,
        save_steps=2,
        per_device_train_batch_size=1,
        learning_rate=2e-4,
        warmup_steps=0,
        lora={"r": 4, "alpha": 8, "dropout": 0.05, "target_modules": ["q_proj", "v_proj"]},
        quantization={"bits": 4, "quant_type": "nf4", "double_quant": True},
    )
    cfg = write_config(tmp_path / "config.yaml", settings)
    env = {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    first, second = tmp_path / "a", tmp_path / "b"
    first.mkdir()
    second.mkdir()
    train = ["train", "-y", "--config", str(cfg)]
    ref = run_sftrun(train, first, env=env)
    assert ref.returncode == 0, ref.stderr[-3000:]
    killed = run_sftrun(
        train, second, script="chaos.py", env={**env, "SFTRUN_TEST_KILL_AFTER_STEP": "2"}
    )
    assert killed.returncode == -9
    eight = run_sftrun([*train, "--resume", "latest", "quantization.bits=8"], second, env=env)
    assert eight.returncode == CheckpointError.exit_code
    assert "quantization.bits: 4 -> 8" in eight.stderr, eight.stderr[-2000:]
    resumed = run_sftrun([*train, "--resume", "latest"], second, env=env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a, b = first / OUT / "checkpoint-4", second / OUT / "checkpoint-4"
    assert_same_tensors(adapter(a), adapter(b))
    assert (a / "optimizer.pt").read_bytes() == (b / "optimizer.pt").read_bytes()
    assert trainer_state(b)["resumed_from"] == [2]

    merged = run_sftrun(["merge", "--checkpoint", str(a), "--out", str(tmp_path / "m")], first)
    assert merged.returncode == 0, merged.stderr[-3000:]
    assert "into the full-precision base" in merged.stdout
    assert (tmp_path / "m" / "config.json").is_file()


def test_4bit_weights_keep_the_training_layout_whatever_the_cpu(tiny_model: Path) -> None:
    """bitsandbytes would repack a 4-bit weight for inference at the first eval-mode forward
    on a CPU with AVX512-BF16 (then an evaluation changes later training numbers, and a
    layer narrower than its block fails an assertion). Every 4-bit layer has that switched
    off after loading, including one that had it on (as such a CPU sets it)."""
    import torch

    from sftrun.config import LoraSettings, QuantizationSettings
    from sftrun.modeling import Backend, keep_4bit_layout, load_lora_model

    quantization = QuantizationSettings(bits=4)
    lora = LoraSettings(r=4, alpha=8, dropout=0.0, target_modules=["q_proj"])
    plain = Backend("plain", "test")
    model = load_lora_model(tiny_model, lora, plain, torch.float32, 64, quantization=quantization)
    layers = [m for m in model.modules() if hasattr(m, "support_avx512bf16_for_cpu")]
    assert layers and not any(m.support_avx512bf16_for_cpu for m in layers)
    for layer in layers:
        layer.support_avx512bf16_for_cpu = True  # as bitsandbytes sets it on such a CPU
    assert keep_4bit_layout(model) == len(layers)
    assert not any(m.support_avx512bf16_for_cpu for m in layers)
