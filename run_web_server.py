"""The web API, as the mission's layout names it; the code is in imgserve/web/.

python run_web_server.py                             # development server (threaded)
gunicorn 'imgserve.web.app:create_app()' ...         # production, as `make run` starts it
"""

import sys

from imgserve.web.app import create_app, main

__all__ = ["create_app", "main"]

if __name__ == "__main__":
    sys.exit(main())
