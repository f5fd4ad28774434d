"""Generator weights from the learner to the rollout actors: the whole protocol in one module.

Three parties, one class each, and the followers:

    WeightPublisher   learner rank 0    makes each new version available: by broadcast when the group is
                                        formed, else by object store; re-forms a broken group
    WeightRelay       in RolloutPool    the published version and how actors get it; the group's state;
                                        counts every fallback with its reason (pool metrics `weight_sync`)
    WeightSubscriber  in RolloutWorker  joins the group, stages broadcast versions, hands the actor the
                                        weights of a version between rollouts (never inside one)
    followers         streaming replicas (serve.follow) long-poll the relay (`WeightRelay.follow`) and pull
                      each version from the object store; they never join the broadcast group, a collective
                      whose every member must keep pace with training: under broadcast, the publisher also
                      puts an object-store copy of a version while a follower has asked within FOLLOWER_TTL_S

Transports, one control call per version, never one per parameter:
- object store (everywhere; `learner.publish_backend: object_store`): one `ray.put` of the state dict in the
  actors' dtype; each actor pulls it before its next rollout;
- broadcast (`learner.publish_backend: broadcast`; NCCL on GPUs, gloo on CPUs): rank 0 and the actors form a
  process group of their own (its own TCPStore, beside Ray Train's group); a version is one packed buffer
  broadcast once, which actors stage and switch to between rollouts. Rank 0 then asks the pool whether every
  member has it: in a tree or a ring most members get it from another one, whose loss rank 0 need not see.

Group states (`WeightRelay.state`):

    object_store  no group: publishing is configured as object store, or no group has formed yet
    formed        the actors that answered joined the current group: versions go by broadcast
    broken        an actor restarted or died, a member failed a broadcast, or a join failed: the next
                  version goes by object store (a fallback, with its reason) and the publisher re-forms
                  the group for the one after, with the actors that answer at once: one lost, restarting
                  or hung is left out (logged by name), so no publish waits for it again; once it answers
                  a rollout that misses a broadcast breaks the group, and it joins the next one

Every wait is bounded by the group's timeout (`learner.broadcast_timeout_s`): a member lost mid-broadcast costs
that version a fallback, never the learner's process (NCCL's own defaults: a 10-minute timeout, then its watchdog
ends the process).

Versions only grow. A learner whose worker group Ray Train restarted resumes from its last checkpoint, behind
versions the lost workers already published: it republishes the restored weights under a new version above
all of them (`WeightRelay.restart`). The versions in between are lost: samples made with them are dropped,
and staleness is counted along the surviving line (`lineage_staleness`).

Everything Ray-free (packing, the group itself, version lineage) is at the top; the parties use Ray handles.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import Any

import ray
import torch
import torch.distributed as dist
from ray.exceptions import ObjectLostError

log = logging.getLogger(__name__)

Layout = list[tuple[str, list[int]]]
FOLLOWER_TTL_S = 60.0  # a follower that has not asked for this long is gone: no more object-store copies for it
ANSWER_S = 5.0  # an actor that does not answer a call in this long is left out of the group being re-formed


class WeightsUnavailable(RuntimeError):
    """This actor cannot get the weights of the version it was sent: it went out by broadcast before the actor
    (re)joined the group, or its object-store copy was lost with the learner process that put it (a restarted
    learner republishes under a newer version). The pool hands the prompt out again once a newer version is
    published."""


# ---------------------------------------------------------------------------------------------- transport


def pack(weights: dict[str, torch.Tensor], dtype: torch.dtype, device: torch.device | str) -> tuple[torch.Tensor, Layout]:
    """All tensors, cast to `dtype`, in one flat buffer on `device`, and the (name, shape) layout to undo it."""
    layout = [(k, list(v.shape)) for k, v in weights.items()]
    buffer = torch.empty(sum(v.numel() for v in weights.values()), dtype=dtype, device=device)
    offset = 0
    for v in weights.values():
        buffer[offset:offset + v.numel()].copy_(v.reshape(-1))
        offset += v.numel()
    return buffer, layout


def numel(layout: Layout) -> int:
    return sum(int(torch.Size(shape).numel()) for _, shape in layout)


def unpack(buffer: torch.Tensor, layout: Layout) -> dict[str, torch.Tensor]:
    """Views of `buffer` shaped as `layout` says."""
    out, offset = {}, 0
    for name, shape in layout:
        n = int(torch.Size(shape).numel())
        out[name] = buffer[offset:offset + n].view(shape)
        offset += n
    return out


Restart = tuple[int, int]  # (version restored from a checkpoint, the version it was republished as)


def lost_version(version: int, restarts: list[Restart]) -> bool:
    """Whether `version` was published by learner workers that were lost and then rolled back past it."""
    return any(restored < version < renumbered for restored, renumbered in restarts)


def lineage_staleness(current: int, made_with: int, restarts: list[Restart]) -> int:
    """Updates between the weights a sample was made with and the `current` ones, along the surviving line: a
    republished version is its restored one, so the numbers skipped at a restart do not count."""
    return current - made_with - sum(renumbered - restored for restored, renumbered in restarts
                                     if made_with <= restored and renumbered <= current)


@contextmanager
def _environ(name: str, value: str) -> Iterator[None]:
    """`name` set to `value` for the block, then as it was."""
    before = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if before is None:
            del os.environ[name]
        else:
            os.environ[name] = before


class BroadcastGroup:
    """A process group of its own from the learner's rank 0 to the actors (rank 0 hosts its TCPStore). A lost
    member costs a broadcast, never a process: gloo and NCCL alike get `timeout_s`, and a broadcast is complete
    only once the CPU has seen it complete."""

    def __init__(self, host: str, port: int, rank: int, world_size: int, backend: str, timeout_s: float,
                 store: dist.TCPStore | None = None):
        """Join the group; blocks until all `world_size` members have joined (or `timeout_s` passes). Rank 0
        passes the store `host_store` opened; the others join its port."""
        if backend not in ("gloo", "nccl"):
            raise ValueError(f"broadcast backend must be gloo or nccl, got {backend!r}")
        timeout = timedelta(seconds=timeout_s)
        store = store or dist.TCPStore(host, port, world_size, is_master=rank == 0, timeout=timeout)
        store = dist.PrefixStore(f"weights-{port}", store)
        if backend == "nccl":
            self.device = torch.device("cuda", torch.cuda.current_device())
            options = dist.ProcessGroupNCCL.Options()
            options._timeout = timeout
            # Read as the group is made. 2: on a failed or timed-out collective NCCL's watchdog aborts this group's
            # communicator and the broadcast raises; its default (3) ends the whole process.
            with _environ("TORCH_NCCL_ASYNC_ERROR_HANDLING", "2"):
                self.pg = dist.ProcessGroupNCCL(store, rank, world_size, options)
        else:
            self.device = torch.device("cpu")
            self.pg = dist.ProcessGroupGloo(store, rank, world_size, timeout)
        self.rank, self.world_size, self.backend, self.timeout_s = rank, world_size, backend, timeout_s

    def broadcast(self, buffer: torch.Tensor) -> torch.Tensor:
        """Rank 0 sends `buffer`; every other rank receives into it (in place). Returns once it completed; raises
        when it failed or did not complete within the group's timeout (a member lost)."""
        opts = dist.BroadcastOptions()
        opts.rootRank = 0
        work = self.pg.broadcast([buffer], opts)
        deadline = time.monotonic() + self.timeout_s
        while not work.is_completed():  # polled on the CPU: NCCL's wait() only makes the current stream wait
            if time.monotonic() > deadline:
                raise TimeoutError(f"weight broadcast not completed in {self.timeout_s:g} s: a member is lost")
            time.sleep(0.002)
        work.wait()  # completed: raises its failure, if any
        return buffer


