"""reward_service/inputs.py in this process: how a scoring request becomes a `VideoInput`, and every refusal's
status and message. Requests are real Starlette requests fed through ASGI messages (multipart bodies encoded by
httpx, as a client sends them); videos are real H.264 MP4s written with PyAV (core/records/video_io.py)."""

from __future__ import annotations

import asyncio
import dataclasses
import re

import httpx
import numpy as np
import pytest
from starlette.requests import Request

from core.config import RewardServiceConfig
from core.records.video_io import write_mp4
from reward_service.inputs import InputError, Limits, decode_video, parse_score_request, raw_frames

LIMITS = Limits(max_body_bytes=1 << 20, max_frames=16, max_pixels=64 * 64, max_duration_s=2.0)


def moving_bar(frames: int = 8, size: int = 32) -> np.ndarray:
    """A red bar moving right on black: uint8 [T, H, W, 3]."""
    video = np.zeros((frames, size, size, 3), dtype=np.uint8)
    for t in range(frames):
        video[t, :, 3 * t:3 * t + 8] = (200, 60, 30)
    return video


FRAMES = moving_bar()  # written at 8 fps: 1 s


@pytest.fixture(scope="module")
def mp4(tmp_path_factory) -> bytes:
    path = tmp_path_factory.mktemp("video") / "bar.mp4"
    write_mp4(path, FRAMES, 8)
    return path.read_bytes()


def refused(status: int, message: str, call) -> None:
    """`call()` raises an InputError with `status` whose message contains `message`."""
    with pytest.raises(InputError, match=re.escape(message)) as info:
        call()
    assert info.value.status == status, f"{message!r}: status {info.value.status}, expected {status}"


