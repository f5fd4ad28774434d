"""The streaming deployment on real Ray Serve with a real WebSocket client: frames, prompt switches, control
errors, the session limit, auth, MP4 generation, presets checked against the model, deadlines, prompt warnings
and the close frame open streams get when the application is deleted."""

from __future__ import annotations

import asyncio
import json
import threading

import httpx
import pytest
import websockets
import yaml
from ray import serve
from ray.serve.schema import ServeDeploySchema
from websockets.exceptions import ConnectionClosed, InvalidStatus

from core.config import PLUMBING_CONFIG, REPO_ROOT, ConfigError, load_config
from core.model.wan import CausalWanModel
from core.records.video_io import read_video
from core.stream.pipeline import VideoPipeline
from core.stream.session import StreamSession
from helpers import peft_adapter
from serve.app import FRAME_HEADER, WorkEnded, _Bound, _check_bound, build_app
from toyworld.config import load_world_config

BASE = ["serve.num_cpus=0.25"]


def deploy(name: str, *overrides: str):
    cfg = load_config(REPO_ROOT / "configs" / "serve.yaml", [*BASE, f"serve.app_name={name}", *overrides])
    serve.run(build_app(cfg), name=name, route_prefix=f"/{name}")


@pytest.fixture
def app_url(stream_app):
    return stream_app


def ws_url(http_url: str) -> str:
    return http_url.replace("http://", "ws://", 1) + "/v1/stream"


async def receive_until(ws, kind: str, frames: list | None = None, errors: list | None = None) -> dict:
    """Read messages until a JSON message of `kind`; binary frames go to `frames`, errors to `errors`."""
    while True:
        msg = await asyncio.wait_for(ws.recv(), timeout=120)
        if isinstance(msg, bytes):
            index, block, t, version = FRAME_HEADER.unpack_from(msg)
            assert msg[FRAME_HEADER.size:FRAME_HEADER.size + 2] == b"\xff\xd8"  # a JPEG
            assert version == 0  # a replica that follows no training plays the weights it started with
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
        # end to end (denoise + decode) is never faster than denoising alone on the sequential path
        assert 0 < metrics["production_fps"]["end_to_end"] <= metrics["production_fps"]["denoise"]
    asyncio.run(run())


def test_generate_mp4_and_fragmented_stream(app_url):
    r = httpx.post(f"{app_url}/v1/generate", json={"prompt": "a green star", "frames": 33, "preset": "wide"},
                   timeout=120)
    assert r.status_code == 200 and r.headers["content-type"] == "video/mp4"
    assert json.loads(r.headers["x-prompt-warnings"]) == []  # a byte-level tokenizer reads every word
    video = read_video(r.content)
    assert video.frames.shape == (33, 32, 128, 3) and video.fps == 16
    with httpx.stream("POST", f"{app_url}/v1/generate", json={"prompt": "x", "frames": 21, "stream": True},
                      timeout=120) as r:
        parts = list(r.iter_bytes())
    assert read_video(b"".join(parts)).frames.shape == (21, 64, 64, 3)
    refused_before = httpx.get(f"{app_url}/v1/metrics").json()["refused"]
    bad = httpx.post(f"{app_url}/v1/generate", json={"prompt": "x", "frames": 100000}, timeout=30)
    assert bad.status_code == 413 and "max_generate_frames" in bad.json()["error"]["message"]
    assert httpx.post(f"{app_url}/v1/generate", json={"prompt": ""}, timeout=30).status_code == 422
    unknown = httpx.post(f"{app_url}/v1/generate", json={"prompt": "x", "preset": "hd"}, timeout=30)
    assert unknown.status_code == 422 and "unknown preset 'hd'" in unknown.json()["error"]["message"]
    refused = httpx.get(f"{app_url}/v1/metrics").json()["refused"]
    assert refused.get("413", 0) - refused_before.get("413", 0) == 1
    assert refused.get("422", 0) - refused_before.get("422", 0) == 2


