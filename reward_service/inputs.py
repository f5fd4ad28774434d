"""Turn an HTTP request into a `VideoInput`, enforcing the service limits before any decoding.

Accepted bodies for POST /v1/score:
- `multipart/form-data` with a `video` file (MP4/WebM) and a `prompt` field;
- `video/mp4`, `video/webm` (the file as the body) with `prompt` in the query;
- `application/octet-stream`: raw uint8 RGB frames [T, H, W, 3] in C order, with `frames`,
  `height`, `width`, `fps` and `prompt` in the query.
Every rejection is an `InputError` carrying the HTTP status and a message saying what to fix.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from starlette.requests import Request

from core.config import RewardServiceConfig
from core.records.video_io import VideoDecodeError, VideoTooLargeError, read_video
from core.reward.base import VideoInput

MAX_FPS = 240.0
VIDEO_TYPES = ("video/mp4", "video/webm", "video/quicktime", "video/x-matroska")
ACCEPTED_TYPES = "multipart/form-data (video file + prompt), video/mp4, video/webm, or application/octet-stream (raw frames)"


BINARY = {"type": "string", "format": "binary"}


def _query(name: str, schema: dict, description: str) -> dict:
    return {"name": name, "in": "query", "required": False, "schema": schema, "description": description}


# What `parse_score_request` accepts, as OpenAPI, for the route's `openapi_extra`: the handler reads the body itself
# (to check sizes before decoding), so FastAPI cannot infer any of it. Query parameters apply per body type, which
# OpenAPI cannot say, so each one's description names the bodies that need it; the service's size limits are in
# GET /v1/info.
SCORE_OPENAPI = {
    "parameters": [
        _query("prompt", {"type": "string", "minLength": 1},
               "the text prompt; required with video/* and application/octet-stream bodies (multipart sends it as "
               "a form field)"),
        _query("frames", {"type": "integer", "minimum": 1}, "application/octet-stream only, required: frames T"),
        _query("height", {"type": "integer", "minimum": 1}, "application/octet-stream only, required: height H"),
        _query("width", {"type": "integer", "minimum": 1}, "application/octet-stream only, required: width W"),
        _query("fps", {"type": "number", "exclusiveMinimum": 0, "maximum": MAX_FPS},
               "application/octet-stream only, required: frames per second"),
    ],
    "requestBody": {
        "required": True,
        "description": "one video, in one of these forms (each has its own parameters; limits: GET /v1/info)",
        "content": {
            "multipart/form-data": {
                "schema": {"type": "object", "required": ["video", "prompt"],
                           "properties": {"video": {**BINARY, "description": "the video file (MP4 or WebM)"},
                                          "prompt": {"type": "string", "minLength": 1}}},
                "encoding": {"video": {"contentType": ", ".join(VIDEO_TYPES)}}},
            **{kind: {"schema": {**BINARY, "description": "the video file; ?prompt= required"}} for kind in VIDEO_TYPES},
            "application/octet-stream": {"schema": {**BINARY, "description": (
                "raw uint8 RGB frames [T, H, W, 3] in C order, exactly frames x height x width x 3 bytes; "
                "?prompt=&frames=&height=&width=&fps= required")}},
        },
    },
}


class InputError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(status, message)  # both in args, so the error pickles across Ray
        self.status = status
        self.message = message

    def __str__(self) -> str:
        return self.message


@dataclass
class Limits:
    max_body_bytes: int
    max_frames: int
    max_pixels: int
    max_duration_s: float

    @classmethod
    def from_config(cls, cfg: RewardServiceConfig) -> "Limits":
        return cls(int(cfg.max_body_mb * 2**20), cfg.max_frames, cfg.max_pixels, cfg.max_duration_s)

    def check_video(self, frames: int, height: int, width: int, fps: float) -> None:
        if not (math.isfinite(fps) and 0 < fps <= MAX_FPS):
            raise InputError(422, f"fps must be a number in (0, {MAX_FPS}], got {fps}")
        if frames > self.max_frames:
            raise InputError(413, f"video has {frames} frames, above the limit of {self.max_frames}")
        if height * width > self.max_pixels:
            raise InputError(413, f"frames are {width}x{height} = {width * height} pixels, above the limit of {self.max_pixels}")
        if frames / fps > self.max_duration_s:
            raise InputError(413, f"video lasts {frames / fps:.1f}s, above the limit of {self.max_duration_s:g}s")


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 as soon as it is known to exceed `limit` bytes."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise InputError(413, f"body of {int(declared)} bytes is above the limit of {limit} bytes")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise InputError(413, f"body is above the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def _prompt(value: object) -> str:
    if not isinstance(value, str) or not value.strip():
        raise InputError(422, "field 'prompt' is required: a non-empty text prompt")
    return value


def _positive(name: str, value: str | None, kind: type) -> int | float:
    try:
        number = kind(value)
    except (TypeError, ValueError):
        raise InputError(422, f"query parameter {name!r} must be a positive {kind.__name__}, got {value!r}") from None
    if not (math.isfinite(number) and number > 0):
        raise InputError(422, f"query parameter {name!r} must be a finite number > 0, got {value!r}")
    return number


def decode_video(data: bytes, prompt: str, limits: Limits) -> VideoInput:
    try:
        video = read_video(data, max_frames=limits.max_frames, max_pixels=limits.max_pixels)
    except VideoTooLargeError as e:
        raise InputError(413, str(e)) from None
    except VideoDecodeError as e:
        raise InputError(400, str(e)) from None
    if not video.fps > 0:
        raise InputError(400, "the video declares no frame rate; re-encode it with one (e.g. ffmpeg -r 16)")
    limits.check_video(len(video.frames), video.height, video.width, video.fps)
    return VideoInput(video.frames, video.fps, prompt)


def raw_frames(data: bytes, query: dict[str, str], limits: Limits) -> VideoInput:
    prompt = _prompt(query.get("prompt"))
    t, h, w = (_positive(k, query.get(k), int) for k in ("frames", "height", "width"))
    fps = _positive("fps", query.get("fps"), float)
    limits.check_video(t, h, w, fps)
    expected = t * h * w * 3
    if len(data) != expected:
        raise InputError(422, f"raw body has {len(data)} bytes but frames x height x width x 3 = {t}x{h}x{w}x3 = "
                              f"{expected}; send uint8 RGB frames in C order [T, H, W, 3]")
    return VideoInput(np.frombuffer(data, dtype=np.uint8).reshape(t, h, w, 3), fps, prompt)


async def parse_score_request(request: Request, limits: Limits) -> VideoInput:
    """The video and prompt of a scoring request, or an `InputError` with its status."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type == "multipart/form-data":
        # Starlette spools file parts without a size limit, so the declared length is the limit check.
        declared = request.headers.get("content-length")
        if declared is None or not declared.isdigit():
            raise InputError(411, "multipart uploads need a Content-Length header")
        if int(declared) > limits.max_body_bytes:
            raise InputError(413, f"body of {int(declared)} bytes is above the limit of {limits.max_body_bytes} bytes")
        try:
            form = await request.form(max_files=1, max_fields=8, max_part_size=limits.max_body_bytes)
        except Exception as e:  # starlette raises MultiPartException / HTTPException for malformed bodies
            raise InputError(400, f"malformed multipart body: {e}") from None
        try:
            upload = form.get("video")
            if upload is None or isinstance(upload, str):
                raise InputError(422, "multipart field 'video' is required: the video file (MP4 or WebM)")
            prompt = _prompt(form.get("prompt"))
            data = await upload.read()
        finally:
            await form.close()
        return decode_video(data, prompt, limits)
    if content_type in VIDEO_TYPES:
        prompt = _prompt(request.query_params.get("prompt"))
        return decode_video(await read_body(request, limits.max_body_bytes), prompt, limits)
    if content_type == "application/octet-stream":
        return raw_frames(await read_body(request, limits.max_body_bytes), dict(request.query_params), limits)
    raise InputError(415, f"unsupported Content-Type {content_type or '(none)'!r}; send {ACCEPTED_TYPES}")
