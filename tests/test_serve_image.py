"""Starting a served stream from given frames, on the toy world's student: an image (or the frames of a video to
continue) sent after the WebSocket `start`, or as multipart files to POST /v1/generate. The stream begins with the
frames as the codec reproduces them (the world's patch codec is exact on world colours); bad images get the
protocol's errors and the stream can start again; /v1/info and the warnings state the model's prompt grammar."""

from __future__ import annotations

import asyncio
import io
import json
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import websockets
from PIL import Image
from ray import serve

from core.records.video_io import read_video
from serve.app import FRAME_HEADER, _jpeg, build_app
from toyworld.config import load_world_config
from toyworld.world import Scene, grammar, render

SCENE = Scene.from_seed(6)  # a large white square moving up on gray
VIDEO = render(SCENE, 9, 32, 32)
MAX_IMAGE_BYTES = 20_000
BLUE_BACKGROUND = "a red triangle moves slowly down across a blue background"


def png(frame: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(frame).save(out, format="PNG")
    return out.getvalue()


BAD_IMAGES = {  # what each bad image is refused with, and a part of the message
    "not an image": (b"GIF89a not really", 422, "not an image"),
    "wrong size": (png(np.zeros((16, 32, 3), np.uint8)), 422, "32x16 (width x height) but this stream makes 32x32"),
    "too large": (png(VIDEO[0]) + b"\0" * MAX_IMAGE_BYTES, 413, "serve.max_image_bytes"),
}


@pytest.fixture(scope="module")
def world_url(serve_instance):
    cfg = load_world_config(None, ["serve.num_cpus=0.25", "serve.app_name=stream_image",
                                   f"serve.max_image_bytes={MAX_IMAGE_BYTES}", "serve.max_prefix_frames=12"])
    serve.run(build_app(cfg), name="stream_image", route_prefix="/stream_image")
    yield f"{serve_instance}/stream_image"
    serve.delete("stream_image")


def ws_url(http_url: str) -> str:
    return http_url.replace("http://", "ws://", 1) + "/v1/stream"


async def next_json(ws) -> dict:
    """The next JSON message, skipping frames."""
    while True:
        msg = await asyncio.wait_for(ws.recv(), timeout=120)
        if isinstance(msg, str):
            return json.loads(msg)


async def send_start(ws, images: list[bytes], frames: int) -> None:
    await ws.send(json.dumps({"type": "start", "prompt": SCENE.prompt, "seed": 1, "max_frames": frames,
                              "images": len(images)}))
    for image in images:
        await ws.send(image)


async def read_stream(ws) -> tuple[dict, list[bytes], list[dict]]:
    """A started stream to its end: (started, the frames' JPEGs, the block messages)."""
    started = await next_json(ws)
    assert started["type"] == "started", started
    jpegs, blocks = [], []
    while True:
        msg = await asyncio.wait_for(ws.recv(), timeout=120)
        if isinstance(msg, bytes):
            assert FRAME_HEADER.unpack_from(msg)[0] == len(jpegs)
            jpegs.append(msg[FRAME_HEADER.size:])
        elif (data := json.loads(msg))["type"] == "block":
            blocks.append(data)
        elif data["type"] == "end":
            return started, jpegs, blocks


def metrics_once_idle(url: str, within_s: float = 30) -> dict:
    """/v1/metrics once the replica holds no session (a stream's slot is freed just after its close)."""
    deadline = time.monotonic() + within_s
    while (metrics := httpx.get(f"{url}/v1/metrics").json())["sessions_active"]:
        assert time.monotonic() < deadline, f"sessions still open after {within_s} s: {metrics}"
        time.sleep(0.1)
    return metrics


def test_a_stream_starts_from_an_image_or_a_video_and_bad_images_leave_the_socket_open(world_url):
    quality = 85  # serve.jpeg_quality: the server's JPEG of a frame equal to the given one is this, byte for byte
    before = httpx.get(f"{world_url}/v1/metrics").json()

    async def run():
        async with websockets.connect(ws_url(world_url), max_size=None) as ws:
            for name, (data, status, says) in BAD_IMAGES.items():
                await ws.send(json.dumps({"type": "start", "prompt": SCENE.prompt, "images": 1}))
                await ws.send(data)
                error = await next_json(ws)
                assert error["type"] == "error" and error["status"] == status and says in error["message"], name
            # more images than serve.max_prefix_frames: refused, and the binary messages it announced are dropped
            await ws.send(json.dumps({"type": "start", "prompt": SCENE.prompt, "images": 13}))
            await ws.send(png(VIDEO[0]))
            error = await next_json(ws)
            assert error["status"] == 413 and "serve.max_prefix_frames = 12" in error["message"]
            # a text message where an image was announced: the start is refused and that message read as usual
            await ws.send(json.dumps({"type": "start", "prompt": SCENE.prompt, "images": 2}))
            await ws.send(png(VIDEO[0]))
            await send_start(ws, [png(VIDEO[0])], 6)
            error = await next_json(ws)
            assert error["status"] == 422 and "message 2 after it is text" in error["message"]
            return await read_stream(ws)

    started, jpegs, blocks = asyncio.run(run())
    assert started["given_frames"] == 1 and started["dropped_frames"] == 0
    assert jpegs[0] == _jpeg(VIDEO[0], quality) and len(jpegs) == 6
    assert jpegs[1] != jpegs[0]  # and the stream goes on from it
    assert [b["given_frames"] for b in blocks] == [1, 0]

    async def continued():
        async with websockets.connect(ws_url(world_url), max_size=None) as ws:
            await send_start(ws, [png(f) for f in VIDEO[:7]], 12)
            return await read_stream(ws)
    started, jpegs, blocks = asyncio.run(continued())
    assert started["given_frames"] == 7 and [b["given_frames"] for b in blocks] == [3, 3, 1, 0]
    assert jpegs[:7] == [_jpeg(f, quality) for f in VIDEO[:7]] and len(jpegs) == 12

    after = metrics_once_idle(world_url)
    assert after["images_refused"] - before["images_refused"] == 5
    for status, n in (("413", 2), ("422", 3)):
        assert after["refused"].get(status, 0) - before["refused"].get(status, 0) == n, status


def test_generate_starts_from_multipart_images_and_refuses_bad_ones(world_url):
    def generate(files: list, **fields) -> httpx.Response:
        return httpx.post(f"{world_url}/v1/generate", data={"prompt": SCENE.prompt, "seed": "1", **fields},
                          files=files, timeout=120)

    r = generate([("image", ("first.png", png(VIDEO[0]), "image/png"))], frames="9")
    assert r.status_code == 200, r.text
    video = read_video(r.content).frames
    plain = read_video(httpx.post(f"{world_url}/v1/generate", json={"prompt": SCENE.prompt, "seed": 1, "frames": 9},
                                  timeout=120).content).frames
    assert video.shape == (9, 32, 32, 3)
    start_error = np.abs(video[0].astype(int) - VIDEO[0]).mean()
    assert start_error < 3 < np.abs(plain[0].astype(int) - VIDEO[0]).mean(), start_error  # H.264 is near, not exact

    with httpx.stream("POST", f"{world_url}/v1/generate", data={"prompt": SCENE.prompt, "frames": "9", "stream": "true"},
                      files=[("image", (f"{i}.png", png(f), "image/png")) for i, f in enumerate(VIDEO[:7])],
                      timeout=120) as r:
        streamed = read_video(b"".join(r.iter_bytes())).frames
    assert streamed.shape == (9, 32, 32, 3) and np.abs(streamed[:7].astype(int) - VIDEO[:7]).mean() < 3

    before = httpx.get(f"{world_url}/v1/metrics").json()
    for name, (data, status, says) in BAD_IMAGES.items():
        r = generate([("image", ("x.png", data, "image/png"))])
        assert r.status_code == status and says in r.json()["error"]["message"], (name, r.text)
    assert generate([("image", (f"{i}.png", png(VIDEO[0]), "image/png")) for i in range(13)]).status_code == 400
    huge = generate([("image", ("huge.png", b"\0" * 400_000, "image/png"))])  # past the body's cap: never stored
    assert huge.status_code == 413 and "request body is over" in huge.json()["error"]["message"]
    bad_field = generate([("image", ("first.png", png(VIDEO[0]), "image/png"))], frames="many")
    assert bad_field.status_code == 422 and bad_field.json()["detail"][0]["loc"] == ["body", "frames"]
    after = httpx.get(f"{world_url}/v1/metrics").json()
    assert after["images_refused"] - before["images_refused"] == 3
    assert after["refused"]["413"] - before["refused"].get("413", 0) == 2


def test_info_states_the_prompt_grammar_and_warnings_name_the_wrong_part(world_url):
    info = httpx.get(f"{world_url}/v1/info").json()
    assert info["prompt_grammar"] == grammar().to_dict()
    assert info["start_from"] == {"formats": ["png", "jpeg"], "max_image_bytes": MAX_IMAGE_BYTES, "max_frames": 12,
                                  "frame_step": 1}
    r = httpx.post(f"{world_url}/v1/generate", json={"prompt": BLUE_BACKGROUND, "frames": 3}, timeout=120)
    (warning,) = json.loads(r.headers["x-prompt-warnings"])  # every word is known: only the grammar sees it
    assert "'blue', is a shape colour, not a background" in warning and "black, gray, brown" in warning

    async def run() -> dict:
        async with websockets.connect(ws_url(world_url), max_size=None) as ws:
            await ws.send(json.dumps({"type": "start", "prompt": BLUE_BACKGROUND, "max_frames": 3}))
            return await next_json(ws)
    assert asyncio.run(run())["warnings"] == [warning]


@pytest.mark.browser
def test_the_page_starts_a_stream_from_an_uploaded_image(browser, world_url, tmp_path):
    """The page's "start from image": upload a PNG, start, and the canvas's first frame is that image."""
    page = browser.new_page(viewport={"width": 1000, "height": 900})
    page.set_default_timeout(90_000)
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(world_url + "/")
    page.wait_for_function("!document.getElementById('grammar').hidden")
    assert "a <colour> <shape> moves <speed> <direction> across a <background> background" in page.text_content("#grammar")

    image = tmp_path / "white_square.png"
    image.write_bytes(png(VIDEO[0]))
    page.set_input_files("#image-file", str(image))
    page.wait_for_function("!document.getElementById('start-image').hidden")
    page.fill("#prompt", SCENE.prompt)
    page.click("#start")
    first = page.wait_for_function("""() => {  // the canvas while it shows the stream's first frame
      const c = document.getElementById("screen");
      return c.dataset.frames === "1" && Array.from(c.getContext("2d").getImageData(0, 0, c.width, c.height).data);
    }""").json_value()
    drawn = np.array(first, dtype=np.uint8).reshape(32, 32, 4)[..., :3]
    # the frame went through the server's JPEG and the browser's decoder: near the image, not exact
    assert np.abs(drawn.astype(int) - VIDEO[0]).mean() < 4
    page.wait_for_function("Number(document.getElementById('screen').dataset.frames) >= 4")
    page.wait_for_function("document.getElementById('log').textContent.includes('given ones')")
    page.screenshot(path=str(tmp_path / "serve_image_start.png"), full_page=True)
    page.click("#snapshot")  # the frame on screen becomes the next start's image
    page.wait_for_function("document.getElementById('start-image-note').textContent.startsWith('frame')")
    page.click("#continue")  # restarts from the frames shown
    page.wait_for_function("document.getElementById('log').textContent.includes('continue from the last')")
    page.wait_for_function("document.getElementById('log').textContent.match(/start: .* from \\d+ frame/)")
    page.wait_for_function("Number(document.getElementById('screen').dataset.frames) >= 4")
    page.click("#stop")
    page.wait_for_function("!document.getElementById('start').disabled")
    assert not errors, errors
    assert Path(tmp_path / "serve_image_start.png").stat().st_size > 5_000
    page.close()