def test_info_health_and_page(app_url):
    info = httpx.get(f"{app_url}/v1/info").json()
    assert info["presets"]["tiny"] == {"height": 64, "width": 64} and info["default_preset"] == "tiny"
    assert info["vocabulary"] is None  # a byte-level tokenizer: no word list to show
    assert info["prompt_grammar"] is None  # nor a grammar: prompts get the word-level check alone
    assert info["limits"]["max_sessions_per_replica"] == 1 and info["auth"] is False
    assert info["fast_path"] == {"block_step": "eager", "overlap_decode": False, "fp8": False, "warm_up_s": 0.0,
                                 "attention": "sdpa"}
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
        assert json.loads(r.headers["x-prompt-warnings"]) == []
        # Words the world's tokenizer does not know are read as <unk>: the client is told which, and where the
        # prompt leaves the world's grammar.
        r = httpx.post(f"{url}/v1/generate", json={"prompt": "a corgi on a blue background", "frames": 3}, timeout=120)
        warning, grammar = json.loads(r.headers["x-prompt-warnings"])
        assert r.status_code == 200 and "corgi" in warning and "background" not in warning.split(":")[1]
        assert "word 2, 'corgi', is not a shape colour" in grammar

        async def stream() -> tuple[dict, dict]:
            async with websockets.connect(ws_url(url), max_size=None) as ws:
                await ws.send(json.dumps({"type": "start", "prompt": "a purple corgi", "max_frames": 6}))
                started = await receive_until(ws, "started")
                await ws.send(json.dumps({"type": "switch", "prompt": "a red square on a teal background"}))
                return started, await receive_until(ws, "switched")
        started, switched = asyncio.run(stream())
        assert len(started["warnings"]) == 2 and started["warnings"][0].split(":")[1].strip().startswith("corgi;")
        assert "teal" in switched["warnings"][0] and "word 4 is 'on'" in switched["warnings"][1]
        assert httpx.get(f"{url}/v1/metrics").json()["prompt_warnings"] == 6
    finally:
        serve.delete("stream_world")


# ----------------------------------------------------------------------------------------- bounds on the work


def test_presets_must_fit_the_models_video_geometry():
    """A preset the model cannot serve is a startup error naming the preset and both shapes (no Ray needed)."""
    cfg = load_world_config(None, ["serve.presets={world: [32, 32], hd: [480, 832], odd: [30, 32]}"])
    with pytest.raises(ConfigError) as refused:
        build_app(cfg)
    message = str(refused.value)
    assert "serve.presets.hd is 480x832 (height x width) but the model's video geometry is 32x32" in message
    assert "24960 tokens per frame, above the model's 64" in message
    assert "serve.presets.odd is 30x32" in message and "multiples of 4x4" in message
    assert "serve.presets.world" not in message
    with pytest.raises(ConfigError, match=r"serve.presets.480p is 480x832 .* 64x64"):
        build_app(load_config(PLUMBING_CONFIG))  # no serve section: the 1.3B's default presets on a 64x64 model
    for cfg in [load_config(REPO_ROOT / "configs" / name) for name in ("serve.yaml", "serve_1.3b.yaml")] + [
            load_world_config(None)]:
        assert cfg.serve.preset_problems(cfg.video, cfg.model.patch_size) == [], cfg.serve.presets


def test_a_bound_stops_the_model_at_the_next_transformer_block():
    """The deadline and shutdown are checked before every transformer block in the thread doing a request's work;
    an awaiting coroutine that gives up (its deadline's scope) waits for that thread to stop."""
    pipe = VideoPipeline.from_config(load_config(REPO_ROOT / "configs" / "serve.yaml"))
    for block in pipe.generator.blocks:
        block.register_forward_pre_hook(_check_bound)
    session = StreamSession(pipe, "a red ball", 0)
    within = _Bound(600, "serve.stream_timeout_s", "stream")
    assert len(asyncio.run(within.run(session.next_chunk)).frames) == 9
    past = _Bound(1e-9, "serve.stream_timeout_s", "stream")
    with pytest.raises(WorkEnded) as ended:
        asyncio.run(past.run(session.next_chunk))
    assert (ended.value.status, ended.value.close_code, ended.value.counter) == (504, 1008, "deadline_stream")
    assert "serve.stream_timeout_s" in ended.value.reason and session.blocks == 1  # no block was made past it

    async def shut_down() -> None:
        bound = _Bound(600, "serve.stream_timeout_s", "stream")
        bound.end_for_shutdown()
        await bound.run(session.next_chunk)
    with pytest.raises(WorkEnded) as ended:
        asyncio.run(shut_down())
    assert (ended.value.status, ended.value.close_code) == (503, 1001) and session.blocks == 1

    stopped = threading.Event()

    def endless() -> None:  # far more blocks than the bound allows: only the bound ends it
        try:
            for _ in range(2000):
                session.next_chunk()
        finally:
            stopped.set()

    async def run_out() -> None:
        bound = _Bound(0.5, "serve.generate_timeout_s", "generate")
        async with bound.scope():
            await bound.run(endless)
    with pytest.raises(WorkEnded) as ended:
        asyncio.run(run_out())
    assert ended.value.counter == "deadline_generate" and stopped.is_set() and session.blocks < 2000
    fresh = StreamSession(pipe, "a red ball", 0)  # (a session stopped mid-block is discarded, as serve does)
    assert len(fresh.next_chunk().frames) == 9  # outside any request the hooks let the model run


@pytest.fixture(scope="module")
def bounded_url(serve_instance):
    """An app whose generate deadline has always passed, with a short start timeout and stream deadline."""
    deploy("stream_bounded", "serve.generate_timeout_s=1e-9", "serve.start_timeout_s=1", "serve.stream_timeout_s=4")
    yield f"{serve_instance}/stream_bounded"
    serve.delete("stream_bounded")


