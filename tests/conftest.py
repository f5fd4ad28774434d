"""Shared test options: `--golden-dir` points at a golden set made by the reference code."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parent.parent


# Tests run tiny models: one intra-op thread is faster there and keeps parallel jobs on a
# 2-core machine from oversubscribing it.
torch.set_num_threads(1)


def pytest_addoption(parser):
    parser.addoption("--golden-dir", default=str(REPO_ROOT.parent / "shared" / "golden"),
                     help="folder with manifest.json and the golden safetensors (default ../shared/golden)")


class GoldenSet:
    """A golden folder: its manifest and lazily loaded per-case tensors."""

    def __init__(self, root: Path):
        self.root = root
        self.manifest = json.loads((root / "manifest.json").read_text())

    def case(self, name: str) -> dict:
        if name not in self.manifest["cases"]:
            pytest.skip(f"golden set {self.root} has no case {name!r}")
        return self.manifest["cases"][name]

    def tensors(self, name: str) -> dict[str, torch.Tensor]:
        from safetensors.torch import load_file
        return load_file(str(self.root / self.case(name)["file"]))

    def atol(self, name: str) -> float:
        return float(self.case(name)["tolerance"]["recommended"]["float64_atol"])


@pytest.fixture(scope="session")
def golden(request) -> GoldenSet:
    root = Path(request.config.getoption("--golden-dir"))
    if not (root / "manifest.json").is_file():
        pytest.skip(f"no golden set at {root} (pass --golden-dir)")
    return GoldenSet(root)


@pytest.fixture
def no_grad():
    """For modules of pure forward checks: `pytestmark = pytest.mark.usefixtures("no_grad")`."""
    with torch.no_grad():
        yield


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def ray_instance():
    """One local Ray for the whole test session (2 cores: actors take fractional CPUs)."""
    import ray

    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def serve_instance(ray_instance):
    """Ray Serve's HTTP proxy on a free localhost port; yields the base URL."""
    from ray import serve

    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port, "request_timeout_s": 60})
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()
