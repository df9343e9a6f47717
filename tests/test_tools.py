"""Pipeline tools: ckpt list/inspect/verify/prune, data prepare/validate, eval, merge, chat."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from tests.conftest import main_in, tiny_settings, write_config
from tests.runs import entries

from sftrun.cli import main

OUT = Path("checkpoints/sft_model")


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path, sample_dir: Path) -> Path:
    """A finished tiny run, resumed once (checkpoints 3..12, one resume at step 6)."""
    cwd = tmp_path_factory.mktemp("tools")
    settings = tiny_settings(tiny_model, sample_dir, eval_accuracy="exact", eval_max_new_tokens=4)
    write_config(cwd / "config.yaml", settings)
    return main_in(
        cwd,
        ["train", "-y", "--config", "config.yaml", "max_steps=6"],
        ["train", "-y", "--config", "config.yaml", "--resume", "latest", "max_steps=12"],
    )


@pytest.fixture
def run_dir(trained: Path, copy_into_workdir) -> Path:
    return copy_into_workdir(trained)


def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-10] ^= 0x01
    path.write_bytes(bytes(data))


def test_ckpt_list_marks_newest_damaged_and_temporary(run_dir: Path, capsys) -> None:
    _flip(OUT / "checkpoint-3/optimizer.pt")
    (OUT / ".tmp-checkpoint-15-4242").mkdir()
    assert main(["ckpt", "list", "--config", "config.yaml"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == [
        "checkpoint",
        "step",
        "epoch",
        "progress",
        "loss",
        "eval_loss",
        "lr",
        "size",
        "written",
        "status",
    ]
    rows = {line.split()[0]: line for line in lines[1:]}
    assert "INVALID: optimizer.pt does not match its sha256" in rows["checkpoint-3"]
    assert rows["checkpoint-12"].endswith("valid [newest]")
    assert " 100.0% " in rows["checkpoint-12"] and " 75.0% " in rows["checkpoint-9"]
    assert "temporary: unfinished save" in rows[".tmp-checkpoint-15-4242"]


def test_ckpt_list_json(run_dir: Path, capsys) -> None:
    assert main(["ckpt", "list", str(OUT), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["step"] for r in rows] == [3, 6, 9, 12]
    last = rows[-1]
    assert last["newest"] and last["valid"] and last["epoch"] == 2.0
    assert last["train_loss"] > 0 and last["eval_loss"] > 0 and last["size"] > 0


def test_ckpt_verify_exit_codes(run_dir: Path, capsys) -> None:
    assert main(["ckpt", "verify", "--all", "--config", "config.yaml"]) == 0
    assert capsys.readouterr().out.count("OK ") == 4
    _flip(OUT / "checkpoint-9/adapter_model.safetensors")
    assert main(["ckpt", "verify", str(OUT / "checkpoint-9"), str(OUT / "checkpoint-12")]) == 1
    out = capsys.readouterr().out
    assert "FAILED  checkpoints/sft_model/checkpoint-9: adapter_model.safetensors does not" in out
    assert "OK      checkpoints/sft_model/checkpoint-12" in out


def test_ckpt_inspect_shows_state_and_a_resume_dry_run(run_dir: Path, capsys) -> None:
    ckpt = str(OUT / "checkpoint-6")
    assert (
        main(
            [
                "ckpt",
                "inspect",
                ckpt,
                "--config",
                "config.yaml",
                "learning_rate=1e-3",
                "num_train_epochs=3",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "checkpoints/sft_model/checkpoint-6: valid" in out
    assert "progress     step 6/6, epoch 1.00/1.00 (100.0%), 24 samples" in out
    assert "allowed      12 steps left (to step 18)" in out
    assert "override     learning_rate: 0.005 -> 0.001" in out
    assert "override     num_train_epochs: 2.0 -> 3.0" in out
    assert "LR at step   6: " in out and "decay ends at step 18" in out
    assert main(["ckpt", "inspect", ckpt, "--config", "config.yaml", "lora.r=8"]) == 0
    assert "would refuse lora.r: 4 -> 8" in capsys.readouterr().out


def test_ckpt_prune_keeps_the_newest_and_damaged(run_dir: Path, capsys) -> None:
    _flip(OUT / "checkpoint-3/rng_state.pth")
    assert main(["ckpt", "prune", str(OUT), "--keep", "1"]) == 0
    out = capsys.readouterr().out
    assert "deleted checkpoints/sft_model/checkpoint-6" in out
    assert "deleted checkpoints/sft_model/checkpoint-9" in out and "freed " in out
    assert entries(OUT) == ["checkpoint-12", "checkpoint-3"]


def test_data_prepare_writes_stats_and_a_cache_that_train_reuses(run_dir: Path, capsys) -> None:
    shutil.rmtree("outputs/1_data")
    assert main(["data", "prepare", "--config", "config.yaml"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("train: 24 examples, ")
    stats = json.loads(Path("outputs/1_data/stats.json").read_text())
    assert stats["train"]["examples"] == 24 and stats["eval"]["examples"] == 6
    assert 0 < stats["train"]["assistant_token_share"] < 1
    assert sum(stats["train"]["length_histogram"].values()) == 24
    assert "| tokens | examples |" in Path("outputs/1_data/stats.md").read_text()
    assert len(list(Path("outputs/1_data/cache").glob("*.safetensors"))) == 2
    assert (
        main(["train", "-y", "--config", "config.yaml", "--resume", "latest", "max_steps=13"]) == 0
    )
    log = sorted(Path("outputs/logs").glob("*.log"))[-1].read_text()
    assert "train data " in log and "tokenized cache hit" in log


def test_data_validate_names_every_bad_line(tmp_path: Path, sample_dir: Path, capsys) -> None:
    good = (sample_dir / "train.jsonl").read_text().splitlines()[:3]
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join([good[0], "{oops", good[1], '{"txt": 1}', good[2]]) + "\n")
    assert main(["data", "validate", str(path)]) == 1
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith(f"{path}:2: not valid JSON")
    assert out[1].startswith(f"{path}:4: unknown record format")
    assert out[2] == f"{path}: 3 good records (messages 3); 2 bad"
    assert main(["data", "validate", str(sample_dir / "eval.jsonl")]) == 0


def test_eval_writes_metrics_report_and_plot(run_dir: Path, capsys) -> None:
    assert (
        main(
            [
                "eval",
                "--checkpoint",
                str(OUT / "checkpoint-12"),
                "--base",
                "--config",
                "config.yaml",
                "eval_accuracy=exact",
                "eval_max_new_tokens=4",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "checkpoint-12: eval_loss " in out and "base: eval_loss " in out
    folder = Path("outputs/4_evaluation/checkpoint-12")
    metrics = json.loads((folder / "metrics.json").read_text())
    assert set(metrics) == {"checkpoint-12", "base"}
    assert metrics["checkpoint-12"]["eval_loss"] < metrics["base"]["eval_loss"]
    assert metrics["base"]["perplexity"] == pytest.approx(
        torch.tensor(metrics["base"]["eval_loss"]).exp().item(), rel=1e-5
    )
    report = (folder / "report.md").read_text()
    assert "| metric | checkpoint-12 | base |" in report and "![training curves]" in report
    assert (folder / "training_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_merge_exports_a_plain_model_with_the_same_logits(run_dir: Path, capsys) -> None:
    from transformers import AutoModelForCausalLM

    from sftrun.export import load_adapter_model

    ckpt = OUT / "checkpoint-12"
    assert main(["merge", "--checkpoint", str(ckpt)]) == 0
    run_id = json.loads((ckpt / "manifest.json").read_text())["run_id"]
    export = Path(f"outputs/5_export/{run_id[:8]}-checkpoint-12")  # the run id: no collisions
    assert f"wrote {export}: merged model + tokenizer" in capsys.readouterr().out
    merged = AutoModelForCausalLM.from_pretrained(export).eval()
    assert (export / "tokenizer.json").is_file()
    assert json.loads((export / ".sftrun-export.json").read_text())["step"] == 12
    loaded = load_adapter_model(ckpt)
    ids = torch.randint(3, 300, (2, 11), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert torch.allclose(
            merged(input_ids=ids).logits, loaded.model(input_ids=ids).logits, atol=1e-5
        )


def test_chat_one_shot_and_interactive(run_dir: Path, capsys) -> None:
    from sftrun.export import chat, load_adapter_model

    ckpt = OUT / "checkpoint-12"
    assert main(["chat", "--checkpoint", str(ckpt), "--prompt", "Hi", "--max-new-tokens", "5"]) == 0
    capsys.readouterr()
    loaded = load_adapter_model(ckpt)
    history = chat(loaded, "Hi", None, 5, 0.0)
    streamed = capsys.readouterr().out
    assert [m["role"] for m in history] == ["user", "assistant"]
    assert streamed.strip() == history[-1]["content"]  # what was streamed is the reply
    answers = iter(["Hello", "/reset", "Again", "/exit"])
    history = chat(loaded, None, "Be brief.", 3, 0.0, read=lambda prompt: next(answers))
    assert [m["role"] for m in history] == ["system", "user", "assistant"]
    assert history[1]["content"] == "Again"
    assert "(history cleared)" in capsys.readouterr().out