def host_store(host: str, world_size: int, timeout_s: float) -> dist.TCPStore:
    """Rank 0's TCPStore on a port the OS picks as it binds (`.port`): no other process can take the port between
    choosing and binding it, as one could with a port probed free and bound later. Members join that port."""
    return dist.TCPStore(host, 0, world_size, is_master=True, timeout=timedelta(seconds=timeout_s),
                         wait_for_workers=False)


def _describe(e: BaseException) -> str:
    """One line: the remote exception inside Ray's RayTaskError, or `e`."""
    cause = getattr(e, "cause", None) or e
    return " ".join(f"{type(cause).__name__}: {cause}".split())[:300]


def _listed(failures: dict[str, str]) -> str:
    return "; ".join(f"{name} ({why})" for name, why in failures.items())


async def _failures(calls: dict[str, Any], timeout_s: float) -> dict[str, str]:
    """Why each of `calls` (name: a Ray call in flight) failed or gave no answer within `timeout_s`; {} when all
    answered."""
    if not calls:
        return {}
    tasks = {name: asyncio.ensure_future(call) for name, call in calls.items()}
    await asyncio.wait(tasks.values(), timeout=timeout_s)
    failed = {}
    for name, task in tasks.items():
        if not task.done():
            task.cancel()
            failed[name] = f"no answer in {timeout_s:g} s"
        elif task.exception() is not None:
            failed[name] = _describe(task.exception())
    return failed


