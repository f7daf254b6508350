"""One error path for every command line: a user error (bad config, data, curriculum or checkpoint)
ends with exit code 2 and its message, which names the key or file, what was found and what is
allowed; a run stopped by a non-finite loss ends with exit code 1 and its message; anything else
is a bug and keeps its traceback. A run stopped by SIGINT / SIGTERM ends with one line and exit code
130 / 143 (see engine.stops), never a traceback."""
from __future__ import annotations

import os
import signal
import sys
from typing import Callable, Optional, Tuple, Type

from efficienttrain.curriculum import CurriculumError

from .checkpoint import CheckpointError
from .config import ConfigError
from .data import DataError
from .stops import Interrupted, RunDirBusy, Stopped, exit_code


class RunFailed(RuntimeError):
    """A training run started as a subprocess (by a study or an evaluation) failed; its log says why."""


USER_ERRORS: Tuple[Type[BaseException], ...] = (ConfigError, CurriculumError, DataError, CheckpointError,
                                                 FileNotFoundError, RunDirBusy)


def run_cli(main: Callable[[], Optional[int]], extra_user_errors: Tuple[Type[BaseException], ...] = ()) -> int:
    """``main()``'s exit code (0 when it returns None), or 2 / 1 with ``error: message`` on stderr
    for a user error (``USER_ERRORS`` + ``extra_user_errors``) / a non-finite loss or a failed run;
    128 + the signal's number for a run stopped by SIGINT / SIGTERM (its line on the first rank only)."""
    from .trainer import NonFiniteLossError

    try:
        return main() or 0
    except (*USER_ERRORS, *extra_user_errors) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (NonFiniteLossError, RunFailed) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except Stopped as e:
        _say(str(e))
        return e.exit_code
    except KeyboardInterrupt as e:      # a second signal, or one outside a training loop
        signum = e.signum if isinstance(e, Interrupted) else signal.SIGINT
        _say(f"stopped at once ({signal.Signals(signum).name}); nothing after the last checkpoint is kept: run the "
             "same command to continue from it")
        return exit_code(signum)


def _say(line: str) -> None:
    if os.environ.get("RANK", "0") == "0":
        print(f"\n{line}", file=sys.stderr, flush=True)
