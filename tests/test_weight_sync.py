"""Weight sync from the learner's rank 0 to the rollout actors (weight_sync.py; gloo here, NCCL on GPUs): packing,
exact weights in the actors, the group's states, and the object-store fallback, counted with its reason, when
an actor restarts."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import ray
import torch
from ray.exceptions import ActorUnavailableError, GetTimeoutError

from actors.pool import RolloutPool
from core.algo.distill import ReDMD
from core.codecs.text_encoder import TextEncoder
from core.config import PLUMBING_CONFIG, load_config
from core.model.wan import CausalWanModel
from core.records.sample import from_record_batch
from learner.engines import full_weights
from learner.loop import Learner
from learner.trainer import negative_context
from weight_sync import (
    ANSWER_S,
    WeightPublisher,
    WeightRelay,
    WeightSubscriber,
    WeightsUnavailable,
    lineage_staleness,
    lost_version,
    numel,
    pack,
    unpack,
)


def test_pack_unpack_round_trip():
    weights = {"a": torch.randn(3, 4), "b": torch.randn(5), "c": torch.randn(2, 1, 3).to(torch.bfloat16)}
    buffer, layout = pack(weights, torch.float32, "cpu")
    assert buffer.shape == (numel(layout),) == (12 + 5 + 6,)
    out = unpack(buffer, layout)
    assert list(out) == ["a", "b", "c"] and all(torch.equal(out[k], weights[k].float()) for k in weights)


def test_bf16_packing_in_the_dtype_the_learners_publisher_takes_from_runtime_dtype(one_rank, tmp_path):
    """Actors run in runtime.dtype, and the learner's publisher sends its weights in that dtype (its broadcast
    buffer is `pack(weights, publisher.dtype, ...)`): a bf16 buffer unpacks to exactly each tensor cast to bf16."""
    g = torch.Generator().manual_seed(0)
    weights = {"a": torch.randn(3, 4, generator=g), "b": torch.randn(5, generator=g, dtype=torch.float64),
               "c": torch.randn(2, 1, 3, generator=g).to(torch.bfloat16)}
    buffer, layout = pack(weights, torch.bfloat16, "cpu")
    assert buffer.dtype == torch.bfloat16 and buffer.shape == (numel(layout),) == (12 + 5 + 6,)
    out = unpack(buffer, layout)
    assert list(out) == list(weights)
    for k, v in weights.items():
        assert out[k].dtype == torch.bfloat16 and out[k].shape == v.shape and torch.equal(out[k], v.to(torch.bfloat16)), k
    assert not torch.equal(out["a"].float(), weights["a"])  # rounded to bf16: not the fp32 values

    for name, dtype in (("bfloat16", torch.bfloat16), ("float32", torch.float32)):
        cfg = load_config(PLUMBING_CONFIG, [f"runtime.dtype={name}", f"learner.output_dir={tmp_path / name}"])
        # the publisher is only built here, never called: publishing goes through the pool, a Ray actor
        learner = Learner(cfg, torch.device("cpu"), negative_context(cfg), pool=object())
        assert learner.models.dtype == torch.float32  # the learner trains in fp32 on CPU whatever the actors run
        assert learner.publisher.dtype == dtype and not learner.publisher.broadcast, name
        trained = full_weights(learner.models.generator, cfg.learner.zero_stage)
        buffer, layout = pack(trained, learner.publisher.dtype, "cpu")
        assert buffer.dtype == dtype
        assert all(torch.equal(w, trained[k].to(dtype)) for k, w in unpack(buffer, layout).items()), name


def test_relay_versions_and_counted_fallbacks():
    relay = WeightRelay()
    relay.publish(1, "ref-1")  # object store by configuration: not a fallback
    assert relay.metrics() == {"version": 1, "state": "object_store", "broken_by": None, "groups_formed": 0,
                               "members": [], "left_out": {}, "fallbacks": {}, "restarts": []}
    relay.publish(2, "ref-2", "group_not_formed: TimeoutError: no actor joined")
    relay.publish(3, "ref-3", "actor_restarted")
    assert relay.metrics()["fallbacks"] == {"group_not_formed": 1, "actor_restarted": 1}
    for stale in (3, 2):
        try:
            relay.publish(stale, "ref")
        except ValueError as e:
            assert "not newer than the published 3" in str(e)
        else:
            raise AssertionError(f"version {stale} after 3 was accepted")
    assert relay.begin_broadcast(4, []) == "group_not_formed"  # no group: the learner sends it by object store
    relay.state, relay.epoch, relay.members = "formed", 1, {"a-0": None}  # as `form` leaves it, with actor a-0
    relay.on_actor_lost("a-0", sent_epoch=0)  # a rollout sent before this group formed says nothing about it
    relay.on_actor_lost("a-1", sent_epoch=1)  # nor does an actor outside the group
    assert relay.state == "formed"
    assert relay.refs_for("a-0") == ["ref-3"] and relay.refs_for("a-1") == ["ref-3"]  # an object-store version
    relay.on_actor_lost("a-0", sent_epoch=1)
    assert relay.metrics()["state"] == "broken" and relay.metrics()["broken_by"] == "actor_restarted: a-0"


def test_followers_long_poll_the_relay_and_get_broadcast_versions_only_once_a_copy_is_offered():
    """A streaming replica following training asks the relay for a version newer than its own: it gets each
    object-store version with its step, waits (bounded) when there is none, and under broadcast gets a version
    only once the publisher offers an object-store copy, which it does while a follower has asked recently."""

    async def scenario() -> None:
        relay = WeightRelay()
        assert not relay.wants_copy()  # nobody follows: broadcast versions need no object-store copy
        relay.publish(1, "ref-1", step=5)
        got = await relay.follow(0, timeout_s=1.0)
        assert got["version"] == 1 and got["step"] == 5 and got["refs"] == ["ref-1"] and got["published_at"] > 0
        assert await relay.follow(1, timeout_s=0.3) is None  # nothing newer: the poll ends at its bound
        assert relay.wants_copy()
        relay.state = "formed"
        assert relay.begin_broadcast(2, [("w", [1])], step=10) is None
        assert relay.refs_for("outsider") == []  # a broadcast version, to an actor in no group: nothing to wait for
        waiting = asyncio.ensure_future(relay.follow(1, timeout_s=60.0))
        for _ in range(10):  # let the follower run until it waits: only an offer or its 60 s bound ends that wait
            await asyncio.sleep(0)
        assert not waiting.done()  # broadcast to the actors only: nothing a follower can pull yet
        relay.offer(1, "too-old")  # an offer for an older version is ignored
        relay.offer(2, "copy-2")
        got = await asyncio.wait_for(waiting, 2.0)
        assert got["version"] == 2 and got["step"] == 10 and got["refs"] == ["copy-2"]
        await relay.receiving  # the (empty) actors' receive task

    asyncio.run(scenario())


def test_an_actor_outside_the_group_or_whose_broadcast_failed_is_told_at_once():
    """A rollout sent a broadcast version that its actor will never get, because the actor is outside the group (the
    relay sends it no refs) or because its broadcast failed, fails at once with WeightsUnavailable, never after the
    group's timeout: the pool hands its prompt out again, and the group breaks so that the next one takes the actor
    in."""

    class LostPeer:  # a group whose broadcast fails as gloo's does when a member dies mid-way
        device = torch.device("cpu")

        def broadcast(self, buffer: torch.Tensor) -> torch.Tensor:
            raise RuntimeError("Read error: Connection reset by peer")

    async def scenario() -> None:
        actor = WeightSubscriber("a-1", torch.float32)
        with pytest.raises(WeightsUnavailable, match="missed the broadcast of version 2"):
            await asyncio.wait_for(actor.weights_of(2, []), 5)
        actor.group, actor.timeout_s = LostPeer(), 600.0
        waiting = asyncio.ensure_future(actor.weights_of(2, [None]))  # a rollout waiting for the staged version
        await asyncio.sleep(0)
        with pytest.raises(RuntimeError, match="Connection reset"):
            await actor.receive(2, [("w", [3])])
        for rollout in (waiting, actor.weights_of(2, [None])):  # the one waiting, and one asking later
            with pytest.raises(WeightsUnavailable, match="the broadcast of version 2 failed .*Connection reset"):
                await asyncio.wait_for(rollout, 5)

    asyncio.run(scenario())

    relay = WeightRelay()
    relay.version, relay.state, relay.epoch, relay.members = 2, "formed", 1, {"a-0": None}  # version 2 broadcast
    assert relay.refs_for("a-0") == [None] and relay.refs_for("a-1") == []
    relay.on_weights_unavailable("a-1", sent_version=2)
    assert relay.state == "broken" and relay.broken_by == "actor_missed_broadcast: a-1"


def test_a_restarted_learner_republishes_above_every_version_and_the_lost_ones_stay_lost():
    relay = WeightRelay()
    for v in (1, 2, 3):
        relay.publish(v, f"ref-{v}")
    with pytest.raises(ValueError, match="not behind the published 3"):
        relay.restart(3)  # caught up with the pool: no restart
    assert relay.restart(1) == 4  # the learner restored version 1; the lost workers had published 2 and 3
    relay.publish(4, "ref-restored")
    relay.publish(5, "ref-5")
    restarts = relay.metrics()["restarts"]
    assert restarts == [(1, 4)]
    assert [v for v in range(7) if lost_version(v, restarts)] == [2, 3]
    # along the surviving line 1 -> 4 (= 1) -> 5, a sample of version 1 is one update old, not four
    assert lineage_staleness(5, 1, restarts) == 1 and lineage_staleness(5, 4, restarts) == 1
    assert lineage_staleness(4, 1, restarts) == 0 and lineage_staleness(5, 0, restarts) == 2
    assert relay.restart(4) == 6 and lost_version(5, relay.restarts)  # a second restart, back to 4
    assert lineage_staleness(6, 1, relay.restarts) == 0  # 6 is 4 is 1


def replays_exactly(cfg, sample, weights) -> bool:
    generator = CausalWanModel(cfg.model, cfg.stream)
    generator.load_state_dict(weights)
    context = TextEncoder.from_config(cfg, "cpu", torch.float32).encode([sample.prompt])
    with torch.no_grad():
        x = ReDMD(cfg).replay(generator, sample.to_rollout_record(), context)
    return (x - sample.clean).abs().max().item() < 1e-5


def fresh_sample(pool, version: int, timeout_s: float = 240.0):
    """The next sample made with `version`; the deadline bounds the whole wait, each call included."""
    deadline = time.monotonic() + timeout_s
    while (remaining := deadline - time.monotonic()) > 0:
        for batch in ray.get(pool.get.remote(1, timeout_s=min(remaining, 30.0))):
            sample = from_record_batch(batch)[0]
            if sample.weight_version == version:
                return sample
    raise AssertionError(f"no sample of version {version} arrived in {timeout_s} s")


def wait_until_answering(name: str, timeout_s: float = 120.0) -> None:
    """Until actor `name` (restarting, say) answers a call."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            ray.get(ray.get_actor(name).ready.remote(), timeout=10)
            return
        except (ActorUnavailableError, GetTimeoutError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


@pytest.mark.actors
def test_broadcast_sync_and_fallback_after_an_actor_restarts(reward_app):
    cfg = load_config(PLUMBING_CONFIG, ["video.num_latent_frames=3", "actors.num_actors=2", "actors.num_cpus=0.25",
                                        f"actors.reward_app={reward_app}", "actors.queue_size=2", "actors.max_staleness=0"])
    pool = RolloutPool.options(name="sync-pool").remote(cfg, "sync-pool")
    try:
        publisher = WeightPublisher(pool, torch.float32, broadcast=True, group_backend="gloo", timeout_s=300)  # rank 0
        sync = ray.get(pool.metrics.remote())["weight_sync"]
        assert publisher.group is not None and sync["state"] == "formed" and sync["groups_formed"] == 1, sync
        ray.get(pool.start.remote())
        versions = {}
        for version in (1, 2, 3, 4):
            torch.manual_seed(100 + version)
            versions[version] = CausalWanModel(cfg.model, cfg.stream).state_dict()
        publisher.publish(1, versions[1])
        assert publisher.syncs == {"broadcast": 1}, ray.get(pool.metrics.remote())["weight_sync"]
        assert replays_exactly(cfg, fresh_sample(pool, 1), versions[1])

        ray.kill(ray.get_actor("sync-pool-actor-0"), no_restart=False)  # it comes back in no group
        fresh_sample(pool, 1)
        deadline = time.monotonic() + 300
        while ray.get(pool.metrics.remote())["weight_sync"]["state"] == "formed":  # until the pool meets the restart
            assert time.monotonic() < deadline, "the pool never noticed the restarted actor"
            fresh_sample(pool, 1)
        wait_until_answering("sync-pool-actor-0")  # back: the re-formed group takes it in (it waits for no one)
        publisher.publish(2, versions[2])  # refused by the pool: object store, then the group is re-formed
        sync = ray.get(pool.metrics.remote())["weight_sync"]
        assert publisher.syncs == {"broadcast": 1, "object_store": 1}
        # the pool meets the restart as a lost rollout or as a rollout the actor had no broadcast weights for
        assert len(sync["fallbacks"]) == 1 and sync["fallbacks"].get("actor_restarted", sync["fallbacks"].get(
            "actor_missed_broadcast")) == 1, sync
        assert sync["state"] == "formed" and sync["groups_formed"] == 2, sync
        assert sync["members"] == ["sync-pool-actor-0", "sync-pool-actor-1"] and not sync["left_out"], sync
        assert replays_exactly(cfg, fresh_sample(pool, 2), versions[2])
        publisher.publish(3, versions[3])
        assert publisher.syncs == {"broadcast": 2, "object_store": 1}, ray.get(pool.metrics.remote())["weight_sync"]
        assert replays_exactly(cfg, fresh_sample(pool, 3), versions[3])
        # a streaming replica starts following: version 3 went to the actors only, so it waits for the next one,
        # which the publisher also puts in the object store for it
        assert ray.get(pool.follow_weights.remote(0, 0.2)) is None
        publisher.publish(4, versions[4])
        assert publisher.syncs == {"broadcast": 3, "object_store": 1, "follower_copy": 1}
        followed = ray.get(pool.follow_weights.remote(3, 5.0))
        assert followed["version"] == 4 and followed["step"] == 0  # (this test publishes no steps)
        copy = ray.get(followed["refs"][0])
        assert all(torch.equal(copy[k], versions[4][k]) for k in versions[4])
        drops = ray.get(pool.metrics.remote())["drops"]
        assert "worker_error" not in drops, drops
    finally:
        ray.get(pool.stop.remote())
        ray.kill(pool)


def fresh_samples(pool, version: int, actors: list[str], timeout_s: float = 240.0) -> dict:
    """A sample made with `version` by each of `actors`, by actor; the deadline bounds the whole wait."""
    deadline, found = time.monotonic() + timeout_s, {}
    while (remaining := deadline - time.monotonic()) > 0:
        for batch in ray.get(pool.get.remote(1, timeout_s=min(remaining, 30.0))):
            sample = from_record_batch(batch)[0]
            if sample.weight_version == version and sample.actor in actors:
                found.setdefault(sample.actor, sample)
        if len(found) == len(actors):
            return found
    raise AssertionError(f"no sample of version {version} from {sorted(set(actors) - set(found))} in {timeout_s} s")


def actor_pid(name: str) -> int:
    return ray.get(ray.get_actor(name).__ray_call__.remote(lambda actor: os.getpid()), timeout=60)


def publish_losing(publisher: WeightPublisher, version: int, weights: dict, actor: str) -> float:
    """Publish `version` while `actor` hangs in its broadcast (SIGSTOP: 0.6 MB of weights is more than a socket
    takes, so the send to it waits) and is then killed, a second into the publish; the seconds the publish took."""
    pid = actor_pid(actor)
    os.kill(pid, signal.SIGSTOP)
    try:
        with ThreadPoolExecutor(1) as thread:
            start = time.monotonic()
            publishing = thread.submit(publisher.publish, version, weights)
            time.sleep(1.0)
            os.kill(pid, signal.SIGKILL)  # gone for good (max_restarts=0)
            publishing.result(timeout=2 * publisher.timeout_s + 30)
            return time.monotonic() - start
    finally:
        with contextlib.suppress(ProcessLookupError):  # never left stopped
            os.kill(pid, signal.SIGKILL)


def _pool_of_three(name: str, reward_app: str, queue_size: int):
    """A pool of three plumbing actors that are never restarted: (config, pool, the actors' names)."""
    cfg = load_config(PLUMBING_CONFIG, ["video.num_latent_frames=3", "actors.num_actors=3", "actors.num_cpus=0.25",
                                        f"actors.reward_app={reward_app}", f"actors.queue_size={queue_size}",
                                        "actors.max_staleness=0", "actors.max_restarts=0"])
    return cfg, RolloutPool.options(name=name).remote(cfg, name), [f"{name}-actor-{i}" for i in range(3)]


def _versions(cfg, seed: int) -> dict[int, dict[str, torch.Tensor]]:
    """Weights of versions 1-5, each seeded apart."""
    versions = {}
    for version in (1, 2, 3, 4, 5):
        torch.manual_seed(seed + version)
        versions[version] = CausalWanModel(cfg.model, cfg.stream).state_dict()
    return versions


@pytest.mark.actors
@pytest.mark.timeout(240)
def test_a_member_lost_mid_broadcast_costs_one_fallback_and_the_group_reforms_without_it(reward_app):
    """Actors lost mid-broadcast (hung in it, then killed for good), in both shapes of gloo's broadcast tree: one
    that another member forwards to (rank 0's own part completes), and one that rank 0 sends to. Each time that
    publish returns within the group's timeout, by object store (a counted fallback), and every other actor rolls
    out with it; the group re-forms without the lost actor, so the next publish is a broadcast that waits for no
    one."""
    timeout_s = 15.0
    cfg, pool, actors = _pool_of_three("lost-pool", reward_app, queue_size=2)
    try:
        ray.get(pool.ready.remote(), timeout=180)  # as a job does: all three in the first group, however slow they start
        publisher = WeightPublisher(pool, torch.float32, broadcast=True, group_backend="gloo", timeout_s=timeout_s)
        assert ray.get(pool.metrics.remote())["weight_sync"]["members"] == actors  # ranks 1, 2, 3
        ray.get(pool.start.remote())
        versions = _versions(cfg, seed=200)
        publisher.publish(1, versions[1])
        assert publisher.syncs == {"broadcast": 1}, ray.get(pool.metrics.remote())["weight_sync"]

        # rank 3 gets the broadcast from rank 1 (actor 0): rank 0's part completes, actor 0's forward fails
        took = publish_losing(publisher, 2, versions[2], actors[2])
        sync = ray.get(pool.metrics.remote())["weight_sync"]
        assert took < timeout_s + 5, (took, sync)
        assert publisher.syncs == {"broadcast": 1, "object_store": 1}, sync
        assert sync["fallbacks"] == {"broadcast_failed": 1}, sync
        assert sync["state"] == "formed" and sync["members"] == actors[:2], sync
        for actor, sample in fresh_samples(pool, 2, actors[:2]).items():  # both got it, by object store
            assert replays_exactly(cfg, sample, versions[2]), actor

        start = time.monotonic()
        publisher.publish(3, versions[3])  # a broadcast to the actors left: nobody waits for the lost one
        took = time.monotonic() - start
        sync = ray.get(pool.metrics.remote())["weight_sync"]
        assert took < 5.0 and publisher.syncs == {"broadcast": 2, "object_store": 1}, (took, sync)
        assert sync["fallbacks"] == {"broadcast_failed": 1} and sync["members"] == actors[:2], sync
        for actor, sample in fresh_samples(pool, 3, actors[:2]).items():
            assert replays_exactly(cfg, sample, versions[3]), actor

        # rank 2 (actor 1) gets it from rank 0, whose broadcast fails
        took = publish_losing(publisher, 4, versions[4], actors[1])
        sync = ray.get(pool.metrics.remote())["weight_sync"]
        assert took < timeout_s + 5, (took, sync)
        assert publisher.syncs == {"broadcast": 2, "object_store": 2}, sync
        assert sync["fallbacks"] == {"broadcast_failed": 2} and sync["members"] == actors[:1], sync
        start = time.monotonic()
        publisher.publish(5, versions[5])
        took = time.monotonic() - start
        sync = ray.get(pool.metrics.remote())["weight_sync"]
        assert took < 5.0 and publisher.syncs == {"broadcast": 3, "object_store": 2}, (took, sync)
        assert replays_exactly(cfg, fresh_samples(pool, 5, actors[:1])[actors[0]], versions[5])
        drops = ray.get(pool.metrics.remote())["drops"]
        assert "worker_error" not in drops, drops
    finally:
        ray.get(pool.stop.remote())
        ray.kill(pool)


@pytest.mark.actors
@pytest.mark.timeout(240)
def test_a_hung_member_holds_a_publish_only_within_its_bound_and_rejoins_once_it_answers(reward_app):
    """An actor that hangs mid-broadcast without dying (SIGSTOP) answers nothing: rank 0's part completes, the member
    forwarding to it fails at the group's timeout, and the publish, bounded, goes by object store; the group re-forms
    without the hung actor. Once it answers again (SIGCONT), its first rollout that misses a broadcast breaks the
    group, and the next group takes it back in: every actor rolls out with the newest version."""
    timeout_s = 5.0
    # a queue slot per actor: the one stopped gets a rollout (and misses a broadcast) once it answers again
    cfg, pool, actors = _pool_of_three("hung-pool", reward_app, queue_size=3)
    try:
        ray.get(pool.ready.remote(), timeout=180)
        publisher = WeightPublisher(pool, torch.float32, broadcast=True, group_backend="gloo", timeout_s=timeout_s)
        ray.get(pool.start.remote())
        versions = _versions(cfg, seed=300)
        publisher.publish(1, versions[1])
        pid = actor_pid(actors[2])
        os.kill(pid, signal.SIGSTOP)
        try:
            start = time.monotonic()
            publisher.publish(2, versions[2])  # rank 3 (actor 2) gets it from rank 1 (actor 0), whose send times out
            took = time.monotonic() - start
            sync = ray.get(pool.metrics.remote())["weight_sync"]
            # the members' answers within the timeout and ANSWER_S, then ANSWER_S for the re-forming group's roll call
            assert took < timeout_s + 2 * ANSWER_S + 3, (took, sync)
            assert publisher.syncs == {"broadcast": 1, "object_store": 1}, sync
            assert sync["fallbacks"] == {"broadcast_failed": 1} and sync["members"] == actors[:2], sync
            assert sync["left_out"] == {actors[2]: f"no answer in {ANSWER_S:g} s"}, sync
            start = time.monotonic()
            publisher.publish(3, versions[3])
            took = time.monotonic() - start
            assert took < 5.0 and publisher.syncs == {"broadcast": 2, "object_store": 1}, took
        finally:
            os.kill(pid, signal.SIGCONT)
        deadline = time.monotonic() + 120
        while ray.get(pool.metrics.remote())["weight_sync"]["state"] == "formed":  # until actor 2 misses a broadcast
            assert time.monotonic() < deadline, "the actor that answers again never missed a broadcast"
            ray.get(pool.get.remote(1, timeout_s=1.0))  # consumed, as by a learner: the actors roll out
        publisher.publish(4, versions[4])  # by object store; the group re-forms with actor 2 again
        sync = ray.get(pool.metrics.remote())["weight_sync"]
        assert publisher.syncs == {"broadcast": 2, "object_store": 2}, sync
        assert sync["fallbacks"] == {"broadcast_failed": 1, "actor_missed_broadcast": 1}, sync
        assert sync["state"] == "formed" and sync["members"] == actors and not sync["left_out"], sync
        publisher.publish(5, versions[5])
        assert publisher.syncs == {"broadcast": 3, "object_store": 2}, ray.get(pool.metrics.remote())["weight_sync"]
        for actor, sample in fresh_samples(pool, 5, actors).items():
            assert replays_exactly(cfg, sample, versions[5]), actor
        drops = ray.get(pool.metrics.remote())["drops"]
        assert "worker_error" not in drops, drops
    finally:
        ray.get(pool.stop.remote())
        ray.kill(pool)
