"""The upload page (GET /) in a real headless Chromium, driven by Playwright, against a live stack."""

from __future__ import annotations

import base64
import re
import uuid
from pathlib import Path

import pytest
from playwright.sync_api import expect, sync_playwright

from imgserve.launch.local_redis import free_port
from imgserve.worker.model import keras_labels
from tools import report
from tools.processes import live_stack, sample_image_bytes, server_env, start_web

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", *report.CHROMIUM_ARGS]
PREDICT_WAIT_MS = 180_000  # the first batch also builds the model's compiled function on a busy CPU
PERCENT = re.compile(r"^(\d+\.\d+%|<0\.01%)$")

pytestmark = [
    pytest.mark.system,
    pytest.mark.skipif(
        not CHROMIUM.exists(), reason="no /usr/bin/chromium (apt-get install chromium; .ci/run does it)"
    ),
]


@pytest.fixture(scope="module")
def stack(redis_server):
    env = server_env(redis_server.url, f"browser-{uuid.uuid4().hex[:6]}", REQUEST_TIMEOUT=150)
    with live_stack(env) as (_, web):
        yield web


@pytest.fixture(scope="module")
def browser():
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


# Every Content-Security-Policy violation as a console error (Chromium also logs its own "Refused to ..." line).
REPORT_CSP_VIOLATIONS = """
document.addEventListener("securitypolicyviolation", (event) => {
  console.error("CSP violation: " + event.violatedDirective + " blocked " + (event.blockedURI || "inline code"));
});
"""


@pytest.fixture
def csp_violations() -> list[str]:
    return []


@pytest.fixture
def page(browser, csp_violations):
    """A fresh page; the test errors if the page's scripts threw an uncaught exception, or if anything
    on it broke the server's Content-Security-Policy."""
    context = browser.new_context(viewport={"width": 1000, "height": 720})
    context.add_init_script(REPORT_CSP_VIOLATIONS)
    page = context.new_page()
    uncaught: list[str] = []
    page.on("pageerror", lambda exc: uncaught.append(str(exc)))
    page.on("console", lambda message: _note_csp_violation(message, csp_violations))
    yield page
    context.close()
    assert not uncaught, f"uncaught JavaScript errors: {uncaught}"
    assert not csp_violations, f"Content-Security-Policy violations: {csp_violations}"


def _note_csp_violation(message, violations: list[str]) -> None:
    if message.type == "error" and ("CSP violation" in message.text or "Content Security Policy" in message.text):
        violations.append(message.text)


def test_the_page_runs_under_the_servers_csp_and_a_violation_is_caught(stack, page, csp_violations):
    response = page.goto(stack.url + "/")
    policy = response.headers["content-security-policy"]
    assert "default-src 'self'" in policy and "frame-ancestors 'none'" in policy
    expect(page.get_by_role("heading", name="imgserve")).to_be_visible()
    assert page.locator("main").evaluate("el => getComputedStyle(el).maxWidth") != "none", "style.css applies"
    assert csp_violations == []
    # Inline code, which the policy forbids: refused, and reported (so the fixture would fail any other test).
    page.evaluate(
        """() => {
            const script = document.createElement("script");
            script.textContent = "window.inlineRan = true";
            document.head.append(script);
        }"""
    )
    assert page.evaluate("() => window.inlineRan") is None
    page.wait_for_timeout(200)  # the violation event and its console message arrive asynchronously
    assert any("script-src" in text for text in csp_violations), csp_violations
    csp_violations.clear()


def check_percentage(text: str, probability: float) -> None:
    """The shown percentage is the probability, rounded to the digits shown."""
    assert PERCENT.match(text), text
    if text.startswith("<"):
        assert probability < 0.0001
    else:
        decimals = len(text[:-1].split(".")[1])
        assert float(text[:-1]) == pytest.approx(probability * 100, abs=0.5 * 10**-decimals + 1e-9)


def check_bar_length(row, probability: float) -> None:
    """The bar fills `probability` of its track (but never less than its CSS min-width)."""
    track = row.locator(".bar-track").bounding_box()
    bar_locator = row.locator(".bar")
    bar = bar_locator.bounding_box()
    min_width = float(bar_locator.evaluate("el => getComputedStyle(el).minWidth").removesuffix("px"))
    assert track is not None and bar is not None and bar["height"] > 0
    assert bar["width"] == pytest.approx(max(probability * track["width"], min_width), abs=1.5)


