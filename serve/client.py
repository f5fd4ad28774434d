"""A Python client of `WS /v1/stream` that reads as the web page plays: frames are consumed at the stream's fps and
the server is paused while more than `ahead_s` seconds of frames wait (resumed under half that), so a watcher
never makes the server race ahead of playback (on a shared machine, that would take the cores from training).

    frames, messages = asyncio.run(read_stream(url, {"prompt": "a red circle moves left"}, until=enough))
"""

from __future__ import annotations

import asyncio
import json
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass

import websockets

GOING_AWAY = 1001  # the close code of a server shutting down (RFC 6455)
FRAME_HEADER = struct.Struct("<IIdI")  # before each frame's JPEG: frame index, block, seconds since the start, weight version


@dataclass(frozen=True)
class Frame:
    arrived: float  # time.monotonic() at arrival
    index: int
    block: int
    version: int
    jpeg: bytes


class StreamGap(TimeoutError):
    """No frame for longer than the bound while the client was not pausing the server."""


async def read_stream(url: str, start: dict, until: Callable[[list[Frame], list[dict]], bool],
                      max_gap_s: float = 60.0, deadline_s: float = 600.0,
                      ahead_s: float = 3.0) -> tuple[list[Frame], list[dict]]:
    """Start a stream at `url` (ws://.../v1/stream) with the `start` fields and read it until `until(frames,
    messages)` holds, then stop it, or until the server goes away (its last message, an error with close code
    1001, ends `messages`). `messages` are the JSON messages in order. Raises StreamGap when no frame came for
    `max_gap_s` unpaused, TimeoutError past `deadline_s`, RuntimeError on any other server error message."""
    frames: list[Frame] = []
    messages: list[dict] = []
    fps, paused = None, False
    deadline = time.monotonic() + deadline_s
    async with websockets.connect(url, max_size=None) as ws:
        await ws.send(json.dumps({"type": "start", **start}))
        while not until(frames, messages):
            if time.monotonic() > deadline:
                raise TimeoutError(f"the stream did not reach its condition within {deadline_s:g} s "
                                   f"({len(frames)} frames, versions {sorted({f.version for f in frames})})")
            if frames and fps:
                waiting = len(frames) - (time.monotonic() - frames[0].arrived) * fps
                if waiting > ahead_s * fps and not paused or paused and waiting < ahead_s / 2 * fps:
                    paused = not paused
                    await ws.send(json.dumps({"type": "pause" if paused else "resume"}))
            try:
                msg = await asyncio.wait_for(ws.recv(), timeout=0.5 if paused else max_gap_s)
            except TimeoutError:
                if not paused:
                    raise StreamGap(f"no frame for {max_gap_s:g} s ({len(frames)} frames so far)") from None
                continue
            if isinstance(msg, bytes):
                index, block, _, version = FRAME_HEADER.unpack_from(msg)
                frames.append(Frame(time.monotonic(), index, block, version, msg[FRAME_HEADER.size:]))
                continue
            data = json.loads(msg)
            if data["type"] == "error" and data.get("close_code") == GOING_AWAY:
                messages.append(data)  # the server is shutting down (its app deleted): the stream ends here
                return frames, messages
            if data["type"] == "error":
                raise RuntimeError(f"the server answered with an error: {data['message']}")
            fps = data["fps"] if data["type"] == "started" else fps
            messages.append(data)
        await ws.send(json.dumps({"type": "stop"}))
    return frames, messages
