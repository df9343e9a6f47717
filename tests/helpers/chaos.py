"""Run ``sftrun`` with a fault injected at an exact point, chosen by environment variables.

- SFTRUN_TEST_KILL_AFTER_STEP=k       SIGKILL right after checkpoint-k is committed
- SFTRUN_TEST_KILL_IN_SAVE=k:FILE     SIGKILL during the save of step k, after FILE is written
- SFTRUN_TEST_SIGNAL_AT_STEP=k:SIG[,SIG]  send these signals to ourselves as step k+1 starts
- SFTRUN_TEST_SLOW_SAVE=SECONDS       sleep after each file a save writes (widens the window)
- SFTRUN_TEST_SIGNAL_RANK=r           only process r sends the SIGNAL_AT_STEP signals
- SFTRUN_TEST_KILL_PEERS_IN_SAVE=k:FILE  process 0 SIGKILLs the other processes of the launch
                                       during the save of step k, after FILE is written
- SFTRUN_TEST_SAMPLES_LOG=PATH        process 0 appends "step: sample ids" for every step
- SFTRUN_TEST_CPU_BF16=0|1            answer as a CPU without (0) or with (1) native bf16
- SFTRUN_TEST_OOM=ROWS:STEP[:NTH]     from step STEP on (1-based), raise torch.OutOfMemoryError
                                       at a micro-batch of more than ROWS rows (with NTH: only at
                                       the NTH micro-batch of a step, after earlier backwards)

Signals and kills are real (os.kill on this process), so handlers run as they would in use.
The faults come in through ``sftrun.hooks.RunHooks``; nothing in sftrun is patched.
"""

import os
import signal
import sys
import time

import torch

from sftrun import hardware
from sftrun.cli import main
from sftrun.hooks import RunHooks

env = os.environ


def _parse(name):
    step, _, rest = env[name].partition(":")
    return int(step), rest


def _peers():
    """The other worker processes of this torchrun launch (same parent, not this one)."""
    parent, me = os.getppid(), os.getpid()
    peers = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == parent and int(pid) != me:
            peers.append(int(pid))
    return peers


def after_file(step, filename):
    if "SFTRUN_TEST_SLOW_SAVE" in env:
        time.sleep(float(env["SFTRUN_TEST_SLOW_SAVE"]))
    if "SFTRUN_TEST_KILL_IN_SAVE" in env and _parse("SFTRUN_TEST_KILL_IN_SAVE") == (step, filename):
        os.kill(os.getpid(), signal.SIGKILL)
    if "SFTRUN_TEST_KILL_PEERS_IN_SAVE" in env:
        if _parse("SFTRUN_TEST_KILL_PEERS_IN_SAVE") == (step, filename):
            for pid in _peers():
                os.kill(pid, signal.SIGKILL)


def after_commit(step, path):
    if env.get("SFTRUN_TEST_KILL_AFTER_STEP") == str(step):
        os.kill(os.getpid(), signal.SIGKILL)


_micro_in_step = [0]  # micro-batches seen so far in the step being trained (all attempts)
_step = [0]


def on_batch(batch):
    _micro_in_step[0] += 1
    if "SFTRUN_TEST_OOM" not in env:
        return
    rows, at, *nth = (int(x) for x in env["SFTRUN_TEST_OOM"].split(":"))
    if _step[0] + 1 >= at and len(batch["input_ids"]) > rows:
        if not nth or _micro_in_step[0] == nth[0]:
            raise torch.OutOfMemoryError("injected by SFTRUN_TEST_OOM")


def on_samples(step, samples):
    _step[0], _micro_in_step[0] = step, 0  # once per step, before its first attempt
    if "SFTRUN_TEST_SAMPLES_LOG" in env and env.get("RANK", "0") == "0":
        with open(env["SFTRUN_TEST_SAMPLES_LOG"], "a") as fh:
            fh.write(f"{step}: {' '.join(map(str, samples))}\n")


def on_step_start(step):
    if env.get("SFTRUN_TEST_SIGNAL_RANK", env.get("RANK", "0")) != env.get("RANK", "0"):
        return
    if "SFTRUN_TEST_SIGNAL_AT_STEP" in env:
        at, names = _parse("SFTRUN_TEST_SIGNAL_AT_STEP")
        if step == at:
            for name in names.split(","):
                os.kill(os.getpid(), signal.Signals[name])


hooks = RunHooks(
    on_step_start=on_step_start,
    on_samples=on_samples,
    on_batch=on_batch,
    after_file=after_file,
    after_commit=after_commit,
)
if "SFTRUN_TEST_CPU_BF16" in env:
    with hardware.assumed(native=env["SFTRUN_TEST_CPU_BF16"] == "1"):
        sys.exit(main(sys.argv[1:], hooks=hooks))
sys.exit(main(sys.argv[1:], hooks=hooks))
