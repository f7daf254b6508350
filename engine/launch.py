"""``python -m engine.launch [torchrun options] -m MODULE ...``: torchrun, ending quietly on a stop.

torchrun forwards SIGINT / SIGTERM to every process (they save the step and stop, see
engine.stops) and then raises its own ``SignalException`` with a traceback; here that ends with
exit code 128 + the signal's number instead, after the processes' own one-line message."""
from __future__ import annotations

import sys

from torch.distributed.elastic.multiprocessing.api import SignalException
from torch.distributed.run import main


def launch() -> int:
    try:
        main()
    except SignalException as e:
        return 128 + int(e.sigval)
    return 0


if __name__ == "__main__":
    sys.exit(launch())
