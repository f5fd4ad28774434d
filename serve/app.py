"""The streaming inference Serve application: watch the causal generator make video, block by block.

Routes:
  WS   /v1/stream    send {"type": "start", "prompt", "seed"?, "preset"?, "max_frames"?, "lora"?}; receive one
                     binary message per frame (16-byte header: uint32 frame index, uint32 block, float64 seconds
                     from the start to when the frame's block was ready; then a JPEG) and a JSON "block"
                     message per block with its timings. Control while streaming: {"type": "switch",
                     "prompt"} (answered by "switched"), "pause" / "resume" (answered by "paused" /
                     "resumed"), "stop". A bad message gets {"type": "error"} and the stream goes on.
  POST /v1/generate  {"prompt", "seed"?, "preset"?, "frames"?, "stream"?}: an MP4, or with stream=true a
                     fragmented MP4 sent fragment by fragment as the blocks are made.
  GET  /             the web page; GET /healthz, /v1/info, /v1/metrics.

Each replica holds one pipeline and at most `serve.max_sessions` sessions (streams and generate calls);
one more is refused with 503 and Retry-After (the WebSocket handshake is denied before a session is
allocated, as is a wrong bearer token). The model runs in a worker thread, so control messages, health
checks and other connections are answered while a block is being made.
"""

import asyncio
import hmac
import io
import json
import struct
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from fastapi import FastAPI, Request, WebSocket, WebSocketDisconnect
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response, StreamingResponse
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field
from ray import serve
from starlette.background import BackgroundTask

from core.config import Config, load_bearer_token, load_config
from core.model.lora import LoraAdapter, applied, merge
from core.records.video_io import FragmentedMP4Encoder, MP4Writer
from core.stream.pipeline import VideoPipeline
from core.stream.session import StreamSession

PAGE = Path(__file__).with_name("static") / "index.html"
FRAME_HEADER = struct.Struct("<IId")  # frame index, block, seconds since the stream started

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


def _jpeg(frame: np.ndarray, quality: int) -> bytes:
    out = io.BytesIO()
    Image.fromarray(frame).save(out, format="JPEG", quality=quality)
    return out.getvalue()


@api.exception_handler(RequestError)
async def _request_error(request: Request, exc: RequestError) -> JSONResponse:
    headers = {"Retry-After": str(request.app.state.server.retry_after)} if exc.status == 503 else None
    if exc.status == 401:
        headers = {"WWW-Authenticate": "Bearer"}
    return JSONResponse({"error": {"status": exc.status, "message": exc.message}}, status_code=exc.status,
                        headers=headers)


