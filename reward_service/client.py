"""Clients of the reward service.

`RewardHandleClient`: for rollout actors inside the Ray cluster; sends uint8 frames through a
Serve DeploymentHandle (object store, no HTTP, no re-encoding), with a timeout per call and
bounded retries on overload, timeouts and replica failures. Bad input is not retried.

`RewardHTTPClient`: for external callers; posts an MP4/WebM file or raw frames over HTTP and
retries 429/503 (honouring Retry-After) and connection errors with exponential backoff.
"""

from __future__ import annotations

import asyncio
import random
import time
from pathlib import Path

import httpx
import numpy as np
from ray import serve
from ray.exceptions import RayActorError, RayTaskError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError


class RewardError(RuntimeError):
    """Scoring failed for good (bad input, or still failing after the retries).

    `kind` says why, for callers that count failures: "rejected" (bad input), "timeout",
    or "unavailable" (overloaded or failing replicas after every retry).
    """

    def __init__(self, message: str, status: int | None = None, kind: str = "unavailable"):
        super().__init__(message)
        self.status = status
        self.kind = kind


def _backoff(attempt: int, base: float) -> float:
    return base * 2**attempt * (1 + random.random() * 0.25)


class RewardHandleClient:
    def __init__(self, app_name: str = "reward", timeout_s: float = 60.0, retries: int = 3, backoff_s: float = 0.25):
        self.handle = serve.get_app_handle(app_name).options(method_name="score")
        self.timeout_s, self.retries, self.backoff_s = timeout_s, retries, backoff_s

    async def score(self, frames: np.ndarray, fps: float, prompt: str) -> dict:
        """Scores of uint8 frames [T, H, W, 3] (numpy or torch); raises `RewardError` on failure."""
        last: Exception | None = None
        for attempt in range(self.retries + 1):
            try:
                return await asyncio.wait_for(self.handle.remote(frames, fps, prompt), self.timeout_s)
            except (BackPressureError, DeploymentUnavailableError, RayActorError, asyncio.TimeoutError) as e:
                last = e  # transient: overload, timeout or a replica that died; try again
            except RayTaskError as e:
                if isinstance(e.cause, (ValueError, TypeError)) or type(e.cause).__name__ == "InputError":
                    raise RewardError(f"the reward service rejected the input: {e.cause}", kind="rejected") from None
                last = e
            if attempt < self.retries:
                await asyncio.sleep(_backoff(attempt, self.backoff_s))
        kind = "timeout" if isinstance(last, asyncio.TimeoutError) else "unavailable"
        raise RewardError(f"scoring failed after {self.retries + 1} attempts: {type(last).__name__}: {last}", kind=kind)


class RewardHTTPClient:
    def __init__(self, url: str, token: str | None = None, timeout_s: float = 60.0, retries: int = 3,
                 backoff_s: float = 0.5):
        self.url = url.rstrip("/")
        self.headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.retries, self.backoff_s = retries, backoff_s
        self.http = httpx.Client(timeout=timeout_s)

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> "RewardHTTPClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def info(self) -> dict:
        return self._request("GET", "/v1/info")

    def score_file(self, path: str | Path, prompt: str) -> dict:
        path = Path(path)
        if not path.is_file():
            raise RewardError(f"no video file at {path}")
        kind = "video/webm" if path.suffix.lower() in (".webm", ".mkv") else "video/mp4"
        return self._request("POST", "/v1/score", files={"video": (path.name, path.read_bytes(), kind)},
                             data={"prompt": prompt})

    def score_frames(self, frames: np.ndarray, fps: float, prompt: str) -> dict:
        frames = np.ascontiguousarray(frames, dtype=np.uint8)
        t, h, w, _ = frames.shape
        return self._request("POST", "/v1/score", content=frames.tobytes(),
                             params={"frames": t, "height": h, "width": w, "fps": fps, "prompt": prompt},
                             headers={"Content-Type": "application/octet-stream"})

    def _request(self, method: str, path: str, **kwargs) -> dict:
        headers = {**self.headers, **kwargs.pop("headers", {})}
        for attempt in range(self.retries + 1):
            wait = _backoff(attempt, self.backoff_s)
            try:
                response = self.http.request(method, self.url + path, headers=headers, **kwargs)
            except httpx.TransportError as e:
                problem = f"{type(e).__name__}: {e}"
            else:
                if response.status_code < 400:
                    return response.json()
                problem = _message(response)
                if response.status_code not in (429, 502, 503, 504):
                    raise RewardError(f"{method} {path} -> {response.status_code}: {problem}", response.status_code,
                                      kind="rejected")
                wait = max(wait, float(response.headers.get("retry-after", 0) or 0))
            if attempt < self.retries:
                time.sleep(wait)
        raise RewardError(f"{method} {path} failed after {self.retries + 1} attempts: {problem}")


def _message(response: httpx.Response) -> str:
    try:
        body = response.json()
        return body.get("error", {}).get("message") or body.get("detail") or response.text
    except ValueError:
        return response.text[:500]
