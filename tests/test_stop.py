"""Stopping the long-running commands the way orchestrators do (`ray job stop`, Kubernetes, docker stop,
systemd send SIGTERM): `serve` with a stream open and `reward-server` each run as their own process on their
own local Ray (`--address local`, so the test session's Serve is not the one shut down), get SIGTERM, and must
close what is open, exit 0 without a stack dump, and leave no Ray process behind."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil
import websockets
from websockets.exceptions import ConnectionClosed

from core.config import REPO_ROOT
from helpers import free_port


def start(tmp_path: Path, *args: str) -> tuple[subprocess.Popen, Path, Path]:
    stdout, stderr = tmp_path / "stdout", tmp_path / "stderr"
    proc = subprocess.Popen([sys.executable, "launch.py", *args, "--address", "local"], cwd=REPO_ROOT,
                            stdout=stdout.open("w"), stderr=stderr.open("w"), text=True)
    return proc, stdout, stderr


def wait_ready(proc: subprocess.Popen, stdout: Path, stderr: Path, words: str) -> None:
    deadline = time.monotonic() + 240
    while words not in stdout.read_text():
        assert proc.poll() is None and time.monotonic() < deadline, stderr.read_text()[-3000:]
        time.sleep(0.5)


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
    port = free_port()
    proc, stdout, stderr = start(tmp_path, "serve", "--config", "configs/serve.yaml", f"serve.port={port}",
                                 "serve.num_cpus=0.25", "serve.drain_check_s=0.2")
    try:
        wait_ready(proc, stdout, stderr, "streaming generation ready")

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
    port = free_port()
    proc, stdout, stderr = start(tmp_path, "reward-server", f"reward_service.port={port}", "reward_service.num_cpus=0.25")
    try:
        wait_ready(proc, stdout, stderr, "reward service (motion) ready")
        assert httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=30).status_code == 200
        stop_and_check(proc, stderr)
    finally:
        proc.kill()
    assert "reward service stopped" in stdout.read_text()
