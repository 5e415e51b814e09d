"""The PDF report (tools/report.py): built from a sample folder made here, and from the real deliverables/."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from pypdf import PdfReader

from tools import report

ROOT = Path(__file__).resolve().parent.parent
SEQUENCE = """sequenceDiagram
    participant Client
    participant WebServer
    participant ModelWorker
    Client->>WebServer: POST /predict
    WebServer->>ModelWorker: LPUSH job
    ModelWorker-->>WebServer: SET result
"""
FLOWCHART = """flowchart LR
    Queue[image_queue] --> Processing[processing list] --> Results[result key]
"""
ARCHITECTURE = """ client ──HTTP──▶ web (Flask/gunicorn)                Redis                         model worker(s)
                  prepare 224×224 uint8  ──LPUSH job──▶ image_queue (LIST) ──BLMOVE/Lua──▶ processing LIST
"""
SAMPLE_RESULTS = """# Sample test results

| scenario | requests | p50 latency (ms) | p95 latency (ms) | throughput (req/s) |
| --- | ---: | ---: | ---: | ---: |
| one worker | 500 | 118.4 | 251.7 | 36.2 |
| two workers | 500 | 97.1 | 203.9 | 61.8 |

See [the key structure](redis_key_structure.md) for the keys.
"""


def sample_doc(number: int) -> str:
    """A small deliverable: a title, a paragraph, a table, a code block, and (in the first two) more."""
    text = (
        f"# Sample document {number}\n\nIntro paragraph of document {number}.\n\n"
        "| key | type |\n| --- | --- |\n| `image_queue` | LIST |\n\n"
        f"```python\ndef handler_{number}(job: dict) -> str:\n    return job['id']\n```\n"
    )
    if number == 1:
        text += f"\n## Flow\n\n```mermaid\n{SEQUENCE}```\n\nNext: [server communication](server_communication.md).\n"
    if number == 2:
        text += f"\n```mermaid\n{FLOWCHART}```\n\n```\n{ARCHITECTURE}```\n\n```\n{'wrapped-line ' * 30}\n```\n"
    return text


def write_sample(folder: Path) -> Path:
    """The eight deliverables, small, in `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    for number, name in enumerate(report.DOCUMENTS, start=1):
        text = SAMPLE_RESULTS if name == "TEST_RESULTS.md" else sample_doc(number)
        (folder / name).write_text(text, encoding="utf-8")
    return folder


def missing_converter() -> str | None:
    """Why the report cannot be built on this machine, or None when it can."""
    if not (os.environ.get("CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")):
        return "no Chromium on this machine (apt-get install chromium)"
    if not report.MERMAID_JS.is_file() and not shutil.which("npm"):
        return "no node/npm on this machine to install the mermaid package"
    return None


@pytest.fixture(scope="module")
def converter() -> None:
    """Skip without Chromium or npm; install the mermaid package (npm ci) when node_modules lacks it."""
    reason = missing_converter()
    if reason:
        pytest.skip(reason)
    if not report.MERMAID_JS.is_file():
        subprocess.run(["npm", "ci", "--no-audit", "--no-fund"], cwd=ROOT / "tools", check=True, timeout=600)


def run_report(*args: str) -> subprocess.CompletedProcess:
    args = [sys.executable, "-m", "tools.report", *args]
    return subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=300)


def build(docs: Path, out_dir: Path) -> tuple[Path, str]:
    """Run report.py on `docs`; returns the PDF's path and the HTML as printed."""
    pdf, printed = out_dir / "report.pdf", out_dir / "printed.html"
    done = run_report("--docs", str(docs), "--out", str(pdf), "--html", str(printed))
    assert done.returncode == 0, done.stderr
    return pdf, printed.read_text(encoding="utf-8")


def page_texts(reader: PdfReader) -> list[str]:
    """Each page's text with runs of whitespace made one space."""
    return [" ".join(page.extract_text().split()) for page in reader.pages]


def first_title(markdown: str) -> str:
    """The first `# ` heading outside fenced code, without backticks."""
    in_fence = False
    for line in markdown.splitlines():
        if line.lstrip().startswith(("```", "~~~")):
            in_fence = not in_fence
        elif not in_fence and line.startswith("# "):
            return " ".join(line[2:].replace("`", "").split())
    raise AssertionError("no `# ` heading")


