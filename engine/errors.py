"""One error path for every command line: a user error (bad config, data, curriculum or checkpoint)
ends with exit code 2 and its message, which names the key or file, what was found and what is
allowed; a run stopped by a non-finite loss ends with exit code 1 and its message; anything else
is a bug and keeps its traceback."""
from __future__ import annotations

import sys
from typing import Callable, Optional, Tuple, Type

from efficienttrain.curriculum import CurriculumError

from .checkpoint import CheckpointError
from .config import ConfigError
from .data import DataError


class RunFailed(RuntimeError):
    """A training run started as a subprocess (by a study or an evaluation) failed; its log says why."""


USER_ERRORS: Tuple[Type[BaseException], ...] = (ConfigError, CurriculumError, DataError, CheckpointError,
                                                 FileNotFoundError)


def run_cli(main: Callable[[], Optional[int]], extra_user_errors: Tuple[Type[BaseException], ...] = ()) -> int:
    """``main()``'s exit code (0 when it returns None), or 2 / 1 with ``error: message`` on stderr
    for a user error (``USER_ERRORS`` + ``extra_user_errors``) / a non-finite loss or a failed run."""
    from .trainer import NonFiniteLossError

    try:
        return main() or 0
    except (*USER_ERRORS, *extra_user_errors) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (NonFiniteLossError, RunFailed) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
