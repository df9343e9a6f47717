"""Checkpoint copies on object storage (``mirror_to``), against a real S3 API: moto's server
on 127.0.0.1, reached through s3fs exactly as an AWS bucket would be."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
from tests.conftest import main_in, tiny_settings, write_config
from tests.runs import adapter, assert_same_tensors, run_sftrun, trainer_state

from sftrun import integrity
from sftrun.cli import main

OUT = Path("checkpoints/sft_model")
BUCKET = "sftrun-test"


@pytest.fixture(scope="module")
def s3() -> Iterator[dict[str, str]]:
    """A moto S3 server on loopback; yields the environment that points s3fs at it."""
    from moto.server import ThreadedMotoServer

    env = {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_MAX_ATTEMPTS": "1",
    }
    saved = {k: os.environ.get(k) for k in [*env, "AWS_ENDPOINT_URL_S3"]}
    os.environ.update(env)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    os.environ["AWS_ENDPOINT_URL_S3"] = env["AWS_ENDPOINT_URL_S3"] = f"http://{host}:{port}"
    import fsspec

    fs = fsspec.filesystem("s3", skip_instance_cache=True)
    fs.mkdir(BUCKET)
    try:
        yield env
    finally:
        server.stop()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _fs():
    import fsspec

    return fsspec.filesystem("s3", skip_instance_cache=True)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_model: Path, sample_dir: Path) -> Path:
    cwd = tmp_path_factory.mktemp("mirror-ref")
    write_config(cwd / "config.yaml", tiny_settings(tiny_model, sample_dir, eval_file=None))
    return main_in(cwd, ["train", "-y", "--config", "config.yaml"]) / OUT


def test_every_checkpoint_reaches_the_mirror_manifest_last(
    s3, tiny_config, workdir: Path, capsys
) -> None:
    url = f"s3://{BUCKET}/full"
    tiny_config(eval_file=None, mirror_to=url, save_total_limit=2)
    assert main(["train", "-y", "--config", "config.yaml"]) == 0
    out = capsys.readouterr().out
    # One line at the end; a checkpoint rotated away locally before its turn is skipped.
    final = [line for line in out.splitlines() if line.startswith(f"mirror {url}: uploaded ")]
    assert len(final) == 1 and final[0].endswith("checkpoint-12") and "FAILED" not in final[0]
    fs = _fs()
    # Rotation applies to the mirror too: it keeps what the local folder keeps; the marker
    # says whose mirror it is.
    assert sorted(p.rsplit("/", 1)[-1] for p in fs.ls(f"{BUCKET}/full")) == [
        ".sftrun-mirror.json",
        "checkpoint-12",
        "checkpoint-9",
    ]
    local = json.loads((OUT / "checkpoint-12/manifest.json").read_text())
    remote = json.loads(fs.cat_file(f"{BUCKET}/full/checkpoint-12/manifest.json"))
    assert remote == local
    assert main(["ckpt", "list", url]) == 0
    listing = capsys.readouterr().out
    assert "checkpoint-12" in listing and "complete" in listing
    assert main(["ckpt", "verify", f"{url}/checkpoint-12"]) == 0
    # A new machine: no local folder, --resume auto takes the mirror's newest, and the run is
    # complete.
    shutil.rmtree("checkpoints")
    assert main(["train", "-y", "--config", "config.yaml", "--resume", "auto"]) == 0
    assert "run complete at step 12 (checkpoint-12)" in capsys.readouterr().out
    assert integrity.verify(OUT / "checkpoint-12") is None


@pytest.mark.slow
def test_killed_mid_upload_and_disk_lost_resumes_from_the_mirror_bit_exactly(
    s3, reference: Path, tmp_path: Path, tiny_model: Path, sample_dir: Path
) -> None:
    url = f"s3://{BUCKET}/killed"
    write_config(
        tmp_path / "config.yaml",
        tiny_settings(tiny_model, sample_dir, eval_file=None, mirror_to=url),
    )
    args = ["train", "-y", "--config", "config.yaml", "--resume", "auto"]
    # Killed right after committing step 6 (its upload under way). Slow local saves give the
    # upload of checkpoint-3 time to finish first, so the mirror has something to resume.
    env = {**s3, "SFTRUN_TEST_KILL_AFTER_STEP": "6", "SFTRUN_TEST_SLOW_SAVE": "0.25"}
    killed = run_sftrun(args, tmp_path, env=env, script="chaos.py")
    assert killed.returncode == -signal.SIGKILL
    shutil.rmtree(tmp_path / "checkpoints")  # the machine and its disk are gone
    resumed = run_sftrun(args, tmp_path, env=s3, script="chaos.py")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from the mirror's checkpoint-" in resumed.stdout
    start = trainer_state(tmp_path / OUT / "checkpoint-12")["resumed_from"]
    assert start in ([3], [6])
    assert_same_tensors(
        adapter(reference / "checkpoint-12"), adapter(tmp_path / OUT / "checkpoint-12")
    )


def test_a_damaged_or_partial_remote_copy_is_skipped_with_the_reason(
    s3, tiny_config, workdir: Path, capsys
) -> None:
    url = f"s3://{BUCKET}/damaged"
    tiny_config(eval_file=None, mirror_to=url)
    assert main(["train", "-y", "--config", "config.yaml"]) == 0
    fs = _fs()
    key = f"{BUCKET}/damaged/checkpoint-12/optimizer.pt"
    data = bytearray(fs.cat_file(key))
    data[-5] ^= 0x01
    fs.pipe_file(key, bytes(data))  # flipped byte
    fs.rm_file(f"{BUCKET}/damaged/checkpoint-9/scheduler.pt")  # missing file
    fs.rm_file(f"{BUCKET}/damaged/checkpoint-6/manifest.json")  # an upload cut short
    shutil.rmtree("checkpoints")
    capsys.readouterr()
    assert main(["ckpt", "verify", f"{url}/checkpoint-12"]) == 1
    assert "optimizer.pt does not match its sha256" in capsys.readouterr().out
    assert main(["train", "-y", "--config", "config.yaml", "--resume", "latest"]) == 0
    out = capsys.readouterr().out
    assert "skipped on the mirror: " in out
    assert "checkpoint-12: optimizer.pt does not match its sha256" in out
    assert "checkpoint-9: scheduler.pt is missing" in out
    assert "checkpoint-6: no manifest (an upload that did not finish)" in out
    assert "resumed from the mirror's checkpoint-3" in out
    assert trainer_state(OUT / "checkpoint-12")["resumed_from"] == [3]
    assert sorted(p.name for p in Path(OUT).glob(".tmp-*")) == []


def test_a_mirror_that_goes_away_during_training_only_logs_and_retries(
    s3, tiny_config, workdir: Path, capsys
) -> None:
    from moto.server import ThreadedMotoServer

    from sftrun.hooks import RunHooks

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = os.environ["AWS_ENDPOINT_URL_S3"]
    os.environ["AWS_ENDPOINT_URL_S3"] = f"http://{host}:{port}"
    try:
        _fs().makedirs(BUCKET, exist_ok=True)  # moto's state is shared by its servers
        tiny_config(eval_file=None, mirror_to=f"s3://{BUCKET}/gone", max_steps=3)

        def outage(step: int) -> None:
            if step == 1:
                server.stop()  # the endpoint disappears mid-run

        hooks = RunHooks(on_step_start=outage)
        assert main(["train", "-y", "--config", "config.yaml"], hooks=hooks) == 0
    finally:
        os.environ["AWS_ENDPOINT_URL_S3"] = endpoint
    out = capsys.readouterr().out
    assert "mirror: upload of checkpoint-3 failed (attempt 3 of 3)" in out
    assert "FAILED checkpoint-3 (the local copies are intact)" in out
    assert integrity.verify(OUT / "checkpoint-3") is None


def test_an_unreachable_mirror_at_start_is_one_line(tiny_config, workdir: Path, capsys) -> None:
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {"AWS_ENDPOINT_URL_S3": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "x"}
    env |= {"AWS_SECRET_ACCESS_KEY": "x", "AWS_MAX_ATTEMPTS": "1"}
    tiny_config(eval_file=None, mirror_to=f"s3://{BUCKET}/nowhere", max_steps=3)
    proc = run_sftrun(["train", "-y", "--config", "config.yaml"], workdir, env=env)
    assert proc.returncode == 4
    assert proc.stderr.startswith(f"error: mirror_to s3://{BUCKET}/nowhere cannot be read (")
    assert proc.stderr.count("\n") == 1
    assert not (workdir / "checkpoints").exists()


def test_a_local_path_mirror_holds_the_same_bytes(tiny_config, workdir: Path) -> None:
    tiny_config(eval_file=None, mirror_to=str(workdir / "copy"), max_steps=3)
    assert main(["train", "-y", "--config", "config.yaml"]) == 0
    for f in (OUT / "checkpoint-3").iterdir():
        copy = workdir / "copy/checkpoint-3" / f.name
        assert hashlib.sha256(copy.read_bytes()).digest() == hashlib.sha256(f.read_bytes()).digest()


def test_a_new_run_refuses_a_mirror_that_holds_another_run(
    s3, tiny_config, workdir: Path, capsys
) -> None:
    url = f"s3://{BUCKET}/owned"
    tiny_config(eval_file=None, mirror_to=url, max_steps=3)
    assert main(["train", "-y", "--config", "config.yaml"]) == 0
    remote_before = _fs().cat_file(f"{BUCKET}/owned/checkpoint-3/manifest.json")
    capsys.readouterr()
    code = main(["train", "-y", "--config", "config.yaml", "output_dir=other"])
    err = capsys.readouterr().err
    assert code == 4 and f"error: mirror_to {url} already holds checkpoints of run " in err
    assert _fs().cat_file(f"{BUCKET}/owned/checkpoint-3/manifest.json") == remote_before
    assert not Path("other").exists()
