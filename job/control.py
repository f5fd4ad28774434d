"""The small actor between the driver and the learner's rank 0 while `fit()` runs: the driver asks for a
clean stop and drains every step's metrics; rank 0 says when it is ready, reports every step, and leaves its
end-of-run summary. It outlives learner worker groups, so a restarted rank 0 learns how far the lost one got."""

from __future__ import annotations

import ray


@ray.remote(num_cpus=0)
class LearnerControl:
    def __init__(self):
        self.stop, self.result = False, None
        self.pending: list[dict] = []  # reported since the last drain
        self.ready_info: dict | None = None
        self.last_step = 0  # the furthest step any rank 0 reported

    def ready(self, info: dict) -> dict:
        """Rank 0 built its models and restored its checkpoint (`info`: step, ...): {"restart": whether a worker
        group was ready before (this one replaces it), "steps_redone": the steps it reported past `step`}."""
        restart = self.ready_info is not None
        self.ready_info = info
        return {"restart": restart, "steps_redone": max(0, self.last_step - info["step"])}

    def readiness(self) -> dict | None:
        """What the latest rank 0 said when it became ready (None before that)."""
        return self.ready_info

    def request_stop(self) -> None:
        self.stop = True

    def stop_requested(self) -> bool:
        return self.stop

    def report(self, metrics: dict) -> None:
        self.pending.append(metrics)
        self.last_step = max(self.last_step, metrics["step"])

    def drain(self) -> list[dict]:
        """Every step's metrics reported since the last call, in order (none is skipped)."""
        rows, self.pending = self.pending, []
        return rows

    def finish(self, result: dict) -> None:
        self.result = result

    def summary(self) -> dict | None:
        """Rank 0's end-of-run summary (step, version, resumed_from, export paths, last metrics)."""
        return self.result
