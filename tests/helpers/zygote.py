"""A warm parent for the tests' sftrun processes: import the heavy libraries once, then fork.

Most of a tiny test run's time is the interpreter importing torch, transformers, peft and
bitsandbytes (about 5 of 7.5 s on the 2-core CI machine). ``tests.runs.run_sftrun`` asks this
server to start each process instead of a cold ``python -m sftrun``: the server forks a
handler, the handler forks the job and reports its pid and then its exit status (negative
for a signal, as ``subprocess`` reports it). The job is a real process: a SIGKILL kills it
mid-write exactly as it would kill a cold one; its stdout and stderr go to the files named in
the request, its working folder and environment are the request's.

Nothing here computes before forking, so no thread pool exists to be broken by ``fork``.
Import-time settings are fixed when the server starts (it is started with the tests'
environment, ``HF_HUB_OFFLINE=1``); a test that needs a fresh interpreter passes
``cold=True`` to ``run_sftrun``, and ``SFTRUN_TEST_COLD=1`` turns the server off.

    python tests/helpers/zygote.py SOCKET_PATH
"""

import atexit
import importlib
import json
import os
import runpy
import signal
import socket
import sys
import traceback

# What a training, resume, export or merge run imports on the way (the rest is small).
WARM = [
    "torch",
    "numpy",
    "safetensors.torch",
    "transformers",
    "transformers.modeling_utils",
    "transformers.models.auto.modeling_auto",
    "transformers.models.llama.modeling_llama",
    "peft",
    "peft.tuners.lora",
    "accelerate",
    "torch.utils.tensorboard",
    "sftrun.cli",
    "sftrun.cli_ckpt",
    "sftrun.trainer",
    "sftrun.placement",
    "sftrun.loop",
    "sftrun.modeling",
    "sftrun.export",
]


def _run_job(request: dict) -> int:
    """In the forked job: become the requested process, run it, return its exit code."""
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    if "OMP_NUM_THREADS" in request["env"]:
        import torch

        torch.set_num_threads(int(request["env"]["OMP_NUM_THREADS"]))
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    for fd, key in ((1, "stdout"), (2, "stderr")):
        target = os.open(request[key], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(target, fd)
        os.close(target)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    for sig in (signal.SIGTERM, signal.SIGCHLD, signal.SIGHUP, signal.SIGUSR1):
        signal.signal(sig, signal.SIG_DFL)
    script = request.get("script")
    try:
        if script:
            sys.argv = [script, *request["argv"]]
            sys.path[0] = os.path.dirname(script)
            runpy.run_path(script, run_name="__main__")
        else:
            sys.argv = ["-m", *request["argv"]]  # runpy puts the module's path first
            sys.path[0] = os.getcwd()  # as `python -m` does
            runpy.run_module("sftrun", run_name="__main__", alter_sys=True)
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        if not isinstance(exc.code, int) and exc.code is not None:
            print(exc.code, file=sys.stderr)
    except BaseException:
        traceback.print_exc()
        code = 1
    return code


def _handle(conn: socket.socket) -> None:
    """In the forked handler: fork the job, report its pid, wait, report its status."""
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    with conn.makefile("rb") as fh:
        request = json.loads(fh.readline())
    pid = os.fork()
    if pid == 0:
        conn.close()
        code = 1
        try:
            code = _run_job(request)
            atexit._run_exitfuncs()
        finally:
            for stream in (sys.stdout, sys.stderr):
                try:
                    stream.flush()
                except Exception:
                    pass
            os._exit(code)
    conn.sendall(json.dumps({"pid": pid}).encode() + b"\n")
    _, status = os.waitpid(pid, 0)
    code = -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
    conn.sendall(json.dumps({"status": code}).encode() + b"\n")


def serve(path: str) -> None:
    for name in WARM:
        importlib.import_module(name)
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # handlers are reaped by the kernel
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path + ".tmp")
    server.listen(16)
    os.rename(path + ".tmp", path)  # the socket appears only when the server is ready
    parent = os.getppid()
    server.settimeout(2)
    while True:
        try:
            conn, _ = server.accept()
        except TimeoutError:
            if os.getppid() != parent:  # the test process is gone without closing us
                os._exit(0)
            continue
        conn.settimeout(None)
        if os.fork() == 0:
            server.close()
            try:
                _handle(conn)
            finally:
                os._exit(0)
        conn.close()


if __name__ == "__main__":
    serve(sys.argv[1])
