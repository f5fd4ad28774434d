"""The streaming deployment on real Ray Serve with a real WebSocket client: frames, prompt switches, control
errors, the session limit, auth, and MP4 generation."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest
import websockets
import yaml
from ray import serve
from ray.serve.schema import ServeDeploySchema
from websockets.exceptions import InvalidStatus

from core.config import REPO_ROOT, load_config
from core.model.wan import CausalWanModel
from core.records.video_io import read_video
from helpers import peft_adapter
from serve.app import FRAME_HEADER, build_app
from toyworld.config import load_world_config

BASE = ["serve.num_cpus=0.25"]


def deploy(name: str, *overrides: str):
    cfg = load_config(REPO_ROOT / "configs" / "serve.yaml", [*BASE, f"serve.app_name={name}", *overrides])
    serve.run(build_app(cfg), name=name, route_prefix=f"/{name}")


@pytest.fixture(scope="module")
def app_url(serve_instance):
    deploy("stream_test")
    yield f"{serve_instance}/stream_test"
    serve.delete("stream_test")


def ws_url(http_url: str) -> str:
    return http_url.replace("http://", "ws://", 1) + "/v1/stream"


async def receive_until(ws, kind: str, frames: list | None = None, errors: list | None = None) -> dict:
    """Read messages until a JSON message of `kind`; binary frames go to `frames`, errors to `errors`."""
    while True:
        msg = await asyncio.wait_for(ws.recv(), timeout=120)
        if isinstance(msg, bytes):
            index, block, t = FRAME_HEADER.unpack_from(msg)
            assert msg[FRAME_HEADER.size:FRAME_HEADER.size + 2] == b"\xff\xd8"  # a JPEG
            if frames is not None:
                frames.append((index, block, t))
            continue
        data = json.loads(msg)
        if data["type"] == "error" and errors is not None and kind != "error":
            errors.append(data)
            continue
        if data["type"] == kind:
            return data
        assert data["type"] in ("block", "switched", "started", "paused", "resumed"), data


def test_stream_frames_switch_and_bad_messages(app_url):
    async def run():
        async with websockets.connect(ws_url(app_url), max_size=None) as ws:
            await ws.send(json.dumps({"type": "switch", "prompt": "too early"}))
            assert "start" in (await receive_until(ws, "error"))["message"]
            await ws.send(json.dumps({"type": "start", "prompt": "a red ball", "preset": "nope"}))
            assert "unknown preset" in (await receive_until(ws, "error"))["message"]
            await ws.send(json.dumps({"type": "start", "prompt": "a red ball", "seed": 3, "max_frames": 60}))
            started = await receive_until(ws, "started")
            assert (started["width"], started["height"], started["fps"]) == (64, 64, 16)
            frames, errors = [], []
            first = await receive_until(ws, "block", frames)
            assert first["block"] == 0 and first["frames"] == 9
            for bad in ("not json", json.dumps({"type": "bogus"}), json.dumps({"type": "switch"}), json.dumps([1]),
                        b"\x00binary"):
                await ws.send(bad)
            await ws.send(json.dumps({"type": "switch", "prompt": "a blue cube"}))
            switched = await receive_until(ws, "switched", frames, errors)
            assert switched["prompt"] == "a blue cube" and switched["at_frame"] >= 9
            end = await receive_until(ws, "end", frames, errors)
            assert end == {"type": "end", "frames": 60, "reason": "max_frames"}
            assert len(errors) == 5 and all(e["type"] == "error" and not e.get("fatal") for e in errors)
            assert [f[0] for f in frames] == list(range(60))  # increasing indices, none lost
            assert all(a[2] <= b[2] for a, b in zip(frames, frames[1:]))
    asyncio.run(run())


def test_session_limit_refuses_with_503_and_frees_on_disconnect(app_url):
    async def run():
        first = await websockets.connect(ws_url(app_url), max_size=None)
        await first.send(json.dumps({"type": "start", "prompt": "a dog"}))
        await receive_until(first, "block")
        with pytest.raises(InvalidStatus) as refused:
            await websockets.connect(ws_url(app_url))
        assert refused.value.response.status_code == 503 and refused.value.response.headers["Retry-After"] == "2"
        await first.send(json.dumps({"type": "pause"}))
        await receive_until(first, "paused", [])
        await first.close()  # a disconnect, even while paused, frees the session
        deadline = asyncio.get_running_loop().time() + 60
        while httpx.get(f"{app_url}/v1/metrics").json()["sessions_active"] != 0:
            assert asyncio.get_running_loop().time() < deadline, "the session was not freed after the disconnect"
            await asyncio.sleep(0.2)
        async with websockets.connect(ws_url(app_url), max_size=None) as again:
            await again.send(json.dumps({"type": "start", "prompt": "a cat", "max_frames": 9}))
            assert (await receive_until(again, "end"))["frames"] == 9
        metrics = httpx.get(f"{app_url}/v1/metrics").json()
        assert metrics["refused_busy"] >= 1 and metrics["time_to_first_frame_s"]["last"] > 0
        assert metrics["production_fps"]["denoise"] > 0 and metrics["delivered_fps"] > 0
    asyncio.run(run())


def test_generate_mp4_and_fragmented_stream(app_url):
    r = httpx.post(f"{app_url}/v1/generate", json={"prompt": "a green star", "frames": 33, "preset": "wide"},
                   timeout=120)
    assert r.status_code == 200 and r.headers["content-type"] == "video/mp4"
    video = read_video(r.content)
    assert video.frames.shape == (33, 64, 112, 3) and video.fps == 16
    with httpx.stream("POST", f"{app_url}/v1/generate", json={"prompt": "x", "frames": 21, "stream": True},
                      timeout=120) as r:
        parts = list(r.iter_bytes())
    assert read_video(b"".join(parts)).frames.shape == (21, 64, 64, 3)
    bad = httpx.post(f"{app_url}/v1/generate", json={"prompt": "x", "frames": 100000}, timeout=30)
    assert bad.status_code == 413 and "max_generate_frames" in bad.json()["error"]["message"]
    assert httpx.post(f"{app_url}/v1/generate", json={"prompt": ""}, timeout=30).status_code == 422


def test_info_health_and_page(app_url):
    info = httpx.get(f"{app_url}/v1/info").json()
    assert info["presets"]["tiny"] == {"height": 64, "width": 64} and info["default_preset"] == "tiny"
    assert info["vocabulary"] is None  # a byte-level tokenizer: no word list to show
    assert info["limits"]["max_sessions_per_replica"] == 1 and info["auth"] is False
    assert httpx.get(f"{app_url}/healthz").json()["status"] == "ok"
    page = httpx.get(f"{app_url}/")
    assert page.status_code == 200 and "<canvas" in page.text


def test_bearer_token_is_checked_before_a_session_exists(serve_instance, monkeypatch):
    monkeypatch.setenv("STREAM_TEST_TOKEN", "s3cret")
    deploy("stream_auth", "serve.auth_token_env=STREAM_TEST_TOKEN")
    url = f"{serve_instance}/stream_auth"

    async def run():
        with pytest.raises(InvalidStatus) as refused:
            await websockets.connect(ws_url(url))
        assert refused.value.response.status_code == 401
        async with websockets.connect(ws_url(url) + "?token=s3cret", max_size=None) as ws:
            await ws.send(json.dumps({"type": "start", "prompt": "a fox", "max_frames": 9}))
            assert (await receive_until(ws, "end"))["frames"] == 9
    try:
        asyncio.run(run())
        assert httpx.get(f"{url}/v1/info").status_code == 401
        assert httpx.get(f"{url}/v1/info", headers={"Authorization": "Bearer s3cret"}).json()["auth"] is True
        assert httpx.get(f"{url}/healthz").status_code == 200
    finally:
        serve.delete("stream_auth")


def test_startup_and_per_session_lora(serve_instance, tmp_path):
    cfg = load_config(REPO_ROOT / "configs" / "serve.yaml")
    peft_adapter(CausalWanModel(cfg.model, cfg.stream), tmp_path / "style")
    deploy("stream_lora", f"serve.lora_adapters={{style: {tmp_path / 'style'}}}",
           f"serve.lora=[{{path: {tmp_path / 'style'}, weight: 0.5}}]")
    url = f"{serve_instance}/stream_lora"

    async def first_block(**start) -> list[bytes]:
        async with websockets.connect(ws_url(url), max_size=None) as ws:
            await ws.send(json.dumps({"type": "start", "prompt": "a fox", "seed": 7, "max_frames": 9, **start}))
            frames = []
            while True:
                msg = await asyncio.wait_for(ws.recv(), timeout=120)
                if isinstance(msg, bytes):
                    frames.append(msg[FRAME_HEADER.size:])
                elif json.loads(msg)["type"] in ("end", "error"):
                    return frames

    try:
        assert httpx.get(f"{url}/v1/info").json()["lora"] == [str(tmp_path / "style")]
        plain = asyncio.run(first_block())
        styled = asyncio.run(first_block(lora="style"))
        again = asyncio.run(first_block())
        assert len(plain) == len(styled) == 9 and styled != plain  # the adapter changes the video
        assert again == plain  # and is gone once its session ends
    finally:
        serve.delete("stream_lora")


def test_serve_deploy_file_is_a_valid_serve_config():
    spec = ServeDeploySchema.model_validate(yaml.safe_load(open(REPO_ROOT / "deploy" / "serve_stream.yaml")))
    app = spec.applications[0]
    assert app.import_path == "serve.app:app_builder"
    assert load_config(REPO_ROOT / app.args["config"], app.args["overrides"]).serve.num_gpus == 1.0


def test_the_default_serves_the_world_student_and_its_vocabulary(serve_instance):
    """`launch.py serve` with no --config: the shipped world student at 32x32, and the words it knows for the page."""
    cfg = load_world_config(None, [*BASE, "serve.app_name=stream_world"])
    serve.run(build_app(cfg), name="stream_world", route_prefix="/stream_world")
    try:
        url = f"{serve_instance}/stream_world"
        info = httpx.get(f"{url}/v1/info").json()
        assert info["presets"] == {"world": {"height": 32, "width": 32}} and info["checkpoint"] == cfg.checkpoint.generator
        assert {"circle", "red", "left", "slowly", "background"} <= set(info["vocabulary"])
        r = httpx.post(f"{url}/v1/generate", json={"prompt": "a red circle moves slowly left across a gray background",
                                                  "frames": 9}, timeout=120)
        assert r.status_code == 200 and read_video(r.content).frames.shape == (9, 32, 32, 3)
    finally:
        serve.delete("stream_world")
