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
import time

import numpy as np
from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse
from ray import serve

from core.config import Config, load_bearer_token, load_config
from core.reward.base import RewardScore, VideoInput
from core.reward.registry import build_backend
from reward_service.inputs import InputError, Limits, parse_score_request

api = FastAPI(
    title="Video reward service",
    description="Scores videos on visual quality (VQ), motion quality (MQ) and text alignment (TA).",
    version="1",
)


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

    @api.post("/v1/score", dependencies=[Depends(_authorised)])
    async def score_http(self, request: Request) -> dict:
        """Score one video: multipart (`video` file + `prompt`), video/mp4 or video/webm body with
        `?prompt=`, or raw uint8 frames (`application/octet-stream`, `?frames=&height=&width=&fps=&prompt=`)."""
        start = time.perf_counter()
        video = await parse_score_request(request, self.limits)
        result = (await self._score_batch(video)).to_dict()
        result.update(backend=self.backend.name, latency_ms=round((time.perf_counter() - start) * 1e3, 2))
        return result

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
