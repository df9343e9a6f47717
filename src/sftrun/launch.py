"""``python -m sftrun.launch``: torchrun, with a stop by signal reported as a stop.

Takes torchrun's own arguments (it runs ``torch.distributed.run`` in this process). torchrun
treats any worker that exits non-zero as a failure and ends with a "FAILED" traceback and
exit 1, also when sftrun's workers stopped cleanly on SIGTERM/SIGHUP/SIGINT (all of them
after the same step, a checkpoint committed, exit 128+signal; torchrun may terminate the
slower ones while they tear down). Here such a stop exits with the workers' own code and no
traceback, so a scheduler or retry loop sees what happened; a
signal to the launcher itself, forwarded by torchrun to the workers, ends the same way. Any
other failure is torchrun's, unchanged.
"""

from __future__ import annotations

import signal
import sys
from collections.abc import Sequence

STOP_CODES = {128 + int(s) for s in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT)}


def main(argv: Sequence[str] | None = None) -> int:
    """torchrun with the same arguments; a stop by signal ends with 128 + the signal, quietly."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    args = parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        run(args)
    except ChildFailedError as exc:
        codes = {failure.exitcode for failure in exc.failures.values()}
        stopped = codes & STOP_CODES
        # A worker that exits first makes torchrun terminate the others (exit code -SIGTERM or
        # -SIGKILL): they had committed the checkpoint with it (every process leaves the save
        # together) and were only tearing down.
        torn_down = codes - STOP_CODES <= {-int(signal.SIGTERM), -int(signal.SIGKILL)}
        if len(stopped) == 1 and torn_down:
            return stopped.pop()  # the workers stopped on one signal: a clean stop
        raise
    except SignalException as exc:
        return 128 + int(exc.sigval)
    return 0


if __name__ == "__main__":
    sys.exit(main())
