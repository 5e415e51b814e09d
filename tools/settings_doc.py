"""The README's settings table and `.env.example`, generated from the declarations in imgserve/settings.py.

    python -m tools.settings_doc          # rewrite both (`make settings-doc`)
    python -m tools.settings_doc --check  # exit 1 naming the stale file(s); tests/test_settings.py runs it too

A setting is documented where it is declared (`setting(default, parser, roles, doc)` in settings.py): edit
the declaration and rerun this, never the generated text. In README.md only the lines between the markers
below are written.
"""

from __future__ import annotations

import argparse
import re
import sys
import textwrap
from dataclasses import fields
from pathlib import Path

from imgserve import settings

PROJECT_DIR = Path(__file__).resolve().parent.parent
README, ENV_EXAMPLE = PROJECT_DIR / "README.md", PROJECT_DIR / ".env.example"
BEGIN, END = "<!-- settings:begin -->", "<!-- settings:end -->"
WIDTH = 118

ENV_HEADER = """\
# Copy to .env and edit. Every variable is optional, and every line below is commented out, showing the default:
# a copy changes nothing until you uncomment a line. "e.g." lines show an example value, not the default.
# Secrets (API keys, a Redis password) belong in .env or the environment, never in git.
# Each variable names the processes that read it: web (the web API), worker (a model worker), launch (`make run`
# starting gunicorn and nginx).
#
# Generated from imgserve/settings.py by `make settings-doc`: edit the declarations there, not this file.
"""


def readme_table() -> str:
    """The Markdown table of every setting: variable, default, the roles that read it, what it does."""
    rows = ["| variable | default | read by | meaning |", "| --- | --- | --- | --- |"]
    for field in fields(settings.Settings):
        spec = settings.spec(field)
        default = f"`{spec.shown}`" if spec.shown else "unset"
        rows.append(f"| `{field.name.upper()}` | {default} | {', '.join(spec.roles)} | {spec.doc} |")
    return "\n".join(rows) + "\n"


def env_example() -> str:
    """.env.example: for each setting its description, an example where it has one, and its default."""
    blocks = [ENV_HEADER]
    for field in fields(settings.Settings):
        spec, name = settings.spec(field), field.name.upper()
        lines = textwrap.wrap(f"{name} ({', '.join(spec.roles)}): {_plain(spec.doc)}", WIDTH - 2)
        lines += [f"e.g. {name}={spec.example}"] if spec.example else []
        lines += [f"{name}={spec.shown}"] if spec.shown or not spec.example else []
        blocks.append("\n".join(f"# {line}" for line in lines) + "\n")
    return "\n".join(blocks)


def _plain(markdown: str) -> str:
    """`doc` without Markdown: code spans unquoted, links to README sections named as such."""
    text = re.sub(r"\[([^\]]+)\]\(#[^)]*\)", r"\1 in README.md", markdown)
    return text.replace("`", "")


def with_table(readme: str) -> str:
    """`readme` with the lines between the settings markers replaced by the generated table."""
    begin, end = readme.find(BEGIN), readme.find(END)
    if begin < 0 or end < begin:
        raise SystemExit(f"README.md has no {BEGIN} ... {END} pair around its settings table")
    return readme[: begin + len(BEGIN)] + "\n" + readme_table() + readme[end:]


def generated() -> dict[Path, str]:
    """Each generated file and the text it should hold."""
    return {README: with_table(README.read_text()), ENV_EXAMPLE: env_example()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 if a file is out of date")
    args = parser.parse_args(argv)
    stale = [path for path, text in generated().items() if not path.exists() or path.read_text() != text]
    if args.check:
        for path in stale:
            print(f"{path.name} is out of date with imgserve/settings.py: run `make settings-doc`", file=sys.stderr)
        return 1 if stale else 0
    for path, text in generated().items():
        path.write_text(text)
    print(f"wrote {', '.join(p.name for p in stale) or 'nothing (both up to date)'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