# Defined before the deployment: Serve pickles the ingress class (and the globals it uses) when it is decorated.
class _Stream:
    """One WebSocket session: a producer making blocks in a worker thread, a reader taking control messages."""

    def __init__(self, server: "StreamServer", ws: WebSocket):
        self.server, self.ws = server, ws
        self.controls: asyncio.Queue[dict] = asyncio.Queue()
        self.running = asyncio.Event()
        self.running.set()
        self.stopped = False

    async def _error(self, message: str) -> None:
        self.server.stats["error_bad_message"] += 1
        await self.ws.send_json({"type": "error", "message": message})

    async def _receive_json(self) -> dict | None:
        message = await self.ws.receive()
        if message["type"] == "websocket.disconnect":
            raise WebSocketDisconnect(message.get("code", 1000))
        raw = message.get("text")
        if raw is None:
            await self._error("binary messages are not understood: send JSON text")
            return None
        try:
            msg = json.loads(raw)
        except json.JSONDecodeError as e:
            await self._error(f"not JSON ({e.msg}); send e.g. {{\"type\": \"switch\", \"prompt\": \"...\"}}")
            return None
        if not isinstance(msg, dict) or not isinstance(msg.get("type"), str):
            await self._error("a message must be a JSON object with a string 'type'")
            return None
        return msg

    async def _start(self) -> StartMessage:
        deadline = time.monotonic() + self.server.svc.start_timeout_s
        while True:
            try:
                msg = await asyncio.wait_for(self._receive_json(), max(0.0, deadline - time.monotonic()))
            except asyncio.TimeoutError:
                raise RequestError(408, "no start message in serve.start_timeout_s") from None
            if msg is None:
                continue
            if msg.get("type") != "start":
                await self._error(f"send a 'start' message first, got {msg['type']!r}")
                continue
            try:
                start = StartMessage.model_validate(msg)
                self.server._size(start.preset)
                if start.lora is not None and start.lora not in self.server.svc.lora_adapters:
                    raise RequestError(422, f"unknown lora {start.lora!r}; available: "
                                            f"{sorted(self.server.svc.lora_adapters)}")
                if start.lora is not None and self.server.svc.max_sessions > 1:
                    raise RequestError(422, "a per-session lora needs serve.max_sessions 1 (the replica's model is "
                                            "shared by its sessions); merge it at startup with serve.lora instead")
                return start
            except (ValueError, RequestError) as e:
                await self._error(f"bad start message: {getattr(e, 'message', e)}")

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
            elif kind == "switch":
                prompt = msg.get("prompt")
                if not isinstance(prompt, str) or not 0 < len(prompt) <= 2000:
                    await self._error("'switch' needs a 'prompt' string of 1 to 2000 characters")
                else:
                    await self.controls.put(msg)
            else:
                await self._error(f"unknown message type {kind!r}; use switch, pause, resume or stop")

    async def run(self) -> None:
        server, ws = self.server, self.ws
        start = await self._start()
        session = await asyncio.to_thread(server._session, start.prompt, start.seed, start.preset)
        limit = min(x for x in (start.max_frames, server.svc.max_session_frames or None, 2**62) if x)
        await ws.send_json({"type": "started", "width": session.width, "height": session.height,
                            "fps": server.cfg.video.fps, "preset": start.preset or server.svc.default_preset,
                            "max_frames": None if limit == 2**62 else limit})
        reader = asyncio.create_task(self._read_controls())
        lora = self._session_lora(start)
        t0, sent, first_sent_at = time.monotonic(), 0, None
        try:
            while not self.stopped and sent < limit:
                await self.running.wait()
                if self.stopped:
                    break
                if reader.done():
                    reader.result()  # re-raise the disconnect
                recache_s = 0.0
                while not self.controls.empty():
                    msg = self.controls.get_nowait()
                    recache_s += await asyncio.to_thread(session.switch_prompt, msg["prompt"])
                    await ws.send_json({"type": "switched", "prompt": msg["prompt"], "at_frame": session.frames})
                chunk = await asyncio.to_thread(session.next_chunk)
                server._count(chunk)
                frames = chunk.frames[: limit - sent].numpy()
                jpegs = await asyncio.to_thread(lambda: [_jpeg(f, server.svc.jpeg_quality) for f in frames])
                now = time.monotonic() - t0
                for i, data in enumerate(jpegs):
                    await ws.send_bytes(FRAME_HEADER.pack(chunk.first_frame + i, chunk.block, now) + data)
                if first_sent_at is None:
                    first_sent_at = time.monotonic()
                    server.ttff_s.append(first_sent_at - t0)
                sent += len(frames)
                server.stats["frames_sent"] += len(frames)
                await ws.send_json({"type": "block", "block": chunk.block, "first_frame": chunk.first_frame,
                                    "frames": len(frames), "denoise_ms": round(chunk.denoise_s * 1e3, 2),
                                    "decode_ms": round(chunk.decode_s * 1e3, 2), "recache_ms": round(recache_s * 1e3, 2),
                                    "memory_bytes": session.memory_bytes()})
            await ws.send_json({"type": "end", "frames": sent, "reason": "stop" if self.stopped else "max_frames"})
            await ws.close()
        finally:
            if first_sent_at is not None:
                server.stats["send_window_s"] += time.monotonic() - first_sent_at
            reader.cancel()
            if lora is not None:
                lora.__exit__(None, None, None)
            del session

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
    def __init__(self, cfg: Config, token: str | None):
        self.cfg = cfg
        self.svc = self.cfg.serve
        self.token = token
        self.pipe = VideoPipeline.from_config(self.cfg)
        self.merged_lora = [self._merge_startup_lora(spec) for spec in self.svc.lora]
        self.sessions = 0
        self.retry_after = max(1, round(self.svc.retry_after_s))
        self.stats: Counter[str] = Counter()
        self.ttff_s: list[float] = []
        api.state.server = self

    def _merge_startup_lora(self, spec: dict) -> str:
        adapter = LoraAdapter.load(spec["path"], alpha=spec.get("alpha"))
        merge(self.pipe.generator, adapter, weight=float(spec.get("weight", 1.0)))
        return str(spec["path"])

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

    def _open(self):
        """Claim a session slot (503 when the replica is full)."""
        if self.sessions >= self.svc.max_sessions:
            self.stats["refused_busy"] += 1
            raise RequestError(503, f"all {self.svc.max_sessions} session(s) of this replica are in use; "
                                    f"retry after {self.retry_after}s")
        self.sessions += 1
        self.stats["sessions_started"] += 1

    def _close(self) -> None:
        self.sessions -= 1
        if self.pipe.device.type == "cuda":
            torch.cuda.empty_cache()

    def _session(self, prompt: str, seed: int, preset: str | None) -> StreamSession:
        height, width = self._size(preset)
        try:
            return StreamSession(self.pipe, prompt, seed, height, width)
        except ValueError as e:
            raise RequestError(422, str(e)) from None

    # ------------------------------------------------------------------------------------------ HTTP

    @api.get("/", response_class=HTMLResponse)
    async def page(self) -> HTMLResponse:
        return HTMLResponse(PAGE.read_text(encoding="utf-8"))

    @api.get("/healthz")
    async def healthz(self) -> dict:
        return {"status": "ok", "sessions": self.sessions}

    @api.get("/v1/info")
    async def info(self, request: Request) -> dict:
        self._check_http_auth(request)
        cfg = self.cfg
        return {"model": {"dim": cfg.model.dim, "num_layers": cfg.model.num_layers, "dtype": cfg.runtime.dtype,
                          "device": str(self.pipe.device)},
                "checkpoint": cfg.checkpoint.generator, "use_ema": cfg.checkpoint.use_ema, "lora": self.merged_lora,
                "lora_adapters": sorted(self.svc.lora_adapters),
                "stream": cfg.stream.model_dump(), "fps": cfg.video.fps,
                "vocabulary": self.pipe.text_encoder.vocabulary(),  # the words a word-level model knows, else null
                "presets": {k: {"height": v[0], "width": v[1]} for k, v in self.svc.presets.items()},
                "default_preset": self.svc.default_preset,
                "limits": {"max_sessions_per_replica": self.svc.max_sessions,
                           "max_session_frames": self.svc.max_session_frames or None,
                           "max_generate_frames": self.svc.max_generate_frames, "retry_after_s": self.retry_after},
                "auth": self.token is not None}

    @api.get("/v1/metrics")
    async def metrics(self) -> dict:
        s = self.stats
        ttff = sorted(self.ttff_s)
        return {"sessions_active": self.sessions, "sessions_started": s["sessions_started"],
                "refused_busy": s["refused_busy"], "errors": {k[6:]: v for k, v in s.items() if k.startswith("error_")},
                "time_to_first_frame_s": {"last": self.ttff_s[-1] if ttff else None,
                                          "median": ttff[len(ttff) // 2] if ttff else None},
                "production_fps": {"denoise": s["frames_made"] / s["denoise_s"] if s["denoise_s"] else None,
                                   "decode": s["frames_made"] / s["decode_s"] if s["decode_s"] else None},
                "delivered_fps": s["frames_sent"] / s["send_window_s"] if s["send_window_s"] else None,
                "frames_sent": s["frames_sent"]}

    def _check_http_auth(self, request: Request) -> None:
        if not self._authorised(request.headers.get("authorization"), None):
            raise RequestError(401, "missing or wrong bearer token: send 'Authorization: Bearer <token>'")

    @api.post("/v1/generate")
    async def generate(self, body: GenerateRequest, request: Request) -> Response:
        self._check_http_auth(request)
        if body.frames > self.svc.max_generate_frames:
            raise RequestError(413, f"frames {body.frames} exceeds serve.max_generate_frames {self.svc.max_generate_frames}")
        self._size(body.preset)  # validate before claiming a slot
        self._open()
        try:
            session = self._session(body.prompt, body.seed, body.preset)
        except Exception:
            self._close()
            raise
        if body.stream:
            return StreamingResponse(self._fragments(session, body.frames), media_type="video/mp4")
        try:
            path = await asyncio.to_thread(self._write_mp4, session, body.frames)
        finally:
            self._close()
        return FileResponse(path, media_type="video/mp4", filename="video.mp4",
                            background=BackgroundTask(Path(path).unlink, missing_ok=True))

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
        with MP4Writer(path, session.width, session.height, self.cfg.video.fps) as writer:
            for part in self._chunks(session, frames):
                writer.write(part)
        return path

    async def _fragments(self, session: StreamSession, frames: int):
        encoder = FragmentedMP4Encoder(session.width, session.height, self.cfg.video.fps)
        chunks = self._chunks(session, frames)
        try:
            while (part := await asyncio.to_thread(next, chunks, None)) is not None:
                yield await asyncio.to_thread(encoder.encode, part)
        finally:
            self._close()

    def _count(self, chunk) -> None:
        self.stats["frames_made"] += len(chunk.frames)
        self.stats["denoise_s"] += chunk.denoise_s
        self.stats["decode_s"] += chunk.decode_s

    # ------------------------------------------------------------------------------------------ WebSocket

    @api.websocket("/v1/stream")
    async def stream(self, ws: WebSocket) -> None:
        if not self._authorised(ws.headers.get("authorization"), ws.query_params.get("token")):
            self.stats["error_unauthorised"] += 1
            await ws.send_denial_response(JSONResponse(
                {"error": {"status": 401, "message": "missing or wrong bearer token (header or ?token=)"}},
                status_code=401, headers={"WWW-Authenticate": "Bearer"}))
            return
        try:
            self._open()
        except RequestError as e:
            await ws.send_denial_response(JSONResponse({"error": {"status": 503, "message": e.message}},
                                                       status_code=503, headers={"Retry-After": str(self.retry_after)}))
            return
        try:
            await ws.accept()
            await _Stream(self, ws).run()
        except WebSocketDisconnect:
            self.stats["disconnects"] += 1
        except Exception as e:  # noqa: BLE001 - reported to the client when it is still there, and counted
            self.stats[f"error_{type(e).__name__}"] += 1
            try:
                await ws.send_json({"type": "error", "message": f"{type(e).__name__}: {e}", "fatal": True})
                await ws.close(code=1011)
            except Exception:  # noqa: BLE001 - the client is gone
                pass
        finally:
            self._close()


def build_app(cfg: Config) -> serve.Application:
    svc = cfg.serve
    token = load_bearer_token("serve", svc.auth_token_env, svc.auth_token_file)
    options = dict(max_ongoing_requests=svc.max_sessions + 8,  # room for health, info and control besides sessions
                   ray_actor_options={"num_cpus": svc.num_cpus, "num_gpus": svc.num_gpus})
    if svc.max_replicas > svc.min_replicas:
        options["autoscaling_config"] = {"min_replicas": svc.min_replicas, "max_replicas": svc.max_replicas,
                                         "target_ongoing_requests": svc.max_sessions}
    else:
        options["num_replicas"] = svc.min_replicas
    return StreamServer.options(**options).bind(cfg, token)


def app_builder(args: dict) -> serve.Application:
    """Entry point for `serve run` / `serve deploy`: args {config: path, overrides: [...]}."""
    return build_app(load_config(args.get("config", "configs/serve.yaml"), list(args.get("overrides", []))))
