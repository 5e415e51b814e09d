"""A model worker, as the mission's layout names it; the code is in imgserve/worker/.

python run_model_server.py [--batch-size N] [--batch-wait-ms MS] [--weights imagenet|none|PATH] ...
"""

import sys

from imgserve.worker.cli import main

if __name__ == "__main__":
    sys.exit(main())
