import io
import re

import pytest

from imgserve import logger

pytestmark = pytest.mark.unit

LINE = re.compile(
    r"^\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3}\] \[(?P<server>[^\]]+)\] \[(?P<script>[^\]]+)\] (?P<action>.*)$"
)


def test_line_format_names_server_and_script():
    out = io.StringIO()
    log = logger.setup("web", "INFO", stream=out)
    log.info("enqueued job %s", "abc")
    logger.get("child").warning("slow")
    first, second = out.getvalue().splitlines()
    match = LINE.match(first)
    assert match, first
    assert match["server"] == "web"
    assert match["script"] == "test_logger.py"
    assert match["action"] == "enqueued job abc"
    assert LINE.match(second)["action"] == "WARNING: slow"


def test_level_filters_debug():
    out = io.StringIO()
    log = logger.setup("model", "INFO", stream=out)
    log.debug("hidden")
    assert out.getvalue() == ""


def test_untrusted_text_is_escaped_and_cut():
    assert logger.untrusted("a\nb\r\x1b[31m\u2028c\\n") == "a\\nb\\r\\x1b[31m\\u2028c\\\\n"
    assert logger.untrusted("plain words, é and ✓") == "plain words, é and ✓"
    assert logger.untrusted("x" * 250, limit=10) == "x" * 10 + "... (250 characters)"
