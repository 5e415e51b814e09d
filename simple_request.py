"""Send one image and print the answer, as the mission's layout names it; the code is imgserve/client/simple_request.py.

python simple_request.py [IMAGE] [--url URL] [--top-k K] [--async] [--api-key KEY]
"""

import sys

from imgserve.client.simple_request import main

if __name__ == "__main__":
    sys.exit(main())
