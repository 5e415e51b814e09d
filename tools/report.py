"""Build deliverables/report.pdf from the eight Markdown deliverables.

    .venv/bin/python -m tools.report [--docs DIR] [--out FILE] [--title NAME]

Markdown becomes HTML (markdown-it-py), Mermaid blocks are drawn as SVG in headless Chromium with the
`mermaid` npm package from tools/node_modules/ (`npm ci` in tools/; `make report` does it), and Chromium prints the
page to PDF: a title page, a table of contents with page numbers, then each document on a new page.
"""

from __future__ import annotations

import argparse
import base64
import datetime
import html
import mimetypes
import os
import shutil
import subprocess
import sys
import tempfile
import unicodedata
from dataclasses import dataclass
from pathlib import Path

from markdown_it import MarkdownIt
from markdown_it.rules_core import StateCore
from markdown_it.token import Token
from playwright.sync_api import Page, sync_playwright
from pypdf import PdfReader

ROOT = Path(__file__).resolve().parent  # tools/: the CSS and the npm package live here
PROJECT = ROOT.parent
DOCUMENTS = (
    "redis_key_structure.md",
    "server_communication.md",
    "model_output_results.md",
    "concurrency_issues.md",
    "notification_implementation.md",
    "stress_test_fix.md",
    "unified_logging.md",
    "TEST_RESULTS.md",
)
CSS_FILE = ROOT / "report.css"
MERMAID_JS = ROOT / "node_modules" / "mermaid" / "dist" / "mermaid.min.js"
# The machine may have no network: keep Chromium from trying to reach Google's services.
CHROMIUM_ARGS = [
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]

# Multi-line code blocks whose longest line would wrap at the normal size get a smaller font, when one
# above a floor fits, so ASCII art and aligned comments keep their shape; others wrap. Widths in points;
# they follow report.css (A4 less 2 x 18 mm margins, less the 3 mm padding and 1 px border of pre.code)
# and DejaVu Sans Mono's advance of 0.602 em.
TEXT_WIDTH_PT = (210 - 2 * 18) * 72 / 25.4
CODE_WIDTH_PT = TEXT_WIDTH_PT - 2 * 3 * 72 / 25.4 - 2 * 0.75
CODE_FONT_PT = 8.5
MIN_CODE_FONT_PT = 6.0
MONO_ADVANCE_EM = 0.602

FOOTER = (
    '<div style="width:100%; font-size:8pt; color:#666; text-align:center; font-family:sans-serif;">'
    '<span class="pageNumber"></span> / <span class="totalPages"></span></div>'
)
DRAW_DIAGRAMS_JS = r"""async (fontFamily) => {
  mermaid.initialize({
    startOnLoad: false, securityLevel: 'strict', theme: 'default', fontFamily,
    sequence: {wrap: true},  // long messages wrap, so wide diagrams need not shrink to illegible text
  });
  const failures = [];
  for (const node of document.querySelectorAll('pre.mermaid')) {
    try {
      await mermaid.run({nodes: [node], suppressErrors: false});
    } catch (error) {
      // The first lines say where; the rest is Mermaid's list of expected tokens.
      const where = String(error.message || error).split('\n').slice(0, 3).join('\n');
      failures.push(`${node.closest('section').dataset.source}: ${where}`);
    }
  }
  const undrawn = document.querySelectorAll('pre.mermaid:not(:has(svg))').length;
  return {failures, undrawn};
}"""
FILL_TOC_JS = """(pages) => {
  let changed = false;
  for (const cell of document.querySelectorAll('.toc .page')) {
    const page = String(pages[cell.dataset.anchor] ?? '');
    if (cell.textContent !== page) { cell.textContent = page; changed = true; }
  }
  return changed;
}"""


class ReportError(Exception):
    """A problem that stops the report; the message says what to fix."""


