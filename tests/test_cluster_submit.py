"""The README's cluster submission, run as written against a local Ray head with token authentication: a checkout
holding 1 GB of weights in checkpoints/ submits (the package leaves them out), the job runs, and a client without
the token is refused."""

from __future__ import annotations

import os
import re
import secrets
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import psutil
import pytest

from benchmarks.common import free_port
from core.config import REPO_ROOT

pytestmark = [pytest.mark.own_ray, pytest.mark.timeout(420)]


def _readme_submit() -> list[str]:
    """The README's `ray job submit ... --` (its cluster block), as arguments."""
    text = (REPO_ROOT / "README.md").read_text()
    match = re.search(r"^ray job submit (--address \S+ --working-dir \S+ --) \\$", text, re.M)
    assert match, "the README's cluster section has no `ray job submit --address ... --working-dir ... --` line"
    return ["job", "submit", *match.group(1).split()]


def _checkout(into: Path) -> Path:
    """The repository's files as a user's checkout holds them, with 1 GB of weights (sparse) in checkpoints/."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO_ROOT, capture_output=True,
                           text=True, check=True).stdout.split()
    for name in files:
        if (REPO_ROOT / name).is_file():
            (into / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO_ROOT / name, into / name)
    (into / "checkpoints").mkdir()
    with open(into / "checkpoints" / "Wan2.1-T2V-14B.safetensors", "wb") as f:
        f.truncate(2**30)
    return into


def _stop_head(temp_dir: str) -> None:
    """Only this head's processes (they name its temp dir): `ray stop` would stop every Ray on the machine."""
    procs = []
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if any(temp_dir in arg for arg in proc.info["cmdline"] or []):
                procs.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    for proc in procs:
        proc.kill()
    psutil.wait_procs(procs, timeout=30)


def test_the_readme_submission_uploads_without_weights_runs_and_needs_the_token(tmp_path):
    checkout = _checkout(tmp_path / "checkout")
    ray = str(Path(sys.executable).parent / "ray")
    temp_dir = f"/tmp/rs{uuid.uuid4().hex[:8]}"  # short: Ray's socket paths must fit 107 bytes
    dashboard = free_port()
    env = os.environ | {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(16),
                        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    env.pop("RAY_ADDRESS", None)
    started = subprocess.run([ray, "start", "--head", f"--port={free_port()}", f"--dashboard-port={dashboard}",
                              # its own agent port: the default one may be held by another Ray on this machine
                              f"--dashboard-agent-listen-port={free_port()}", "--include-dashboard=true", "--num-cpus=1", f"--temp-dir={temp_dir}",
                              "--disable-usage-stats"], env=env, capture_output=True, text=True, timeout=120)
    try:
        assert started.returncode == 0, started.stdout[-2000:] + started.stderr[-2000:]
        submit = [ray, *_readme_submit()]
        address = submit.index("--address") + 1
        submit[address] = submit[address].replace(":8265", f":{dashboard}")
        # the job's copy of the repository holds no weights: they stay where paths.root points
        plan = ["sh", "-c", "test ! -e checkpoints && python launch.py plan --config configs/reward_forcing_1.3b.yaml"]
        deadline = time.monotonic() + 90
        while True:  # a head just started answers "No available agent" until its dashboard agent is up
            job = subprocess.run(submit + plan, cwd=checkout, env=env, capture_output=True, text=True, timeout=300)
            out = job.stdout + job.stderr
            if "No available agent" not in out or time.monotonic() > deadline:
                break
            time.sleep(2)
        assert job.returncode == 0 and "succeeded" in out, out[-4000:]
        assert "learner worker" in out and "everything fits" in out, out[-4000:]  # the plan ran in the job
        # a client without the token gets no job in
        refused = subprocess.run(submit + ["python", "-c", "print('ran')"], cwd=checkout,
                                 env={k: v for k, v in env.items() if k != "RAY_AUTH_TOKEN"} | {"HOME": str(tmp_path)},
                                 capture_output=True, text=True, timeout=120)
        assert refused.returncode != 0 and "ran" not in refused.stdout, refused.stdout[-2000:] + refused.stderr[-2000:]
    finally:
        _stop_head(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)
