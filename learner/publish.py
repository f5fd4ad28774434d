"""Publishing generator weights to the rollout actors: one object-store put and one control call per version.

Rank 0 puts the whole state dict (in the actors' dtype) into the object store once and hands the
pool a single reference; each actor pulls it between rollouts (`RolloutWorker._load_weights`),
so a sync is one `ray.put` plus one `RolloutPool.publish` call, never one call per parameter.
"""

from __future__ import annotations

import time

import ray
import torch


class ObjectStorePublisher:
    def __init__(self, pool: ray.actor.ActorHandle, dtype: torch.dtype):
        self.pool = pool
        self.dtype = dtype

    def publish(self, version: int, weights: dict[str, torch.Tensor]) -> float:
        """Make `weights` the actors' weights of `version`; returns the seconds spent."""
        start = time.perf_counter()
        ref = ray.put({k: v.to(self.dtype) for k, v in weights.items()})
        ray.get(self.pool.publish.remote(version, [ref]))
        return time.perf_counter() - start