# ---------------------------------------------------------------------------------------------- learner side


class WeightPublisher:
    """Learner rank 0: `publish(version, weights)` makes `weights` the actors' weights of `version`."""

    def __init__(self, pool: ray.actor.ActorHandle, dtype: torch.dtype, broadcast: bool = False,
                 group_backend: str = "gloo", timeout_s: float = 600.0):
        self.pool, self.dtype = pool, dtype
        self.broadcast, self.group_backend, self.timeout_s = broadcast, group_backend, timeout_s
        self.group: BroadcastGroup | None = None
        self.not_formed = ""  # why the last attempt to form a group failed
        self.syncs: Counter[str] = Counter()  # versions sent per transport
        if broadcast:
            self._form(timeout_s)  # the first group waits (bounded) for actors still starting

    def _form(self, answer_s: float) -> None:
        """Form a new group (rank 0 hosted here) with the actors that answer within `answer_s`; on failure, say why."""
        self.group, self.not_formed = None, ""
        members = ray.get(self.pool.weight_group_members.remote(answer_s))
        if not members:
            self.not_formed = "group_not_formed: no actor answered"
        else:
            host, world = ray.util.get_node_ip_address(), len(members) + 1
            store = host_store(host, world, self.timeout_s)
            joined = self.pool.form_weight_group.remote(host, store.port, self.group_backend, self.timeout_s, members)
            try:
                group = BroadcastGroup(host, store.port, 0, world, self.group_backend, self.timeout_s, store)
            except Exception as e:  # noqa: BLE001 - an actor that cannot join: versions go by object store
                group, self.not_formed = None, f"group_not_formed: {_describe(e)}"
            refusal = ray.get(joined)  # bounded: the pool waits for the joins at most the timeout and ANSWER_S
            if refusal is not None:
                self.not_formed = refusal
            elif group is not None:
                self.group = group
        if self.not_formed:
            log.warning("weight broadcast group not formed (%s); versions go by object store", self.not_formed)

    def publish(self, version: int, weights: dict[str, torch.Tensor], step: int = 0) -> float:
        """Send `version` (made at training `step`) by broadcast if the group is formed, else by object store (a
        counted fallback when broadcast is configured); returns the seconds spent."""
        start = time.perf_counter()
        reason = None
        if self.group is not None:
            buffer, layout = pack(weights, self.dtype, self.group.device)
            reason = ray.get(self.pool.begin_broadcast.remote(version, layout, step))
            if reason is None:
                try:
                    self.group.broadcast(buffer)
                except Exception as e:  # noqa: BLE001 - a member lost (or timed out): resend by object store
                    reason = f"broadcast_failed: {_describe(e)}"
                else:  # rank 0's part is done, not the members' (in a tree or ring, some get it from another member)
                    reason = ray.get(self.pool.end_broadcast.remote())  # bounded, as the members' waits are
            if reason is None:
                self.syncs["broadcast"] += 1
                if ray.get(self.pool.wants_weight_copy.remote()):  # a streaming replica follows the versions
                    ray.get(self.pool.offer_weights.remote(version, [self._put(weights)]))
                    self.syncs["follower_copy"] += 1
                return time.perf_counter() - start
        elif self.broadcast:
            reason = self.not_formed or "group_not_formed"
        ray.get(self.pool.publish.remote(version, [self._put(weights)], reason, step))
        self.syncs["object_store"] += 1
        if self.broadcast:  # the group is stale or missing: re-form it for the next version, waiting for no one lost
            self._form(min(self.timeout_s, ANSWER_S))
        return time.perf_counter() - start

    def _put(self, weights: dict[str, torch.Tensor]) -> ray.ObjectRef:
        return ray.put({k: v.to(self.dtype) for k, v in weights.items()})