@dataclass(frozen=True)
class Document:
    """One deliverable: its file name, its title (first `# ` heading) and its Markdown."""

    number: int
    name: str
    title: str
    markdown: str
    has_title_heading: bool

    @property
    def anchor(self) -> str:
        """The id of the document's section, which the contents link to."""
        return f"doc-{self.number}"


def base_parser() -> MarkdownIt:
    """CommonMark plus GitHub's tables and strikethrough."""
    return MarkdownIt("commonmark").enable(["table", "strikethrough"])


def make_parser() -> MarkdownIt:
    """The base parser with the report's rules for fences, links and images."""
    md = base_parser()
    md.add_render_rule("fence", render_fence)
    md.add_render_rule("code_block", lambda self, tokens, idx, options, env: code_html(tokens[idx].content))
    md.core.ruler.push("report_references", resolve_references)
    return md


def first_heading(text: str) -> str | None:
    """Plain text of the first level-1 heading, or None."""
    tokens = base_parser().parse(text)
    for open_token, inline in zip(tokens, tokens[1:], strict=False):
        if open_token.type == "heading_open" and open_token.tag == "h1":
            return plain_text(inline.children or [])
    return None


def plain_text(children: list[Token]) -> str:
    """The text a reader sees in an inline token list (markup dropped)."""
    parts = []
    for child in children:
        if child.type in ("text", "code_inline"):
            parts.append(child.content)
        elif child.type in ("softbreak", "hardbreak"):
            parts.append(" ")
    return "".join(parts).strip()


def collect_docs(docs_dir: Path, names: tuple[str, ...] = DOCUMENTS) -> list[Document]:
    """Read the deliverables in report order; every one of them must exist."""
    missing = [name for name in names if not (docs_dir / name).is_file()]
    if missing:
        raise ReportError(f"missing in {docs_dir}: {', '.join(missing)} (the report needs all {len(names)})")
    docs = []
    for number, name in enumerate(names, start=1):
        text = (docs_dir / name).read_text(encoding="utf-8")
        title = first_heading(text)
        docs.append(Document(number, name, title or Path(name).stem, text, title is not None))
    return docs


def code_font_pt(code: str) -> float | None:
    """A smaller font size that keeps a wide block's lines whole, or None for the default size (and wrapping)."""
    lines = code.splitlines()
    columns = max((display_width(line.expandtabs(8)) for line in lines), default=0)
    if len(lines) < 2 or columns * CODE_FONT_PT * MONO_ADVANCE_EM <= CODE_WIDTH_PT:
        return None  # fits, or a single line: nothing to keep aligned, so it wraps at the readable size
    size = int(100 * CODE_WIDTH_PT / (columns * MONO_ADVANCE_EM)) / 100
    return size if size >= MIN_CODE_FONT_PT else None


def display_width(line: str) -> int:
    """Columns a line takes in a monospace font (wide East Asian characters take two)."""
    return sum(2 if unicodedata.east_asian_width(char) in ("W", "F") else 1 for char in line)


def render_fence(self, tokens: list[Token], idx: int, options, env) -> str:
    """Mermaid blocks become <pre class="mermaid"> for the browser to draw; others monospace code."""
    token = tokens[idx]
    language = token.info.strip().split(" ")[0].lower() if token.info else ""
    if language == "mermaid":
        return f'<pre class="mermaid">{html.escape(token.content)}</pre>\n'
    return code_html(token.content)


def code_html(code: str) -> str:
    """A monospace block that wraps, in a smaller font when that keeps its lines whole."""
    size = code_font_pt(code)
    style = f' style="font-size:{size}pt"' if size else ""
    return f'<pre class="code"{style}><code>{html.escape(code)}</code></pre>\n'


def resolve_references(state: StateCore) -> None:
    """Links to other deliverables jump inside the PDF, other local links stay as text, images are embedded."""
    for block in state.tokens:
        children = block.children or []
        for index, token in enumerate(children):
            if token.type == "link_open":
                resolve_link(token, children[index:], state.env)
            elif token.type == "image":
                token.attrSet("src", embed_image(str(token.attrGet("src") or ""), state.env))


