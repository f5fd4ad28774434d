"""The rollout actor pool: hands out prompts, keeps a bounded sample queue, and loses nothing.

`RolloutPool` is an async Ray actor. One dispatch loop per rollout actor takes the next prompt
(`core.records.prompts.PromptSource`) whenever fewer than `queue_size` samples exist (queued or being
made), so a learner that falls behind makes actors wait rather than samples drop. A rollout
lost with its actor (the actor restarts, up to `max_restarts`) is released and handed out
again; a prompt is acknowledged only once its sample is consumed or dropped for a counted
reason, so none is lost or duplicated. The pool relays published weights to its actors
(`weight_sync.WeightRelay`: object store or broadcast group); actors switch only between
rollouts, and samples older than `max_staleness` versions are dropped by `get` and counted. After a
learner restart (`learner_started`), samples made with the versions the lost learner published past its
checkpoint are dropped as `lost_weights`, and staleness counts along the surviving versions.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter, deque
from pathlib import Path

import pyarrow as pa
import ray
import torch
from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError

from actors.worker import RolloutWorker
from core.config import REPO_ROOT, Config
from core.records.prompts import PromptSource, WorkItem
from weight_sync import Layout, WeightRelay, WeightsUnavailable, lineage_staleness, lost_version


def _prompts_path(path: str) -> Path:
    p = Path(path)
    return p if p.is_absolute() or p.exists() else REPO_ROOT / p


@ray.remote(num_cpus=0)
class RolloutPool:
    def __init__(self, cfg: Config, name: str = "rollout", prompt_state: dict | None = None):
        self.cfg = cfg
        a = cfg.actors
        path = _prompts_path(a.prompts)
        self.source = (PromptSource.from_state(path, a.prompt_seed, (0, 1), prompt_state) if prompt_state
                       else PromptSource(path, seed=a.prompt_seed))
        worker_cls = ray.remote(RolloutWorker)
        self.names = [f"{name}-actor-{i}" for i in range(a.num_actors)]
        self.workers = [worker_cls.options(name=n, num_cpus=a.num_cpus, num_gpus=a.num_gpus, max_restarts=a.max_restarts,
                                           max_task_retries=0).remote(cfg, n) for n in self.names]
        self.queue: deque[tuple[pa.RecordBatch, WorkItem]] = deque()
        self.in_flight: dict[int, WorkItem] = {}
        self.waiting_since: dict[int, float] = {}  # actors idle because the queue is full
        self.changed = asyncio.Condition()
        self.weights = WeightRelay()
        self.drops: Counter[str] = Counter()
        self.delivered = self.duplicates = 0
        self.errors: dict[str, str] = {}  # last worker error per actor
        self.dead: dict[int, str] = {}  # actors retired after dying past their restarts
        self.stats = [Counter() for _ in self.workers]
        self.started = time.monotonic()
        self.stopping = False
        self.tasks: list[asyncio.Task] = []
        self.video_requests: deque[str] = deque()  # MP4 paths the next rollouts write their frames to
        self.videos: list[str] = []

    async def ready(self) -> int:
        """Wait until every actor is constructed (generator, text encoder, codec loaded); how many there are."""
        await asyncio.gather(*(w.ready.remote() for w in self.workers))
        return len(self.workers)

    async def encode(self, prompts: list[str]) -> list[torch.Tensor]:
        """The prompts' valid context rows (CPU, rollout dtype), encoded by the first live actor: how a job encodes
        its negative prompt once, with the text encoder the actors hold, for every learner worker."""
        live = [w for i, w in enumerate(self.workers) if i not in self.dead]
        if not live:
            raise RuntimeError(f"no live rollout actor to encode prompts with: {self.dead}")
        return await live[0].encode.remote(prompts)

    async def start(self) -> None:
        """Start one dispatch loop per actor (idempotent)."""
        if not self.tasks:
            self.started = time.monotonic()
            self.tasks = [asyncio.get_running_loop().create_task(self._dispatch(i)) for i in range(len(self.workers))]

    async def _dispatch(self, i: int) -> None:
        stats = self.stats[i]
        while not self.stopping:
            self.waiting_since[i] = time.monotonic()
            async with self.changed:
                await self.changed.wait_for(
                    lambda: self.stopping or len(self.queue) + len(self.in_flight) < self.cfg.actors.queue_size)
            stats["wait_s"] += time.monotonic() - self.waiting_since.pop(i)
            if self.stopping:
                return
            item = self.source.take()
            self.in_flight[i] = item
            video = self.video_requests.popleft() if self.video_requests else None
            sent_version, sent_epoch = self.weights.version, self.weights.epoch
            refs = self.weights.refs_for(self.names[i])
            try:
                result = await self.workers[i].rollout.remote(item, sent_version, refs, video)
            except (RayActorError, ActorDiedError, ActorUnavailableError) as e:
                # The rollout died with its actor: hand the prompt out again. An actor that keeps
                # dying past its restarts is retired so its loop stops taking prompts.
                stats["lost_rollouts"] += 1
                if not isinstance(e, ActorUnavailableError):  # "restarting" is not another death: wait it out
                    stats["lost_in_a_row"] += 1
                self.weights.on_actor_lost(self.names[i], sent_epoch)
                self.source.release(item)
                if video:
                    self.video_requests.appendleft(video)
                if stats["lost_in_a_row"] > self.cfg.actors.max_restarts + 1:
                    self.dead[i] = f"{type(e).__name__}: {e}"[:500]
                    return
                await asyncio.sleep(0.5)  # let Ray restart the actor
                continue
            except Exception as e:  # a bug or bad weights in the worker: count it, never lose the prompt silently
                cause = getattr(e, "cause", None) or e  # the worker's own exception inside Ray's RayTaskError
                self.errors[self.names[i]] = f"{type(cause).__name__}: {cause}"[:500]
                if isinstance(cause, WeightsUnavailable):  # the prompt waits for the next version, never dropped
                    stats["weights_unavailable"] += 1
                    self.weights.on_weights_unavailable(self.names[i], sent_version)
                    self.source.release(item)
                    await self._newer_than(sent_version, refs)
                    continue
                self.drops["worker_error"] += 1
                self.source.ack(item)
                continue
            finally:
                del self.in_flight[i]
                async with self.changed:
                    self.changed.notify_all()
            stats["lost_in_a_row"] = 0
            if video and "decode_s" in result.timings:
                self.videos.append(video)
            for key, seconds in result.timings.items():
                stats[key] += seconds
            if result.drop_reason:
                self.drops[result.drop_reason] += 1
                self.source.ack(item)
            else:
                stats["rollouts"] += 1
                self.queue.append((result.batch, item))
            async with self.changed:
                self.changed.notify_all()

    async def _newer_than(self, version: int, refs: list, timeout_s: float = 30.0) -> None:
        """Wait until the pool has other weights than the `version` sent as `refs`: a newer version, or that one again
        by object store after its broadcast failed (or the pool stops); bounded, so a dispatch loop whose actor
        lacks the weights of the current version looks again at least every `timeout_s`, rather than failing
        rollout after rollout."""
        sent = refs[0] if refs else None
        deadline = time.monotonic() + timeout_s
        while (self.weights.version <= version and self.weights.ref is sent and not self.stopping
               and time.monotonic() < deadline):
            await asyncio.sleep(0.2)

    def request_video(self, path: str) -> None:
        """Have the next rollout also write its decoded frames to the MP4 `path` (a look at the current policy)."""
        self.video_requests.append(path)

    def publish(self, version: int, refs: list, reason: str | None = None, step: int = 0) -> None:
        """Make `refs[0]` (an object-store ref to a state dict) the weights of `version`, made at training `step`;
        `reason` says why it was not broadcast (None: the object store is the configured transport)."""
        self.weights.publish(version, refs[0], reason, step)

    async def follow_weights(self, after: int, timeout_s: float) -> dict | None:
        """For a streaming replica following training: the first version newer than `after` within `timeout_s`
        (`WeightRelay.follow`)."""
        return await self.weights.follow(after, timeout_s)

    def wants_weight_copy(self) -> bool:
        return self.weights.wants_copy()

    def offer_weights(self, version: int, refs: list) -> None:
        """`refs[0]`: an object-store copy of the broadcast `version`, for followers."""
        self.weights.offer(version, refs[0])

    def learner_started(self, version: int) -> dict:
        """A learner (re)starting with the weights of `version`: {"version": the version to publish them as,
        "restarts": every restart so far, "publish": whether the actors lack those weights}. Behind the
        published version, its worker group was restarted from a checkpoint: the weights are republished under
        a new, higher version, and samples of the lost versions are dropped."""
        if version < self.weights.version:
            version = self.weights.restart(version)
        return {"version": version, "restarts": list(self.weights.restarts), "publish": version != self.weights.version}

    async def weight_group_members(self, timeout_s: float) -> list[str]:
        """The actors, retired ones aside, that answer within `timeout_s`: the next broadcast group's members."""
        live = {n: w for i, (n, w) in enumerate(zip(self.names, self.workers)) if i not in self.dead}
        return await self.weights.answering(live, timeout_s)

    async def form_weight_group(self, host: str, port: int, backend: str, timeout_s: float, members: list[str]) -> str | None:
        """Have `members` join the broadcast group hosted by the learner's rank 0; None, or why it did not form."""
        workers = dict(zip(self.names, self.workers))
        return await self.weights.form({n: workers[n] for n in members}, host, port, backend, timeout_s)

    def begin_broadcast(self, version: int, layout: Layout, step: int = 0) -> str | None:
        """The one control call of a broadcast sync: None when every member will receive `version`, else why not."""
        return self.weights.begin_broadcast(version, layout, step)

    async def end_broadcast(self) -> str | None:
        """After the learner's rank 0 sent the version begun: None when every member has it, else why not."""
        return await self.weights.end_broadcast()

    async def get(self, n: int = 1, timeout_s: float | None = None) -> list[pa.RecordBatch]:
        """Up to `n` fresh samples, waiting at most `timeout_s` in all (None: until `n` arrive); stale ones
        are dropped and counted."""
        out: list[pa.RecordBatch] = []
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while len(out) < n:
            async with self.changed:
                remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
                try:
                    await asyncio.wait_for(self.changed.wait_for(lambda: self.queue), remaining)
                except asyncio.TimeoutError:
                    break
                batch, item = self.queue.popleft()
                self.changed.notify_all()  # room for another rollout
            if not self.source.ack(item):  # already acknowledged: a second copy of the same prompt
                self.duplicates += 1
                continue
            made_with = batch.column("weight_version")[0].as_py()
            if lost_version(made_with, self.weights.restarts):
                self.drops["lost_weights"] += 1
                continue
            if lineage_staleness(self.weights.version, made_with, self.weights.restarts) > self.cfg.actors.max_staleness:
                self.drops["stale"] += 1
                continue
            self.delivered += 1
            out.append(batch)
        return out

    def metrics(self) -> dict:
        now = time.monotonic()
        elapsed = max(now - self.started, 1e-9)
        per_actor = {}
        for i, (name, s) in enumerate(zip(self.names, self.stats)):
            waiting = now - self.waiting_since[i] if i in self.waiting_since else 0.0
            per_actor[name] = {"rollouts": s["rollouts"], "rollouts_per_s": s["rollouts"] / elapsed,
                               **{k: round(s[k], 4) for k in ("generate_s", "decode_s", "score_s", "load_weights_s")},
                               "wait_s": round(s["wait_s"] + waiting, 4), "lost_rollouts": s["lost_rollouts"],
                               "weights_unavailable": s["weights_unavailable"],
                               "busy": i in self.in_flight, "waiting": i in self.waiting_since, "dead": self.dead.get(i),
                               "last_error": self.errors.get(name)}
        return {"version": self.weights.version, "queue_depth": len(self.queue), "in_flight": len(self.in_flight),
                "delivered": self.delivered, "drops": dict(self.drops), "duplicates_suppressed": self.duplicates,
                "videos": list(self.videos), "weight_sync": self.weights.metrics(),
                "elapsed_s": elapsed, "actors": per_actor}

    def state(self) -> dict:
        """Prompt cursor to checkpoint: restoring it re-issues what was handed out but not consumed."""
        return self.source.state()

    async def stop(self) -> None:
        self.stopping = True
        async with self.changed:
            self.changed.notify_all()
        for task in self.tasks:
            task.cancel()
        for w in self.workers:
            ray.kill(w, no_restart=True)
