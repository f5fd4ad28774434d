"""Stopping the long-running commands the way orchestrators do (`ray job stop`, Kubernetes, docker stop,
systemd send SIGTERM): `serve` with a stream open and `reward-server` each run as their own process on their
own local Ray (`--address local`, so the test session's Serve is not the one shut down), get SIGTERM, and must
close what is open, exit 0 without a stack dump, and leave no Ray process behind."""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil
import pytest
import websockets
from websockets.exceptions import ConnectionClosed

from core.config import REPO_ROOT
from helpers import free_port

pytestmark = pytest.mark.own_ray


def start(tmp_path: Path, ready: str, *args: str) -> tuple[subprocess.Popen, Path, Path, int]:
    """The command on its own local Ray and a free port (`{port}` in `args`), waited for until it prints `ready`;
    returns the process, its stdout and stderr files and the port. Serve cannot bind port 0 and report the port it got, so
    a port another process took between probing and binding is a clean refusal that names it (exit 2), and the
    start is tried again on another."""
    for attempt in range(5):
        port = free_port()
        stdout, stderr = tmp_path / f"stdout{attempt}", tmp_path / f"stderr{attempt}"
        proc = subprocess.Popen([sys.executable, "launch.py", *(a.format(port=port) for a in args), "--address", "local"],
                                cwd=REPO_ROOT, stdout=stdout.open("w"), stderr=stderr.open("w"), text=True)
        deadline = time.monotonic() + 240
        while ready not in stdout.read_text():
            if proc.poll() is not None and "is already in use" in stderr.read_text():
                break  # taken meanwhile: another port
            assert proc.poll() is None and time.monotonic() < deadline, stderr.read_text()[-3000:]
            time.sleep(0.5)
        else:
            return proc, stdout, stderr, port
    raise AssertionError("five free ports were taken before the command could bind one")


def stop_and_check(proc: subprocess.Popen, stderr: Path) -> None:
    """SIGTERM; then exit 0, no stack dump, and every process the command started gone."""
    children = psutil.Process(proc.pid).children(recursive=True)
    assert any("raylet" in " ".join(c.cmdline()) for c in children)  # the command's own Ray is there to stop
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=120)
    err = stderr.read_text()
    assert proc.returncode == 0, err[-3000:]
    assert "Traceback" not in err and "*** SIGTERM received" not in err and "SIGTERM: stopping the" in err
    gone, alive = psutil.wait_procs(children, timeout=30)
    assert not alive, [" ".join(p.cmdline())[:120] for p in alive]


def test_sigterm_to_serve_closes_the_open_stream_and_exits_0(tmp_path):
    proc, stdout, stderr, port = start(tmp_path, "streaming generation ready", "serve", "--config", "configs/serve.yaml",
                                       "serve.port={port}", "serve.num_cpus=0.25", "serve.drain_check_s=0.2")
    try:

        async def hold_a_stream() -> tuple[int, str, int]:
            blocks = 0
            async with websockets.connect(f"ws://127.0.0.1:{port}/v1/stream", max_size=None) as ws:
                await ws.send(json.dumps({"type": "start", "prompt": "a red ball"}))
                try:
                    while True:
                        msg = await asyncio.wait_for(ws.recv(), timeout=120)
                        if isinstance(msg, str) and json.loads(msg)["type"] == "block":
                            blocks += 1
                            if blocks == 1:
                                await asyncio.to_thread(stop_and_check, proc, stderr)
                except ConnectionClosed:
                    pass
                return ws.close_code, ws.close_reason, blocks
        code, reason, blocks = asyncio.run(hold_a_stream())
    finally:
        proc.kill()
    assert code == 1001 and "shutting down" in reason and blocks >= 1
    assert "streaming service stopped" in stdout.read_text()


def test_sigterm_to_reward_server_exits_0(tmp_path):
    proc, stdout, stderr, port = start(tmp_path, "reward service (motion) ready", "reward-server",
                                       "reward_service.port={port}", "reward_service.num_cpus=0.25")
    try:
        assert httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=30).status_code == 200
        stop_and_check(proc, stderr)
    finally:
        proc.kill()
    assert "reward service stopped" in stdout.read_text()


def test_a_port_in_use_is_one_clear_line_that_names_the_key(tmp_path):
    """A port another process listens on: exit 2 and one line naming the port and the key to change, no stack
    dump (Serve's proxy would fail to bind inside its actor, with its traceback)."""
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        run = subprocess.run([sys.executable, "launch.py", "reward-server", f"reward_service.port={port}",
                              "--address", "local"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=240)
    assert run.returncode == 2 and "Traceback" not in run.stderr, run.stderr[-3000:]
    assert (f"error: port {port} on 127.0.0.1 is already in use: set reward_service.port to a free port"
            in run.stderr.splitlines()[-1])
