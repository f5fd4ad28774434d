"""Shared fixtures: the golden set (tests/golden by default, `--golden-dir` for another), one local Ray and
one Serve HTTP proxy per session, the reward apps the Ray tests score with (the motion scorer, and one behind a
gate the test opens), a tiny VideoReward release, a one-process gloo group, headless Chromium for the page
tests and a C++ compiler for the compiled path."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
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
from gated_reward import Gate
from helpers import NO_CHROMIUM, chromium, free_port
from job.cluster import PortInUseError, start_serve
from reward_service.app import build_app
from serve.app import build_app as build_stream_app
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
    """Ray Serve's HTTP proxy on a free localhost port, started as the commands start it; yields the base URL.
    Serve cannot bind port 0 and report it, so a port taken between probing and binding means another try."""
    for attempt in range(5):
        try:
            url = start_serve("127.0.0.1", free_port(), request_timeout_s=60, section="test")
            break
        except PortInUseError:
            if attempt == 4:
                raise
    yield url
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
def stream_app(serve_instance) -> str:
    """The streaming app on configs/serve.yaml, deployed once for the serve and browser tests; its URL."""
    cfg = load_config(REPO / "configs" / "serve.yaml", ["serve.num_cpus=0.25", "serve.app_name=stream_test"])
    serve.run(build_stream_app(cfg), name="stream_test", route_prefix="/stream_test")
    yield f"{serve_instance}/stream_test"
    serve.delete("stream_test")


@pytest.fixture(scope="session")
def gated_reward(serve_instance, tmp_path_factory) -> tuple[str, Gate]:
    """A reward app whose scores wait at a gate the test opens (tests/gated_reward.py): its name and the gate,
    open. A test that closes it decides when every score in flight finishes, and opens it again when done."""
    gate = Gate(tmp_path_factory.mktemp("gate"))
    gate.open()
    cfg = load_config(REPO / "configs" / "reward_service.yaml",
                      ["reward.backend=gated", f"reward.gate={gate.folder}", "reward_service.app_name=gated_reward",
                       "reward_service.num_cpus=0.1"])
    serve.run(build_app(cfg), name="gated_reward", route_prefix="/gated_reward")
    yield "gated_reward", gate
    gate.open()
    serve.delete("gated_reward")


@pytest.fixture(scope="session")
def videoreward_release(tmp_path_factory) -> Release:
    """A tiny random VideoReward release in the released folder layout (tests/videoreward_release.py)."""
    return write_release(tmp_path_factory.mktemp("VideoReward"))


@pytest.fixture(scope="module")
def one_rank(tmp_path_factory):
    """A one-process gloo group, as Ray Train gives each worker; the environment is restored afterwards. Its
    store is a file, not a TCP port: nothing another process could take first."""
    store = tmp_path_factory.mktemp("one_rank") / "store"
    with pytest.MonkeyPatch.context() as env:
        for key, value in dict(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1").items():
            env.setenv(key, value)
        # no MASTER_ADDR/PORT to read: rank and world size are given, so DeepSpeed must not look for MPI instead
        deepspeed.init_distributed(dist_backend="gloo", init_method=f"file://{store}", rank=0, world_size=1,
                                   auto_mpi_discovery=False)
        yield
        dist.destroy_process_group()
        # DeepSpeed keeps its clone of the world group across process groups; a later module's group would
        # otherwise be handed the destroyed one's (engine init: "Group ... is not registered")
        deepspeed.utils.groups._WORLD_GROUP = None


@pytest.fixture
def browser():
    """Headless Chromium driven by Playwright; a machine without it fails here (`make test` installs it)."""
    if chromium() is None:
        pytest.fail(NO_CHROMIUM, pytrace=False)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium(), headless=True,
                                    args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"])
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture(scope="session")
def cxx_compiler() -> str:
    """The C++ compiler torch.compile's CPU backend (inductor) builds with; a machine without one fails here
    (`make test` installs g++)."""
    found = next((c for c in ("g++", "c++", "clang++") if shutil.which(c)), None)
    if found is None:
        pytest.fail("torch.compile on CPU needs a C++ compiler (inductor's CPU backend): install g++", pytrace=False)
    return found
