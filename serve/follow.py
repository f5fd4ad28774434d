"""A streaming replica that follows training: where new weight versions come from, and the thread that fetches them.

Two sources, one interface (`next(after, timeout_s)`: the first version newer than `after`, or None):
- `PoolVersions`: a running job's rollout pool (`launch.py train --serve`). The replica long-polls the pool's
  weight relay (`weight_sync.WeightRelay.follow`) and pulls each version from the object store, as an actor does.
- `CheckpointVersions`: a learner's output folder (`launch.py serve --follow DIR`): each complete checkpoint, its
  EMA generator (or the raw one before the EMA starts), read offline. It works for a job on another cluster
  whose output folder this machine can read, and for one that has ended.

`Follower` runs the source in a thread of its own, so fetching and building a version's generator never holds up
the replica's event loop or a stream's block; sessions switch to `Follower.latest` between blocks.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import ray
import torch
from ray.exceptions import RayActorError

from core.config import ConfigError
from core.stream.pipeline import VideoPipeline
from learner.checkpointing import checkpoint_dir, generator_weights, latest_checkpoint, read_cursor

logger = logging.getLogger(__name__)
FETCH_TIMEOUT_S = 600.0  # pulling one version's weights from the object store


class FollowEnded(Exception):
    """The source will publish no more versions (the training job's pool is gone)."""


@dataclass(frozen=True)
class NewVersion:
    version: int
    step: int | None
    published_at: float | None  # wall clock (time.time()) of publication: the switch latency's start
    weights: dict[str, torch.Tensor]


@dataclass(frozen=True)
class Weights:
    """Weights a session can play: their version, the training step that made them and a pipeline holding them."""
    version: int
    step: int | None
    published_at: float | None
    pipe: VideoPipeline


class PoolVersions:
    """The versions a running job's rollout pool relays to its actors."""

    def __init__(self, pool: ray.actor.ActorHandle, name: str):
        self.pool, self.name = pool, name

    def describe(self) -> str:
        return f"training job (rollout pool {self.name})"

    def next(self, after: int, timeout_s: float) -> NewVersion | None:
        try:
            got = ray.get(self.pool.follow_weights.remote(after, timeout_s), timeout=timeout_s + 60)
            if got is None:
                return None
            weights = ray.get(got["refs"][0], timeout=FETCH_TIMEOUT_S)
        except RayActorError as e:
            raise FollowEnded(f"the training job's rollout pool is gone ({type(e).__name__})") from None
        return NewVersion(got["version"], got["step"], got["published_at"], weights)


class CheckpointVersions:
    """The versions a learner writes as checkpoints into `output_dir` (polled every `poll_s`)."""

    def __init__(self, output_dir: str | Path, use_ema: bool = True, poll_s: float = 2.0):
        self.output_dir, self.use_ema, self.poll_s = Path(output_dir), use_ema, poll_s
        if not self.output_dir.is_dir():
            raise ConfigError(f"--follow {output_dir}: no such folder; give a training run's learner.output_dir "
                                    "(it holds checkpoints/step_XXXXXXXX)")

    def describe(self) -> str:
        return f"checkpoints in {self.output_dir}"

    def next(self, after: int, timeout_s: float) -> NewVersion | None:
        deadline = time.monotonic() + timeout_s
        while True:
            latest = latest_checkpoint(checkpoint_dir(self.output_dir))
            if latest is not None:
                try:
                    cursor = read_cursor(latest)
                    if cursor["version"] > after:
                        return NewVersion(cursor["version"], cursor["step"], (latest / "cursor.json").stat().st_mtime,
                                          generator_weights(latest, self.use_ema))
                except FileNotFoundError:  # pruned by the learner while it was read: the next poll sees a newer one
                    pass
            if time.monotonic() + self.poll_s > deadline:
                return None
            time.sleep(self.poll_s)


Source = PoolVersions | CheckpointVersions


class Follower:
    """A thread that fetches each new version from `source` and makes it playable (`make`, off the event loop);
    `latest` is what following sessions switch to. It ends when the source does, or at `stop()`."""

    POLL_S = 5.0  # one long poll: how long stop() may wait

    def __init__(self, source: Source, start: Weights, make: Callable[[dict[str, torch.Tensor]], VideoPipeline]):
        self.source, self.make = source, make
        self.latest = start
        self.received = 0
        self.errors: Counter[str] = Counter()
        self.last_error: str | None = None
        self.ended: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="weight-follower", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                new = self.source.next(self.latest.version, self.POLL_S)
                if new is not None and not self._stop.is_set():
                    self.latest = Weights(new.version, new.step, new.published_at, self.make(new.weights))
                    self.received += 1
                    logger.info("now following weight version %d (step %s)", new.version, new.step)
            except FollowEnded as e:
                self.ended = str(e)
                logger.warning("weight following ended: %s; version %d stays", e, self.latest.version)
                return
            except Exception as e:  # noqa: BLE001 - counted and shown in /v1/info; tried again
                self.errors[type(e).__name__] += 1
                self.last_error = f"{type(e).__name__}: {e}"[:300]
                logger.warning("fetching a weight version failed (tried again in %g s): %s", self.POLL_S, e)
                self._stop.wait(self.POLL_S)

    def stop(self) -> None:
        self._stop.set()

    def info(self) -> dict:
        return {"source": self.source.describe(), "versions_received": self.received, "ended": self.ended,
                "errors": dict(self.errors), "last_error": self.last_error}