def mermaid_blocks(markdown: str) -> list[str]:
    return re.findall(r"^```mermaid[^\n]*\n(.*?)^```", markdown, flags=re.M | re.S)


def table_figures(markdown: str) -> list[str]:
    """Every number in the body cells of the Markdown tables (not in code blocks)."""
    text = re.sub(r"^```.*?^```", "", markdown, flags=re.M | re.S)
    figures = []
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("|") and not re.fullmatch(r"[|:\-\s]+", line):
            figures += re.findall(r"(?<![\w.])\d[\d,]*(?:\.\d+)?", line)
    return figures


def check_report(docs: Path, pdf: Path, printed: str) -> str:
    """What every report must show: title page, contents, each document on its own pages, drawn diagrams.

    Returns the PDF's text.
    """
    reader = PdfReader(pdf)
    texts = page_texts(reader)
    starts = report.section_pages(pdf)
    anchors = [f"doc-{n}" for n in range(1, len(report.DOCUMENTS) + 1)]
    first_pages = [starts[anchor] for anchor in anchors]
    assert first_pages[0] >= 3, "title page and contents come first"
    assert first_pages == sorted(set(first_pages)), f"each document starts on a new page: {first_pages}"
    assert len(reader.pages) >= 2 + len(report.DOCUMENTS)
    assert "imgserve" in texts[0] and "Deliverables report" in texts[0]
    assert re.search(r"\d{4}-\d{2}-\d{2}", texts[0]) and re.search(r"\b[0-9a-f]{7,}\b|unknown", texts[0])
    markdowns = [(docs / name).read_text(encoding="utf-8") for name in report.DOCUMENTS]
    for name, markdown, start in zip(report.DOCUMENTS, markdowns, first_pages, strict=True):
        title = first_title(markdown)
        assert title in texts[start - 1], f"{name}: title {title!r} not on its first page {start}"
        assert re.search(rf"{re.escape(title)} {re.escape(name)} {start}\b", texts[1]), f"{name} in contents"
    diagrams = [block for markdown in markdowns for block in mermaid_blocks(markdown)]
    assert printed.count("<svg") >= len(diagrams)
    prose = re.sub(r"^```mermaid.*?^```", "", "\n".join(markdowns), flags=re.M | re.S)
    whole = " ".join(texts)
    for keyword in {block.split()[0] for block in diagrams} - set(prose.split()):
        assert keyword not in whole, f"raw Mermaid source ({keyword}) printed instead of a drawing"
    return whole


@pytest.mark.system
def test_sample_report(converter, tmp_path: Path) -> None:
    docs = write_sample(tmp_path / "docs")
    pdf, printed = build(docs, tmp_path)
    whole = check_report(docs, pdf, printed)
    assert printed.count('<pre class="mermaid"') == 2 and printed.count("<svg") >= 2
    assert "ModelWorker" in whole and "POST /predict" in whole, "diagram labels drawn as text"
    for figure in table_figures(SAMPLE_RESULTS):
        assert figure in whole
    assert "<table>" in printed and "<th>scenario</th>" in printed
    assert "def handler_3(job: dict) -> str:" in whole
    assert 'href="#doc-2"' in printed, "links between deliverables jump inside the PDF"
    assert re.search(r'<pre class="code" style="font-size:[67]\.\d+pt"><code> client ──HTTP', printed)


