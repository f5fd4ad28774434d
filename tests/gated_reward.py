"""A reward backend the test holds: the motion scorer behind a gate, so a test decides when scoring happens.

`reward.backend: gated` with `reward.gate: <folder>`. Each call writes `entered-<n>` into the folder (the moment
a score is in flight, visible to the test) and scores only once the test has written `open` there. The wait is
bounded (`max_wait_s`): a test that forgets its gate gets a failed score, not a hang. Registered on import, here
and in every Ray worker that unpickles the config (the test session's Ray puts tests/ on PYTHONPATH).
"""

from __future__ import annotations

import itertools
import time
from pathlib import Path
from typing import Literal

from core.config import RewardBackendConfig
from core.reward.base import RewardScore, VideoInput
from core.reward.motion import MotionScorer
from core.reward.registry import register_backend


class GatedRewardConfig(RewardBackendConfig):
    backend: Literal["gated"] = "gated"
    gate: str
    max_wait_s: float = 120.0


class GatedMotion:
    name = "gated"

    def __init__(self, gate: Path, max_wait_s: float):
        self.gate, self.max_wait_s = gate, max_wait_s
        self.scorer, self.calls = MotionScorer(), itertools.count()

    @classmethod
    def from_config(cls, cfg: GatedRewardConfig) -> "GatedMotion":
        return cls(Path(cfg.gate), cfg.max_wait_s)

    def score_batch(self, videos: list[VideoInput]) -> list[RewardScore]:
        (self.gate / f"entered-{next(self.calls)}").touch()
        deadline = time.monotonic() + self.max_wait_s
        while not (self.gate / "open").exists():
            if time.monotonic() > deadline:
                raise TimeoutError(f"the gate {self.gate} was not opened within {self.max_wait_s} s")
            time.sleep(0.01)
        return self.scorer.score_batch(videos)

    def info(self) -> dict:
        return {"backend": self.name, "gate": str(self.gate)}


class Gate:
    """The test's side: a folder, how many scores entered it, and the latch that lets them through."""

    def __init__(self, folder: Path):
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)

    def entered(self) -> int:
        return len(list(self.folder.glob("entered-*")))

    def wait_entered(self, n: int = 1, timeout_s: float = 240.0) -> None:
        deadline = time.monotonic() + timeout_s
        while self.entered() < n:
            assert time.monotonic() < deadline, f"{self.entered()} of {n} scores reached the gate in {timeout_s} s"
            time.sleep(0.05)

    def open(self) -> None:
        (self.folder / "open").touch()

    def close(self) -> None:
        (self.folder / "open").unlink(missing_ok=True)


register_backend(GatedRewardConfig, GatedMotion)