def test_photo_upload_shows_five_labelled_bars(stack, page, tmp_path):
    photo = tmp_path / "castle_image.jpg"
    photo.write_bytes(sample_image_bytes())
    page.goto(stack.url + "/")
    expect(page).to_have_title(re.compile("imgserve"))
    with page.expect_response("**/predict", timeout=PREDICT_WAIT_MS) as answer:
        page.get_by_label("Choose an image").set_input_files(photo)
    served = answer.value.json()["predictions"]

    rows = page.locator("#predictions .prediction")
    expect(rows).to_have_count(5)
    labels = set(keras_labels().tolist())
    for row, prediction in zip(rows.all(), served, strict=True):
        assert row.get_attribute("data-label") == prediction["label"] and prediction["label"] in labels
        expect(row.locator(".prediction-label")).to_have_text(prediction["label"].replace("_", " "))
        check_percentage(row.locator(".prediction-value").inner_text(), prediction["probability"])
        check_bar_length(row, prediction["probability"])
    expect(page.locator("#error")).to_be_hidden()
    expect(page.get_by_role("heading", name="Top 5")).to_be_visible()
    preview = page.get_by_role("img", name="The uploaded image, castle_image.jpg")
    expect(preview).to_be_visible()
    assert preview.evaluate("img => img.naturalWidth") > 0
    expect(page.get_by_role("status")).to_contain_text("Done")
    page.screenshot(path=tmp_path / "predictions.png", full_page=True)


