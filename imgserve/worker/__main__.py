"""`python -m imgserve.worker`: a model worker (see cli.py)."""

import sys

from imgserve.worker.cli import main

sys.exit(main())
