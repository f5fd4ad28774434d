"""Rollout actors on real Ray with the real reward service: samples, versions, failures, back-pressure."""

from __future__ import annotations

import time

import pytest
import ray
import torch

from actors.pool import RolloutPool
from actors.worker import RolloutWorker
from core.algo.distill import ReDMD
from core.algo.rollout import SelfForcedRollout
from core.algo.scheduler import FlowMatchScheduler
from core.codecs.text_encoder import TextEncoder, pad_context
from core.config import PLUMBING_CONFIG, load_config
from core.model.wan import CausalWanModel
from core.records.prompts import WorkItem
from core.records.sample import from_record_batch
from core.stream.pipeline import build_generator
from learner.samples import PoolSamples, SampleTimeoutError
from weight_sync import BroadcastGroup, host_store, pack

BASE = ["video.num_latent_frames=3", "actors.num_cpus=0.25", "reward_service.num_cpus=0.1"]

pytestmark = pytest.mark.actors


def make_pool(name: str, prompts, reward_app: str, overrides: list[str]):
    cfg = load_config(PLUMBING_CONFIG, BASE + [f"actors.prompts={prompts}", f"actors.reward_app={reward_app}", *overrides])
    pool = RolloutPool.options(name=name).remote(cfg, name)
    ray.get(pool.start.remote())
    return cfg, pool


def write_prompts(tmp_path, n: int):
    path = tmp_path / "prompts.txt"
    path.write_text("\n".join(f"a shape number {i} moves" for i in range(n)) + "\n")
    return path


def samples_of(batches):
    return [s for b in batches for s in from_record_batch(b)]


def random_weights(cfg, seed: int, nan: bool = False) -> dict:
    torch.manual_seed(seed)
    sd = CausalWanModel(cfg.model, cfg.stream).state_dict()
    if nan:
        sd["head.head.bias"] = torch.full_like(sd["head.head.bias"], float("nan"))
    return sd


def test_samples_flow_with_versions_and_replay_exactly(reward_app, tmp_path):
    cfg, pool = make_pool("flow", write_prompts(tmp_path, 6), reward_app, ["actors.queue_size=4"])
    try:
        first = samples_of(ray.get(pool.get.remote(3, timeout_s=120)))
        assert len(first) == 3 and {s.weight_version for s in first} == {0}
        for s in first:
            assert 0 <= s.exit_index < len(cfg.scheduler.denoising_step_list)
            assert set(s.rewards_raw) == {"VQ", "MQ", "TA"} and s.clean.shape == s.noisy.shape == (1, 3, 16, 8, 8)
            assert s.timings["generate_s"] > 0 and s.timings["score_s"] > 0
        weights = random_weights(cfg, seed=7)
        ray.get(pool.publish.remote(1, [ray.put(weights)]))
        fresh = samples_of(ray.get(pool.get.remote(2, timeout_s=120)))
        assert {s.weight_version for s in fresh} == {1}
        metrics = ray.get(pool.metrics.remote())
        assert metrics["drops"].get("stale", 0) >= 1  # version-0 samples made meanwhile (max_staleness 0)

        # the learner's replay of a received sample reproduces the actor's exit-step outputs exactly
        model = CausalWanModel(cfg.model, cfg.stream)
        model.load_state_dict(weights)
        sched = FlowMatchScheduler.from_config(cfg.scheduler)
        timesteps = sched.denoising_timesteps(cfg.scheduler.denoising_step_list, cfg.scheduler.warp_denoising_step)
        rollout = SelfForcedRollout(model, sched, timesteps, cfg.scheduler.context_noise)
        context = TextEncoder.from_config(cfg, "cpu", torch.float32).encode([fresh[0].prompt])
        assert torch.equal(pad_context([fresh[0].text_context], cfg.model.text_len), context)  # what the actor shipped
        replayed = rollout.replay_exit_steps(fresh[0].to_rollout_record(), context, model.init_cache(1, cfg.video.latent_hw))
        assert replayed.requires_grad and (replayed - fresh[0].clean).abs().max() < 1e-5

        ray.get(pool.publish.remote(2, [ray.put(random_weights(cfg, seed=8, nan=True))]))
        deadline = time.monotonic() + 120
        while ray.get(pool.metrics.remote())["drops"].get("nonfinite_latents", 0) == 0 and time.monotonic() < deadline:
            ray.get(pool.get.remote(1, timeout_s=5))
        assert ray.get(pool.metrics.remote())["drops"]["nonfinite_latents"] >= 1

        # weights that do not fit the generator: every rollout fails in the worker; counted, never a hang
        ray.get(pool.publish.remote(3, [ray.put({"not.a.wan.key": torch.zeros(1)})]))
        deadline = time.monotonic() + 120
        while ray.get(pool.metrics.remote())["drops"].get("worker_error", 0) == 0 and time.monotonic() < deadline:
            ray.get(pool.get.remote(1, timeout_s=5))
        m = ray.get(pool.metrics.remote())
        assert m["drops"]["worker_error"] >= 1 and m["in_flight"] <= cfg.actors.num_actors
        assert any("does not fit" in (a["last_error"] or "") for a in m["actors"].values())
    finally:
        ray.get(pool.stop.remote())


