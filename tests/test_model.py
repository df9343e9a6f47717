"""Models: stock PEFT loads our adapters with the same logits; the loss; backend choice;
the bundled sample data; and one end-to-end run on the real bundled SmolLM2 model."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

import pytest
import torch
from tests.conftest import REPO, tiny_settings, write_config
from tests.runs import adapter, assert_same_tensors, run_sftrun, trainer_state

from sftrun import constants as C
from sftrun.cli import main
from sftrun.config import LoraSettings
from sftrun.errors import ModelError
from sftrun.loss import LabelOnlyLoss
from sftrun.modeling import load_lora_model, select_backend


def _stock_and_own_logits(base_dir: Path, ckpt: Path, lora: LoraSettings, ids: torch.Tensor):
    from peft import PeftModel, set_peft_model_state_dict
    from transformers import AutoModelForCausalLM

    stock = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), ckpt).eval()
    backend = select_backend("plain", no_unsloth=True)
    own = load_lora_model(base_dir, lora, backend, torch.float32, 256)
    set_peft_model_state_dict(own, adapter(ckpt))
    own.eval()
    with torch.no_grad():
        return stock(input_ids=ids).logits, own(input_ids=ids).logits, own


def test_stock_peft_loads_the_adapter_with_identical_logits(
    tiny_config, tiny_model: Path, workdir: Path
) -> None:
    tiny_config()
    assert main(["train", "-y", "--config", "config.yaml", "max_steps=3"]) == 0
    ckpt = workdir / "checkpoints/sft_model/checkpoint-3"
    lora = LoraSettings(r=4, alpha=8, dropout=0.1, target_modules=["q_proj", "v_proj"])
    ids = torch.randint(3, 300, (2, 17), generator=torch.Generator().manual_seed(0))
    stock, own, own_model = _stock_and_own_logits(tiny_model, ckpt, lora, ids)
    assert torch.equal(stock, own)
    base_logits = own_model.get_base_model()
    with own_model.disable_adapter(), torch.no_grad():
        untouched = base_logits(input_ids=ids).logits
    assert not torch.allclose(untouched, own)  # the adapter really changes the model


def test_label_only_loss_equals_full_vocabulary_cross_entropy(tiny_model: Path) -> None:
    backend = select_backend("plain", no_unsloth=True)
    lora = LoraSettings(r=4, alpha=8, dropout=0.0, target_modules=["q_proj"])
    model = load_lora_model(tiny_model, lora, backend, torch.float32, 64)
    ids = torch.randint(3, 300, (2, 12), generator=torch.Generator().manual_seed(1))
    labels = ids.clone()
    labels[:, :6] = C.IGNORE_INDEX
    attention = torch.ones_like(ids)
    loss_sum, count = LabelOnlyLoss(model)(ids, attention, labels)
    logits = model(input_ids=ids, attention_mask=attention).logits
    reference = torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]),
        labels[:, 1:].reshape(-1),
        ignore_index=C.IGNORE_INDEX,
        reduction="sum",
    )
    assert int(count) == 12
    assert loss_sum.item() == pytest.approx(reference.item(), rel=1e-6)


def test_backend_choice_says_why() -> None:
    assert select_backend("auto", no_unsloth=True).name == "plain"
    assert "--no-unsloth" in select_backend("auto", no_unsloth=True).reason
    if not torch.cuda.is_available():
        auto = select_backend("auto", no_unsloth=False)
        assert auto.name == "plain" and "needs CUDA" in auto.reason


def test_missing_base_model_names_the_fix(tiny_config, capsys: pytest.CaptureFixture[str]) -> None:
    tiny_config(model_name_or_path=C.DEFAULT_MODEL_DIR)
    assert main(["train", "-y", "--config", "config.yaml"]) == ModelError.exit_code
    assert capsys.readouterr().err == (
        "error: base model not found: model/models has no config.json; run `sftrun model "
        "prepare` to build the bundled SmolLM2-135M-Instruct there\n"
    )


def test_wrong_target_module_lists_available_layers(tiny_config, capsys) -> None:
    tiny_config(lora={"r": 4, "target_modules": ["qkv"]})
    assert main(["train", "-y", "--config", "config.yaml"]) == ModelError.exit_code
    assert "lora.target_modules ['qkv'] are not layers of" in capsys.readouterr().err


def test_sample_data_in_the_repo_is_what_the_generator_writes(tmp_path: Path) -> None:
    from sftrun.sample_task import write_sample_data

    train, held_out = write_sample_data(tmp_path)
    assert train.read_bytes() == (REPO / "data/sample/train.jsonl").read_bytes()
    assert held_out.read_bytes() == (REPO / "data/sample/eval.jsonl").read_bytes()
    assert not set(train.read_text().splitlines()) & set(held_out.read_text().splitlines())


# --- the real bundled model ------------------------------------------------------------------


@pytest.fixture(scope="session")
def bundled_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``model/models`` when `make` prepared it, else a fresh ``sftrun model prepare``, made
    once per test session: xdist's workers share it (the first prepares it under a lock)."""
    prepared = REPO / C.DEFAULT_MODEL_DIR
    if (prepared / "config.json").is_file():
        return prepared
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # this session's folder, above every worker's own
    out = root / "bundled" / "models"
    out.parent.mkdir(exist_ok=True)
    with open(root / "bundled.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (out / "config.json").is_file():
            assert main(["model", "prepare", "--out", str(out)]) == 0
    return out


def test_model_prepare_refuses_to_overwrite(tmp_path: Path, capsys) -> None:
    (tmp_path / "models").mkdir()
    assert main(["model", "prepare", "--out", str(tmp_path / "models")]) == ModelError.exit_code
    assert "already exists; pass --force" in capsys.readouterr().err


@pytest.mark.slow
def test_bundled_model_trains_and_resumes_exactly(bundled_model: Path, tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    lines = (REPO / "data/sample/train.jsonl").read_text().splitlines()
    (data / "train.jsonl").write_text("\n".join(lines[:12]) + "\n")
    held = (REPO / "data/sample/eval.jsonl").read_text().splitlines()
    (data / "eval.jsonl").write_text("\n".join(held[:2]) + "\n")
    settings = tiny_settings(
        bundled_model,
        data,
        max_seq_length=256,
        max_steps=3,
        save_steps=2,
        eval_steps=0,
        learning_rate=2e-4,
        warmup_steps=0,
        eval_accuracy="json",
        eval_max_new_tokens=8,
        lora={"r": 8, "alpha": 16, "dropout": 0.05},
    )
    cfg = write_config(tmp_path / "config.yaml", settings)
    first, second = tmp_path / "a", tmp_path / "b"
    first.mkdir()
    second.mkdir()
    env = {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    ref = run_sftrun(["train", "-y", "--config", str(cfg)], first, env=env)
    assert ref.returncode == 0, ref.stderr
    assert "held-out accuracy before training" in ref.stdout
    assert "held-out accuracy after training" in ref.stdout
    killed = run_sftrun(
        ["train", "-y", "--config", str(cfg)],
        second,
        script="chaos.py",
        env={**env, "SFTRUN_TEST_KILL_AFTER_STEP": "2"},
    )
    assert killed.returncode == -9
    resumed = run_sftrun(
        ["train", "-y", "--config", str(cfg), "--resume", "latest"], second, env=env
    )
    assert resumed.returncode == 0, resumed.stderr
    a = first / "checkpoints/sft_model/checkpoint-3"
    b = second / "checkpoints/sft_model/checkpoint-3"
    assert trainer_state(a)["log_history"][-3:][0]["loss"] > 0
    ha = [h for h in trainer_state(a)["log_history"] if h.get("step") == 3 and "loss" in h]
    hb = [h for h in trainer_state(b)["log_history"] if h.get("step") == 3 and "loss" in h]
    assert ha[0]["loss"] == hb[0]["loss"] and ha[0]["grad_norm"] == hb[0]["grad_norm"]
    assert_same_tensors(adapter(a), adapter(b))
    lora = LoraSettings(r=8, alpha=16, dropout=0.05)
    ids = torch.randint(3, 40000, (1, 9), generator=torch.Generator().manual_seed(2))
    stock, own, _ = _stock_and_own_logits(bundled_model, a, lora, ids)
    assert torch.equal(stock, own)
