"""Where a learner worker's samples come from: the live actor pool, or a recorded Parquet file.

`PoolSamples` asks the `RolloutPool` for fresh samples (the pool drops stale ones and counts
them); each worker asks for its own, so workers never train on the same sample. `ParquetSamples`
replays a recorded run (core.records.sample Parquet) deterministically: iteration i of rank r reads a
fixed slice, so a resumed run sees exactly the samples an uninterrupted one would.
"""

from __future__ import annotations

import time

import ray

from core.records.sample import Sample, from_record_batch, read_parquet


class SampleTimeoutError(RuntimeError):
    """No sample arrived within learner.sample_timeout_s."""


class PoolSamples:
    def __init__(self, pool: ray.actor.ActorHandle, timeout_s: float):
        self.pool = pool
        self.timeout_s = timeout_s

    def next(self, step: int, n: int) -> list[Sample]:
        samples: list[Sample] = []
        deadline = time.monotonic() + self.timeout_s
        while len(samples) < n:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                metrics = ray.get(self.pool.metrics.remote())
                raise SampleTimeoutError(
                    f"step {step}: got {len(samples)} of {n} samples in learner.sample_timeout_s={self.timeout_s}s. "
                    f"Pool: queue {metrics['queue_depth']}, in flight {metrics['in_flight']}, drops {metrics['drops']}, "
                    f"actor errors {[a['last_error'] for a in metrics['actors'].values() if a['last_error']]}, "
                    f"dead actors {[k for k, a in metrics['actors'].items() if a['dead']]}. Check the reward service and "
                    "the actors, or raise learner.sample_timeout_s for slow rollouts.")
            for batch in ray.get(self.pool.get.remote(n - len(samples), min(remaining, 30.0))):
                samples.extend(from_record_batch(batch))
        return samples


class ParquetSamples:
    def __init__(self, path: str, rank: int, world_size: int):
        self.samples = read_parquet(path)
        if not self.samples:
            raise ValueError(f"learner.samples_parquet {path} holds no samples")
        self.rank, self.world_size = rank, world_size

    def next(self, step: int, n: int) -> list[Sample]:
        start = (step * self.world_size + self.rank) * n
        return [self.samples[(start + i) % len(self.samples)] for i in range(n)]
