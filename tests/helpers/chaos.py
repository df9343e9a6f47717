"""Run ``sftrun`` with a fault injected at an exact point, chosen by environment variables.

- SFTRUN_TEST_KILL_AFTER_STEP=k       SIGKILL right after checkpoint-k is committed
- SFTRUN_TEST_KILL_IN_SAVE=k:FILE     SIGKILL during the save of step k, after FILE is written
- SFTRUN_TEST_SIGNAL_AT_STEP=k:SIG[,SIG]  send these signals to ourselves as step k+1 starts
- SFTRUN_TEST_SLOW_SAVE=SECONDS       sleep after each file a save writes (widens the window)

Signals and kills are real (os.kill on this process), so handlers run as they would in use.
"""

import os
import signal
import sys
import time

from sftrun import checkpoint, trainer
from sftrun.cli import main

env = os.environ
_save = checkpoint.save
_step_indices = trainer.step_indices


def _parse(name):
    step, _, rest = env[name].partition(":")
    return int(step), rest


def save(output_dir, step, payload, hook=None):
    def chaos_hook(filename):
        if hook is not None:
            hook(filename)
        if "SFTRUN_TEST_SLOW_SAVE" in env:
            time.sleep(float(env["SFTRUN_TEST_SLOW_SAVE"]))
        if "SFTRUN_TEST_KILL_IN_SAVE" in env and _parse("SFTRUN_TEST_KILL_IN_SAVE") == (
            step,
            filename,
        ):
            os.kill(os.getpid(), signal.SIGKILL)

    path = _save(output_dir, step, payload, chaos_hook)
    if env.get("SFTRUN_TEST_KILL_AFTER_STEP") == str(step):
        os.kill(os.getpid(), signal.SIGKILL)
    return path


def step_indices(seed, n, samples_seen, count):
    if "SFTRUN_TEST_SIGNAL_AT_STEP" in env:
        step, names = _parse("SFTRUN_TEST_SIGNAL_AT_STEP")
        if samples_seen == step * count:
            for name in names.split(","):
                os.kill(os.getpid(), signal.Signals[name])
    return _step_indices(seed, n, samples_seen, count)


checkpoint.save = save
trainer.step_indices = step_indices
sys.exit(main(sys.argv[1:]))
