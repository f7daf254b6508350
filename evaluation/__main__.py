import sys

from .run_eval import main

sys.exit(main())
