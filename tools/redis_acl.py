"""Print the Redis ACL commands that create the web and worker users of a queue (redis_protocol/acl.py).

    python -m tools.redis_acl [--queue image_queue] [--aclfile]

Passwords are left as <WEB_PASSWORD> and <WORKER_PASSWORD> for you to fill in (or use `#<sha256>` hashes);
`--aclfile` prints lines for an ACL file instead of ACL SETUSER commands for redis-cli.
"""

from __future__ import annotations

import argparse
import sys

from imgserve import settings
from imgserve.protocol.acl import rules


def commands(queue: str, aclfile: bool = False) -> list[str]:
    """The two users' lines: ACL SETUSER commands, or ACL file lines; passwords as placeholders."""
    lines = []
    for role in ("web", "worker"):
        words = [role, "reset", "on", f"><{role.upper()}_PASSWORD>", *rules(queue, role)]  # reset: nothing left over
        lines.append(("user " if aclfile else "ACL SETUSER ") + " ".join(words))
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--queue", default=settings.Settings.image_queue, help="IMAGE_QUEUE")
    parser.add_argument("--aclfile", action="store_true", help="lines for an ACL file")
    args = parser.parse_args(argv)
    print("\n".join(commands(args.queue, args.aclfile)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