def test_deadlines_free_the_replica_and_say_why(bounded_url):
    for stream in (False, True, False):  # none is refused as busy: each one's slot was freed
        r = httpx.post(f"{bounded_url}/v1/generate", json={"prompt": "a red ball", "frames": 481, "stream": stream},
                       timeout=60)
        assert r.status_code == 504 and "serve.generate_timeout_s" in r.json()["error"]["message"]

    async def run() -> tuple[list, list]:
        closes, messages = [], []
        async with websockets.connect(ws_url(bounded_url), max_size=None) as ws:  # no start: a client error
            with pytest.raises(ConnectionClosed):
                while True:
                    messages.append(await asyncio.wait_for(ws.recv(), timeout=60))
            closes.append((ws.close_code, ws.close_reason))
        async with websockets.connect(ws_url(bounded_url), max_size=None) as ws:  # an endless stream: the deadline
            await ws.send(json.dumps({"type": "start", "prompt": "a red ball"}))
            with pytest.raises(ConnectionClosed):
                while True:
                    messages.append(await asyncio.wait_for(ws.recv(), timeout=60))
            closes.append((ws.close_code, ws.close_reason))
        return closes, [json.loads(m) for m in messages if isinstance(m, str)]
    closes, messages = asyncio.run(run())
    assert closes[0][0] == 1008 and "serve.start_timeout_s" in closes[0][1]
    assert closes[1][0] == 1008 and "serve.stream_timeout_s = 4 s" in closes[1][1]
    fatal = [m for m in messages if m["type"] == "error"]
    assert [m["close_code"] for m in fatal] == [1008, 1008] and all(m["fatal"] for m in fatal)
    metrics = httpx.get(f"{bounded_url}/v1/metrics").json()
    assert metrics["deadlines_expired"] == {"generate": 3, "stream": 1} and metrics["start_timeouts"] == 1
    assert metrics["sessions_active"] == 0 and metrics["refused_busy"] == 0


def test_deleting_the_app_closes_open_streams_with_going_away(serve_instance):
    """What `launch.py serve` does on Ctrl-C / SIGTERM, at the deployment level: the client holding a stream gets a
    close frame with 1001 and a reason, not a dropped connection."""
    deploy("stream_drain", "serve.drain_check_s=0.2")
    url = f"{serve_instance}/stream_drain"

    async def run() -> tuple[int, str, list]:
        async with websockets.connect(ws_url(url), max_size=None) as ws:
            await ws.send(json.dumps({"type": "start", "prompt": "a red ball"}))
            await receive_until(ws, "block")
            deleting = asyncio.create_task(asyncio.to_thread(serve.delete, "stream_drain"))
            messages = []
            with pytest.raises(ConnectionClosed):
                while True:
                    messages.append(await asyncio.wait_for(ws.recv(), timeout=60))
            await deleting
            return ws.close_code, ws.close_reason, [json.loads(m) for m in messages if isinstance(m, str)]
    code, reason, messages = asyncio.run(run())
    assert code == 1001 and "shutting down" in reason
    assert messages[-1]["type"] == "error" and messages[-1]["fatal"] and messages[-1]["close_code"] == 1001


@pytest.mark.compile
def test_a_compiled_replica_with_overlapped_decode_warms_at_start_and_streams(serve_instance, cxx_compiler):
    """The fast path end to end on CPU: compiled layers and decode overlapped with the next block's denoising."""
    deploy("stream_fast", "runtime.compile=true", "runtime.overlap_decode=true")
    url = f"{serve_instance}/stream_fast"
    try:
        fast = httpx.get(f"{url}/v1/info").json()["fast_path"]
        assert fast["block_step"] == "compiled" and fast["overlap_decode"] is True and fast["warm_up_s"] > 0

        async def stream() -> tuple[list, dict]:
            async with websockets.connect(ws_url(url), max_size=None) as ws:
                await ws.send(json.dumps({"type": "start", "prompt": "a red ball", "seed": 3, "max_frames": 57}))
                await receive_until(ws, "started")
                frames = []
                await receive_until(ws, "block", frames)
                await ws.send(json.dumps({"type": "switch", "prompt": "a blue cube"}))
                switched = await receive_until(ws, "switched", frames)
                switched["frames_before"] = len(frames)
                await receive_until(ws, "end", frames)
                return frames, switched
        frames, switched = asyncio.run(stream())
        # every frame made was sent when the switch came, and one block (12 frames) more was denoised ahead: the
        # switch applies after it
        assert [f[0] for f in frames] == list(range(57)) and switched["at_frame"] == switched["frames_before"] + 12
        r = httpx.post(f"{url}/v1/generate", json={"prompt": "a fox", "frames": 21}, timeout=120)
        assert r.status_code == 200 and read_video(r.content).frames.shape[0] == 21
        metrics = httpx.get(f"{url}/v1/metrics").json()
        assert metrics["sessions_active"] == 0 and metrics["production_fps"]["end_to_end"] > 0
    finally:
        serve.delete("stream_fast")
