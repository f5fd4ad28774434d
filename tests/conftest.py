"""Shared fixtures: the golden set (tests/golden by default, `--golden-dir` for another), one local Ray and
one Serve HTTP proxy per session, the reward app the Ray tests score with, a tiny VideoReward release, a
one-process gloo group, and headless Chromium for the page tests."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import deepspeed
import pytest
import ray
import torch
import torch.distributed as dist
from playwright.sync_api import sync_playwright
from ray import serve
from safetensors.torch import load_file

from core.config import load_config
from helpers import chromium, free_port
from reward_service.app import build_app
from videoreward_release import Release, write_release

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
GOLDEN_DIR = TESTS / "golden"

# Tests run tiny models: one intra-op thread is faster there and keeps parallel jobs on a
# 2-core machine from oversubscribing it.
torch.set_num_threads(1)


def pytest_addoption(parser):
    parser.addoption("--golden-dir", default=str(GOLDEN_DIR),
                     help="folder with manifest.json and the golden safetensors (default tests/golden)")


class GoldenSetError(RuntimeError):
    """A golden set that is missing, incomplete or altered."""


class GoldenSet:
    """A golden folder made by the reference code: its manifest, checked whole, and per-case tensors."""

    def __init__(self, root: Path):
        self.root = root
        manifest = root / "manifest.json"
        if not manifest.is_file():
            raise GoldenSetError(f"no golden set at {root} (manifest.json missing): restore tests/golden "
                                 "(a copy of the reference set, ../shared/golden) or pass --golden-dir")
        self.manifest = json.loads(manifest.read_text())
        self.cases: dict[str, dict] = self.manifest["cases"]
        problems = []
        for name, case in self.cases.items():
            path = root / case["file"]
            if not path.is_file():
                problems.append(f"case {name}: {case['file']} is missing")
            elif hashlib.sha256(path.read_bytes()).hexdigest() != case["sha256"]:
                problems.append(f"case {name}: {case['file']} does not match the manifest's sha256")
        if not self.cases:
            problems.append("the manifest lists no cases")
        if problems:
            raise GoldenSetError(f"golden set {root} is incomplete:\n  " + "\n  ".join(problems)
                                 + "\nrestore it from the reference set (../shared/golden) or pass --golden-dir")

    def tensors(self, name: str) -> dict[str, torch.Tensor]:
        return load_file(str(self.root / self.cases[name]["file"]))

    def atol(self, name: str) -> float:
        return float(self.cases[name]["tolerance"]["recommended"]["float64_atol"])


@pytest.fixture(scope="session")
def golden(request) -> GoldenSet:
    try:
        return GoldenSet(Path(request.config.getoption("--golden-dir")))
    except GoldenSetError as e:
        pytest.fail(str(e), pytrace=False)


def pytest_generate_tests(metafunc):
    """`golden_case`: every case the golden set's manifest lists (one test each, none skipped)."""
    if "golden_case" in metafunc.fixturenames:
        manifest = Path(metafunc.config.getoption("--golden-dir")) / "manifest.json"
        names = sorted(json.loads(manifest.read_text())["cases"]) if manifest.is_file() else ["<no manifest>"]
        metafunc.parametrize("golden_case", names)


@pytest.fixture
def no_grad():
    """For modules of pure forward checks: `pytestmark = pytest.mark.usefixtures("no_grad")`."""
    with torch.no_grad():
        yield


@pytest.fixture(scope="session")
def ray_instance():
    """One local Ray for the whole test session (2 cores: actors take fractional CPUs). Its workers can import
    the test modules, as a cluster's runtime_env would ship a user's own code (a reward backend a test registers)."""
    path = os.pathsep.join(p for p in (str(TESTS), str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, configure_logging=False,
             runtime_env={"env_vars": {"PYTHONPATH": path}})
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def serve_instance(ray_instance):
    """Ray Serve's HTTP proxy on a free localhost port; yields the base URL."""
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port, "request_timeout_s": 60})
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()


@pytest.fixture(scope="session")
def reward_app(serve_instance) -> str:
    """The motion reward service, deployed once, that the actor, learner and weight-sync tests score with."""
    cfg = load_config(REPO / "configs" / "reward_service.yaml",
                      ["reward_service.app_name=test_reward", "reward_service.num_cpus=0.1"])
    serve.run(build_app(cfg), name="test_reward", route_prefix="/test_reward")
    yield "test_reward"
    serve.delete("test_reward")


@pytest.fixture(scope="session")
def videoreward_release(tmp_path_factory) -> Release:
    """A tiny random VideoReward release in the released folder layout (tests/videoreward_release.py)."""
    return write_release(tmp_path_factory.mktemp("VideoReward"))


@pytest.fixture(scope="module")
def one_rank():
    """A one-process gloo group, as Ray Train gives each worker; the environment is restored afterwards."""
    with pytest.MonkeyPatch.context() as env:
        for key, value in dict(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", WORLD_SIZE="1",
                               LOCAL_RANK="0", LOCAL_WORLD_SIZE="1").items():
            env.setenv(key, value)
        deepspeed.init_distributed(dist_backend="gloo")
        yield
        dist.destroy_process_group()
        # DeepSpeed keeps its clone of the world group across process groups; a later module's group would
        # otherwise be handed the destroyed one's (engine init: "Group ... is not registered")
        deepspeed.utils.groups._WORLD_GROUP = None


@pytest.fixture
def browser():
    """Headless Chromium driven by Playwright."""
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium(), headless=True,
                                    args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"])
        try:
            yield browser
        finally:
            browser.close()
