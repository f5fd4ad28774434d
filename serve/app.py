"""The streaming inference Serve application: watch the causal generator make video, block by block.

Routes:
  WS   /v1/stream    send {"type": "start", "prompt", "seed"?, "preset"?, "max_frames"?, "lora"?, "weights"?,
                     "images"?}; with "images": n, n binary messages follow it, each one PNG or JPEG frame of the
                     stream's size to start from (one: an image to animate; more: a video to continue). Then
                     receive one binary message per frame (20-byte header: uint32 frame index, uint32 block,
                     float64 seconds from the start to when the frame's block was ready, uint32 weight version;
                     then a JPEG) and a JSON "block" message per block with its timings. Control while
                     streaming: {"type": "switch", "prompt"} (answered by "switched"), "pause" / "resume"
                     (answered by "paused" / "resumed"), {"type": "follow", "on"} (answered by "following"),
                     "stop". A bad message gets {"type": "error"} and the stream goes on.
  POST /v1/generate  {"prompt", "seed"?, "preset"?, "frames"?, "stream"?}: an MP4, or with stream=true a
                     fragmented MP4 sent fragment by fragment as the blocks are made. As multipart/form-data the
                     same fields, plus one or more "image" files: the frames to start from, as on the WebSocket.
  GET  /             the web page; GET /healthz, /v1/info, /v1/metrics.

Following training (`serve/follow.py`: `launch.py train --serve`, `launch.py serve --follow DIR`): a replica built
with a weight source plays each new version as it arrives. A session with "weights": "latest" (the default)
switches to the newest version between blocks, never inside one, its KV window re-cached under the new weights as
on a prompt switch, and is told with a {"type": "weights"} message (version, training step, switch and
publish-to-frame seconds); {"type": "follow", "on": false} holds the version it plays. "weights": "start" plays
the replica's starting weights, for a side-by-side view. Each version held by a session is one generator in memory.

Each replica holds one pipeline and at most `serve.max_sessions` sessions (streams and generate calls);
one more is refused with 503 and Retry-After (the WebSocket handshake is denied before a session is
allocated, as is a wrong bearer token). The model runs in a worker thread, so control messages, health
checks and other connections are answered while a block is being made.

Every piece of work is bounded: presets are checked against the model's video geometry when the app is built
(`ServeConfig.preset_problems`), and each generate call and stream session has a deadline (`_Bound`) that the
model checks before every transformer block, so work past it stops within one block's forward and the slot is
freed: 504 for generate, a close with 1008 and a reason for a stream. When Serve deletes the application (or
`launch.py serve` stops), open streams are closed with 1001 ("going away") before the replica goes.
Words of a prompt the tokenizer reads as unknown (or cut off past text_len), and, for a model whose tokenizer
folder carries a prompt grammar (core/codecs/prompt_grammar.py), the parts of a prompt outside it, are returned to
the client: `warnings` in the stream's `started` / `switched` messages, the `X-Prompt-Warnings` header (a JSON
list) of /v1/generate. /v1/info shows the grammar.

Frames to start from are bounded in bytes (`serve.max_image_bytes` each) and count (`serve.max_prefix_frames`), and
must have the stream's size: one that does not fit is refused with 413 (too large) or 422 (not a PNG or JPEG, the
wrong size, a video the model cannot hold), over the WebSocket as an error message after which the client may send
another start.
"""

import asyncio
import contextlib
import hmac
import io
import json
import logging
import tempfile
import threading
import time
from collections import Counter, deque
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from fastapi import FastAPI, Request, WebSocket, WebSocketDisconnect
from fastapi.exception_handlers import request_validation_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response, StreamingResponse
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from ray import serve
from starlette.background import BackgroundTask
from starlette.formparsers import MultiPartException, MultiPartParser

from core.codecs.prompt_grammar import PromptGrammar
from core.config import Config, ConfigError, load_bearer_token, load_config
from core.model.attention import attention_kernel
from core.model.lora import LoraAdapter, applied, merge
from core.records.video_io import FragmentedMP4Encoder, MP4Writer
from core.stream.pipeline import VideoPipeline
from core.stream.prefix import ImageTooLargeError, read_prefix_image
from core.stream.session import StreamSession, warm_up
from serve.client import FRAME_HEADER
from serve.follow import Follower, Source, Weights

PAGE = Path(__file__).with_name("static") / "index.html"
CLOSE_POLICY, CLOSE_GOING_AWAY, CLOSE_INTERNAL = 1008, 1001, 1011  # WebSocket close codes (RFC 6455)
SHUTDOWN_MESSAGE = "the server is shutting down; reconnect to continue on another replica"
FIELDS_BYTES = 64 * 1024  # a generate request's JSON body, or its multipart body's non-image part
logger = logging.getLogger(__name__)

api = FastAPI(title="Streaming video generation",
              description="Real-time causal Wan2.1 generation (Reward Forcing): WebSocket frames, MP4, a web page.",
              version="1")


class StartMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: str = "start"
    prompt: str = Field(min_length=1, max_length=2000)
    seed: int = 0
    preset: str | None = None
    max_frames: int | None = Field(default=None, ge=1)
    lora: str | None = None
    lora_weight: float = 1.0
    weights: Literal["latest", "start"] = "latest"
    images: int = Field(default=0, ge=0)  # binary messages that follow: PNG or JPEG frames to start from


class GenerateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    prompt: str = Field(min_length=1, max_length=2000)
    seed: int = 0
    preset: str | None = None
    frames: int = Field(default=81, ge=1)
    stream: bool = False


class RequestError(ValueError):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


class WorkEnded(Exception):
    """A request's work stopped before it was done: its deadline passed, or the replica is shutting down.

    `status` is what a generate call answers, `close_code` and `reason` (at most 123 bytes, the WebSocket limit)
    what a stream is closed with, `counter` the metrics key that counts it."""

    def __init__(self, status: int, close_code: int, reason: str, counter: str):
        super().__init__(reason)
        self.status, self.close_code, self.reason, self.counter = status, close_code, reason, counter