def test_backpressure_then_actor_death_loses_and_duplicates_nothing(gated_reward, tmp_path):
    """The learner takes nothing: actors fill the queue, then wait (not pile up, not drop). Then an actor is killed
    mid-rollout: the reward service's gate holds every score, so an actor the pool calls busy is inside a rollout
    until the test opens the gate; its prompt is handed out again, none lost or duplicated."""
    n_prompts = 8
    app, gate = gated_reward
    gate.open()
    cfg, pool = make_pool("kill", write_prompts(tmp_path, n_prompts), app, ["actors.queue_size=2", "actors.max_restarts=2"])
    try:
        def stalled(m: dict) -> bool:  # the queue is full and both actors wait for room
            return m["queue_depth"] == 2 and all(a["waiting"] for a in m["actors"].values())

        deadline = time.monotonic() + 120
        while not stalled(m := ray.get(pool.metrics.remote())):
            assert time.monotonic() < deadline and m["queue_depth"] + m["in_flight"] <= 2 and not m["drops"], m
            time.sleep(0.2)
        made = sum(a["rollouts"] for a in m["actors"].values())
        assert m["in_flight"] == 0 and made == 2 and not m["drops"], m

        gate.close()  # the next rollouts cannot finish: their scores wait at the gate
        ids = [s.sample_id for s in samples_of(ray.get(pool.get.remote(2, timeout_s=120)))]
        deadline = time.monotonic() + 120
        while not ray.get(pool.metrics.remote())["actors"]["kill-actor-0"]["busy"]:
            assert time.monotonic() < deadline, "actor 0 never started its next rollout"
            time.sleep(0.05)
        ray.kill(ray.get_actor("kill-actor-0"), no_restart=False)  # dies mid-rollout; Ray restarts it
        gate.open()
        deadline = time.monotonic() + 240
        while len({i for i in ids if i.startswith("e0-")}) < n_prompts:
            assert time.monotonic() < deadline, ids
            ids += [s.sample_id for s in samples_of(ray.get(pool.get.remote(1, timeout_s=30)))]
        epoch0 = [i for i in ids if i.startswith("e0-")]
        assert sorted(epoch0) == sorted(f"e0-i{i}" for i in range(n_prompts))  # every prompt once
        assert len(ids) == len(set(ids))
        m = ray.get(pool.metrics.remote())
        assert not m["drops"] and m["duplicates_suppressed"] == 0
        assert m["actors"]["kill-actor-0"]["lost_rollouts"] >= 1  # the kill hit its rollout (each try on the restarting actor counts)
    finally:
        gate.open()
        ray.get(pool.stop.remote())


def test_scoring_timeouts_drop_samples_with_a_counted_reason(reward_app, tmp_path):
    cfg, pool = make_pool("timeout", write_prompts(tmp_path, 4), reward_app,
                          ["actors.num_actors=1", "actors.queue_size=1", "actors.score_timeout_s=0.0001",
                           "actors.score_retries=0"])
    try:
        deadline = time.monotonic() + 180  # the actor starts slowly on a loaded machine
        while ray.get(pool.metrics.remote())["drops"].get("score_timeout", 0) == 0 and time.monotonic() < deadline:
            assert ray.get(pool.get.remote(1, timeout_s=5)) == []  # a timed-out score never becomes a sample
        m = ray.get(pool.metrics.remote())
        assert m["drops"].get("score_timeout", 0) >= 1 and m["delivered"] == 0
    finally:
        ray.get(pool.stop.remote())


