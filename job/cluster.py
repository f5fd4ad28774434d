"""Ray and Serve, started the same way by every command (`train`, `serve`, `reward-server`)."""

from __future__ import annotations

import ray
from ray import serve


def start_ray(address: str | None = None, log_to_driver: bool = True) -> bool:
    """Join the Ray cluster at `address` (None: RAY_ADDRESS, as under `ray job submit`, else a new local Ray);
    False when this process was already connected (then the caller must not shut Ray down)."""
    if ray.is_initialized():
        return False
    ray.init(address=address, include_dashboard=False, log_to_driver=log_to_driver)
    return True


def start_serve(host: str, port: int, request_timeout_s: float | None = None) -> str:
    """Start Serve's HTTP proxy on host:port (a Serve already running on the cluster is joined as it is);
    the base URL."""
    options = {"host": host, "port": port}
    if request_timeout_s is not None:
        options["request_timeout_s"] = request_timeout_s
    serve.start(http_options=options)
    return f"http://{host}:{port}"