# ---------------------------------------------------------------------------------------------- pool side


class WeightRelay:
    """The pool's record of the published version and of the broadcast group; no Ray actor of its own."""

    def __init__(self) -> None:
        self.version = 0
        self.ref = None  # object-store ref of the current version; None when it went (or goes) by broadcast
        self.state = "object_store"
        self.epoch = 0  # groups formed so far: a rollout lost before the current one formed says nothing of it
        self.members: dict[str, Any] = {}  # the current group's actors by name, in rank order (ranks 1, 2, ...)
        self.left_out: dict[str, str] = {}  # actors that did not answer when the group was last formed, and why
        self.timeout_s = 0.0  # the current group's timeout
        self.fallbacks: Counter[str] = Counter()  # object-store publishes that should have been broadcasts, by reason
        self.broken_by = ""
        self.receiving: asyncio.Task | None = None
        self.restarts: list[Restart] = []
        self.step = 0  # the training step that made the current version
        self.published_at = time.time()  # wall clock of its publication: followers measure publish-to-frame from it
        self.follower_ref = None  # object-store copy of the current version for followers (None: none yet)
        self.follower_asked = float("-inf")  # monotonic time a follower last asked

    def restart(self, restored: int) -> int:
        """A restarted learner resumed the weights of version `restored`, which the lost one had published past:
        the version to republish them as (above every version seen). Lost versions stay lost."""
        if restored >= self.version:
            raise ValueError(f"restored version {restored} is not behind the published {self.version}: no restart")
        self.restarts.append((restored, self.version + 1))
        return self.version + 1

    def _check_newer(self, version: int) -> None:
        if version == self.version and self.ref is None and version > 0:
            return  # resending by object store a version whose broadcast did not complete
        if version <= self.version:
            raise ValueError(f"weight version {version} is not newer than the published {self.version}")

    def _published(self, version: int, step: int, ref) -> None:
        self.version, self.step, self.published_at = version, step, time.time()
        self.ref = self.follower_ref = ref

    def publish(self, version: int, ref, reason: str | None = None, step: int = 0) -> None:
        """`ref` (an object-store ref to a state dict) is the weights of `version`, made at training `step`;
        `reason` says why it was not broadcast (None: object store is the configured transport)."""
        self._check_newer(version)
        self._published(version, step, ref)
        if reason is not None:
            kind = reason.split(":", 1)[0]
            self.fallbacks[kind] += 1
            log.warning("weight version %d goes by object store instead of broadcast: %s", version, reason)

    def _break(self, why: str) -> None:
        if self.state == "formed":
            self.state, self.broken_by = "broken", why
            log.warning("weight broadcast group broken: %s", why)

    async def answering(self, actors: dict[str, Any], timeout_s: float) -> list[str]:
        """The names of `actors` that answer a call within `timeout_s`: the next group's members. One lost,
        restarting or hung is left out, so that forming waits for no one who cannot join."""
        self.left_out = await _failures({name: actor.ready.remote() for name, actor in actors.items()}, timeout_s)
        if self.left_out:
            log.warning("weight broadcast group forms without %s", _listed(self.left_out))
        return [name for name in actors if name not in self.left_out]

    async def form(self, members: dict[str, Any], host: str, port: int, backend: str, timeout_s: float) -> str | None:
        """Have the i-th of `members` join the group hosted by the learner's rank 0 as rank i + 1; None when formed,
        else why not."""
        world = len(members) + 1
        joins = {name: actor.join_weight_group.remote(host, port, i + 1, world, backend, timeout_s)
                 for i, (name, actor) in enumerate(members.items())}
        failed = await _failures(joins, timeout_s + ANSWER_S)
        if failed:  # publication falls back to the object store
            self.state, self.broken_by, self.members = "broken", f"group_not_formed: {_listed(failed)}", {}
            return self.broken_by
        self.state, self.broken_by, self.members, self.timeout_s = "formed", "", dict(members), timeout_s
        self.epoch += 1
        return None

    def begin_broadcast(self, version: int, layout: Layout, step: int = 0) -> str | None:
        """The one control call of a broadcast sync: if the group is formed, have every member receive `version`
        (the learner then broadcasts it) and return None; else return why not (the learner then publishes by
        object store)."""
        self._check_newer(version)
        if self.state != "formed":
            return self.broken_by or "group_not_formed"
        self._published(version, step, None)
        self.receiving = asyncio.get_running_loop().create_task(
            self._receive(version, layout, dict(self.members), self.epoch))
        return None

    async def _receive(self, version: int, layout: Layout, members: dict[str, Any], epoch: int) -> str | None:
        """The members' side of the broadcast of `version`: None when all have it, else why not, naming the members
        that failed it. A failure breaks the group (the version goes by object store and re-forms it) unless it
        has been re-formed since."""
        calls = {name: actor.receive_weights.remote(version, layout) for name, actor in members.items()}
        failed = await _failures(calls, self.timeout_s + ANSWER_S)
        if not failed:
            return None
        why = f"broadcast_failed: version {version}: {_listed(failed)}"
        if epoch == self.epoch:
            self._break(why)
        else:
            log.warning("an earlier weight broadcast group failed: %s", why)
        return why

    async def end_broadcast(self) -> str | None:
        """Once rank 0's side of the current broadcast completed: None when every member has the version too, else
        why not (the learner then publishes it by object store)."""
        return await self.receiving

    def refs_for(self, name: str) -> list:
        """What a rollout on actor `name` is sent: [the object-store ref] of the current version, [None] for a
        broadcast version to a member, [] to an actor outside the group (a broadcast it must not wait for)."""
        return [self.ref] if self.ref is not None or name in self.members else []

    def wants_copy(self) -> bool:
        """Whether a follower asked within FOLLOWER_TTL_S: then a broadcast version also goes to the object store."""
        return time.monotonic() - self.follower_asked < FOLLOWER_TTL_S

    def offer(self, version: int, ref) -> None:
        """`ref` is an object-store copy of the broadcast `version`, for followers (ignored once a newer one is out)."""
        if version == self.version:
            self.follower_ref = ref

    async def follow(self, after: int, timeout_s: float) -> dict | None:
        """Wait up to `timeout_s` for a version newer than `after` that followers can pull: {"version", "step",
        "published_at", "refs": [object-store ref]}, or None. A long poll: the follower asks again at once."""
        deadline = time.monotonic() + timeout_s
        while True:
            self.follower_asked = time.monotonic()
            if self.version > after and self.follower_ref is not None:
                return {"version": self.version, "step": self.step, "published_at": self.published_at,
                        "refs": [self.follower_ref]}
            if self.follower_asked >= deadline:
                return None
            await asyncio.sleep(min(0.1, deadline - self.follower_asked))

    def on_actor_lost(self, name: str, sent_epoch: int) -> None:
        """A rollout died with actor `name`: a restarted actor is in no group formed before it restarted. One
        outside the current group does not break it."""
        if sent_epoch == self.epoch and name in self.members:
            self._break(f"actor_restarted: {name}")

    def on_weights_unavailable(self, name: str, sent_version: int) -> None:
        """Actor `name` had no broadcast of `sent_version` (it is in no group that sent it): unless a newer version
        has gone out since, the group is missing an actor that answers, and the next one takes it in."""
        if sent_version == self.version and self.ref is None:  # not since sent again by object store
            self._break(f"actor_missed_broadcast: {name}")

    def metrics(self) -> dict:
        return {"version": self.version, "state": self.state, "broken_by": self.broken_by or None,
                "groups_formed": self.epoch, "members": list(self.members), "left_out": dict(self.left_out),
                "fallbacks": dict(self.fallbacks), "restarts": list(self.restarts)}