def test_non_image_upload_shows_the_servers_error(stack, page, tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("this is not a picture\n")
    page.goto(stack.url + "/")
    with page.expect_response("**/predict") as answer:
        page.get_by_label("Choose an image").set_input_files(notes)
    assert answer.value.status == 400

    alert = page.get_by_role("alert")
    expect(alert).to_be_visible()
    expect(alert).to_have_text(re.compile(r"^The server could not use this file: .*not an image"))
    expect(page.locator("#predictions .prediction")).to_have_count(0)
    expect(page.locator("#result")).to_be_hidden()
    page.screenshot(path=tmp_path / "error.png", full_page=True)


def test_keyboard_only_upload(stack, page, tmp_path):
    photo = tmp_path / "photo.jpg"
    photo.write_bytes(sample_image_bytes())
    # Playwright turns on file-chooser interception asynchronously when the first listener is added; a
    # listener from the start makes sure it is on before Space is pressed (else the event can be missed).
    page.on("filechooser", lambda _chooser: None)
    page.goto(stack.url + "/")
    page.keyboard.press("Tab")
    expect(page.get_by_label("Choose an image")).to_be_focused()
    page.keyboard.press("Tab")
    expect(page.get_by_role("button", name="Classify")).to_be_focused()
    page.keyboard.press("Enter")  # nothing chosen yet: a message, and focus back on the file input
    expect(page.get_by_role("alert")).to_have_text("Choose an image first.")
    expect(page.get_by_label("Choose an image")).to_be_focused()

    with page.expect_file_chooser() as chooser:
        page.keyboard.press("Space")
    with page.expect_response("**/predict", timeout=PREDICT_WAIT_MS):
        chooser.value.set_files(photo)
    expect(page.locator("#predictions .prediction")).to_have_count(5)
    expect(page.get_by_role("alert")).to_be_hidden()


def test_dropped_image_is_classified(stack, page):
    page.goto(stack.url + "/")
    transfer = page.evaluate_handle(
        """([data, name]) => {
            const bytes = Uint8Array.from(atob(data), (c) => c.charCodeAt(0));
            const transfer = new DataTransfer();
            transfer.items.add(new File([bytes], name, { type: "image/jpeg" }));
            return transfer;
        }""",
        [base64.b64encode(sample_image_bytes()).decode(), "dropped.jpg"],
    )
    with page.expect_response("**/predict", timeout=PREDICT_WAIT_MS):
        page.locator("#dropzone").dispatch_event("drop", {"dataTransfer": transfer})
    expect(page.locator("#predictions .prediction")).to_have_count(5)
    expect(page.get_by_role("img", name="The uploaded image, dropped.jpg")).to_be_visible()


def test_network_failure_shows_a_readable_error(stack, page, tmp_path):
    photo = tmp_path / "photo.jpg"
    photo.write_bytes(sample_image_bytes())
    page.goto(stack.url + "/")
    page.route("**/predict", lambda route: route.abort("connectionrefused"))
    page.get_by_label("Choose an image").set_input_files(photo)
    alert = page.get_by_role("alert")
    expect(alert).to_have_text(re.compile(r"^Could not reach the server .*try again\.$"))
    expect(page.locator("#predictions .prediction")).to_have_count(0)
    expect(page.get_by_role("button", name="Classify")).to_be_enabled()


def test_redis_down_shows_the_503_with_retry_hint(page, tmp_path):
    """A web server whose Redis is unreachable answers 503 with Retry-After; the page says so."""
    env = server_env(f"redis://127.0.0.1:{free_port()}/0", "browser-no-redis", NOTIFICATIONS="off")
    web = start_web(env)
    try:
        photo = tmp_path / "photo.jpg"
        photo.write_bytes(sample_image_bytes())
        page.goto(web.url + "/")
        with page.expect_response("**/predict") as answer:
            page.get_by_label("Choose an image").set_input_files(photo)
        assert answer.value.status == 503
        expect(page.get_by_role("alert")).to_have_text(
            re.compile(r"^The server is busy or not ready: .*Redis.* \(the server suggests waiting 1 s\)$")
        )
        expect(page.locator("#predictions .prediction")).to_have_count(0)
        expect(page.get_by_role("heading", name="Top 5")).to_have_count(0)
    finally:
        web.stop()


def test_random_weights_are_announced_on_the_page(stack, page):
    page.goto(stack.url + "/")
    expect(page.get_by_role("note")).to_contain_text("random weights")


def test_a_server_with_real_weights_shows_no_warning(stack, page):
    models = {"ready": True, "models": [{"model": "resnet50", "weights": "imagenet"}]}
    page.route("**/readyz", lambda route: route.fulfill(json=models))
    with page.expect_response("**/readyz"):
        page.goto(stack.url + "/")
    page.wait_for_timeout(200)  # the page's script handles the answer
    expect(page.locator("#weights-warning")).to_be_hidden()


BROWSER_KEY = "browser-test-key-" + "b" * 16


@pytest.fixture(scope="module")
def keyed_stack(redis_server):
    env = server_env(redis_server.url, f"browser-key-{uuid.uuid4().hex[:6]}", REQUEST_TIMEOUT=150, API_KEYS=BROWSER_KEY)
    with live_stack(env) as (_, web):
        yield web


def test_with_api_keys_the_page_asks_for_the_key_before_uploading_and_sends_it(keyed_stack, page, tmp_path):
    photo = tmp_path / "sample.jpg"
    photo.write_bytes(sample_image_bytes())
    page.goto(keyed_stack.url + "/")
    key_field = page.get_by_label("API key")
    expect(key_field).to_be_visible()  # /readyz said api_keys_required
    sent: list[str] = []
    page.on("request", lambda request: sent.append(request.url) if request.url.endswith("/predict") else None)
    page.get_by_label("Choose an image").set_input_files(photo)
    expect(page.locator("#error")).to_contain_text("API key")
    assert sent == []  # nothing uploaded without a key
    key_field.fill(BROWSER_KEY)
    with page.expect_request("**/predict", timeout=PREDICT_WAIT_MS) as posted:
        with page.expect_response("**/predict", timeout=PREDICT_WAIT_MS) as answer:
            page.get_by_role("button", name="Classify").click()
    assert posted.value.headers["authorization"] == f"Bearer {BROWSER_KEY}"
    assert answer.value.status == 200
    expect(page.locator("#predictions .prediction")).to_have_count(5)
    expect(page.locator("#error")).to_be_hidden()
    assert page.evaluate("() => sessionStorage.getItem('imgserve-api-key')") == BROWSER_KEY


def test_without_api_keys_the_page_shows_no_key_field(stack, page):
    with page.expect_response("**/readyz") as readiness:
        page.goto(stack.url + "/")
    assert readiness.value.json()["api_keys_required"] is False
    page.wait_for_timeout(200)  # the page's script reads the answer asynchronously
    expect(page.get_by_label("API key")).to_be_hidden()
