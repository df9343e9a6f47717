"""Run ``sftrun`` with a fault injected at an exact point, chosen by environment variables.

- SFTRUN_TEST_KILL_AFTER_STEP=k       SIGKILL right after checkpoint-k is committed
- SFTRUN_TEST_KILL_IN_SAVE=k:FILE     SIGKILL during the save of step k, after FILE is written
- SFTRUN_TEST_SIGNAL_AT_STEP=k:SIG[,SIG]  send these signals to ourselves as step k+1 starts
- SFTRUN_TEST_SLOW_SAVE=SECONDS       sleep after each file a save writes (widens the window)

Signals and kills are real (os.kill on this process), so handlers run as they would in use.
The faults come in through ``sftrun.hooks.RunHooks``; nothing in sftrun is patched.
"""

import os
import signal
import sys
import time

from sftrun.cli import main
from sftrun.hooks import RunHooks

env = os.environ


def _parse(name):
    step, _, rest = env[name].partition(":")
    return int(step), rest


def after_file(step, filename):
    if "SFTRUN_TEST_SLOW_SAVE" in env:
        time.sleep(float(env["SFTRUN_TEST_SLOW_SAVE"]))
    if "SFTRUN_TEST_KILL_IN_SAVE" in env and _parse("SFTRUN_TEST_KILL_IN_SAVE") == (step, filename):
        os.kill(os.getpid(), signal.SIGKILL)


def after_commit(step, path):
    if env.get("SFTRUN_TEST_KILL_AFTER_STEP") == str(step):
        os.kill(os.getpid(), signal.SIGKILL)


def on_step_start(step):
    if "SFTRUN_TEST_SIGNAL_AT_STEP" in env:
        at, names = _parse("SFTRUN_TEST_SIGNAL_AT_STEP")
        if step == at:
            for name in names.split(","):
                os.kill(os.getpid(), signal.Signals[name])


hooks = RunHooks(on_step_start=on_step_start, after_file=after_file, after_commit=after_commit)
sys.exit(main(sys.argv[1:], hooks=hooks))