_WORKER = threading.local()  # the _Bound of the request whose model work this worker thread is running


def _check_bound(module: torch.nn.Module, args: tuple) -> None:
    """Forward pre-hook on every transformer block: stop the running request's work once its bound says so."""
    bound = getattr(_WORKER, "bound", None)
    if bound is not None:
        bound.check()


class _Bound:
    """One request's bound in time: a deadline (`seconds` from now, the config key `setting`), and an early end
    when the replica shuts down.

    The model runs in worker threads that Python cannot interrupt, so the bound is checked cooperatively: by the
    forward pre-hook on each transformer block (`_check_bound`) in the thread that runs the request's work, and by
    `scope()` (an asyncio timeout) around everything else the request awaits (sends, a paused stream, the start
    message). Past the deadline the work therefore stops within one block's forward. `kind` ("generate" or
    "stream") names the metrics counter of its deadline."""

    def __init__(self, seconds: float, setting: str, kind: str):
        self.seconds, self.setting, self.kind = seconds, setting, kind
        self.expires = time.monotonic() + seconds
        self.shutting_down = False
        self.abandoned = False  # the awaiting coroutine was cancelled (the client left): stop the thread too
        self.counted = False  # its early end is in the metrics (a streamed generate can meet it in two places)
        self._timeout: asyncio.Timeout | None = None

    def ended(self) -> WorkEnded:
        if self.shutting_down:
            return WorkEnded(503, CLOSE_GOING_AWAY, SHUTDOWN_MESSAGE, "closed_for_shutdown")
        return WorkEnded(504, CLOSE_POLICY, f"deadline reached: {self.setting} = {self.seconds:g} s",
                         f"deadline_{self.kind}")

    def check(self) -> None:
        if self.shutting_down or self.abandoned or time.monotonic() >= self.expires:
            raise self.ended()

    def end_for_shutdown(self) -> None:
        """End the request now (called on the event loop): its thread stops at the next block, its scope exits."""
        self.shutting_down = True
        if self._timeout is not None and not self._timeout.expired():
            self._timeout.reschedule(asyncio.get_running_loop().time())

    @contextlib.asynccontextmanager
    async def scope(self) -> AsyncIterator[None]:
        """Everything awaited inside ends at the deadline (or shutdown) with `WorkEnded`."""
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout_at(loop.time() + max(0.0, self.expires - time.monotonic())) as self._timeout:
                if self.shutting_down:
                    self._timeout.reschedule(loop.time())
                yield
        except TimeoutError:
            if not self._timeout.expired():
                raise
            raise self.ended() from None
        finally:
            self._timeout = None

    async def run(self, fn: Callable[..., Any], *args: Any) -> Any:
        """`fn(*args)` in a worker thread under this bound. If the awaiting coroutine is cancelled (the deadline's
        scope, a client that left), the thread is told to stop and waited for, so the model is free before the
        request's slot is."""
        work = asyncio.get_running_loop().run_in_executor(None, self._call, fn, *args)
        try:
            return await asyncio.shield(work)
        except asyncio.CancelledError:
            self.abandoned = True
            await asyncio.wait([work])
            if not work.cancelled():
                work.exception()  # retrieved: the thread's WorkEnded is expected here
            raise

    def _call(self, fn: Callable[..., Any], *args: Any) -> Any:
        _WORKER.bound = self
        try:
            self.check()  # a compiled or graph-replayed generator has no per-layer check: stop between blocks
            return fn(*args)
        finally:
            _WORKER.bound = None


def _jpeg(frame: np.ndarray, quality: int) -> bytes:
    out = io.BytesIO()
    Image.fromarray(frame).save(out, format="JPEG", quality=quality)
    return out.getvalue()


def _read_frames(images: list[bytes], height: int, width: int, max_bytes: int) -> np.ndarray:
    """uint8 [T, height, width, 3] of T PNG or JPEG frames, in order; a RequestError naming the first bad one (413
    past `max_bytes`, 422 for anything else: not such an image, another size)."""
    frames = []
    for i, data in enumerate(images):
        try:
            frames.append(read_prefix_image(data, height, width, max_bytes))
        except ValueError as e:
            which = f"image {i + 1} of {len(images)}: " if len(images) > 1 else ""
            if isinstance(e, ImageTooLargeError):
                raise RequestError(413, f"{which}{e} (serve.max_image_bytes); send a smaller PNG or JPEG") from None
            raise RequestError(422, f"{which}{e}") from None
    return np.concatenate(frames)


async def _capped(stream: AsyncIterator[bytes], limit: int, why: str) -> AsyncIterator[bytes]:
    """`stream` as it arrives, or a 413 once it passes `limit` bytes: nothing larger is ever held or spooled."""
    total = 0
    async for chunk in stream:
        total += len(chunk)
        if total > limit:
            raise RequestError(413, f"the request body is over {limit} bytes: {why}")
        yield chunk


_GENERATE_FIELDS = GenerateRequest.model_json_schema()
_GENERATE_BODY = {"requestBody": {"required": True, "content": {
    "application/json": {"schema": _GENERATE_FIELDS},
    "multipart/form-data": {"schema": {**_GENERATE_FIELDS, "properties": {
        **_GENERATE_FIELDS["properties"],
        "image": {"type": "array", "items": {"type": "string", "format": "binary"},
                  "description": "PNG or JPEG frames of the preset's size to start from, in order: one image to "
                                 "animate, or several frames of a video to continue"}}}}}}}


@api.exception_handler(RequestError)
async def _request_error(request: Request, exc: RequestError) -> JSONResponse:
    request.app.state.server.stats[f"refused_{exc.status}"] += 1
    headers = {"Retry-After": str(request.app.state.server.retry_after)} if exc.status == 503 else None
    if exc.status == 401:
        headers = {"WWW-Authenticate": "Bearer"}
    return JSONResponse({"error": {"status": exc.status, "message": exc.message}}, status_code=exc.status,
                        headers=headers)


