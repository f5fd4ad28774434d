"""Rollout actor throughput: samples/s for 1, 2 and 4 actors, where actor time goes, and back-pressure.

What it measures
----------------
One local Ray (`ray.init(address="local", num_cpus=--num-cpus)`, default 4 *logical* CPUs:
Ray only uses the number to place actors, it does not pin or create cores) with Serve's HTTP
proxy on a free localhost port and the reward application of `reward_service.app.build_app`
(motion backend, one replica of --reward-cpus logical CPUs). On the plumbing config
(configs/plumbing.yaml, `video.num_latent_frames` = --latent-frames, default 9, i.e. three
3-frame blocks and 33 decoded 64x64 frames; its default of 21 works too but a sample
then takes ~3 s of CPU) it runs, one after another in the same Ray:

* for each N in --actors (default 1,2,4): a `RolloutPool` of N actors (`actors.num_cpus` =
  --actor-cpus, default 0.5, so 4 actors fit in 4 logical CPUs; each actor runs one torch
  thread) with `actors.queue_size` = --queue-size (default 8). Warm-up: the driver consumes
  samples until *every* actor has delivered one (its process started and its generator,
  text encoder and VAE were built), then drains what is queued. Then it consumes samples as
  fast as it can (`pool.get(1)` in a loop) for --duration seconds (default 30);
* one slow-consumer run: --slow-actors actors (default 2), queue size --slow-queue-size
  (default 2), and a consumer paced to --slow-factor (default 0.5) x the samples/s measured
  for that N above, i.e. a learner that falls behind. Actors must then wait (back-pressure):
  their wait fraction should rise towards 1 - factor.

Reported per run:
  samples/s   samples received in the timed window / the window's length
  scaling     samples/s of N actors / samples/s of 1 actor (2/1 and 4/1)
  actor time  from `pool.metrics()` snapshots at the start and end of the window (deltas,
              summed over actors): wait_s (idle because queue + in-flight reached
              queue_size) against generate_s + decode_s + score_s; "wait fraction" =
              wait / (wait + generate + decode + score). "unaccounted" is the rest of the
              actors' wall time (N x window): Ray call and Arrow overhead, and work in flight
              at the window's edges (stage times are added only when a rollout completes).
  stages      mean ms per sample of generate (DiT rollout + text encoder), decode (VAE) and
              score (DeploymentHandle call to the reward replica, including Serve's
              batch_wait_timeout_s), and each one's share of the stage total.

On a machine with P physical cores, actors (and the reward replica, the pool, the driver and
Ray's own processes) share those P cores: beyond P actors samples/s cannot grow, and per-stage
times grow instead. The point of the script is the measurement and where time goes.

How to run (from the repository root)
-------------------------------------
    python benchmarks/rollout_throughput.py                         # ~3 min on 2 cores
    python benchmarks/rollout_throughput.py --latent-frames 21 --duration 40
    python benchmarks/rollout_throughput.py --actors 1,2 --json rollout.json

Needs Ray with Serve, torch and this repository's packages.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import platform
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))  # run as a script from anywhere

from benchmarks.common import cpu_model, finish, load_1m, local_ray_serve, physical_cores  # noqa: E402

APP = "rollout_bench_reward"
STAGES = ("generate_s", "decode_s", "score_s")


def machine_info() -> dict:
    import ray
    import torch

    return {"cpu": cpu_model(), "logical_cpus": os.cpu_count() or 1, "physical_cores": physical_cores(),
            "python": platform.python_version(), "torch": torch.__version__, "ray": ray.__version__,
            "loadavg_1m_at_start": load_1m()}


def actor_totals(metrics: dict) -> dict:
    keys = ("rollouts", *STAGES, "load_weights_s", "wait_s")
    return {k: sum(a[k] for a in metrics["actors"].values()) for k in keys}


def run_pool(args, label: str, n_actors: int, queue_size: int, consumer_rate: float | None) -> dict:
    """One pool: warm up, consume for args.duration s (as fast as possible or paced), return the numbers."""
    import ray

    from actors.pool import RolloutPool
    from core.config import PLUMBING_CONFIG, load_config

    cfg = load_config(PLUMBING_CONFIG, [f"video.num_latent_frames={args.latent_frames}", f"actors.num_actors={n_actors}",
                             f"actors.num_cpus={args.actor_cpus}", f"actors.queue_size={queue_size}",
                             f"actors.reward_app={APP}"])
    name = f"bench-{label}"
    t_create = time.perf_counter()
    pool = RolloutPool.options(name=name).remote(cfg, name)
    try:
        ray.get(pool.start.remote())
        # warm-up: every actor has started, built its models and delivered a sample
        deadline = time.monotonic() + args.warmup_timeout
        while True:
            m = ray.get(pool.metrics.remote())
            if all(a["rollouts"] >= 1 for a in m["actors"].values()):
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"{label}: not every actor delivered a sample within {args.warmup_timeout} s: {m}")
            ray.get(pool.get.remote(1, timeout_s=2))
        if m["queue_depth"]:
            ray.get(pool.get.remote(m["queue_depth"], timeout_s=10))  # drain what the warm-up left queued
        warmup_s = time.perf_counter() - t_create

        m0 = ray.get(pool.metrics.remote())
        t0 = time.perf_counter()
        end = t0 + args.duration
        received = 0
        while True:
            now = time.perf_counter()
            if now >= end:
                break
            if consumer_rate is not None:  # a learner that falls behind: one sample per 1/rate seconds
                slot = t0 + received / consumer_rate
                if slot >= end:
                    time.sleep(end - now)
                    break
                if slot > now:
                    time.sleep(slot - now)
            batches = ray.get(pool.get.remote(1, timeout_s=max(0.01, end - time.perf_counter())))
            received += sum(b.num_rows for b in batches)
        window = time.perf_counter() - t0
        m1 = ray.get(pool.metrics.remote())
    finally:
        try:
            ray.get(pool.stop.remote(), timeout=60)
        finally:
            ray.kill(pool, no_restart=True)
        time.sleep(2)  # let the killed actor processes exit before the next run starts

    a0, a1 = actor_totals(m0), actor_totals(m1)
    d = {k: a1[k] - a0[k] for k in a0}
    actor_wall = (m1["elapsed_s"] - m0["elapsed_s"]) * n_actors
    work = sum(d[k] for k in STAGES)
    per_actor = {}
    for actor, s1 in m1["actors"].items():
        s0 = m0["actors"][actor]
        w, busy = s1["wait_s"] - s0["wait_s"], sum(s1[k] - s0[k] for k in STAGES)
        per_actor[actor] = {"rollouts": s1["rollouts"] - s0["rollouts"], "wait_s": w, "work_s": busy,
                            "wait_fraction": w / (w + busy) if w + busy > 0 else 0.0}
    return {
        "label": label, "actors": n_actors, "queue_size": queue_size, "consumer_rate": consumer_rate,
        "warmup_s": warmup_s, "window_s": window, "samples": received, "samples_per_s": received / window,
        "rollouts_completed": d["rollouts"], "actor_wall_s": actor_wall, "totals_s": {k: d[k] for k in (*STAGES, "wait_s")},
        "wait_fraction": d["wait_s"] / (d["wait_s"] + work) if d["wait_s"] + work > 0 else 0.0,
        "unaccounted_fraction": max(0.0, 1 - (d["wait_s"] + work) / actor_wall) if actor_wall > 0 else 0.0,
        "stage_ms_per_sample": {k: 1e3 * d[k] / d["rollouts"] if d["rollouts"] else float("nan") for k in STAGES},
        "stage_share": {k: d[k] / work if work else float("nan") for k in STAGES},
        "queue_depth_at_end": m1["queue_depth"], "drops": m1["drops"], "per_actor": per_actor,
    }


def print_table(runs: list[dict]) -> None:
    print(f"{'run':<12} {'actors':>6} {'queue':>5} {'consumer':>9} {'warm-up s':>9} {'samples':>7} {'samples/s':>9} "
          f"{'wait frac':>9} {'unacct':>6}  {'gen ms':>7} {'dec ms':>7} {'score ms':>8}  split gen/dec/score")
    for r in runs:
        ms, sh = r["stage_ms_per_sample"], r["stage_share"]
        consumer = "max" if r["consumer_rate"] is None else f"{r['consumer_rate']:.2f}/s"
        print(f"{r['label']:<12} {r['actors']:>6} {r['queue_size']:>5} {consumer:>9} {r['warmup_s']:9.1f} "
              f"{r['samples']:>7} {r['samples_per_s']:9.3f} {r['wait_fraction']:9.2f} {r['unaccounted_fraction']:6.2f}  "
              f"{ms['generate_s']:7.0f} {ms['decode_s']:7.0f} {ms['score_s']:8.1f}  "
              f"{sh['generate_s']:.0%}/{sh['decode_s']:.0%}/{sh['score_s']:.0%}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--actors", default="1,2,4", help="comma-separated actor counts (default 1,2,4)")
    p.add_argument("--latent-frames", type=int, default=9, help="video.num_latent_frames (default 9)")
    p.add_argument("--duration", type=float, default=30.0, help="timed window per run, seconds (default 30)")
    p.add_argument("--queue-size", type=int, default=8, help="actors.queue_size of the fast runs (default 8)")
    p.add_argument("--actor-cpus", type=float, default=0.5, help="actors.num_cpus, logical (default 0.5)")
    p.add_argument("--reward-cpus", type=float, default=0.5, help="reward replica num_cpus, logical (default 0.5)")
    p.add_argument("--num-cpus", type=int, default=4, help="logical CPUs given to ray.init (default 4)")
    p.add_argument("--slow-actors", type=int, default=2, help="actors in the slow-consumer run (default 2; 0 = skip)")
    p.add_argument("--slow-queue-size", type=int, default=2, help="queue size of the slow-consumer run (default 2)")
    p.add_argument("--slow-factor", type=float, default=0.5,
                   help="slow consumer's rate as a fraction of the measured rate of --slow-actors (default 0.5)")
    p.add_argument("--warmup-timeout", type=float, default=180.0, help="seconds for every actor's first sample")
    p.add_argument("--json", default=None, help="also write the results to this file")
    args = p.parse_args()
    counts = sorted({int(x) for x in args.actors.split(",") if x.strip()})
    if not counts or min(counts) < 1 or args.duration <= 0 or args.latent_frames < 1:
        p.error("--actors must be positive ints; --duration and --latent-frames must be positive")
    if args.actor_cpus * max(counts + [args.slow_actors]) + args.reward_cpus > args.num_cpus:
        p.error("--num-cpus must hold the largest pool (actors x --actor-cpus) plus --reward-cpus")
    if args.slow_actors and not 0 < args.slow_factor < 1:
        p.error("--slow-factor must be in (0, 1)")

    os.environ["OMP_NUM_THREADS"] = "1"
    import torch
    from ray import serve

    from core.config import PLUMBING_CONFIG, load_config
    from reward_service.app import build_app

    torch.set_num_threads(1)
    logging.getLogger("ray").setLevel(logging.WARNING)
    logging.getLogger("ray.serve").setLevel(logging.WARNING)

    machine = machine_info()
    print(f"machine: {machine['cpu']}, {machine['physical_cores']} physical cores, {machine['logical_cpus']} logical "
          f"CPUs; load avg {machine['loadavg_1m_at_start']} at start; Python {machine['python']}, torch "
          f"{machine['torch']}, ray {machine['ray']}", flush=True)
    print(f"ray.init(num_cpus={args.num_cpus}) logical CPUs; actors.num_cpus={args.actor_cpus} (1 torch thread each), "
          f"reward replica num_cpus={args.reward_cpus} (motion backend); tiny config, video.num_latent_frames="
          f"{args.latent_frames}; timed window {args.duration:g} s per run", flush=True)
    print(f"NOTE: this machine has {machine['physical_cores']} physical cores shared by the actors, the reward replica, "
          f"the pool, the driver and Ray itself: scaling beyond {machine['physical_cores']} actors cannot be expected. "
          "The point is the measurement and where actor time goes.", flush=True)

    results: dict = {"machine": machine, "args": vars(args), "runs": []}
    stack = contextlib.ExitStack()
    try:
        stack.enter_context(local_ray_serve(args.num_cpus, 120, {"OMP_NUM_THREADS": "1"}))
        reward_cfg = load_config(PLUMBING_CONFIG, ["reward.backend=motion", f"reward_service.app_name={APP}",
                                        f"reward_service.num_cpus={args.reward_cpus}"])
        serve.run(build_app(reward_cfg), name=APP, route_prefix=f"/{APP}")

        runs = results["runs"]
        for n in counts:
            r = run_pool(args, f"fast-{n}", n, args.queue_size, None)
            runs.append(r)
            print(f"  {r['label']}: {r['samples']} samples in {r['window_s']:.1f} s = {r['samples_per_s']:.3f}/s, "
                  f"wait fraction {r['wait_fraction']:.2f} (warm-up {r['warmup_s']:.1f} s)", flush=True)
        rate = {r["actors"]: r["samples_per_s"] for r in runs}
        if args.slow_actors:
            base = rate.get(args.slow_actors)
            if base is None:
                base = run_pool(args, f"fast-{args.slow_actors}", args.slow_actors, args.queue_size, None)["samples_per_s"]
            r = run_pool(args, f"slow-{args.slow_actors}", args.slow_actors, args.slow_queue_size, args.slow_factor * base)
            runs.append(r)
            print(f"  {r['label']}: consumer paced to {r['consumer_rate']:.3f}/s; {r['samples']} samples in "
                  f"{r['window_s']:.1f} s, wait fraction {r['wait_fraction']:.2f}", flush=True)

        print()
        print_table(runs)
        print()
        for r in runs:
            parts = ", ".join(f"{a.rsplit('-', 1)[-1]}: {s['rollouts']} rollouts, wait {s['wait_fraction']:.2f}"
                              for a, s in r["per_actor"].items())
            print(f"per actor {r['label']:<8} {parts}")
        if 1 in rate:
            scaling = {f"{n}/1": rate[n] / rate[1] for n in counts if n != 1}
            results["scaling"] = scaling
            print("SCALING vs 1 actor: " + ", ".join(f"{k} x{v:.2f}" for k, v in scaling.items())
                  + f" (on {machine['physical_cores']} physical cores)")
        finish(results, args.json)
        return 0
    finally:
        stack.close()


if __name__ == "__main__":
    sys.exit(main())
