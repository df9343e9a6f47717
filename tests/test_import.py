"""Taking in the runs users already have (issue 25): an HF Trainer / TRL checkpoint continued
in sftrun as TRL itself continues it, refusals that change nothing, and ``init_adapter``.

The reference is TRL's ``SFTTrainer`` (tests/helpers/trl_sft.py), run in its own process:
12 steps saving at 6, then TRL resumed from its checkpoint-6. sftrun imports that same
checkpoint-6 and continues to 12; the per-step losses and the final adapter must agree.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

from conftest import tiny_settings, write_config
from runs import (
    OUT,
    adapter,
    changed,
    cli,
    one_line_error,
    run_sftrun,
    step_records,
    trainer_state,
    tree,
)
from sftrun import sampler
from sftrun.hfckpt import pickle_fields

# Steps 7-12 of sftrun's continuation against TRL's own resume: the bound.
LOSS_RTOL = 1e-3
# The final adapters: the same float32 arithmetic in a different summation order (sftrun sums
# the loss over label tokens itself, TRL through transformers' num_items_in_batch) moves the
# last bits; measured 1.5e-8 on weights up to 0.2 (docs/resume.md).
ADAPTER_ATOL = 1e-6


def _trl(work: Path, tiny_model: Path, sample_dir: Path, out: str, *resume: str) -> list[dict]:
    proc = run_sftrun(
        [str(tiny_model), str(sample_dir / "train.jsonl"), str(work / out), *resume],
        cwd=work,
        script="trl_sft.py",
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def trl(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path, sample_dir: Path) -> Path:
    """TRL's run (checkpoints 6 and 12) and TRL's own resume from 6, with their logs."""
    work = tmp_path_factory.mktemp("trl")
    straight = _trl(work, tiny_model, sample_dir, "trl")
    resumed = _trl(work, tiny_model, sample_dir, "trl-resumed", str(work / "trl/checkpoint-6"))
    (work / "losses.json").write_text(json.dumps({"straight": straight, "resumed": resumed}))
    return work


def _config(workdir: Path, tiny_model: Path, sample_dir: Path, **overrides: Any) -> Path:
    """sftrun's side of tests/helpers/trl_sft.py's settings."""
    settings = tiny_settings(
        tiny_model,
        sample_dir,
        eval_file=None,
        max_steps=12,
        learning_rate=5e-3,
        lr_scheduler_type="linear",
        warmup_steps=0,
        weight_decay=0.0,
        max_grad_norm=1.0,
        save_steps=3,
        seed=11,
        lora={"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]},
    )
    settings.update(overrides)
    return write_config(workdir / "config.yaml", settings)


@pytest.fixture
def source(trl: Path, workdir: Path) -> Path:
    """A private copy of TRL's checkpoint-6."""
    return Path(shutil.copytree(trl / "trl/checkpoint-6", workdir / "hf/checkpoint-6"))


@pytest.mark.slow
def test_trl_checkpoint_continues_in_sftrun_as_trl_continues_it(
    trl: Path, workdir: Path, tiny_model: Path, sample_dir: Path, capsys: pytest.CaptureFixture
) -> None:
    source = trl / "trl/checkpoint-6"
    before = tree(source)
    _config(workdir, tiny_model, sample_dir)
    code, out, err = cli(capsys, "ckpt", "import", str(source), "--config", "config.yaml")
    assert code == 0, err
    assert "imported step 6 of 12 into checkpoints/sft_model/checkpoint-6" in out
    assert "sftrun train --resume checkpoints/sft_model/checkpoint-6" in out
    assert "rng_state.pth" in out  # said: its numpy state would need unpickling
    assert tree(source) == before  # the source is only read
    imported = trainer_state(OUT / "checkpoint-6")
    assert imported["data_order"] == sampler.HF_TRAINER and imported["data_seed"] == 11
    assert imported["samples_seen"] == 24  # one epoch of 24 examples, 6 steps of 4
    assert sorted(step_records(imported["log_history"])) == [1, 2, 3, 4, 5, 6]

    code, _, err = cli(
        capsys, "train", "-y", "--config", "config.yaml", "--resume", str(OUT / "checkpoint-6")
    )
    assert code == 0, err
    ours = step_records(trainer_state(OUT / "checkpoint-12")["log_history"], after=6)
    theirs = {h["step"]: h for h in json.loads((trl / "losses.json").read_text())["resumed"]}
    assert sorted(ours) == [7, 8, 9, 10, 11, 12]
    for step, record in ours.items():
        assert record["loss"] == pytest.approx(theirs[step]["loss"], rel=LOSS_RTOL), step
        assert record["learning_rate"] == pytest.approx(theirs[step]["learning_rate"], rel=1e-9)
    final, reference = adapter(OUT / "checkpoint-12"), adapter(trl / "trl-resumed/checkpoint-12")
    assert final.keys() == reference.keys()
    for key in final:
        torch.testing.assert_close(final[key], reference[key], rtol=0, atol=ADAPTER_ATOL)

    # The imported order and position are kept by later resumes: from checkpoint-9 of the
    # continued run, step 12 comes out bit-identical.
    shutil.copytree(OUT, workdir / "again")
    shutil.rmtree(workdir / "again/checkpoint-12")
    _config(workdir, tiny_model, sample_dir, output_dir="again")
    code, _, err = cli(
        capsys, "train", "-y", "--config", "config.yaml", "--resume", "again/checkpoint-9"
    )
    assert code == 0, err
    again = adapter(workdir / "again/checkpoint-12")
    assert all(torch.equal(again[k], final[k]) for k in final)


