"""Small helpers the benchmark scripts share: which machine ran them, a free port, the results file."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import socket
import sys
from pathlib import Path
from typing import Iterator


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (platform.processor() elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def physical_cores() -> int:
    cores = set()
    for topo in Path("/sys/devices/system/cpu").glob("cpu[0-9]*/topology"):
        try:
            cores.add(((topo / "physical_package_id").read_text().strip(), (topo / "core_id").read_text().strip()))
        except OSError:
            pass
    return len(cores) or os.cpu_count() or 1


def load_1m() -> float | None:
    return round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def finish(results: dict, json_path: str | None) -> None:
    """Record the load at the end (this run's own processes included) and write the JSON if asked."""
    results.setdefault("machine", {})["loadavg_1m_at_end"] = load_1m()
    print(f"load avg {results['machine']['loadavg_1m_at_end']} at end (this run's own processes included)")
    if json_path:
        Path(json_path).write_text(json.dumps(results, indent=2))
        print(f"wrote {json_path}")


@contextlib.contextmanager
def local_ray_serve(num_cpus: int, request_timeout_s: float, env_vars: dict[str, str] | None = None) -> Iterator[str]:
    """A fresh local Ray (never a running cluster) with Serve's HTTP proxy on a free port; yields its URL."""
    import ray
    from ray import serve

    ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=False, configure_logging=False,
             runtime_env={"env_vars": env_vars or {}})
    try:
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port, "request_timeout_s": request_timeout_s})
        try:
            yield f"http://127.0.0.1:{port}"
        finally:
            try:
                serve.shutdown()
            except Exception as e:  # noqa: BLE001 (keep going: Ray must still be shut down)
                print(f"serve.shutdown failed: {e!r}", file=sys.stderr)
    finally:
        ray.shutdown()
