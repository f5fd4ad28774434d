"""Weight sync from the learner's rank 0 to the rollout actors (weight_sync.py; gloo here, NCCL on GPUs): packing,
exact weights in the actors, the group's states, and the object-store fallback, counted with its reason, when
an actor restarts."""

from __future__ import annotations

import asyncio
import time

import pytest
import ray
import torch

from actors.pool import RolloutPool
from core.algo.distill import ReDMD
from core.codecs.text_encoder import TextEncoder
from core.config import PLUMBING_CONFIG, load_config
from core.model.wan import CausalWanModel
from core.records.sample import from_record_batch
from learner.engines import full_weights
from learner.loop import Learner
from learner.trainer import negative_context
from weight_sync import WeightPublisher, WeightRelay, lineage_staleness, lost_version, numel, pack, unpack


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
                               "fallbacks": {}, "restarts": []}
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
    assert relay.begin_broadcast(4, [], []) == "group_not_formed"  # no group: the learner sends it by object store
    relay.state, relay.epoch = "formed", 1  # as `form` leaves it
    relay.on_actor_lost(sent_epoch=0)  # a rollout sent before this group formed says nothing about it
    assert relay.state == "formed"
    relay.on_actor_lost(sent_epoch=1)
    assert relay.metrics()["state"] == "broken" and relay.metrics()["broken_by"] == "actor_restarted"


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
        assert relay.begin_broadcast(2, [("w", [1])], workers=[], step=10) is None
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
        publisher.publish(2, versions[2])  # refused by the pool: object store, then the group is re-formed
        sync = ray.get(pool.metrics.remote())["weight_sync"]
        assert publisher.syncs == {"broadcast": 1, "object_store": 1}
        # the pool meets the restart as a lost rollout or as a rollout the actor had no broadcast weights for
        assert len(sync["fallbacks"]) == 1 and sync["fallbacks"].get("actor_restarted", sync["fallbacks"].get(
            "actor_missed_broadcast")) == 1, sync
        assert sync["state"] == "formed" and sync["groups_formed"] == 2, sync
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