def test_hf_trainer_order_is_accelerates_seedable_sampler() -> None:
    """The order sftrun replays is the one accelerate's sampler (as HF Trainer sets it up)
    yields, epoch after epoch: checked against accelerate itself, not against a copy."""
    from accelerate.data_loader import SeedableRandomSampler

    for n, seed in ((24, 11), (7, 3)):
        reference = SeedableRandomSampler(range(n), data_seed=seed)
        for epoch in range(3):  # each full pass moves the sampler to the next epoch
            assert list(reference) == list(
                sampler.epoch_permutation(seed, epoch, n, sampler.HF_TRAINER)
            )
    with pytest.raises(ValueError, match="unknown data order"):
        sampler.epoch_permutation(1, 0, 4, "shuffled")


def test_training_args_are_read_without_unpickling(tmp_path: Path) -> None:
    from transformers import TrainingArguments

    args = TrainingArguments(
        output_dir=str(tmp_path),
        seed=5,
        gradient_accumulation_steps=3,
        lr_scheduler_type="cosine",
        use_cpu=True,
        report_to=[],
    )
    torch.save(args, tmp_path / "training_args.bin")
    fields = pickle_fields((tmp_path / "training_args.bin").read_bytes())
    assert fields["seed"] == 5 and fields["gradient_accumulation_steps"] == 3
    assert fields["lr_scheduler_type"] == "cosine"  # an enum, as its value
    assert fields["accelerator_config"]["use_seedable_sampler"] is True

    marker = tmp_path / "ran"

    class Hostile:
        def __reduce__(self):  # what pickle.load would call: os.system("touch ran")
            return (os.system, (f"touch {marker}",))

    for payload in (pickle.dumps(Hostile()), pickle.dumps({"x": Hostile()}), b"\x80\x04junk"):
        try:
            pickle_fields(payload)
        except ValueError:
            pass
    assert not marker.exists()


def _packing(source: Path) -> None:
    from trl import SFTConfig

    torch.save(
        SFTConfig(output_dir=str(source), packing=True, report_to=[], use_cpu=True, bf16=False),
        source / "training_args.bin",
    )


def _full_fine_tune(source: Path) -> None:
    (source / "adapter_model.safetensors").rename(source / "model.safetensors")


