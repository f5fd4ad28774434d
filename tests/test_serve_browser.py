"""The web page in a real browser: headless Chromium (Debian's /usr/bin/chromium) driven by Playwright
against the Serve app on the test session's Serve instance. Start a stream, watch frames being drawn
and the picture change, switch the prompt, take a screenshot, stop."""

from __future__ import annotations

from pathlib import Path

import pytest

TIMEOUT_MS = 90_000

pytestmark = pytest.mark.browser

# The canvas as a small fingerprint: the sum of its pixels and a checksum over them.
CANVAS_PIXELS = """() => {
  const c = document.getElementById("screen");
  const d = c.getContext("2d").getImageData(0, 0, c.width, c.height).data;
  let sum = 0, hash = 0;
  for (let i = 0; i < d.length; i++) { sum += d[i]; hash = (hash * 31 + d[i]) | 0; }
  return [sum, hash];
}"""


# Frames drawn while the page's render loop runs 30 more times (requestAnimationFrame, what playback runs on).
DRAWN_OVER_30_RENDER_TICKS = """() => new Promise(done => {
  const canvas = document.getElementById("screen"), start = Number(canvas.dataset.frames);
  let ticks = 0;
  const tick = () => (++ticks < 30 ? requestAnimationFrame(tick) : done(Number(canvas.dataset.frames) - start));
  requestAnimationFrame(tick);
})"""


def _frames(page) -> int:
    return int(page.get_attribute("#screen", "data-frames") or 0)


def test_page_streams_switches_and_stops(browser, stream_app, tmp_path):
    page = browser.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    console_errors: list[str] = []
    page.on("console", lambda m: console_errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: console_errors.append(str(e)))

    page.goto(stream_app + "/")  # the trailing slash: the page's relative URLs resolve under the prefix
    # The preset selector is filled from /v1/info (relative to the route prefix).
    page.wait_for_function("document.querySelectorAll('#preset option').length > 0")
    assert "tiny" in page.eval_on_selector_all("#preset option", "os => os.map(o => o.value)")

    page.fill("#prompt", "a red fox running through fresh snow")
    page.fill("#seed", "3")
    page.click("#start")
    assert page.is_disabled("#start")

    # Frames are drawn (after the client-side pre-buffer) and the picture changes between two samples.
    page.wait_for_function("Number(document.getElementById('screen').dataset.frames) >= 4")
    assert page.eval_on_selector("#screen", "c => [c.width, c.height]") == [64, 64]
    first = page.evaluate(CANVAS_PIXELS)
    assert first[0] > 0, "the canvas is still blank after frames were drawn"
    drawn = _frames(page)
    page.wait_for_function(f"Number(document.getElementById('screen').dataset.frames) >= {drawn + 6}")
    second = page.evaluate(CANVAS_PIXELS)
    assert second != first, "the canvas did not change between two samples"

    # Live stats: frames received, time to first frame and the last block's timings are filled in.
    page.wait_for_function("document.getElementById('stat-denoise').textContent.includes('ms')")
    received, drawn = page.evaluate("[Number(document.getElementById('stat-received').textContent), "
                                    "Number(document.getElementById('screen').dataset.frames)]")
    assert received >= drawn > 0
    assert page.text_content("#stat-ttff").strip().endswith("s")

    # Pause freezes playback and the server (which acknowledges it); resume goes on.
    page.click("#pause")
    assert page.text_content("#pause") == "Resume"
    page.wait_for_function("document.getElementById('log').textContent.includes('server paused')")
    paused_at = _frames(page)
    assert page.evaluate(DRAWN_OVER_30_RENDER_TICKS) == 0  # the page's draw loop ran 30 times and drew nothing
    assert _frames(page) == paused_at
    page.click("#pause")
    page.wait_for_function(f"Number(document.getElementById('screen').dataset.frames) > {paused_at}")

    # Record the canvas while the prompt is switched: MP4 where MediaRecorder supports it, else WebM.
    page.click("#record")
    assert page.text_content("#record").startswith("Stop recording")

    # Switch the prompt: the server acknowledges it and more frames follow.
    page.fill("#switch-prompt", "a lighthouse on a cliff during a storm")
    page.click("#switch")
    page.wait_for_function("document.getElementById('log').textContent.includes('switched at frame')")
    assert "lighthouse" in page.text_content("#status") or "lighthouse" in page.text_content("#log")
    after_switch = _frames(page)
    page.wait_for_function(f"Number(document.getElementById('screen').dataset.frames) >= {after_switch + 8}")

    with page.expect_download() as download_info:
        page.click("#record")
    download = download_info.value
    assert Path(download.suggested_filename).suffix in (".mp4", ".webm")
    video = tmp_path / download.suggested_filename
    download.save_as(video)
    assert video.stat().st_size > 1_000

    shot = tmp_path / "stream.png"
    page.screenshot(path=str(shot), full_page=True)
    data = shot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5_000
    canvas_shot = tmp_path / "canvas.png"
    page.locator("#screen").screenshot(path=str(canvas_shot))
    assert canvas_shot.stat().st_size > 500

    # Stop: the server ends the stream and the controls return to their idle state.
    page.click("#stop")
    page.wait_for_function("document.getElementById('log').textContent.includes('end:')")
    page.wait_for_function("!document.getElementById('start').disabled")
    assert "stop" in page.text_content("#status")
    assert not [e for e in console_errors if "favicon" not in e], console_errors
    page.close()
