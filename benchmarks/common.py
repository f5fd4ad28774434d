"""Small helpers the benchmark scripts share: which machine ran them, a free port, the results file."""

from __future__ import annotations

import json
import os
import platform
import socket
from pathlib import Path


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