def request(body: bytes, headers: dict[str, str], query: str = "", chunks: int = 1) -> Request:
    """A POST /v1/score request as Starlette receives it, the body arriving in `chunks` ASGI messages."""
    size = -(-len(body) // chunks) if body else 1
    parts = [body[i:i + size] for i in range(0, len(body), size)] or [b""]
    messages = [{"type": "http.request", "body": p, "more_body": i < len(parts) - 1} for i, p in enumerate(parts)]

    async def receive() -> dict:
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    scope = {"type": "http", "method": "POST", "path": "/v1/score", "query_string": query.encode(),
             "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()]}
    return Request(scope, receive)


def parse(body: bytes, headers: dict[str, str], query: str = "", limits: Limits = LIMITS, chunks: int = 1):
    return asyncio.run(parse_score_request(request(body, headers, query, chunks), limits))


def multipart(files: dict | None = None, data: dict | None = None) -> tuple[bytes, dict[str, str]]:
    """A multipart/form-data body and its headers (Content-Type with the boundary, Content-Length), from httpx."""
    req = httpx.Request("POST", "http://reward/v1/score", files=files, data=data)
    return req.read(), {k: v for k, v in req.headers.items() if k != "host"}


def test_limits_come_from_the_service_config_and_check_video_refuses_each_excess():
    limits = Limits.from_config(RewardServiceConfig(max_body_mb=0.5, max_frames=16, max_pixels=4096, max_duration_s=2.0))
    assert limits == Limits(512 * 1024, 16, 4096, 2.0)
    limits.check_video(16, 64, 64, 8.0)  # exactly at every limit: 16 frames, 4096 pixels, 2 s
    for fps in (0.0, -8.0, float("nan"), float("inf"), 241.0):
        refused(422, f"fps must be a number in (0, 240.0], got {fps}", lambda: limits.check_video(8, 8, 8, fps))
    refused(413, "video has 17 frames, above the limit of 16", lambda: limits.check_video(17, 8, 8, 16.0))
    refused(413, "frames are 65x64 = 4160 pixels, above the limit of 4096", lambda: limits.check_video(8, 64, 65, 8.0))
    refused(413, "video lasts 2.5s, above the limit of 2s", lambda: limits.check_video(10, 8, 8, 4.0))


def test_raw_frames_are_read_from_the_query_and_each_bad_field_is_named():
    frames = np.arange(2 * 4 * 6 * 3, dtype=np.uint8).reshape(2, 4, 6, 3)
    data = frames.tobytes()
    query = {"prompt": "a red circle", "frames": "2", "height": "4", "width": "6", "fps": "8"}
    video = raw_frames(data, query, LIMITS)
    assert np.array_equal(video.frames, frames) and video.fps == 8.0 and video.prompt == "a red circle"
    cases = [
        ({"prompt": None}, 422, "field 'prompt' is required: a non-empty text prompt"),
        ({"prompt": "  "}, 422, "field 'prompt' is required: a non-empty text prompt"),
        ({"frames": None}, 422, "query parameter 'frames' must be a positive int, got None"),
        ({"height": "4.5"}, 422, "query parameter 'height' must be a positive int, got '4.5'"),
        ({"width": "0"}, 422, "query parameter 'width' must be a finite number > 0, got '0'"),
        ({"fps": "inf"}, 422, "query parameter 'fps' must be a finite number > 0, got 'inf'"),
        ({"fps": "300"}, 422, "fps must be a number in (0, 240.0], got 300.0"),
        ({"frames": "17"}, 413, "video has 17 frames, above the limit of 16"),  # before the body's size is compared
    ]
    for change, status, message in cases:
        bad = {k: v for k, v in {**query, **change}.items() if v is not None}
        refused(status, message, lambda: raw_frames(data, bad, LIMITS))
    for body in (data[:-1], data + b"\0"):
        refused(422, f"raw body has {len(body)} bytes but frames x height x width x 3 = 2x4x6x3 = 144",
                lambda: raw_frames(body, query, LIMITS))


def test_a_video_file_decodes_and_bad_or_oversized_files_are_refused(mp4):
    video = decode_video(mp4, "a red bar", LIMITS)
    assert video.frames.shape == FRAMES.shape and video.fps == 8.0 and video.prompt == "a red bar"
    assert np.abs(video.frames.astype(int) - FRAMES).mean() < 2  # H.264 at crf 18: close to what was written
    refused(400, "empty input (0 bytes)", lambda: decode_video(b"", "p", LIMITS))
    refused(400, "not a video container", lambda: decode_video(b"GIF89a" + bytes(64), "p", LIMITS))
    refused(400, "it looks corrupt or truncated", lambda: decode_video(mp4[:len(mp4) // 2], "p", LIMITS))
    # the decoder's own limits (413, not 400: the video is readable, only too large) and the duration
    refused(413, "max_frames=4", lambda: decode_video(mp4, "p", dataclasses.replace(LIMITS, max_frames=4)))
    refused(413, "max_pixels=1023", lambda: decode_video(mp4, "p", dataclasses.replace(LIMITS, max_pixels=32 * 32 - 1)))
    refused(413, "video lasts 1.0s, above the limit of 0.5s",
            lambda: decode_video(mp4, "p", dataclasses.replace(LIMITS, max_duration_s=0.5)))


def test_each_kind_of_body_is_read_by_its_content_type(mp4):
    body, headers = multipart(files={"video": ("bar.mp4", mp4, "video/mp4")}, data={"prompt": "a red bar"})
    assert headers["content-type"].startswith("multipart/form-data; boundary=")
    video = parse(body, headers)
    assert video.frames.shape == FRAMES.shape and video.fps == 8.0 and video.prompt == "a red bar"

    for content_type in ("video/mp4", "Video/MP4; codecs=avc1"):
        video = parse(mp4, {"content-type": content_type, "content-length": str(len(mp4))}, "prompt=a%20red%20bar",
                      chunks=3)
        assert video.frames.shape == FRAMES.shape and video.prompt == "a red bar", content_type

    raw = FRAMES[:2].tobytes()
    video = parse(raw, {"content-type": "application/octet-stream"}, "prompt=bar&frames=2&height=32&width=32&fps=8")
    assert np.array_equal(video.frames, FRAMES[:2]) and video.fps == 8.0


def test_bad_requests_are_refused_with_their_status_before_decoding(mp4):
    body, headers = multipart(files={"video": ("bar.mp4", mp4, "video/mp4")}, data={"prompt": "a red bar"})
    unsized = {k: v for k, v in headers.items() if k != "content-length"}
    refused(411, "multipart uploads need a Content-Length header", lambda: parse(body, unsized))
    small = dataclasses.replace(LIMITS, max_body_bytes=1000)
    refused(413, f"body of {len(body)} bytes is above the limit of 1000 bytes", lambda: parse(body, headers, limits=small))
    no_video = multipart(files={"prompt": (None, "a red bar")})  # (no file name: a form field)
    refused(422, "multipart field 'video' is required", lambda: parse(*no_video))
    text_video = multipart(files={"video": (None, "not a file"), "prompt": (None, "a red bar")})
    refused(422, "multipart field 'video' is required", lambda: parse(*text_video))
    no_prompt = multipart(files={"video": ("bar.mp4", mp4, "video/mp4")})
    refused(422, "field 'prompt' is required", lambda: parse(*no_prompt))
    garbage = b"--xyz\r\ngarbage\r\n"
    refused(400, "malformed multipart body", lambda: parse(
        garbage, {"content-type": "multipart/form-data; boundary=xyz", "content-length": str(len(garbage))}))

    refused(422, "field 'prompt' is required", lambda: parse(mp4, {"content-type": "video/mp4"}))
    refused(413, f"body of {len(mp4)} bytes is above the limit of 1000 bytes", lambda: parse(
        mp4, {"content-type": "video/webm", "content-length": str(len(mp4))}, "prompt=p", limits=small))
    # no Content-Length: refused while the body streams in, once past the limit
    refused(413, "body is above the limit of 1000 bytes",
            lambda: parse(mp4, {"content-type": "video/mp4"}, "prompt=p", limits=small, chunks=4))
    refused(415, "unsupported Content-Type 'text/plain'", lambda: parse(b"hello", {"content-type": "text/plain"}))
    refused(415, "unsupported Content-Type '(none)'", lambda: parse(b"hello", {}))