@pytest.mark.slow
@pytest.mark.parametrize(
    ("damage", "overrides", "expected"),
    [
        (lambda s: (s / "global_step6").mkdir(), {}, "a DeepSpeed ZeRO checkpoint (global_step6/"),
        (lambda s: (s / "pytorch_model_fsdp_0").mkdir(), {}, "an FSDP-sharded checkpoint"),
        (_full_fine_tune, {}, "a full fine-tune checkpoint (model.safetensors, no LoRA adapter)"),
        (_packing, {}, "the source run packed its data (packing=True)"),
        (lambda s: (s / "optimizer.pt").unlink(), {}, "optimizer.pt is missing"),
        (
            None,
            {"lora": {"r": 8, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]}},
            "lora.r: the adapter has 4, the config says 8",
        ),
        (None, {"learning_rate": 1e-3}, "learning_rate: the source run's peak was 0.005"),
        (None, {"gradient_accumulation_steps": 4}, "global batch: the source run trained 2 x 2"),
        (None, {"lr_scheduler_type": "cosine"}, "lr_scheduler_type: the source run used 'linear'"),
        (None, {"max_steps": 20}, "max_steps: the source run was planned for 12 steps"),
    ],
    ids=[
        "deepspeed",
        "fsdp",
        "full-fine-tune",
        "packing",
        "no-optimizer",
        "lora-r",
        "lr",
        "batch",
        "schedule",
        "length",
    ],
)
def test_import_refusals_are_one_line_and_change_nothing(
    source: Path,
    workdir: Path,
    tiny_model: Path,
    sample_dir: Path,
    capsys,
    damage,
    overrides,
    expected,
) -> None:
    if damage is not None:
        damage(source)
    _config(workdir, tiny_model, sample_dir, **overrides)
    before = tree(workdir)
    code, _, err = cli(capsys, "ckpt", "import", str(source), "--config", "config.yaml")
    assert code == 4, err
    assert expected in one_line_error(err)
    # Nothing written (outputs/1_data, the tokenized data cache, aside), the source untouched.
    assert not changed(before, tree(workdir), ignore=("outputs",))


@pytest.mark.slow
@pytest.mark.parametrize("inside", ["", "/run"])
def test_import_never_writes_into_its_source(
    source: Path, workdir: Path, tiny_model: Path, sample_dir: Path, capsys, inside: str
) -> None:
    """output_dir pointed at the HF checkpoint, or below it: refused before the run lock or
    anything else is made there."""
    _config(workdir, tiny_model, sample_dir, output_dir=f"hf/checkpoint-6{inside}")
    before = tree(workdir)
    code, _, err = cli(capsys, "ckpt", "import", str(source), "--config", "config.yaml")
    assert code == 2
    assert "is inside the checkpoint being imported" in one_line_error(err)
    assert tree(workdir) == before


@pytest.mark.slow
def test_import_never_replaces_a_run_and_resume_points_to_it(
    source: Path, workdir: Path, tiny_model: Path, sample_dir: Path, capsys
) -> None:
    _config(workdir, tiny_model, sample_dir)
    code, out, err = cli(capsys, "ckpt", "import", str(source), "--config", "config.yaml")
    assert code == 0, err
    first = tree(workdir / OUT)
    code, _, err = cli(capsys, "ckpt", "import", str(source), "--config", "config.yaml")
    assert code != 0 and "checkpoint" in one_line_error(err)
    assert tree(workdir / OUT) == first  # the run it would have overwritten is intact

    code, _, err = cli(capsys, "train", "-y", "--config", "config.yaml", "--resume", str(source))
    assert code == 4
    assert f"continue it in sftrun with: sftrun ckpt import {source}" in one_line_error(err)


def test_init_adapter_starts_a_new_run_from_an_adapter(
    run: Path, tiny_config, capsys: pytest.CaptureFixture[str]
) -> None:
    """A new run (its own schedule, step 0) whose first step moves the given adapter by at
    most one Adam step (lr per element), not a fresh adapter; a mismatched shape is refused."""
    start = run / "checkpoint-12"
    tiny_config(
        init_adapter=str(start), output_dir="fresh", max_steps=1, save_steps=1, eval_file=None
    )
    code, _, err = cli(capsys, "train", "-y", "--config", "config.yaml")
    assert code == 0, err
    moved, given = adapter(Path("fresh/checkpoint-1")), adapter(start)
    assert max(float((moved[k] - given[k]).abs().max()) for k in given) <= 5e-3 * 1.001
    assert any(float(given[k].abs().max()) > 0.01 for k in given if "lora_B" in k)

    tiny_config(
        init_adapter=str(start),
        output_dir="other",
        lora={"r": 8, "alpha": 8, "dropout": 0.1, "target_modules": ["q_proj", "v_proj"]},
    )
    code, _, err = cli(capsys, "train", "-y", "--config", "config.yaml")
    assert code == 2
    assert "init_adapter" in one_line_error(err) and "lora.r: the adapter has 4" in err
    assert not Path("other").exists()

    # A run folder inside the starting adapter would write into a folder sftrun only reads.
    before = tree(start)
    tiny_config(init_adapter=str(start), output_dir=str(start / "run"))
    code, _, err = cli(capsys, "train", "-y", "--config", "config.yaml")
    assert code == 2 and "is inside init_adapter" in one_line_error(err)
    assert tree(start) == before
