"""Weight broadcast from the learner's rank 0 to the rollout actors (gloo here, NCCL on GPUs): packing, exact
weights in the actors, and the object-store fallback when an actor restarts."""

from __future__ import annotations

import pytest
import ray
import torch

from core.config import PLUMBING_CONFIG, REPO_ROOT, load_config
from core.distill import ReDMD
from core.sample import from_record_batch
from core.text_encoder import TextEncoder
from core.wan.model import CausalWanModel
from core.weight_sync import numel, pack, unpack


def test_pack_unpack_round_trip():
    weights = {"a": torch.randn(3, 4), "b": torch.randn(5), "c": torch.randn(2, 1, 3).to(torch.bfloat16)}
    buffer, layout = pack(weights, torch.float32, "cpu")
    assert buffer.shape == (numel(layout),) == (12 + 5 + 6,)
    out = unpack(buffer, layout)
    assert list(out) == ["a", "b", "c"] and all(torch.equal(out[k], weights[k].float()) for k in weights)


@pytest.fixture(scope="module")
def reward_app(serve_instance):
    from ray import serve

    from reward_service.app import build_app

    cfg = load_config(REPO_ROOT / "configs" / "reward_service.yaml",
                      ["reward_service.app_name=sync_reward", "reward_service.num_cpus=0.1"])
    serve.run(build_app(cfg), name="sync_reward", route_prefix="/sync_reward")
    yield "sync_reward"
    serve.delete("sync_reward")


def replays_exactly(cfg, sample, weights) -> bool:
    generator = CausalWanModel(cfg.model, cfg.stream)
    generator.load_state_dict(weights)
    context = TextEncoder.from_config(cfg, "cpu", torch.float32).encode([sample.prompt])
    with torch.no_grad():
        x = ReDMD(cfg).replay(generator, sample.to_rollout_record(), context)
    return (x - sample.clean).abs().max().item() < 1e-5


def fresh_sample(pool, version: int):
    for _ in range(10):
        for batch in ray.get(pool.get.remote(1, timeout_s=120)):
            sample = from_record_batch(batch)[0]
            if sample.weight_version == version:
                return sample
    raise AssertionError(f"no sample of version {version} arrived")


def test_broadcast_sync_and_fallback_after_an_actor_restarts(reward_app):
    from actors.pool import RolloutPool
    from learner.publish import BroadcastPublisher

    cfg = load_config(PLUMBING_CONFIG, ["video.num_latent_frames=3", "actors.num_actors=2", "actors.num_cpus=0.25",
                             f"actors.reward_app={reward_app}", "actors.queue_size=2", "actors.max_staleness=0"])
    pool = RolloutPool.options(name="sync-pool").remote(cfg.model_dump(), "sync-pool")
    try:
        publisher = BroadcastPublisher(pool, torch.float32, "gloo", timeout_s=300)  # this process plays rank 0
        assert publisher.group is not None and ray.get(pool.metrics.remote())["weight_group_ok"]
        ray.get(pool.start.remote())
        versions = {}
        for version in (1, 2, 3):
            torch.manual_seed(100 + version)
            versions[version] = CausalWanModel(cfg.model, cfg.stream).state_dict()
        publisher.publish(1, versions[1])
        assert publisher.syncs == {"broadcast": 1, "object_store": 0}, ray.get(pool.metrics.remote())["weight_group_error"]
        assert replays_exactly(cfg, fresh_sample(pool, 1), versions[1])

        ray.kill(ray.get_actor("sync-pool-actor-0"), no_restart=False)  # it comes back in no group
        fresh_sample(pool, 1)
        while ray.get(pool.metrics.remote())["weight_group_ok"]:  # until the pool has met the restarted actor
            fresh_sample(pool, 1)
        publisher.publish(2, versions[2])  # refused by the pool: object store, then the group is re-formed
        assert publisher.syncs == {"broadcast": 1, "object_store": 1}
        assert publisher.group is not None, ray.get(pool.metrics.remote())["weight_group_error"]
        assert replays_exactly(cfg, fresh_sample(pool, 2), versions[2])
        publisher.publish(3, versions[3])
        assert publisher.syncs == {"broadcast": 2, "object_store": 1}, ray.get(pool.metrics.remote())["weight_group_error"]
        assert replays_exactly(cfg, fresh_sample(pool, 3), versions[3])
        drops = ray.get(pool.metrics.remote())["drops"]
        assert "worker_error" not in drops, drops
    finally:
        ray.get(pool.stop.remote())
        ray.kill(pool)