@api.exception_handler(RequestValidationError)
async def _invalid_body(request: Request, exc: RequestValidationError) -> JSONResponse:
    """FastAPI's 422 for a body that does not fit the schema (what was wrong, field by field), counted."""
    request.app.state.server.stats["refused_422"] += 1
    return await request_validation_exception_handler(request, exc)


async def _prepend(first: bytes, rest: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    yield first
    async for part in rest:
        yield part


# Defined before the deployment: Serve pickles the ingress class (and the globals it uses) when it is decorated.
class _Stream:
    """One WebSocket session: a producer making blocks in a worker thread, a reader taking control messages."""

    def __init__(self, server: "StreamServer", ws: WebSocket, bound: _Bound):
        self.server, self.ws, self.bound = server, ws, bound
        self.controls: asyncio.Queue[dict] = asyncio.Queue()
        self.running = asyncio.Event()
        self.running.set()
        self.stopped = False
        self.following = True  # switch to each new weight version ("weights": "latest"); False holds the current one
        self.held: dict | None = None  # a text message that came where an image was expected: read next
        self.dropping = False  # the images of a refused start: binary messages are dropped until the next text

    async def _error(self, message: str) -> None:
        self.server.stats["error_bad_message"] += 1
        await self.ws.send_json({"type": "error", "message": message})

    async def _refuse_images(self, e: RequestError) -> None:
        """A start whose frames are refused: counted as a refusal of its status; the client may start again."""
        self.server.stats[f"refused_{e.status}"] += 1
        self.server.stats["images_refused"] += 1
        await self.ws.send_json({"type": "error", "message": f"bad start images: {e.message}", "status": e.status})

    async def _receive(self) -> dict:
        if self.held is not None:
            message, self.held = self.held, None
            return message
        message = await self.ws.receive()
        if message["type"] == "websocket.disconnect":
            raise WebSocketDisconnect(message.get("code", 1000))
        return message

    async def _receive_json(self) -> dict | None:
        message = await self._receive()
        raw = message.get("text")
        if raw is None:
            if not self.dropping:
                await self._error("binary messages are not understood here: send JSON text (images go right after "
                                  "a start that announces them with \"images\")")
            return None
        self.dropping = False
        try:
            msg = json.loads(raw)
        except json.JSONDecodeError as e:
            await self._error(f"not JSON ({e.msg}); send e.g. {{\"type\": \"switch\", \"prompt\": \"...\"}}")
            return None
        if not isinstance(msg, dict) or not isinstance(msg.get("type"), str):
            await self._error("a message must be a JSON object with a string 'type'")
            return None
        return msg

    async def _before(self, deadline: float, work: Awaitable[Any]) -> Any:
        """Await `work` until the start deadline; past it, the session ends with a policy close."""
        try:
            return await asyncio.wait_for(work, max(0.0, deadline - time.monotonic()))
        except asyncio.TimeoutError:  # the client's fault: a policy close, not an internal error
            raise WorkEnded(408, CLOSE_POLICY, f"no valid start message within serve.start_timeout_s = "
                                               f"{self.server.svc.start_timeout_s:g} s", "start_timeouts") from None

    async def _begin(self) -> tuple[StartMessage, Weights, StreamSession]:
        """The first valid start and its session. A start whose frames do not fit (the model cannot hold them) is
        refused like bad images: the client may send another."""
        deadline = time.monotonic() + self.server.svc.start_timeout_s
        while True:
            start, prefix = await self._start(deadline)
            playing = self._wanted(start, self.server.start)
            try:
                session = await self.bound.run(self.server._session, start.prompt, start.seed, start.preset,
                                               playing.pipe, prefix)
                return start, playing, session
            except RequestError as e:
                if prefix is None:
                    raise
                await self._refuse_images(e)

    async def _start(self, deadline: float) -> tuple[StartMessage, np.ndarray | None]:
        """The first valid start message, and the frames [T, H, W, 3] its images hold (None without images)."""
        while True:
            msg = await self._before(deadline, self._receive_json())
            if msg is None:
                continue
            if msg.get("type") != "start":
                await self._error(f"send a 'start' message first, got {msg['type']!r}")
                continue
            try:
                start = self._valid_start(msg)
            except (ValueError, RequestError) as e:
                self.dropping = bool(msg.get("images"))
                await self._error(f"bad start message: {getattr(e, 'message', e)}")
                continue
            if not start.images:
                return start, None
            try:
                return start, await self._before(deadline, self._receive_images(start))
            except RequestError as e:
                self.dropping = True
                await self._refuse_images(e)

    async def _receive_images(self, start: StartMessage) -> np.ndarray:
        """The `start.images` binary messages that follow a start, read as frames of its preset's size."""
        svc = self.server.svc
        if start.images > svc.max_prefix_frames:
            raise RequestError(413, f"the start announces {start.images} images, more than serve.max_prefix_frames "
                                    f"= {svc.max_prefix_frames}; send the last {svc.max_prefix_frames} frames or fewer")
        images = []
        for k in range(start.images):
            message = await self._receive()
            if message.get("bytes") is None:
                self.held = message  # a client that gave up on its images: its next message is read as usual
                raise RequestError(422, f"the start announces {start.images} image(s) but message {k + 1} after it "
                                        "is text: send the images as binary messages right after the start")
            images.append(message["bytes"])
        height, width = self.server._size(start.preset)
        return await asyncio.to_thread(_read_frames, images, height, width, svc.max_image_bytes)

    def _valid_start(self, msg: dict) -> StartMessage:
        """`msg` as a StartMessage the replica can serve; a ValueError or RequestError saying why not."""
        start = StartMessage.model_validate(msg)
        svc = self.server.svc
        self.server._size(start.preset)
        if start.lora is not None and start.lora not in svc.lora_adapters:
            raise RequestError(422, f"unknown lora {start.lora!r}; available: {sorted(svc.lora_adapters)}")
        if start.lora is not None and svc.max_sessions > 1:
            raise RequestError(422, "a per-session lora needs serve.max_sessions 1 (the replica's model is "
                                    "shared by its sessions); merge it at startup with serve.lora instead")
        if start.lora is not None and self.server.follower is not None:
            raise RequestError(422, "a per-session lora is not available while the replica follows "
                                    "training (each version is a new generator); merge it with serve.lora")
        return start

    async def _read_controls(self) -> None:
        try:
            await self._read_controls_until_disconnect()
        finally:
            self.running.set()  # a paused producer wakes up and sees the disconnect

    async def _read_controls_until_disconnect(self) -> None:
        while True:
            msg = await self._receive_json()
            if msg is None:
                continue
            kind = msg["type"]
            if kind == "pause":  # acknowledged: no block starts until "resume" (one in progress still arrives)
                self.running.clear()
                await self.ws.send_json({"type": "paused"})
            elif kind == "resume":
                self.running.set()
                await self.ws.send_json({"type": "resumed"})
            elif kind == "stop":
                self.stopped = True
                self.running.set()
            elif kind == "follow":
                if not isinstance(msg.get("on"), bool):
                    await self._error("'follow' needs 'on': true (play each new weight version) or false (hold)")
                else:
                    self.following = msg["on"]
                    await self.ws.send_json({"type": "following", "on": self.following})
            elif kind == "switch":
                prompt = msg.get("prompt")
                if not isinstance(prompt, str) or not 0 < len(prompt) <= 2000:
                    await self._error("'switch' needs a 'prompt' string of 1 to 2000 characters")
                else:
                    await self.controls.put(msg)
            else:
                await self._error(f"unknown message type {kind!r}; use switch, pause, resume, follow or stop")

    def _wanted(self, start: StartMessage, playing: Weights) -> Weights:
        """The weights this session should play next: the starting ones, the newest, or those it holds."""
        if start.weights == "start":
            return self.server.start
        return self.server.latest() if self.following else playing

    async def _switch_weights(self, session: StreamSession, to: Weights) -> dict:
        """Between blocks: continue under `to` (window re-cached); what the "weights" message will say."""
        seconds = await self.bound.run(session.switch_weights, to.pipe)
        self.server.stats["weight_switches"] += 1
        return {"type": "weights", "version": to.version, "step": to.step, "at_frame": session.switch_frame,
                "switch_ms": round(seconds * 1e3, 2)}

    async def run(self) -> None:
        server, ws = self.server, self.ws
        start, playing, session = await self._begin()
        limit = min(x for x in (start.max_frames, server.svc.max_session_frames or None, 2**62) if x)
        await ws.send_json({"type": "started", "width": session.width, "height": session.height,
                            "fps": server.cfg.video.fps, "preset": start.preset or server.svc.default_preset,
                            "max_frames": None if limit == 2**62 else limit,
                            "deadline_s": self.bound.seconds, "warnings": server._prompt_warnings(start.prompt),
                            "weights": {"version": playing.version, "step": playing.step},
                            "given_frames": session.given_frames, "dropped_frames": session.dropped_frames})
        reader = asyncio.create_task(self._read_controls())
        lora = self._session_lora(start)
        t0, sent, first_sent_at = time.monotonic(), 0, None
        # whose weights made a block: with overlapped decode, the block after a weight switch was made before it
        made_by, announce = {id(playing.pipe): playing}, None
        try:
            while not self.stopped and sent < limit:
                await self.running.wait()
                if self.stopped:
                    break
                if reader.done():
                    reader.result()  # re-raise the disconnect
                recache_s = 0.0
                if (wanted := self._wanted(start, playing)) is not playing:
                    announce = await self._switch_weights(session, wanted)
                    made_by, playing = {id(playing.pipe): playing, id(wanted.pipe): wanted}, wanted
                    recache_s += announce["switch_ms"] / 1e3
                while not self.controls.empty():
                    msg = self.controls.get_nowait()
                    recache_s += await self.bound.run(session.switch_prompt, msg["prompt"])
                    await ws.send_json({"type": "switched", "prompt": msg["prompt"], "at_frame": session.switch_frame,
                                        "warnings": server._prompt_warnings(msg["prompt"])})
                chunk = await self.bound.run(session.next_chunk)
                server._count(chunk)
                made = made_by.get(id(chunk.pipe), playing)
                frames = chunk.frames[: limit - sent].numpy()
                jpegs = await asyncio.to_thread(lambda: [_jpeg(f, server.svc.jpeg_quality) for f in frames])
                now = time.monotonic() - t0
                for i, data in enumerate(jpegs):
                    await ws.send_bytes(FRAME_HEADER.pack(chunk.first_frame + i, chunk.block, now, made.version) + data)
                if announce is not None and made is playing:  # after its first frames: publication to them, wall clock
                    latency = time.time() - playing.published_at if playing.published_at is not None else None
                    if latency is not None:
                        server.publish_to_frame_s.append(latency)
                    await ws.send_json(announce | {"publish_to_frame_s": latency})
                    announce = None
                if first_sent_at is None:
                    first_sent_at = time.monotonic()
                    server.ttff_s.append(first_sent_at - t0)
                sent += len(frames)
                server.stats["frames_sent"] += len(frames)
                await ws.send_json({"type": "block", "block": chunk.block, "first_frame": chunk.first_frame,
                                    "frames": len(frames), "denoise_ms": round(chunk.denoise_s * 1e3, 2),
                                    "decode_ms": round(chunk.decode_s * 1e3, 2), "block_ms": round(chunk.wall_s * 1e3, 2),
                                    "recache_ms": round(recache_s * 1e3, 2),
                                    "given_frames": min(chunk.given_frames, len(frames)),
                                    "memory_bytes": session.memory_bytes()})
            await ws.send_json({"type": "end", "frames": sent, "reason": "stop" if self.stopped else "max_frames"})
            await ws.close()
        finally:
            if first_sent_at is not None:
                server.stats["send_window_s"] += time.monotonic() - first_sent_at
            reader.cancel()
            if lora is not None:
                lora.__exit__(None, None, None)
            session.close()

    def _session_lora(self, start: StartMessage):
        if start.lora is None:
            return None
        adapter = LoraAdapter.load(self.server.svc.lora_adapters[start.lora])
        context = applied(self.server.pipe.generator, adapter, weight=start.lora_weight)
        context.__enter__()
        return context


@serve.deployment
@serve.ingress(api)
class StreamServer:
    def __init__(self, cfg: Config, token: str | None, follow: Source | None = None):
        self.cfg = cfg
        self.svc = self.cfg.serve
        self.token = token
        self.pipe = VideoPipeline.from_config(self.cfg)
        self.merged_lora = [self._merge_startup_lora(spec, self.pipe) for spec in self.svc.lora]
        self._bounded(self.pipe)
        self.warm_up_s = self._warm_up(self.pipe)
        self.start = Weights(0, None, None, self.pipe)  # the weights the replica started with
        self.follower = Follower(follow, self.start, self._playable) if follow is not None else None
        self.publish_to_frame_s: deque[float] = deque(maxlen=1024)  # the latest switches' latencies (bounded)
        self.bounds: set[_Bound] = set()  # one per open session (stream or generate call)
        self.shutting_down = False
        self.drain_watch: asyncio.Task | None = None
        self.retry_after = max(1, round(self.svc.retry_after_s))
        self.stats: Counter[str] = Counter()
        self.ttff_s: list[float] = []
        self.grammar = PromptGrammar.find(cfg.text_encoder.tokenizer)  # the prompts the model knows, if it says
        api.state.server = self

    def __del__(self) -> None:
        if getattr(self, "follower", None) is not None:
            self.follower.stop()

    def _merge_startup_lora(self, spec: dict, pipe: VideoPipeline) -> str:
        adapter = LoraAdapter.load(spec["path"], alpha=spec.get("alpha"))
        merge(pipe.generator, adapter, weight=float(spec.get("weight", 1.0)))
        return str(spec["path"])

    @staticmethod
    def _bounded(pipe: VideoPipeline) -> None:
        """Where a request's work stops once its bound ends it: before every transformer block on the eager path;
        compiled layers and replayed graphs run no Python hooks, so there it stops between stream blocks."""
        if pipe.block_step.mode == "eager":
            for block in pipe.generator.blocks:
                block.register_forward_pre_hook(_check_bound)

    def _playable(self, weights: dict[str, torch.Tensor]) -> VideoPipeline:
        """A pipeline of a new weight version, as the starting one was made: startup LoRAs merged, bounded."""
        pipe = self.pipe.with_weights(weights)
        for spec in self.svc.lora:
            self._merge_startup_lora(spec, pipe)
        self._bounded(pipe)
        self._warm_up(pipe)
        return pipe

    def _warm_up(self, pipe: VideoPipeline) -> float:
        """Compile and capture every stream shape of every preset now, so no session does (seconds; 0 when eager)."""
        seconds = warm_up(pipe, list(self.svc.presets.values()), self.svc.max_sessions)
        if seconds:
            logger.info("stream fast path (%s) warmed up in %.1f s", pipe.block_step.mode, seconds)
        return seconds

    def latest(self) -> Weights:
        """The newest weights this replica has: the follower's latest version, else the starting weights."""
        return self.follower.latest if self.follower is not None else self.start

    # ------------------------------------------------------------------------------------------ helpers

    def _authorised(self, authorization: str | None, query_token: str | None) -> bool:
        if self.token is None:
            return True
        scheme, _, token = (authorization or "").partition(" ")
        given = token if scheme.lower() == "bearer" else (query_token or "")
        return hmac.compare_digest(given.encode(), self.token.encode())

    def _size(self, preset: str | None) -> tuple[int, int]:
        name = preset or self.svc.default_preset
        if name not in self.svc.presets:
            raise RequestError(422, f"unknown preset {name!r}; choose one of {sorted(self.svc.presets)}")
        height, width = self.svc.presets[name]
        return height, width

    @property
    def sessions(self) -> int:
        return len(self.bounds)

    def _open(self, bound: _Bound) -> None:
        """Claim a session slot for the request `bound` bounds (503 when the replica is full or shutting down)."""
        if self.shutting_down:
            self.stats["refused_busy"] += 1
            raise RequestError(503, SHUTDOWN_MESSAGE)
        if self.sessions >= self.svc.max_sessions:
            self.stats["refused_busy"] += 1
            raise RequestError(503, f"all {self.svc.max_sessions} session(s) of this replica are in use; "
                                    f"retry after {self.retry_after}s")
        self.bounds.add(bound)
        self.stats["sessions_started"] += 1
        if self.drain_watch is None or self.drain_watch.done():
            self.drain_watch = asyncio.create_task(self._watch_for_deletion())

    def _close(self, bound: _Bound) -> None:
        self.bounds.discard(bound)
        if self.pipe.device.type == "cuda":
            torch.cuda.empty_cache()

    async def _watch_for_deletion(self) -> None:
        """While sessions are open, ask Serve every `drain_check_s` whether this application is being deleted, and
        if so end every session (streams close with 1001, generate calls answer 503).

        Serve stops a replica by draining it: it waits for the replica's open requests, and a stream is one that
        does not end by itself, so without this the replica would be killed after graceful_shutdown_timeout_s and
        its clients would see the connection drop. Nothing in the replica is told about the drain (the deployment's
        `__del__` runs only after it), hence the question to the controller."""
        app = serve.get_replica_context().app_name
        while self.bounds:
            await asyncio.sleep(self.svc.drain_check_s)
            try:
                status = (await asyncio.to_thread(serve.status)).applications.get(app)
            except Exception as e:  # noqa: BLE001 - the controller may be restarting: ask again next time
                logger.warning("could not ask Serve for the status of application %r: %s", app, e)
                continue
            if status is None or status.status == "DELETING":
                logger.warning("application %r is being deleted: ending %d open session(s)", app, len(self.bounds))
                self.shutting_down = True
                for bound in list(self.bounds):
                    bound.end_for_shutdown()
                return

    def _prompt_warnings(self, prompt: str) -> list[str]:
        """What the model will not read of `prompt` (unknown words, truncation; logged by the encoder) and, with a
        prompt grammar, the parts of it outside the grammar; counted."""
        warnings = self.pipe.text_encoder.prompt_warnings(prompt)
        if self.grammar is not None:
            warnings += self.grammar.warnings(prompt)
        self.stats["prompt_warnings"] += len(warnings)
        return warnings

    def _session(self, prompt: str, seed: int, preset: str | None, pipe: VideoPipeline | None = None,
                 prefix: np.ndarray | None = None) -> StreamSession:
        """A session of the preset's size, starting from the frames `prefix` when given; 422 when they do not fit."""
        height, width = self._size(preset)
        try:
            return StreamSession(pipe or self.latest().pipe, prompt, seed, height, width, prefix=prefix)
        except ValueError as e:
            raise RequestError(422, str(e)) from None

    # ------------------------------------------------------------------------------------------ HTTP

    @api.get("/", response_class=HTMLResponse)
    async def page(self) -> HTMLResponse:
        return HTMLResponse(PAGE.read_text(encoding="utf-8"))

    @api.get("/healthz")
    async def healthz(self) -> dict:
        return {"status": "shutting_down" if self.shutting_down else "ok", "sessions": self.sessions}

    @api.get("/v1/info")
    async def info(self, request: Request) -> dict:
        self._check_http_auth(request)
        cfg = self.cfg
        return {"model": {"dim": cfg.model.dim, "num_layers": cfg.model.num_layers, "dtype": cfg.runtime.dtype,
                          "device": str(self.pipe.device)},
                "checkpoint": cfg.checkpoint.generator, "use_ema": cfg.checkpoint.use_ema, "lora": self.merged_lora,
                "lora_adapters": sorted(self.svc.lora_adapters),
                "stream": cfg.stream.model_dump(), "fps": cfg.video.fps,
                "fast_path": {"block_step": self.pipe.block_step.mode, "overlap_decode": cfg.runtime.overlap_decode,
                              "fp8": cfg.runtime.fp8, "warm_up_s": round(self.warm_up_s, 2),
                              "attention": attention_kernel(cfg.runtime.attention_backend, self.pipe.device,
                                                            self.pipe.dtype)},
                "vocabulary": self.pipe.text_encoder.vocabulary(),  # the words a word-level model knows, else null
                "prompt_grammar": self.grammar.to_dict() if self.grammar is not None else None,
                "start_from": {"formats": ["png", "jpeg"], "max_image_bytes": self.svc.max_image_bytes,
                               "max_frames": self.svc.max_prefix_frames,
                               "frame_step": self.pipe.vae.temporal_stride},  # 1 + frame_step * k frames are used
                "presets": {k: {"height": v[0], "width": v[1]} for k, v in self.svc.presets.items()},
                "default_preset": self.svc.default_preset,
                "weights": self._weights_info(),
                "limits": {"max_sessions_per_replica": self.svc.max_sessions,
                           "max_session_frames": self.svc.max_session_frames or None,
                           "max_generate_frames": self.svc.max_generate_frames, "retry_after_s": self.retry_after,
                           "generate_timeout_s": self.svc.generate_timeout_s,
                           "stream_timeout_s": self.svc.stream_timeout_s, "start_timeout_s": self.svc.start_timeout_s},
                "auth": self.token is not None}

    def _weights_info(self) -> dict:
        latest = self.latest()
        return {"version": latest.version, "step": latest.step, "following": self.follower is not None,
                **(self.follower.info() if self.follower is not None else {})}

    @api.get("/v1/metrics")
    async def metrics(self) -> dict:
        s = self.stats
        ttff = sorted(self.ttff_s)
        latency = sorted(self.publish_to_frame_s)
        return {"sessions_active": self.sessions, "sessions_started": s["sessions_started"],
                "refused_busy": s["refused_busy"],
                "refused": {k[8:]: v for k, v in s.items() if k.startswith("refused_") and k[8:].isdigit()},
                "deadlines_expired": {"generate": s["deadline_generate"], "stream": s["deadline_stream"]},
                "start_timeouts": s["start_timeouts"], "closed_for_shutdown": s["closed_for_shutdown"],
                "prompt_warnings": s["prompt_warnings"], "images_refused": s["images_refused"],
                "errors": {k[6:]: v for k, v in s.items() if k.startswith("error_")},
                "time_to_first_frame_s": {"last": self.ttff_s[-1] if ttff else None,
                                          "median": ttff[len(ttff) // 2] if ttff else None},
                # benchmarks/stream_session.py's definitions: video frames over the summed seconds
                "production_fps": {"denoise": s["frames_made"] / s["denoise_s"] if s["denoise_s"] else None,
                                   "decode": s["frames_made"] / s["decode_s"] if s["decode_s"] else None,
                                   "end_to_end": s["frames_made"] / s["block_s"] if s["block_s"] else None},
                "delivered_fps": s["frames_sent"] / s["send_window_s"] if s["send_window_s"] else None,
                "frames_sent": s["frames_sent"],
                "weights": {"version": self.latest().version, "switches": s["weight_switches"],
                            "versions_received": self.follower.received if self.follower is not None else 0,
                            "publish_to_frame_s": {"last": self.publish_to_frame_s[-1] if latency else None,
                                                   "median": latency[len(latency) // 2] if latency else None}}}

    def _check_http_auth(self, request: Request) -> None:
        if not self._authorised(request.headers.get("authorization"), None):
            raise RequestError(401, "missing or wrong bearer token: send 'Authorization: Bearer <token>'")

    async def _generate_request(self, request: Request) -> tuple[GenerateRequest, list[bytes]]:
        """The request's fields and image files: a JSON body, or multipart/form-data with "image" files. Its body
        is bounded in bytes (413); fields that do not fit get 422."""
        multipart = request.headers.get("content-type", "").partition(";")[0].strip().lower() == "multipart/form-data"
        fields, images = await (self._read_form(request) if multipart else self._read_json(request))
        try:
            return GenerateRequest.model_validate(fields), images
        except ValidationError as e:
            raise RequestValidationError([{**err, "loc": ("body", *err["loc"])} for err in e.errors()]) from None

    @staticmethod
    async def _read_json(request: Request) -> tuple[Any, list[bytes]]:
        """A JSON body's fields (no images: those come as multipart)."""
        why = "a JSON request holds a prompt and a few fields; send images as multipart/form-data"
        body = b"".join([chunk async for chunk in _capped(request.stream(), FIELDS_BYTES, why)])
        try:
            return json.loads(body), []
        except json.JSONDecodeError as e:
            raise RequestValidationError([{"type": "json_invalid", "loc": ("body", e.pos), "msg": "JSON decode error",
                                           "input": {}, "ctx": {"error": e.msg}}]) from None

    async def _read_form(self, request: Request) -> tuple[dict, list[bytes]]:
        """A multipart body's text fields and its "image" files, in order (each file at most serve.max_image_bytes
        is checked when it is read as a frame; the whole body is capped before anything is spooled)."""
        svc = self.svc
        limit = FIELDS_BYTES + svc.max_prefix_frames * svc.max_image_bytes
        why = (f"it holds at most serve.max_prefix_frames = {svc.max_prefix_frames} images of serve.max_image_bytes "
               f"= {svc.max_image_bytes} each, and the fields")
        parser = MultiPartParser(request.headers, _capped(request.stream(), limit, why),
                                 max_files=svc.max_prefix_frames, max_fields=len(GenerateRequest.model_fields))
        try:
            form = await parser.parse()
        except MultiPartException as e:
            raise RequestError(400, f"cannot read the multipart body: {e.message} (send the fields "
                                    f"{', '.join(GenerateRequest.model_fields)} and at most serve.max_prefix_frames = "
                                    f"{svc.max_prefix_frames} 'image' files)") from None
        try:
            files = {key for key, value in form.multi_items() if not isinstance(value, str)}
            if unknown := files - {"image"}:
                raise RequestError(422, f"unknown file fields {sorted(unknown)}: send the frames as 'image' files")
            images = [await v.read() for k, v in form.multi_items() if k == "image" and not isinstance(v, str)]
            return {k: v for k, v in form.multi_items() if isinstance(v, str)}, images
        finally:
            await form.close()

    @api.post("/v1/generate", openapi_extra=_GENERATE_BODY)
    async def generate(self, request: Request) -> Response:
        """An MP4 of `frames` frames, or with `stream` a fragmented MP4 as blocks are made; within
        serve.generate_timeout_s of arrival, else 504 (a streamed answer cut by it ends as an incomplete transfer).
        As multipart/form-data, "image" files are the frames it starts from (the video begins with them)."""
        self._check_http_auth(request)
        bound = _Bound(self.svc.generate_timeout_s, "serve.generate_timeout_s", "generate")
        try:
            async with bound.scope():  # the body's arrival counts against the deadline too
                body, images = await self._generate_request(request)
        except WorkEnded as e:
            self._count_end(bound, e)
            raise RequestError(e.status, f"{e.reason}; nothing was generated") from None
        if body.frames > self.svc.max_generate_frames:
            raise RequestError(413, f"frames {body.frames} exceeds serve.max_generate_frames {self.svc.max_generate_frames}")
        height, width = self._size(body.preset)  # validate before claiming a slot
        prefix = await self._prefix(images, height, width) if images else None
        self._open(bound)
        fragments = session = None  # once started, the fragment generator owns the slot and the session: it frees them
        try:
            async with bound.scope():
                session = await bound.run(self._prefixed_session, body, prefix)
                headers = {"X-Prompt-Warnings": json.dumps(self._prompt_warnings(body.prompt))}  # ASCII: a header
                if body.stream:
                    fragments = self._fragments(session, body.frames, bound)
                    first = await anext(fragments)  # the first block here: a failure before it is a status code
                    return StreamingResponse(_prepend(first, fragments), media_type="video/mp4", headers=headers)
                path = await bound.run(self._write_mp4, session, body.frames)
        except WorkEnded as e:
            self._count_end(bound, e)
            raise RequestError(e.status, f"{e.reason}; nothing was generated") from None
        finally:
            if fragments is None:
                self._close(bound)
                if session is not None:
                    session.close()
        return FileResponse(path, media_type="video/mp4", filename="video.mp4", headers=headers,
                            background=BackgroundTask(Path(path).unlink, missing_ok=True))

    async def _prefix(self, images: list[bytes], height: int, width: int) -> np.ndarray:
        """The frames a generate call starts from; bad ones counted as refused images (and by status)."""
        try:
            return await asyncio.to_thread(_read_frames, images, height, width, self.svc.max_image_bytes)
        except RequestError:
            self.stats["images_refused"] += 1
            raise

    def _prefixed_session(self, body: GenerateRequest, prefix: np.ndarray | None) -> StreamSession:
        try:
            return self._session(body.prompt, body.seed, body.preset, prefix=prefix)
        except RequestError:
            self.stats["images_refused"] += prefix is not None
            raise

    def _chunks(self, session, frames: int):
        sent = 0
        while sent < frames:
            chunk = session.next_chunk()
            self._count(chunk)
            part = chunk.frames[: frames - sent].numpy()
            sent += len(part)
            yield part

    def _write_mp4(self, session: StreamSession, frames: int) -> str:
        path = tempfile.NamedTemporaryFile(suffix=".mp4", delete=False).name
        try:
            with MP4Writer(path, session.width, session.height, self.cfg.video.fps) as writer:
                for part in self._chunks(session, frames):
                    writer.write(part)
        except BaseException:
            Path(path).unlink(missing_ok=True)
            raise
        return path

    async def _fragments(self, session: StreamSession, frames: int, bound: _Bound):
        encoder = FragmentedMP4Encoder(session.width, session.height, self.cfg.video.fps)
        chunks = self._chunks(session, frames)
        try:
            while (part := await bound.run(next, chunks, None)) is not None:
                yield await asyncio.to_thread(encoder.encode, part)
                bound.check()
        except WorkEnded as e:  # after the first fragment: abort the transfer so that it cannot pass as whole
            self._count_end(bound, e)
            raise
        finally:  # also when the response is dropped unsent: a started async generator is closed when collected
            self._close(bound)
            session.close()

    def _count_end(self, bound: _Bound, ended: WorkEnded) -> None:
        """Count and log a request's early end, once."""
        if not bound.counted:
            bound.counted = True
            self.stats[ended.counter] += 1
            logger.warning("a %s request ended early: %s", bound.kind, ended.reason)

    def _count(self, chunk) -> None:
        self.stats["frames_made"] += len(chunk.frames) - chunk.given_frames  # given frames are decoded, not made
        self.stats["denoise_s"] += chunk.denoise_s
        self.stats["decode_s"] += chunk.decode_s
        self.stats["block_s"] += chunk.wall_s

    # ------------------------------------------------------------------------------------------ WebSocket

    @api.websocket("/v1/stream")
    async def stream(self, ws: WebSocket) -> None:
        if not self._authorised(ws.headers.get("authorization"), ws.query_params.get("token")):
            self.stats["error_unauthorised"] += 1
            await ws.send_denial_response(JSONResponse(
                {"error": {"status": 401, "message": "missing or wrong bearer token (header or ?token=)"}},
                status_code=401, headers={"WWW-Authenticate": "Bearer"}))
            return
        bound = _Bound(self.svc.stream_timeout_s, "serve.stream_timeout_s", "stream")
        try:
            self._open(bound)
        except RequestError as e:
            await ws.send_denial_response(JSONResponse({"error": {"status": 503, "message": e.message}},
                                                       status_code=503, headers={"Retry-After": str(self.retry_after)}))
            return
        try:
            await ws.accept()
            async with bound.scope():
                await _Stream(self, ws, bound).run()
        except WebSocketDisconnect:
            self.stats["disconnects"] += 1
        except WorkEnded as e:  # a deadline, no start in time (1008), or shutdown (1001): the client is told why
            self._count_end(bound, e)
            await self._close_ws(ws, e.close_code, e.reason)
        except Exception as e:  # noqa: BLE001 - reported to the client when it is still there, and counted
            self.stats[f"error_{type(e).__name__}"] += 1
            await self._close_ws(ws, CLOSE_INTERNAL, f"internal error: {type(e).__name__}", f"{type(e).__name__}: {e}")
        finally:
            self._close(bound)

    @staticmethod
    async def _close_ws(ws: WebSocket, code: int, reason: str, message: str | None = None) -> None:
        """A fatal `error` message, then the close frame with `code` and `reason` (cut to the 123 bytes a close
        frame holds)."""
        try:
            await ws.send_json({"type": "error", "message": message or reason, "fatal": True, "close_code": code})
            await ws.close(code=code, reason=reason.encode()[:123].decode(errors="ignore"))
        except Exception:  # noqa: BLE001 - the client is gone
            pass


def build_app(cfg: Config, follow: Source | None = None) -> serve.Application:
    """The streaming Serve application for `cfg`, following the weight versions of `follow` when given; a
    ConfigError naming each preset the model cannot serve."""
    svc = cfg.serve
    if problems := svc.preset_problems(cfg.video, cfg.model.patch_size):
        raise ConfigError("serve presets the model cannot serve:\n  " + "\n  ".join(problems) + "\nset serve.presets "
                          "(and serve.default_preset) to sizes that fit, e.g. serve.presets={video: [" +
                          f"{cfg.video.height}, {cfg.video.width}]}} serve.default_preset=video")
    if svc.lora_adapters and (cfg.runtime.compile or cfg.runtime.cuda_graphs):
        raise ConfigError("serve.lora_adapters applies a session's LoRA through forward hooks, which compiled layers "
                          "and replayed CUDA graphs do not run: merge adapters at startup with serve.lora, or set "
                          "runtime.compile=false runtime.cuda_graphs=false")
    token = load_bearer_token("serve", svc.auth_token_env, svc.auth_token_file)
    options = dict(max_ongoing_requests=svc.max_sessions + 8,  # room for health, info and control besides sessions
                   ray_actor_options={"num_cpus": svc.num_cpus, "num_gpus": svc.num_gpus},
                   graceful_shutdown_wait_loop_s=svc.drain_check_s)  # a drained replica goes as soon as it is idle
    if svc.max_replicas > svc.min_replicas:
        options["autoscaling_config"] = {"min_replicas": svc.min_replicas, "max_replicas": svc.max_replicas,
                                         "target_ongoing_requests": svc.max_sessions}
    else:
        options["num_replicas"] = svc.min_replicas
    return StreamServer.options(**options).bind(cfg, token, follow)


def app_builder(args: dict) -> serve.Application:
    """Entry point for `serve run` / `serve deploy`: args {config: path, overrides: [...]}. Like `launch.py serve`, it
    refuses a real-size generator with no weights and names every missing file before a replica is deployed,
    rather than each replica failing on the first one."""
    cfg = load_config(args.get("config", "configs/serve.yaml"), list(args.get("overrides", [])))
    cfg.check_generator_weights()
    cfg.check_paths("generator", "serve")
    return build_app(cfg)
