"""The demo page in a real browser: headless Chromium (the system package) driven by Playwright.

Starts ``cloc_demo.app`` on a free port over tiny random checkpoints made in a temporary folder, picks
a test scene, draws a box with two clicks, edits the vocabulary, grounds a phrase, asks the MLLM
about the region, uploads a file that is not an image, and checks what the page shows (labels, the
drawn box's pixels, the grounding verdict, an answer, the error message), with a screenshot saved
in the test's temporary folder. Skipped, with the reason, without Chromium or Playwright.
"""

import io
import os
import shutil

import numpy as np
import PIL.Image
import pytest
from test_app_backend import make_checkpoints

CHROMIUM = next((p for p in (os.environ.get("CLOC_CHROMIUM"), "/usr/bin/chromium", shutil.which("chromium"),
                             shutil.which("chromium-browser")) if p and os.path.isfile(p)), None)
if CHROMIUM is None:
    pytest.skip("no Chromium (apt-get install chromium; .ci/run installs it)", allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api", reason="Playwright is not installed (the `app` extra)")
pytest.importorskip("gradio", reason="Gradio is not installed (the `app` extra)")

TIMEOUT_MS = 20_000
YELLOW, RED = (255, 215, 0), (255, 40, 40)


@pytest.fixture(scope="module")
def app_url(tmp_path_factory):
    from cloc_demo import app

    paths = make_checkpoints(tmp_path_factory.mktemp("app_ckpt"))
    demo = app.main(["--cloc", paths["cloc"], "--clip", paths["clip"], "--mllm", paths["mllm"], "--data", paths["data"],
                     "--port", "0", "--max-new-tokens", "4"], block=False)
    yield demo.local_url
    demo.close()


def _pixels_near(png: bytes, colour, tol: int = 30) -> int:
    image = np.asarray(PIL.Image.open(io.BytesIO(png)).convert("RGB")).astype(int)
    return int((np.abs(image - np.array(colour)).max(-1) <= tol).sum())


def _wait_pixels(page, locator, colour, at_least: int) -> int:
    """Pixels of ``colour`` in the element's screenshot, polled until there are ``at_least`` (a new
    picture loads after the text beside it has changed)."""
    for _ in range(TIMEOUT_MS // 250):
        count = _pixels_near(locator.screenshot(), colour)
        if count >= at_least:
            return count
        page.wait_for_timeout(250)
    pytest.fail(f"the picture never showed {at_least} pixels of {colour} (it shows {count})")


def _wait_text(page, selector: str, text: str):
    try:
        page.wait_for_function(
            "([sel, text]) => { const e = document.querySelector(sel); return e && e.innerText.includes(text); }",
            arg=[selector, text], timeout=TIMEOUT_MS)
    except sync_api.TimeoutError:
        shown = page.locator(selector).inner_text() if page.locator(selector).count() else "(absent)"
        pytest.fail(f"{selector} never showed {text!r}; it shows {shown!r}; status: {page.inner_text('#status')!r}")
    return page.inner_text(selector)


def _fill(page, elem_id: str, value: str):
    page.locator(f"#{elem_id} textarea, #{elem_id} input").first.fill(value)


def test_page_draw_ground_ask_and_bad_upload(app_url, tmp_path):
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1300, "height": 1100})
            page.set_default_timeout(TIMEOUT_MS)
            page.goto(app_url)
            _run_session(page, tmp_path)
        finally:
            browser.close()


def _run_session(page, tmp_path):
    # the first test scene is shown on opening; pick the second
    _wait_text(page, "#status", "test-00000000")
    page.click("#scene input")
    page.locator("ul[role=listbox] li").nth(1).click()
    assert "Click two corners" in _wait_text(page, "#status", "test-00000001")
    canvas = page.locator("#canvas img")
    before = canvas.screenshot()
    assert _pixels_near(before, YELLOW) == 0

    # a box from two clicks -> top-5 labels for CLOC and the CLIP baseline, the box drawn in yellow
    size = canvas.bounding_box()
    canvas.click(position={"x": size["width"] * 0.15, "y": size["height"] * 0.2})
    _wait_text(page, "#status", "first corner")
    canvas.click(position={"x": size["width"] * 0.7, "y": size["height"] * 0.8})
    cloc = _wait_text(page, "#cloc-labels", "probability")
    clip = _wait_text(page, "#clip-labels", "probability")
    assert "CLOC" in cloc and "Best CLIP baseline" in clip
    assert sum(line[:1].isdigit() for line in cloc.splitlines()) == 5
    assert "circle" in cloc + clip or "square" in cloc + clip or "ring" in cloc + clip
    page.wait_for_function("() => document.querySelector('#box-text textarea, #box-text input').value.includes(',')")
    _wait_pixels(page, canvas, YELLOW, 50)

    # an edited vocabulary
    page.get_by_role("button", name="Vocabulary (editable").click()
    vocab = page.locator("#vocab textarea")
    # the accordion mounts its textbox on opening, with the default vocabulary; fill it after that
    page.wait_for_function("() => (document.querySelector('#vocab textarea') || {value: ''}).value.includes('circle')")
    for _ in range(3):
        vocab.fill("zebra\nmoon\nteapot")
        page.wait_for_timeout(300)
        if vocab.input_value() == "zebra\nmoon\nteapot":
            break
    page.click("#relabel")
    cloc = _wait_text(page, "#cloc-labels", "teapot")
    assert sum(line[:1].isdigit() for line in cloc.splitlines()) == 3

    # a phrase -> the head's box with a verdict, and the candidates ranked
    page.get_by_role("tab", name="Ground a phrase").click()
    _fill(page, "phrase", "a red circle")
    page.click("#ground")
    result = _wait_text(page, "#ground-result", "found")
    assert "confidence" in result and "Candidate boxes" in result
    _wait_pixels(page, canvas, RED, 5)  # the head's box (maybe tiny: it is untrained) and its score

    # the MLLM about the drawn region
    page.get_by_role("tab", name="Ask the MLLM").click()
    page.click("#ask")
    answer = _wait_text(page, "#answer", "Answer:")
    assert "<region>" in answer and ("no box" in answer or "Box in the answer" in answer)

    # a point prompt: one click in point mode
    page.get_by_text("point: one click").click()
    canvas.click(position={"x": size["width"] * 0.5, "y": size["height"] * 0.5})
    assert "for the point" in _wait_text(page, "#status", "for the point")
    assert "around the point" in _wait_text(page, "#clip-labels", "probability")

    page.screenshot(path=str(tmp_path / "app.png"), full_page=True)
    assert (tmp_path / "app.png").stat().st_size > 10_000

    # not an image: a message on the page, and the server still answers
    bad = tmp_path / "notes.txt"
    bad.write_text("not an image")
    page.locator("#upload input[type=file]").set_input_files(str(bad))
    assert "not an image file" in _wait_text(page, "#status", "⚠")
    page.click("#ask")
    _wait_text(page, "#answer", "Answer:")