def resolve_link(token: Token, rest: list[Token], env: dict) -> None:
    """Point a link to another deliverable at its section; turn links to nothing in the PDF into text."""
    href = str(token.attrGet("href") or "")
    if href.startswith(("http://", "https://", "mailto:")):
        return
    target = env["anchors"].get(Path(href.split("#")[0]).name)
    if target:
        token.attrSet("href", f"#{target}")
        return
    # Nothing in the PDF to point at: keep the words, drop the link.
    closing = next(t for t in rest if t.type == "link_close")
    token.tag = closing.tag = "span"
    token.attrs = {}


def embed_image(src: str, env: dict) -> str:
    """A data: URI for a local image, so the page needs no file or network access."""
    if src.startswith("data:"):
        return src
    if "://" in src:
        raise ReportError(f"{env['source']}: remote image {src} (put the file beside the document)")
    path = env["docs_dir"] / src
    if not path.is_file():
        raise ReportError(f"{env['source']}: image {src} not found in {env['docs_dir']}")
    mime = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
    return f"data:{mime};base64,{base64.b64encode(path.read_bytes()).decode()}"


def markdown_to_html(doc: Document, docs_dir: Path, anchors: dict[str, str]) -> str:
    """The document as an HTML <section>, starting with its title."""
    env = {"anchors": anchors, "docs_dir": docs_dir, "source": doc.name}
    body = make_parser().render(doc.markdown, env)
    if not doc.has_title_heading:
        body = f"<h1>{html.escape(doc.title)}</h1>\n{body}"
    return f'<section class="doc" id="{doc.anchor}" data-source="{html.escape(doc.name)}">\n{body}</section>'


def title_page(title: str, day: str, commit: str) -> str:
    """Project name, date and commit."""
    return (
        '<section class="title-page">'
        f'<p class="report-title">{html.escape(title)}</p>'
        '<p class="subtitle">Deliverables report</p>'
        f"<dl><dt>Date</dt><dd>{html.escape(day)}</dd><dt>Commit</dt><dd>{html.escape(commit)}</dd></dl>"
        "</section>"
    )


def table_of_contents(docs: list[Document]) -> str:
    """Numbered entries linking to each document; page numbers are filled in after a first print."""
    rows = "".join(
        f'<li><span class="number">{doc.number}.</span><a href="#{doc.anchor}">{html.escape(doc.title)}</a>'
        f'<span class="source">{html.escape(doc.name)}</span><span class="leader"></span>'
        f'<span class="page" data-anchor="{doc.anchor}"></span></li>'
        for doc in docs
    )
    return f'<section class="toc"><h1>Contents</h1><ol>{rows}</ol></section>'


def assemble(docs: list[Document], docs_dir: Path, title: str, day: str, commit: str) -> str:
    """The whole report as one HTML page."""
    anchors = {doc.name: doc.anchor for doc in docs}
    sections = "\n".join(markdown_to_html(doc, docs_dir, anchors) for doc in docs)
    return (
        f'<!doctype html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)} report</title>'
        f"<style>{CSS_FILE.read_text(encoding='utf-8')}</style></head><body>\n"
        f"{title_page(title, day, commit)}\n{table_of_contents(docs)}\n{sections}\n</body></html>\n"
    )


def git_commit(docs_dir: Path) -> str:
    """Short hash of HEAD, noting uncommitted changes to the documents; "unknown" outside git."""
    try:
        commit = git(["rev-parse", "--short", "HEAD"])
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    try:
        changed = git(["status", "--porcelain", "--", str(docs_dir.resolve())])
    except subprocess.CalledProcessError:  # documents outside the repository
        changed = ""
    return f"{commit} (documents changed since)" if changed else commit


def git(args: list[str]) -> str:
    """Output of a git command run in the repository."""
    done = subprocess.run(["git", *args], cwd=PROJECT, capture_output=True, text=True, check=True, timeout=30)
    return done.stdout.strip()


