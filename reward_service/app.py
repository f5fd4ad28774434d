"""The reward Serve application: a FastAPI ingress in front of a batched scoring backend.

Routes: POST /v1/score, GET /healthz, GET /v1/info, and FastAPI's /docs and /openapi.json.
Requests arriving together are scored as one batch (`@serve.batch`); the model runs in a
worker thread so the event loop keeps accepting and rejecting requests. Back-pressure is
Serve's: past `max_ongoing_requests` per replica and `max_queued_requests` waiting, new
requests get 503 with Retry-After. Rollout actors call `score` through a DeploymentHandle
with uint8 frames (no HTTP, no re-encoding).
"""


import asyncio
import hmac
import logging
import time

import numpy as np
from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse
from ray import serve

from core.codecs.text_encoder import unknown_words
from core.config import Config, load_bearer_token, load_config
from core.reward.base import RewardScore, VideoInput
from core.reward.registry import build_backend
from reward_service.inputs import SCORE_OPENAPI, InputError, Limits, parse_score_request

logger = logging.getLogger(__name__)

api = FastAPI(
    title="Video reward service",
    description="Scores videos on visual quality (VQ), motion quality (MQ) and text alignment (TA).",
    version="1",
)


ERROR_SCHEMA = {"type": "object", "required": ["error"], "properties": {"error": {
    "type": "object", "required": ["status", "message"],
    "properties": {"status": {"type": "integer"}, "message": {"type": "string"}}}}}
SCORE_ERRORS = {400: "undecodable video", 401: "missing or wrong bearer token", 411: "multipart without Content-Length",
                413: "body, frames, pixels or duration over the limits", 415: "unsupported Content-Type",
                422: "missing or invalid field (prompt, raw-frame parameters, fps, raw body size)",
                503: "overloaded: retry after Retry-After seconds"}
SCORE_RESPONSE = {"type": "object", "required": ["VQ", "MQ", "TA", "Overall", "backend", "warnings"], "properties": {
    **{axis: {"type": "number"} for axis in ("VQ", "MQ", "TA", "Overall")},
    "raw": {"type": "object"}, "normalized": {"type": "object"}, "sampling": {"type": "object"},
    "extra": {"type": "object"}, "backend": {"type": "string"}, "latency_ms": {"type": "number"},
    "warnings": {"type": "array", "items": {"type": "string"},
                 "description": "what the backend will not read of the prompt (words its tokenizer maps to unknown)"}}}


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": {"status": status, "message": message}}, status_code=status, headers=headers)


@api.exception_handler(InputError)
async def _input_error(request: Request, exc: InputError) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
    return _error(exc.status, exc.message, headers)


async def _authorised(request: Request) -> None:
    server: RewardServer = request.app.state.server
    if server.token is None:
        return
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.encode(), server.token.encode()):
        raise InputError(401, "missing or wrong bearer token: send 'Authorization: Bearer <token>'")


