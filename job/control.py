"""The small actor between the driver and the learner's rank 0 while `fit()` runs: the driver asks for a
clean stop and drains every step's metrics; rank 0 reports them and leaves its end-of-run summary."""

from __future__ import annotations

import ray


@ray.remote(num_cpus=0)
class LearnerControl:
    def __init__(self):
        self.stop, self.result = False, None
        self.pending: list[dict] = []  # reported since the last drain

    def request_stop(self) -> None:
        self.stop = True

    def stop_requested(self) -> bool:
        return self.stop

    def report(self, metrics: dict) -> None:
        self.pending.append(metrics)

    def drain(self) -> list[dict]:
        """Every step's metrics reported since the last call, in order (none is skipped)."""
        rows, self.pending = self.pending, []
        return rows

    def finish(self, result: dict) -> None:
        self.result = result

    def summary(self) -> dict | None:
        """Rank 0's end-of-run summary (step, version, resumed_from, export paths, last metrics)."""
        return self.result