def find_chromium() -> str:
    """Path of the system Chromium ($CHROMIUM, else on PATH)."""
    path = os.environ.get("CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    if not path:
        raise ReportError("Chromium not found: install it (apt-get install chromium) or set CHROMIUM=/path")
    return path


def draw_diagrams(page: Page) -> None:
    """Replace every Mermaid block's source with the SVG drawing of it."""
    if page.locator("pre.mermaid").count() == 0:
        return
    if not MERMAID_JS.is_file():
        raise ReportError(f"{MERMAID_JS} missing: run `npm ci` in {ROOT} (make report does)")
    page.add_script_tag(path=str(MERMAID_JS))
    outcome = page.evaluate(DRAW_DIAGRAMS_JS, "DejaVu Sans, Liberation Sans, Arial, sans-serif")
    if outcome["failures"] or outcome["undrawn"]:
        details = "; ".join(outcome["failures"]) or f"{outcome['undrawn']} diagram(s) not drawn"
        raise ReportError(f"Mermaid could not draw: {details}")


def section_pages(pdf: Path) -> dict[str, int]:
    """Page number (from 1) of every place the PDF's links point at, by anchor name."""
    reader = PdfReader(pdf)
    return {
        name.lstrip("/"): reader.get_destination_page_number(dest) + 1
        for name, dest in reader.named_destinations.items()
    }


def print_pdf(page: Page, out: Path) -> None:
    """Print to PDF, then again with the contents' page numbers until they match the pages."""
    for _ in range(3):
        page.pdf(
            path=str(out),
            prefer_css_page_size=True,
            print_background=True,
            outline=True,
            tagged=True,
            display_header_footer=True,
            header_template="<div></div>",
            footer_template=FOOTER,
        )
        if not page.evaluate(FILL_TOC_JS, section_pages(out)):
            return
    raise ReportError("the contents' page numbers did not settle after 3 prints")


def render_pdf(document_html: str, out: Path) -> str:
    """Draw the diagrams and print the page to `out`; returns the HTML as printed."""
    blocked: list[str] = []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=find_chromium(), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            # Everything the report needs is in the page: refuse any fetch rather than depend on a network.
            page.route("**/*", lambda route: (blocked.append(route.request.url), route.abort()))
            page.set_content(document_html, wait_until="load")
            draw_diagrams(page)
            print_pdf(page, out)
            printed = page.content()
        finally:
            browser.close()
    for url in blocked:
        print(f"report: warning: blocked a request for {url}", file=sys.stderr)
    return printed


def build_report(docs_dir: Path, out: Path, title: str = "imgserve") -> str:
    """Write the PDF report of the deliverables in `docs_dir` to `out`; returns the HTML as printed."""
    docs = collect_docs(docs_dir)
    document_html = assemble(docs, docs_dir, title, datetime.date.today().isoformat(), git_commit(docs_dir))
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="report-") as tmp:
        draft = Path(tmp) / out.name
        printed = render_pdf(document_html, draft)
        shutil.move(draft, out)
    return printed


def main(argv: list[str] | None = None) -> int:
    """Command line: build the report, or say what stopped it (exit status 1)."""
    parser = argparse.ArgumentParser(description="Build the PDF report of the deliverables.")
    parser.add_argument("--docs", type=Path, default=PROJECT / "deliverables", help="folder of the eight documents")
    parser.add_argument("--out", type=Path, help="PDF to write (default: DOCS/report.pdf)")
    parser.add_argument("--title", default="imgserve", help="project name on the title page")
    parser.add_argument("--html", type=Path, help="also write the HTML as printed (diagrams drawn) here")
    args = parser.parse_args(argv)
    out = args.out or args.docs / "report.pdf"
    try:
        printed = build_report(args.docs, out, args.title)
    except ReportError as error:
        print(f"report: error: {error}", file=sys.stderr)
        return 1
    if args.html:
        args.html.write_text(printed, encoding="utf-8")
    print(f"report: wrote {out} ({len(PdfReader(out).pages)} pages)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
