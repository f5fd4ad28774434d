"""End-to-end steps/s of the tiny distillation job with actors.max_staleness 0 against 1, and the learner's idle fraction.

What it measures
----------------
The whole job, `python launch.py train` on the plumbing config (configs/plumbing.yaml: the
reward service on Ray Serve, 2 rollout actors, 1 DeepSpeed learner worker on Ray Train, all on
CPU), run as a subprocess for each `actors.max_staleness` setting (--settings, default 0,1),
the settings alternating --repeats times (default 2: 0,1,0,1) to spread drift over both. Each
run gets `learner.max_steps` = --steps (default 40), a fresh temporary `learner.output_dir`,
`learner.video_every=0` (no sample videos), `learner.checkpoint_every=100000` (only the final
checkpoint), its own local Ray (`--address local`, never a running cluster) and Serve's HTTP
proxy on a free localhost port (`reward_service.port`). From the run's `metrics.csv` and
`summary.json`:

  steady steps/s  (last step - step k) / (wall_s[last] - wall_s[k]), k = --skip (default 5):
                  excludes the start-up (Ray, Serve, Ray Train, DeepSpeed init, the first
                  rollouts). `wall_s` is when the job's driver drained the row (it polls every
                  1 s), so each end is late by up to 1 s. "last" is the last row drained while
                  the learner ran (rows drained after it ended have no pool columns and a
                  wall_s that includes the final checkpoint, the export and Ray Train's teardown).
  whole-run steps/s  steps / the `launch.py train` process's whole wall time (start-up and shutdown
                  included; summary.json's steps_per_s counts training time only).
  idle fraction   sum(sample_wait_s) / sum(iteration_s) over the same steps k+1..last: the
                  share of the learner's iteration time spent waiting for a sample
                  (iteration_s includes that wait).
  learner steps/s (steps k+1..last) / sum(iteration_s): the learner's own rate, a cross-check
                  of the steady rate without the driver's polling granularity.
  drops           summary.json's drops (stale: samples older than max_staleness versions when
                  the learner asked for them; other reasons are listed if any).
  staleness       mean of `staleness` (learner version - the sample's weight version) over
                  the steady steps, i.e. over the consumed samples (batch size 1).

Medians over repeats are reported per setting, and the ratio staleness 1 / staleness 0. The
tiny job is bound by the rollouts (the tiny random VAE decode on CPU, ~1-3 s per sample) on a
small machine, so the learner mostly waits; the point is how much the on-policy setting adds
to that wait.

How to run (from the repository root)
-------------------------------------
    python benchmarks/staleness_throughput.py                        # 4 runs, ~6-10 min on 2 cores
    python benchmarks/staleness_throughput.py --repeats 1 --steps 30
    python benchmarks/staleness_throughput.py --settings 0,1,2 --json staleness.json

Needs Ray with Serve and Train, DeepSpeed, torch and this repository's packages (what
`launch.py train` needs).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))  # run as a script from anywhere

from benchmarks.common import cpu_model, finish, free_port, load_1m, physical_cores, steady_state  # noqa: E402


def machine_info() -> dict:
    import ray
    import torch

    return {"cpu": cpu_model(), "logical_cpus": os.cpu_count() or 1, "physical_cores": physical_cores(),
            "python": platform.python_version(), "torch": torch.__version__, "ray": ray.__version__,
            "loadavg_1m_at_start": load_1m()}


def run_job(staleness: int, args, out: Path) -> dict:
    cmd = [sys.executable, "launch.py", "train", "--config", "configs/plumbing.yaml", "--address", "local",
           f"actors.max_staleness={staleness}",
           f"learner.max_steps={args.steps}", f"learner.output_dir={out}", "learner.video_every=0",
           "learner.checkpoint_every=100000", f"reward_service.port={free_port()}"]
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("RAY_ADDRESS", None)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=args.run_timeout)
    elapsed = time.perf_counter() - t0
    if proc.returncode != 0:
        tail = "\n".join(proc.stderr.splitlines()[-40:])
        raise RuntimeError(f"`{' '.join(cmd)}` exited with {proc.returncode} after {elapsed:.0f} s; stderr tail:\n{tail}")
    steady = steady_state(out, args.skip)
    return {"max_staleness": staleness, "process_s": elapsed, "whole_run_wall_s": elapsed,
            "whole_run_steps_per_s": steady["steps"] / elapsed, **steady}


def median(runs: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in runs)


def print_table(runs: list[dict], settings: list[int], skip: int) -> None:
    print(f"{'run':<8} {'stale':>5} {'steady steps/s':>14} {'whole-run steps/s':>17} {'learner steps/s':>15} "
          f"{'idle frac':>9} {'wait gen/critic s':>17} {'stale drops':>11} {'delivered':>9} {'mean stale':>10} "
          f"{f'@step {skip} s':>10} {'run s':>6}")
    for i, r in enumerate(runs):
        print(f"{i + 1:<8} {r['max_staleness']:>5} {r['steady_steps_per_s']:14.3f} {r['whole_run_steps_per_s']:17.3f} "
              f"{r['learner_steps_per_s']:15.3f} {r['idle_fraction']:9.2f} "
              f"{r['mean_wait_s_generator_steps']:8.2f}/{r['mean_wait_s_critic_steps']:<8.2f} {r['stale_drops']:>11} "
              f"{r['samples_delivered']:>9} {r['mean_staleness']:10.2f} {r['startup_s']:10.1f} {r['whole_run_wall_s']:6.1f}")
    for s in settings:
        rs = [r for r in runs if r["max_staleness"] == s]
        print(f"{'median':<8} {s:>5} {median(rs, 'steady_steps_per_s'):14.3f} {median(rs, 'whole_run_steps_per_s'):17.3f} "
              f"{median(rs, 'learner_steps_per_s'):15.3f} {median(rs, 'idle_fraction'):9.2f} "
              f"{median(rs, 'mean_wait_s_generator_steps'):8.2f}/{median(rs, 'mean_wait_s_critic_steps'):<8.2f} "
              f"{median(rs, 'stale_drops'):>11g} {median(rs, 'samples_delivered'):>9g} {median(rs, 'mean_staleness'):10.2f} "
              f"{median(rs, 'startup_s'):10.1f} {median(rs, 'whole_run_wall_s'):6.1f}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--settings", default="0,1", help="comma-separated actors.max_staleness values (default 0,1)")
    p.add_argument("--repeats", type=int, default=2, help="runs per setting, the settings alternating (default 2)")
    p.add_argument("--steps", type=int, default=40, help="learner.max_steps per run (default 40)")
    p.add_argument("--skip", type=int, default=5, help="steady state starts after this step (default 5)")
    p.add_argument("--run-timeout", type=float, default=600.0, help="seconds per `launch.py train` run (default 600)")
    p.add_argument("--json", default=None, help="also write the results to this file")
    args = p.parse_args()
    settings = [int(x) for x in args.settings.split(",") if x.strip()]
    if not settings or min(settings) < 0 or len(set(settings)) != len(settings):
        p.error("--settings must be distinct non-negative ints")
    if args.repeats < 1 or args.skip < 1 or args.steps < args.skip + 5:
        p.error("--repeats and --skip must be >= 1, and --steps >= --skip + 5")

    machine = machine_info()
    print(f"machine: {machine['cpu']}, {machine['physical_cores']} physical cores, {machine['logical_cpus']} logical "
          f"CPUs; load avg {machine['loadavg_1m_at_start']} at start; Python {machine['python']}, torch "
          f"{machine['torch']}, ray {machine['ray']}", flush=True)
    print(f"`launch.py train` (plumbing config: reward service + 2 rollout actors + 1 DeepSpeed learner worker), "
          f"learner.max_steps={args.steps}, no videos, final checkpoint only; actors.max_staleness in {settings}, "
          f"alternating, {args.repeats} run(s) each; steady state = steps {args.skip + 1}..last", flush=True)

    results: dict = {"machine": machine, "args": vars(args), "runs": []}
    runs = results["runs"]
    with tempfile.TemporaryDirectory(prefix="staleness_bench_") as tmp:
        for rep in range(args.repeats):
            for s in settings:
                r = run_job(s, args, Path(tmp) / f"run{rep}_s{s}")
                runs.append(r)
                print(f"  max_staleness={s} (repeat {rep + 1}): steady {r['steady_steps_per_s']:.3f} steps/s "
                      f"(steps {r['window_steps']} in {r['window_wall_s']:.1f} s), whole run {r['whole_run_steps_per_s']:.3f} "
                      f"steps/s ({r['whole_run_wall_s']:.1f} s), idle {r['idle_fraction']:.2f}, drops {r['drops']}, "
                      f"mean staleness {r['mean_staleness']:.2f}", flush=True)

    print()
    print_table(runs, settings, args.skip)
    per = {s: [r for r in runs if r["max_staleness"] == s] for s in settings}
    results["medians"] = {s: {k: median(rs, k) for k in ("steady_steps_per_s", "whole_run_steps_per_s",
                                                         "learner_steps_per_s", "idle_fraction", "stale_drops",
                                                         "mean_staleness")} for s, rs in per.items()}
    if 0 in per and 1 in per:
        m0, m1 = results["medians"][0], results["medians"][1]
        results["ratios"] = {"steady": m1["steady_steps_per_s"] / m0["steady_steps_per_s"],
                             "whole_run": m1["whole_run_steps_per_s"] / m0["whole_run_steps_per_s"]}
    print()
    finish(results, args.json)
    if "ratios" in results:
        print(f"RATIOS: steps/s staleness1/staleness0 x{results['ratios']['steady']:.2f} (steady), "
              f"x{results['ratios']['whole_run']:.2f} (whole run); learner idle fraction 0: {m0['idle_fraction']:.2f}, "
              f"1: {m1['idle_fraction']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
