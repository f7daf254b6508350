import sys

from engine.threads import configure as _configure_threads

_configure_threads()             # before torch loads (engine/threads.py)

from .main import main

sys.exit(main())