# ---------------------------------------------------------------------------------------------- actor side


class WeightSubscriber:
    """An actor's side: which version its model holds, the group it is in, and broadcast versions staged."""

    def __init__(self, name: str, dtype: torch.dtype):
        self.name, self.dtype = name, dtype
        self.version = 0
        self.group: BroadcastGroup | None = None
        self.timeout_s = 0.0
        self.staged: dict[int, asyncio.Future] = {}

    def join(self, host: str, port: int, rank: int, world_size: int, backend: str, timeout_s: float) -> None:
        self.group = BroadcastGroup(host, port, rank, world_size, backend, timeout_s)
        self.timeout_s = timeout_s

    def _future(self, version: int) -> asyncio.Future:
        return self.staged.setdefault(version, asyncio.get_running_loop().create_future())

    async def receive(self, version: int, layout: Layout) -> None:
        """Take part in the broadcast of `version` and stage it; the model switches at the next rollout. The
        broadcast runs off the event loop (a lost member holds it up to the group's timeout); when it fails, a
        rollout waiting for `version` fails at once with WeightsUnavailable (its prompt is handed out again)."""
        if self.group is None:
            raise WeightsUnavailable(f"{self.name} is not in the weight broadcast group")
        buffer = torch.empty(numel(layout), dtype=self.dtype, device=self.group.device)
        try:
            await asyncio.to_thread(self.group.broadcast, buffer)
        except Exception as e:
            staged = self._future(version)
            if not staged.done():
                staged.set_exception(WeightsUnavailable(f"{self.name}: the broadcast of version {version} failed "
                                                        f"({_describe(e)})"))
                staged.exception()  # retrieved here too: asyncio logs nothing when no rollout awaits it
            raise
        self._future(version).set_result(unpack(buffer, layout))

    async def weights_of(self, version: int, refs: list) -> dict[str, torch.Tensor] | None:
        """The state dict of `version` when the model holds another one (None: nothing to load): from the
        object store when `refs[0]` is a ref, else the staged broadcast (none when `refs` is empty)."""
        if version == self.version:
            return None
        if refs and refs[0] is not None:
            try:
                return await refs[0]
            except ObjectLostError as e:  # its owner, the learner's rank 0, died: a restart republishes them
                raise WeightsUnavailable(f"{self.name}: the weights of version {version} were lost with the "
                                         f"process that published them ({type(e).__name__})") from None
        if not refs or self.group is None:
            raise WeightsUnavailable(f"{self.name} missed the broadcast of version {version} (it is in no group "
                                     "that sent it)")
        return await asyncio.wait_for(self._future(version), self.timeout_s)

    def loaded(self, version: int) -> None:
        """The model now holds `version`; staged older versions are dropped."""
        self.version = version
        self.staged = {v: f for v, f in self.staged.items() if v > version}