@pytest.mark.system
def test_real_deliverables(converter, tmp_path: Path) -> None:
    docs = ROOT / "deliverables"
    whole = check_report(docs, *build(docs, tmp_path))
    figures = table_figures((docs / "TEST_RESULTS.md").read_text(encoding="utf-8"))
    assert figures, "TEST_RESULTS.md has tables of measured figures"
    missing = [figure for figure in figures if figure not in whole]
    assert not missing, f"figures from TEST_RESULTS.md not in the PDF: {missing}"


@pytest.mark.unit
def test_missing_document_is_named(tmp_path: Path) -> None:
    docs = write_sample(tmp_path / "docs")
    (docs / "concurrency_issues.md").unlink()
    done = run_report("--docs", str(docs), "--out", str(tmp_path / "report.pdf"))
    assert done.returncode == 1
    assert "concurrency_issues.md" in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "report.pdf").exists()


@pytest.mark.system
def test_broken_diagram_is_named(converter, tmp_path: Path) -> None:
    docs = write_sample(tmp_path / "docs")
    (docs / "unified_logging.md").write_text("# Logs\n\n```mermaid\nsequenceDiagram\n  A->>: oops\n```\n")
    with pytest.raises(report.ReportError, match=r"Mermaid could not draw: unified_logging\.md"):
        report.build_report(docs, tmp_path / "report.pdf")


@pytest.mark.unit
def test_links_between_documents_and_images(tmp_path: Path) -> None:
    (tmp_path / "chart.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    doc = report.Document(1, "a.md", "A", "[b](TEST_RESULTS.md) [code](../redis_protocol.py) ![c](chart.png)", True)
    anchors = {"TEST_RESULTS.md": "doc-8"}
    body = report.markdown_to_html(doc, tmp_path, anchors)
    assert '<a href="#doc-8">b</a>' in body
    assert "<span>code</span>" in body
    assert 'src="data:image/png;base64,iVBORw0KGgo="' in body
    missing = report.Document(1, "a.md", "A", "![c](nope.png)", True)
    with pytest.raises(report.ReportError, match=r"a\.md: image nope\.png not found"):
        report.markdown_to_html(missing, tmp_path, anchors)


@pytest.mark.unit
def test_fenced_and_indented_code_are_code_blocks(tmp_path: Path) -> None:
    doc = report.Document(1, "a.md", "A", "Text:\n\n    indented <code>\n\n```sh\nmake report\n```\n", True)
    body = report.markdown_to_html(doc, tmp_path, {})
    assert '<pre class="code"><code>indented &lt;code&gt;\n</code></pre>' in body
    assert '<pre class="code"><code>make report\n</code></pre>' in body


@pytest.mark.unit
def test_titles_come_from_the_first_level_one_heading(tmp_path: Path) -> None:
    write_sample(tmp_path)
    (tmp_path / "stress_test_fix.md").write_text("```\n# not a title\n```\n\n## Sub\n\n# The `Fix` *here*\n\n# Later\n")
    (tmp_path / "unified_logging.md").write_text("No heading at all.\n")
    docs = report.collect_docs(tmp_path)
    assert [doc.title for doc in docs][5:7] == ["The Fix here", "unified_logging"]
    assert "<h1>unified_logging</h1>" in report.markdown_to_html(docs[6], tmp_path, {})


@pytest.mark.parametrize(
    ("columns", "expected"),
    [(80, None), (92, None), (110, (7.0, 7.3)), (131, (6.0, 6.2)), (140, None), (300, None)],
)
@pytest.mark.unit
def test_wide_code_gets_a_smaller_font_above_a_floor(columns: int, expected) -> None:
    size = report.code_font_pt("short\n" + "x" * columns + "\n")
    if expected is None:
        assert size is None
    else:
        assert expected[0] <= size <= expected[1]
        assert size * report.MONO_ADVANCE_EM * columns <= report.CODE_WIDTH_PT


@pytest.mark.unit
def test_a_single_long_line_wraps_at_the_normal_size() -> None:
    assert report.code_font_pt("x" * 110) is None