def test_rollouts_compute_off_the_event_loop_and_weights_switch_between_them(gated_reward):
    """`status` is answered while a rollout computes (seconds: 21 latent frames to decode, against milliseconds a
    status call takes); a weight broadcast (the learner's rank 0 here) and `ready` while the rollout is still in
    progress (its score held at the reward service's gate until the test opens it): the broadcast waits only for
    the staging copy. The next rollout switches to the staged weights, and each sample replays exactly with its
    own weights."""
    app, gate = gated_reward
    gate.close()
    cfg = load_config(PLUMBING_CONFIG, BASE + ["video.num_latent_frames=21", f"actors.reward_app={app}"])
    worker = ray.remote(RolloutWorker).options(num_cpus=0.25, max_restarts=0).remote(cfg, "offloop-actor")
    try:
        ray.get(worker.ready.remote())
        store = host_store("127.0.0.1", 2, 120.0)  # the learner's side: a port bound as it is chosen
        joined = worker.join_weight_group.remote("127.0.0.1", store.port, 1, 2, "gloo", 120.0)
        group = BroadcastGroup("127.0.0.1", store.port, 0, 2, "gloo", 120.0, store)
        ray.get(joined)
        items = [WorkItem(0, i, i, f"a shape number {i} moves", seed=11 + i) for i in range(2)]
        first = worker.rollout.remote(items[0], 0, [None])
        seen, deadline = None, time.monotonic() + 240  # a status answered while the first rollout computes
        while seen is None and time.monotonic() < deadline:
            status = ray.get(worker.status.remote())
            seen = status if status["computing"] else None
        assert seen == {"name": "offloop-actor", "weight_version": 0, "computing": items[0].sample_id, "rollouts": 0}
        new_weights = random_weights(cfg, seed=7)
        buffer, layout = pack(new_weights, torch.float32, "cpu")
        staged = worker.receive_weights.remote(1, layout)
        group.broadcast(buffer)  # returns once the actor has the copy: it does not wait for the rollout
        ray.get(staged)
        second = worker.rollout.remote(items[1], 1, [None])  # the staged version; waits for the model, not the loop
        assert ray.get(worker.ready.remote()) == "offloop-actor"
        assert not ray.wait([first], timeout=0)[0]  # all of the above came back while the first rollout still ran
        gate.open()

        made = [from_record_batch(r.batch)[0] for r in ray.get([first, second], timeout=300)]
        assert [s.weight_version for s in made] == [0, 1]
        assert ray.get(worker.status.remote()) == {"name": "offloop-actor", "weight_version": 1, "computing": None,
                                                   "rollouts": 2}
        generator = build_generator(cfg, torch.device("cpu"))
        for sample, weights in zip(made, (None, new_weights)):
            if weights is not None:
                generator.load_state_dict(weights)
            with torch.no_grad():
                x = ReDMD(cfg).replay(generator, sample.to_rollout_record(),
                                      pad_context([sample.text_context], cfg.model.text_len))
            assert (x - sample.clean).abs().max() < 1e-5, sample.weight_version
    finally:
        gate.open()
        ray.kill(worker, no_restart=True)


def test_samples_of_versions_lost_with_a_restarted_learner_are_dropped_and_counted(gated_reward, tmp_path):
    """A learner restarted from a checkpoint of version 1, after its lost workers published version 2: the pool
    republishes the restored weights as version 3, and the version-2 samples still in flight are dropped as
    `lost_weights`, counted, never delivered. The gate holds those samples in scoring until the restart."""
    app, gate = gated_reward
    gate.open()
    cfg = load_config(PLUMBING_CONFIG, BASE + [f"actors.prompts={write_prompts(tmp_path, 8)}", f"actors.reward_app={app}",
                                               "actors.queue_size=2"])
    pool = RolloutPool.options(name="lost").remote(cfg, "lost")
    try:
        for version in (1, 2):  # before the first rollout: every rollout is made with version 2
            ray.get(pool.publish.remote(version, [ray.put(random_weights(cfg, seed=version))]))
        gate.close()  # and waits in scoring
        ray.get(pool.start.remote())
        deadline = time.monotonic() + 120
        while ray.get(pool.metrics.remote())["in_flight"] < 2:
            assert time.monotonic() < deadline, ray.get(pool.metrics.remote())
            time.sleep(0.1)
        line = ray.get(pool.learner_started.remote(1))
        assert line == {"version": 3, "restarts": [(1, 3)], "publish": True}
        ray.get(pool.publish.remote(3, [ray.put(random_weights(cfg, seed=1))]))
        gate.open()
        fresh = samples_of(ray.get(pool.get.remote(2, timeout_s=120)))
        m = ray.get(pool.metrics.remote())
        assert {s.weight_version for s in fresh} == {3} and m["drops"] == {"lost_weights": 2}, m["drops"]
    finally:
        gate.open()
        ray.get(pool.stop.remote())


def test_a_learner_that_gets_no_samples_says_why_within_its_bound(reward_app, tmp_path):
    """`learner.sample_timeout_s` bounds the learner's wait for samples; past it, the error names the pool's state
    and what to check (a pool never started makes none)."""
    cfg = load_config(PLUMBING_CONFIG, BASE + [f"actors.prompts={write_prompts(tmp_path, 2)}",
                                               f"actors.reward_app={reward_app}"])
    pool = RolloutPool.options(name="idle").remote(cfg, "idle")
    try:
        with pytest.raises(SampleTimeoutError) as err:
            PoolSamples(pool, timeout_s=1.0).next(step=7, n=2)
        message = str(err.value)
        assert "step 7: got 0 of 2 samples in learner.sample_timeout_s=1.0s" in message and "queue 0" in message
    finally:
        ray.get(pool.stop.remote())
