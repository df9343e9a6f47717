"""Several processes (torchrun, gloo, 2 processes on the CPU, OMP_NUM_THREADS=1).

The split of a step's samples is a pure function, tested in one process; everything else
runs real `torchrun --standalone` jobs of the tiny model through tests/helpers/chaos.py.
"""

from __future__ import annotations

import itertools
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tests.conftest import tiny_settings, write_config
from tests.runs import (
    HELPERS,
    adapter,
    assert_same_tensors,
    entries,
    run_sftrun,
    trainer_state,
)

from sftrun import checkpoint, integrity, runfolder
from sftrun.distributed import micro_batches, rank_seed
from sftrun.sampler import step_indices

OUT = Path("checkpoints/sft_model")


@pytest.mark.parametrize("global_batch", [4, 6, 8])
def test_every_split_of_the_global_batch_trains_on_the_same_samples(global_batch: int) -> None:
    splits = [
        (p, m, a)
        for p, m, a in itertools.product(range(1, 9), repeat=3)
        if p * m * a == global_batch
    ]
    assert len(splits) >= 4
    for step in range(5):
        samples = step_indices(3, 22, step * global_batch, global_batch)
        for processes, micro, accumulation in splits:
            taken = [
                ids
                for rank in range(processes)
                for batch in micro_batches(samples, rank, micro, accumulation)
                for ids in batch
            ]
            assert taken == samples, (processes, micro, accumulation)  # each once, in order


def test_rank_seeds_are_distinct_and_one_process_keeps_the_seed() -> None:
    assert rank_seed(42, 0, 0) == 42
    seeds = {rank_seed(42, step, rank) for step in range(50) for rank in range(8)}
    assert len(seeds) == 400


def _torchrun(
    cwd: Path,
    args: list[str],
    n: int = 2,
    env: dict[str, str] | None = None,
    timeout: int = 240,
    launcher: str = "torch.distributed.run",
) -> subprocess.CompletedProcess[str]:
    with socket.socket() as s:  # a free port, so parallel jobs never meet
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", launcher, f"--nproc_per_node={n}"]
    cmd += ["--nnodes=1", "--master_addr=127.0.0.1", f"--master_port={port}"]
    cmd += [str(HELPERS / "chaos.py"), "train", "-y", "--config", "config.yaml", *args]
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(
        cmd, cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout
    )


def _single(cwd: Path, args: list[str], env: dict[str, str] | None = None):
    cmd = [sys.executable, str(HELPERS / "chaos.py"), "train", "-y", "--config", "config.yaml"]
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
    return subprocess.run(
        cmd + args, cwd=cwd, env=full_env, capture_output=True, text=True, timeout=240
    )


# 2 processes x micro 1 x accumulation 2 = 1 process x micro 2 x accumulation 2 = 4.
TWO = ["per_device_train_batch_size=1"]
ONE = ["per_device_train_batch_size=2"]


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory, tiny_model: Path, sample_dir: Path) -> Path:
    """The uninterrupted 2-process reference run (12 steps) with its sample log."""
    cwd = tmp_path_factory.mktemp("ddp-ref")
    write_config(cwd / "config.yaml", tiny_settings(tiny_model, sample_dir, eval_file=None))
    proc = _torchrun(cwd, TWO, env={"SFTRUN_TEST_SAMPLES_LOG": str(cwd / "samples.log")})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return cwd


NO_DROPOUT = {"lora": {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]}}


@pytest.fixture(scope="module")
def two_process_run_without_dropout(tmp_path_factory, tiny_model: Path, sample_dir: Path) -> Path:
    """As ``two_process_run``, LoRA dropout 0: no random draw in training at all."""
    cwd = tmp_path_factory.mktemp("ddp-ref-nodrop")
    settings = tiny_settings(tiny_model, sample_dir, eval_file=None, **NO_DROPOUT)
    write_config(cwd / "config.yaml", settings)
    proc = _torchrun(cwd, TWO, env={"SFTRUN_TEST_SAMPLES_LOG": str(cwd / "samples.log")})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return cwd


