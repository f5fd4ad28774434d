"""Watching the student learn: `launch.py train --serve` on the embedded default (the toy world) deploys the
streaming app in the job's cluster, following each weight version the learner publishes. A WebSocket client holds
a stream open across versions; a real browser shows the version change, side by side with the starting student.
The job is stopped with SIGTERM at the end, as a user would, and must exit 0."""

from __future__ import annotations

import asyncio
import json
import re
import signal
import subprocess
import sys
import time
import urllib.request

import pytest

from core.config import REPO_ROOT
from serve.client import Frame, read_stream

APP, ROUTE = "follow_stream", "/follow"
# A bound on the client's wait for the next frame (a hang, not a speed claim: training shares the cores)
MAX_WAIT_S = 120.0

pytestmark = [pytest.mark.job, pytest.mark.timeout(900)]
URL_LINE = re.compile(r"streaming app following the training: open (\S+)")


@pytest.fixture(scope="module")
def following_job(serve_instance, ray_instance, tmp_path_factory):
    """The main job with --serve, far longer than both tests (SIGTERM stops it): yields the page's URL."""
    out = tmp_path_factory.mktemp("follow") / "run"
    stdout, stderr = out.parent / "stdout", out.parent / "stderr"
    cmd = [sys.executable, "launch.py", "train", "--serve", "--address", ray_instance.get_runtime_context().gcs_address,
           f"learner.output_dir={out}", "learner.max_steps=5000", "evaluation.around_train=false",
           "actors.reward_app=follow_reward", f"reward_service.port={serve_instance.rsplit(':', 1)[1]}",
           f"serve.app_name={APP}", f"serve.route_prefix={ROUTE}",
           "serve.stream_timeout_s=50"]  # the session's proxy cuts requests at 60 s: streams close before, by the app
    proc = subprocess.Popen(cmd, cwd=REPO_ROOT, stdout=stdout.open("w"), stderr=stderr.open("w"), text=True)
    deadline, url = time.monotonic() + 300, None
    while url is None:
        assert proc.poll() is None and time.monotonic() < deadline, stderr.read_text()[-3000:]
        url = next(iter(URL_LINE.findall(stdout.read_text())), None)
        time.sleep(0.5)
    try:
        yield url
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=300)
        finally:
            proc.kill()
    assert proc.returncode == 0, stderr.read_text()[-3000:]
    assert "Traceback" not in stderr.read_text()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["stopped"].startswith("SIGTERM")


def _get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=30) as resp:
        return json.loads(resp.read())


def test_a_stream_held_open_plays_each_new_version_without_a_gap(following_job):
    """Frames keep coming in order, none missing, while the version advances mid-session; each switch is
    announced after the first frames it made, with its training step, and counted in /v1/metrics."""
    info, deadline = _get(following_job + "v1/info"), time.monotonic() + 300
    assert info["weights"]["following"] and "rollout pool" in info["weights"]["source"]
    while info["weights"]["version"] < 1:  # the learner has started (the app is up before it is built)
        assert time.monotonic() < deadline, info
        time.sleep(0.5)
        info = _get(following_job + "v1/info")

    def two_switches(frames: list[Frame], messages: list[dict]) -> bool:
        return sum(m["type"] == "weights" for m in messages) >= 2  # each announced after its first frames

    frames, messages = asyncio.run(read_stream(
        following_job.replace("http://", "ws://", 1) + "v1/stream",
        {"prompt": "a red circle moves quickly left across a gray background", "seed": 0}, until=two_switches,
        max_gap_s=MAX_WAIT_S, deadline_s=300))
    switches = [m for m in messages if m["type"] == "weights"]
    assert [f.index for f in frames] == list(range(len(frames)))  # in order, none missing
    assert {m["type"] for m in messages} <= {"started", "block", "weights", "paused", "resumed"}
    versions = [f.version for f in frames]
    assert versions == sorted(versions)  # a following stream never goes back
    assert [s["version"] for s in switches] == sorted({*versions} - {versions[0]})
    for s in switches:  # announced at the frame where the version's first frames start, with the step that made it
        assert versions[s["at_frame"]] == s["version"] and (s["at_frame"] == 0 or versions[s["at_frame"] - 1] < s["version"])
        assert s["step"] >= 1 and s["switch_ms"] >= 0 and s["publish_to_frame_s"] >= 0
    metrics = _get(following_job + "v1/metrics")["weights"]
    assert metrics["switches"] >= len(switches) and metrics["versions_received"] >= 2
    assert metrics["publish_to_frame_s"]["median"] is not None


@pytest.mark.browser
def test_the_page_shows_the_version_change_side_by_side_with_the_starting_student(following_job, browser):
    page = browser.new_page(viewport={"width": 1100, "height": 900})
    page.goto(following_job)
    page.wait_for_selector("#weights-row:not([hidden])", timeout=60_000)
    page.fill("#prompt", "a blue square moves slowly up across a gray background")
    page.check("#compare")
    page.click("#start")
    page.wait_for_function("() => Number(document.getElementById('screen-start').dataset.frames) > 5",
                           timeout=120_000)
    first = page.get_attribute("#screen", "data-version")
    page.wait_for_function(f"() => document.getElementById('screen').dataset.version !== '{first}'", timeout=300_000)
    assert int(page.get_attribute("#screen", "data-version")) > int(first)
    assert re.fullmatch(r"version \d+ \(step \d+\)", page.text_content("#stat-version"))
    assert page.text_content("#caption-start").startswith("starting student (version 0")
    assert int(page.text_content("#stat-switches")) >= 1
    page.click("#stop")
