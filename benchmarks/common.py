"""Small helpers the benchmark scripts share: which machine ran them, a free port, the results file."""

from __future__ import annotations

import contextlib
import csv
import json
import os
import platform
import socket
import statistics
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


def _num(text: str | None) -> float | None:
    return float(text) if text not in (None, "") else None


def steady_state(out: Path, skip: int) -> dict:
    """Steady-state numbers of one `launch.py train` run from its metrics.csv and summary.json: steps/s between the
    rows of step `skip` and the last one drained while the learner ran, the learner's idle fraction, drops."""
    with (out / "metrics.csv").open(newline="") as f:
        rows = [{k: _num(v) if k != "generator_step" else v for k, v in r.items()} for r in csv.DictReader(f)]
    summary = json.loads((out / "summary.json").read_text())
    live = [r for r in rows if r["delivered"] is not None]  # drained while the learner ran
    start = next((r for r in live if r["step"] == skip), None)
    if start is None or live[-1]["step"] <= skip:
        raise RuntimeError(f"{out}: no steady window (step {skip} .. last live step {live[-1]['step'] if live else None}); "
                           "raise --steps or lower --skip")
    last = live[-1]
    window = [r for r in rows if skip < r["step"] <= last["step"]]
    wait, iteration = sum(r["sample_wait_s"] for r in window), sum(r["iteration_s"] for r in window)
    drops = summary.get("drops") or {}
    return {
        "steps": int(rows[-1]["step"]), "window_steps": f"{skip + 1}..{int(last['step'])}",
        "window_wall_s": last["wall_s"] - start["wall_s"],
        "steady_steps_per_s": (last["step"] - skip) / (last["wall_s"] - start["wall_s"]),
        "learner_steps_per_s": len(window) / iteration,
        "startup_s": start["wall_s"],  # until step `skip` was drained
        "idle_fraction": wait / iteration, "sample_wait_s": wait, "iteration_s": iteration,
        "mean_wait_s_generator_steps": statistics.fmean([r["sample_wait_s"] for r in window if r["generator_step"] == "True"]
                                                        or [float("nan")]),
        "mean_wait_s_critic_steps": statistics.fmean([r["sample_wait_s"] for r in window if r["generator_step"] != "True"]
                                                     or [float("nan")]),
        "mean_staleness": statistics.fmean(r["staleness"] for r in window),
        "drops": drops, "stale_drops": drops.get("stale", 0), "samples_delivered": summary["samples_delivered"],
        "final_version": summary["weight_version"],
    }