def _samples(path: Path) -> dict[int, str]:
    lines = path.read_text().splitlines()
    return {int(k): v for k, v in (line.split(": ", 1) for line in lines)}


@pytest.mark.slow
def test_two_processes_write_one_checkpoint_per_step_with_every_rank_state(
    two_process_run: Path,
) -> None:
    out = two_process_run / OUT
    assert entries(out) == [
        "checkpoint-12",
        "checkpoint-3",
        "checkpoint-6",
        "checkpoint-9",
    ]
    assert all(info.valid for info in runfolder.scan(out))
    payload, _ = checkpoint.load(out / "checkpoint-6")
    assert payload.training_args["world_size"] == 2
    assert len(payload.rng_state["ranks"]) == 2
    assert not torch.equal(
        payload.rng_state["ranks"][0]["cpu"], payload.rng_state["ranks"][1]["cpu"]
    )
    assert len(list((two_process_run / "outputs/logs").iterdir())) == 1  # process 0's log only


@pytest.mark.slow
def test_sigkill_of_the_job_then_resume_on_two_is_bit_exact(
    two_process_run: Path, tmp_path: Path, tiny_model: Path, sample_dir: Path
) -> None:
    write_config(tmp_path / "config.yaml", tiny_settings(tiny_model, sample_dir, eval_file=None))
    killed = _torchrun(tmp_path, TWO, env={"SFTRUN_TEST_KILL_AFTER_STEP": "6"})
    assert killed.returncode != 0
    assert runfolder.resolve("latest", tmp_path / OUT)[0].name == "checkpoint-6"
    resumed = _torchrun(tmp_path, [*TWO, "--resume", "latest"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    ref, got = two_process_run / OUT / "checkpoint-12", tmp_path / OUT / "checkpoint-12"
    assert_same_tensors(adapter(ref), adapter(got))
    for name in ("optimizer.pt", "scheduler.pt"):
        assert (ref / name).read_bytes() == (got / name).read_bytes()


@pytest.mark.slow
@pytest.mark.parametrize("direction", ["2->1", "1->2"])
def test_resume_on_another_process_count_continues_at_the_exact_sample(
    two_process_run_without_dropout: Path,
    tmp_path: Path,
    tiny_model: Path,
    sample_dir: Path,
    direction: str,
) -> None:
    ref_run = two_process_run_without_dropout
    settings = tiny_settings(tiny_model, sample_dir, eval_file=None, **NO_DROPOUT)
    write_config(tmp_path / "config.yaml", settings)
    log = {"SFTRUN_TEST_SAMPLES_LOG": str(tmp_path / "samples.log")}
    kill = {**log, "SFTRUN_TEST_KILL_AFTER_STEP": "6"}  # the same 12-step run, killed
    if direction == "2->1":
        first = _torchrun(tmp_path, TWO, env=kill)
        second = _single(tmp_path, [*ONE, "--resume", "latest"], env=log)
    else:
        first = _single(tmp_path, ONE, env=kill)
        second = _torchrun(tmp_path, [*TWO, "--resume", "latest"], env=log)
    assert first.returncode != 0 and integrity.verify(tmp_path / OUT / "checkpoint-6") is None
    assert second.returncode == 0, second.stderr[-3000:]
    assert "random states are re-derived per process" in second.stdout
    assert _samples(tmp_path / "samples.log") == _samples(ref_run / "samples.log")
    # Same samples, same optimizer and LR state, no dropout: the adapters differ only by the
    # order of floating-point sums (DDP's all-reduce against local accumulation).
    ref = adapter(ref_run / OUT / "checkpoint-12")
    got = adapter(tmp_path / OUT / "checkpoint-12")
    start = adapter(ref_run / OUT / "checkpoint-6")
    for key in ref:
        assert torch.allclose(ref[key], got[key], atol=1e-5, rtol=0), key
        assert not torch.allclose(ref[key], start[key], atol=1e-3, rtol=0)  # it did train
    assert trainer_state(tmp_path / OUT / "checkpoint-12")["samples_seen"] == 48


def _sigterm_to_rank_1_at_step_4(
    tmp_path: Path, tiny_model: Path, sample_dir: Path, launcher: str
) -> subprocess.CompletedProcess[str]:
    write_config(
        tmp_path / "config.yaml",
        tiny_settings(tiny_model, sample_dir, eval_file=None, save_steps=100),
    )
    env = {"SFTRUN_TEST_SIGNAL_AT_STEP": "4:SIGTERM", "SFTRUN_TEST_SIGNAL_RANK": "1"}
    return _torchrun(tmp_path, TWO, env=env, launcher=launcher)


@pytest.mark.slow
def test_sigterm_to_one_process_stops_both_after_the_same_step(
    tmp_path: Path, tiny_model: Path, sample_dir: Path
) -> None:
    proc = _sigterm_to_rank_1_at_step_4(tmp_path, tiny_model, sample_dir, "torch.distributed.run")
    assert proc.returncode != 0  # torchrun reports the workers' exit 143
    assert proc.stderr.count(f"exitcode  : {128 + signal.SIGTERM}") in (0, 1, 2)
    names = entries(tmp_path / OUT)
    assert names == ["checkpoint-5"] and integrity.verify(tmp_path / OUT / "checkpoint-5") is None
    resumed = _torchrun(tmp_path, [*TWO, "--resume", "latest"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert trainer_state(tmp_path / OUT / "checkpoint-12")["resumed_from"] == [5]


@pytest.mark.slow
def test_a_signal_stop_under_the_launcher_is_a_stop_and_its_printed_commands_work(
    tmp_path: Path, tiny_model: Path, sample_dir: Path
) -> None:
    proc = _sigterm_to_rank_1_at_step_4(tmp_path, tiny_model, sample_dir, "sftrun.launch")
    assert proc.returncode == 128 + signal.SIGTERM, proc.stderr[-3000:]
    assert "FAILED" not in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    printed = proc.stdout + proc.stderr
    assert printed.count("resume with: ") == 1  # process 0 alone says it
    same = printed.split("resume with: ", 1)[1].splitlines()[0]
    assert "-m sftrun.launch --standalone --nproc_per_node=2 -m sftrun train" in same
    one = printed.split("on one process (the same global batch 4, the same samples): ")[1]
    one = one.splitlines()[0]
    assert one.endswith("per_device_train_batch_size=1 gradient_accumulation_steps=4")
    # ckpt inspect says which process count it assumed, and what keeps the batch on another.
    inspect = run_sftrun(
        ["ckpt", "inspect", str(OUT / "checkpoint-5"), "--config", "config.yaml", *TWO], tmp_path
    )
    assert inspect.returncode == 0, inspect.stderr
    assert "processes    2, as the checkpoint was written" in inspect.stdout
    assert "1 process(es): gradient_accumulation_steps=4" in inspect.stdout
    # Without the setting, one process is refused with the setting named.
    single = _single(tmp_path, [*TWO, "--resume", "latest"])
    assert single.returncode == 4
    assert "set gradient_accumulation_steps=4" in single.stderr
    # The printed one-process command works as printed, from another folder.
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    resumed = subprocess.run(["bash", "-c", one], cwd="/", env=env, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert trainer_state(tmp_path / OUT / "checkpoint-12")["resumed_from"] == [5]


@pytest.mark.slow
def test_a_process_killed_during_a_save_never_leaves_an_invalid_checkpoint(
    tmp_path: Path, tiny_model: Path, sample_dir: Path
) -> None:
    write_config(tmp_path / "config.yaml", tiny_settings(tiny_model, sample_dir, eval_file=None))
    env = {"SFTRUN_TEST_KILL_PEERS_IN_SAVE": "6:optimizer.pt", "SFTRUN_TEST_SLOW_SAVE": "0.3"}
    proc = _torchrun(tmp_path, TWO, env=env)
    assert proc.returncode != 0
    out = tmp_path / OUT
    assert all(info.valid for info in runfolder.scan(out)), runfolder.scan(out)
    resumed = _torchrun(tmp_path, [*TWO, "--resume", "latest"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert integrity.verify(out / "checkpoint-12") is None


@pytest.mark.slow
def test_fsdp_killed_and_resumed_under_either_setting_matches_the_ddp_run_bit_for_bit(
    two_process_run: Path, tmp_path: Path, tiny_model: Path, sample_dir: Path
) -> None:
    """FSDP shards the frozen layers and leaves the adapter whole, averaging its gradients
    as DDP does (sum, then / 2, exact in binary): the same bits as the DDP run, through a
    kill under FSDP, a resume under DDP, a kill and a resume under FSDP. Evaluation and
    generation run on the sharded model in between (they must not desynchronise the ranks,
    and they draw no training randomness)."""
    settings = tiny_settings(
        tiny_model, sample_dir, eval_steps=2, eval_accuracy="exact", eval_max_new_tokens=4
    )
    write_config(tmp_path / "config.yaml", settings)
    fsdp = [*TWO, "parallel=fsdp"]
    first = _torchrun(tmp_path, fsdp, env={"SFTRUN_TEST_KILL_AFTER_STEP": "3"})
    assert first.returncode != 0
    assert "(fsdp: the frozen base sharded over them)" in first.stdout
    assert "FSDP: 2 decoder layers sharded over 2 processes" in first.stdout
    assert "held-out accuracy before training" in first.stdout
    second = _torchrun(
        tmp_path,
        [*TWO, "parallel=ddp", "--resume", "latest"],
        env={"SFTRUN_TEST_KILL_AFTER_STEP": "9"},
    )
    assert second.returncode != 0 and "override parallel: 'fsdp' -> 'ddp'" in second.stdout, (
        second.stdout
    )
    third = _torchrun(tmp_path, [*fsdp, "--resume", "latest"])
    assert third.returncode == 0, third.stderr[-3000:]
    assert "held-out accuracy after training" in third.stdout
    assert trainer_state(tmp_path / OUT / "checkpoint-12")["resumed_from"] == [3, 9]
    ref, got = two_process_run / OUT / "checkpoint-12", tmp_path / OUT / "checkpoint-12"
    assert_same_tensors(adapter(ref), adapter(got))
    for name in ("optimizer.pt", "scheduler.pt"):
        assert (ref / name).read_bytes() == (got / name).read_bytes()


def test_fsdp_in_one_process_trains_as_usual_and_says_so(
    tmp_path: Path, tiny_model: Path, sample_dir: Path
) -> None:
    write_config(tmp_path / "config.yaml", tiny_settings(tiny_model, sample_dir, eval_file=None))
    proc = _single(tmp_path, ["parallel=fsdp", "max_steps=1"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "parallel: fsdp in one process: nothing to shard, trained as usual" in proc.stdout
    assert integrity.verify(tmp_path / OUT / "checkpoint-1") is None


def test_fsdp_refuses_a_model_without_named_decoder_layers() -> None:
    from sftrun.distributed import shard_frozen_layers
    from sftrun.errors import SftrunError

    with pytest.raises(SftrunError, match="parallel: fsdp needs the model's decoder layers"):
        shard_frozen_layers(torch.nn.Sequential(torch.nn.Linear(2, 2)), torch.device("cpu"), set())


@pytest.mark.slow
def test_a_group_that_cannot_form_fails_within_the_timeout(
    tmp_path: Path, tiny_model: Path, sample_dir: Path
) -> None:
    write_config(tmp_path / "config.yaml", tiny_settings(tiny_model, sample_dir, eval_file=None))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    lonely = {  # rank 0 of 2; rank 1 never starts
        "RANK": "0",
        "LOCAL_RANK": "0",
        "WORLD_SIZE": "2",
        "LOCAL_WORLD_SIZE": "2",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": port,
        "OMP_NUM_THREADS": "1",
    }
    proc = _single(tmp_path, ["ddp_timeout=3"], env=lonely)
    assert proc.returncode == 1
    assert "error: the group of 2 processes did not form within 3 s (this is rank 0" in proc.stderr
    assert "1/2 clients joined" in proc.stderr
    assert not (tmp_path / "checkpoints").exists()
