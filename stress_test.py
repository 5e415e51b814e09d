"""Load the API from many threads, as the mission's layout names it; the code is imgserve/client/stress_test.py.

python stress_test.py [--requests N] [--threads N] [--url URL] ...   (--help for all)
"""

import sys

from imgserve.client.stress_test import main

if __name__ == "__main__":
    sys.exit(main())