@serve.deployment
@serve.ingress(api)
class RewardServer:
    def __init__(self, cfg: Config, token: str | None):
        self.cfg = cfg
        self.limits = Limits.from_config(self.cfg.reward_service)
        self.token = token
        self.backend = build_backend(self.cfg.reward)
        self._score_batch.set_max_batch_size(self.cfg.reward_service.max_batch_size)
        self._score_batch.set_batch_wait_timeout_s(self.cfg.reward_service.batch_wait_timeout_s)
        self.batch_sizes: list[int] = []
        api.state.server = self

    @serve.batch
    async def _score_batch(self, videos: list[VideoInput]) -> list[RewardScore]:
        self.batch_sizes.append(len(videos))
        return await asyncio.to_thread(self.backend.score_batch, videos)

    async def score(self, frames: np.ndarray, fps: float, prompt: str) -> dict:
        """In-cluster scoring of uint8 frames [T, H, W, 3] (numpy or torch) through a DeploymentHandle."""
        if hasattr(frames, "numpy"):  # a torch tensor
            frames = frames.detach().cpu().numpy()
        video = VideoInput(np.ascontiguousarray(frames), float(fps), prompt)
        self.limits.check_video(*video.frames.shape[:3], video.fps)
        return (await self._score_batch(video)).to_dict()

    @api.post("/v1/score", dependencies=[Depends(_authorised)], openapi_extra=SCORE_OPENAPI,
              responses={200: {"content": {"application/json": {"schema": SCORE_RESPONSE}}},
                         **{code: {"description": what, "content": {"application/json": {"schema": ERROR_SCHEMA}}}
                            for code, what in SCORE_ERRORS.items()}})
    async def score_http(self, request: Request) -> dict:
        """Score one video: multipart (`video` file + `prompt`), video/mp4 or video/webm body with
        `?prompt=`, or raw uint8 frames (`application/octet-stream`, `?frames=&height=&width=&fps=&prompt=`)."""
        start = time.perf_counter()
        video = await parse_score_request(request, self.limits)
        result = (await self._score_batch(video)).to_dict()
        result.update(backend=self.backend.name, latency_ms=round((time.perf_counter() - start) * 1e3, 2),
                      warnings=self._prompt_warnings(video.prompt))
        return result

    def _prompt_warnings(self, prompt: str) -> list[str]:
        """Words of `prompt` the backend's tokenizer reads as unknown, for a backend that reads prompts through one
        (its `tokenizer` attribute, e.g. VideoReward's); logged and returned with the scores."""
        tokenizer = getattr(self.backend, "tokenizer", None)
        unknown = unknown_words(tokenizer, prompt) if tokenizer is not None else []
        if not unknown:
            return []
        warning = f"the {self.backend.name} backend's tokenizer reads these words as unknown: {', '.join(unknown)}"
        logger.warning("prompt %r: %s", prompt, warning)
        return [warning]

    @api.get("/healthz")
    async def healthz(self) -> dict:
        return {"status": "ok"}

    @api.get("/v1/info", dependencies=[Depends(_authorised)])
    async def info(self) -> dict:
        svc = self.cfg.reward_service
        return {
            **self.backend.info(),
            "batching": {"max_batch_size": svc.max_batch_size, "batch_wait_timeout_s": svc.batch_wait_timeout_s,
                         "recent_batch_sizes": self.batch_sizes[-32:]},
            "limits": {"max_body_bytes": self.limits.max_body_bytes, "max_frames": svc.max_frames,
                       "max_pixels": svc.max_pixels, "max_duration_s": svc.max_duration_s},
            "backpressure": {"max_ongoing_requests": svc.max_ongoing_requests,
                             "max_queued_requests": svc.max_queued_requests, "retry_after_s": svc.retry_after_s},
            "auth": self.token is not None,
        }


def build_app(cfg: Config) -> serve.Application:
    """The Serve application for `cfg`, with its replica, back-pressure and autoscaling settings."""
    svc = cfg.reward_service
    # read where the app is built, so replicas on other nodes need no env or file
    token = load_bearer_token("reward_service", svc.auth_token_env, svc.auth_token_file)
    options = dict(
        max_ongoing_requests=svc.max_ongoing_requests,
        max_queued_requests=svc.max_queued_requests,
        backpressure_config={"status_code": 503, "retry_after_s": svc.retry_after_s},
        ray_actor_options={"num_cpus": svc.num_cpus, "num_gpus": svc.num_gpus},
    )
    if svc.max_replicas > svc.min_replicas:
        options["autoscaling_config"] = {"min_replicas": svc.min_replicas, "max_replicas": svc.max_replicas,
                                         "target_ongoing_requests": svc.target_ongoing_requests}
    else:
        options["num_replicas"] = svc.min_replicas
    return RewardServer.options(**options).bind(cfg, token)


def app_builder(args: dict) -> serve.Application:
    """Entry point for `serve run` / `serve deploy` config files: args {config: path, overrides: [...]}."""
    return build_app(load_config(args.get("config", "configs/reward_service.yaml"), list(args.get("overrides", []))))
