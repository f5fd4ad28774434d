"""Ray and Serve, started the same way by every command (`train`, `serve`, `reward-server`)."""

from __future__ import annotations

import errno
import socket

import ray
from ray import serve
from ray.serve.context import _get_global_client

from core.config import ConfigError


def start_ray(address: str | None = None, log_to_driver: bool = True) -> bool:
    """Join the Ray cluster at `address` (None: RAY_ADDRESS, as under `ray job submit`, else a new local Ray);
    False when this process was already connected (then the caller must not shut Ray down)."""
    if ray.is_initialized():
        return False
    ray.init(address=address, include_dashboard=False, log_to_driver=log_to_driver)
    return True


def start_serve(host: str, port: int, request_timeout_s: float | None = None, section: str = "serve") -> str:
    """Start Serve's HTTP proxy on host:port and return the base URL.

    A cluster has one Serve HTTP proxy, shared by every app on it (the reward service, the streaming app).
    Serve itself only logs a warning and keeps the running proxy's settings when a second `serve.start` asks
    for others, so an app would answer on a port nobody asked for; here that is an error naming the keys of
    `section` (the config section whose host/port were asked for)."""
    wanted = {"host": host, "port": port} | ({"request_timeout_s": request_timeout_s} if request_timeout_s else {})
    if _get_global_client(raise_if_no_controller_running=False) is None:  # this call starts the proxy
        _start_proxy(wanted, f"{section}.port")
    else:
        serve.start(http_options=wanted)  # Serve keeps the running proxy's settings: compared below
    # Serve's own comparison (serve._private.api._check_http_options) reads this same client attribute; there is
    # no public accessor for the running proxy's settings
    running = _get_global_client().http_config
    conflicts = {k: (v, getattr(running, k)) for k, v in wanted.items() if getattr(running, k) != v}
    if conflicts:
        asked = ", ".join(f"{section}.{k}={v!r} (running: {r!r})" for k, (v, r) in conflicts.items())
        raise ConfigError(f"Serve on this Ray cluster already runs its HTTP proxy with other settings: {asked}. All "
                          "apps on one cluster share one proxy: set these keys to the running values, or use "
                          "another Ray cluster")
    return f"http://{host}:{port}"


def _start_proxy(wanted: dict, key: str) -> None:
    host, port = wanted["host"], wanted["port"]
    check_port_free(host, port, key)
    try:
        serve.start(http_options=wanted)
    except RuntimeError as e:  # taken between the check and the proxy's bind: the proxy failed to start
        if "Failed to bind" not in str(e):
            raise
        serve.shutdown()  # the controller this call started, so that another port can be tried
        raise PortInUseError(_in_use(host, port, key)) from None


def check_port_free(host: str, port: int, key: str) -> None:
    """A port another process holds is one clear error naming the port and the config key that chose it (Serve's
    proxy would otherwise fail to bind inside its own actor, with its traceback in the logs)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:  # the same plain bind the proxy makes
        try:
            probe.bind((host, port))
        except OSError as e:
            if e.errno != errno.EADDRINUSE:
                raise
            raise PortInUseError(_in_use(host, port, key)) from None


def _in_use(host: str, port: int, key: str) -> str:
    return f"port {port} on {host} is already in use: set {key} to a free port, or stop what listens there"


class PortInUseError(ConfigError):
    """The port a server was asked to listen on is taken."""
