"""What following training costs: the main job's steps/s with and without a streaming follower, and the switch latency.

What it measures
----------------
The main job, `python launch.py train` on the embedded default (the toy world: reward service, 2 rollout actors,
1 DeepSpeed learner worker), run as a subprocess alternately without and with `--serve` (--repeats times each,
default 2). Each run gets `learner.max_steps` = --steps (default 40), a fresh temporary output folder, no sample
videos, only the final checkpoint, no before/after evaluation, its own local Ray and Serve's proxy on a free port.
In a `--serve` run a client (serve.client.read_stream, which reads as the web page plays: at the stream's fps,
pausing the server while more than 3 s of frames wait) holds one stream open from the moment the app is up until
the job ends. From each run:

  steady steps/s     as benchmarks/staleness_throughput.py: (last step - step k) / wall time between their rows,
                     k = --skip (default 5): start-up excluded
  publish to frame   per weight switch the stream announced: wall clock from the learner's publication of the
                     version (the pool's relay stamps it) to the stream's first frame under it being sent
  switch             the replica's part of it: re-caching the session's window under the new generator
  max frame gap      the longest wait between two frames the client received (its own pauses included)
  jump at a switch   the mean absolute change (0-255) from the last frame before a weight switch to the first
                     after it, over the same change at the stream's other block boundaries (1: a switch jumps
                     no more than an ordinary block boundary)

Medians over runs, and the ratio of steady steps/s with / without the follower.

    python benchmarks/serve_following.py                 # 4 runs, ~6 min on 2 cores
    python benchmarks/serve_following.py --repeats 1 --json following.json
"""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))  # run as a script from anywhere

from benchmarks.common import cpu_model, finish, free_port, load_1m, physical_cores, steady_state  # noqa: E402
from serve.client import read_stream  # noqa: E402

URL_LINE = re.compile(r"streaming app following the training: open (\S+)")
PROMPT = "a red circle moves quickly left across a gray background"


def _job(out: Path, steps: int, follow: bool) -> tuple[list[str], dict]:
    cmd = [sys.executable, "launch.py", "train", *(["--serve"] if follow else []), "--address", "local",
           f"learner.max_steps={steps}", f"learner.output_dir={out}", "learner.video_every=0",
           "learner.checkpoint_every=100000", "evaluation.around_train=false", f"reward_service.port={free_port()}"]
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("RAY_ADDRESS", None)
    return cmd, env


def _jumps(frames: list, switch_frames: set[int]) -> tuple[list[float], list[float]]:
    """Mean |change| across each block boundary: at weight switches, and at the other boundaries."""
    def pixels(f) -> np.ndarray:
        return np.asarray(Image.open(io.BytesIO(f.jpeg)).convert("RGB"), dtype=np.float64)

    at_switch, ordinary = [], []
    for before, after in zip(frames, frames[1:]):
        if after.block != before.block:
            change = float(np.abs(pixels(after) - pixels(before)).mean())
            (at_switch if after.index in switch_frames else ordinary).append(change)
    return at_switch, ordinary


def _watch(proc: subprocess.Popen, stdout: Path, timeout_s: float) -> dict:
    """Wait for the app's URL, then hold a stream open until the job ends; the stream's numbers."""
    deadline = time.monotonic() + timeout_s
    while not (urls := URL_LINE.findall(stdout.read_text())):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"the job ended or timed out before its streaming app was up: {stdout.read_text()[-2000:]}")
        time.sleep(0.5)
    url = urls[0].replace("http://", "ws://", 1) + "v1/stream"
    frames, messages = asyncio.run(read_stream(url, {"prompt": PROMPT, "seed": 0}, until=lambda f, m: proc.poll() is not None,
                                               max_gap_s=60, deadline_s=max(1.0, deadline - time.monotonic())))
    switches = [m for m in messages if m["type"] == "weights"]
    at_switch, ordinary = _jumps(frames, {m["at_frame"] for m in switches})
    return {"frames": len(frames), "versions_seen": len({f.version for f in frames}), "switches": len(switches),
            "jump_at_switch": at_switch, "jump_at_other_boundaries": ordinary,
            "publish_to_frame_s": [m["publish_to_frame_s"] for m in switches],
            "switch_ms": [m["switch_ms"] for m in switches],
            "max_frame_gap_s": max((b.arrived - a.arrived for a, b in zip(frames, frames[1:])), default=None)}


def run_job(follow: bool, args, out: Path) -> dict:
    cmd, env = _job(out, args.steps, follow)
    stdout, stderr = out.parent / f"{out.name}.stdout", out.parent / f"{out.name}.stderr"
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=stdout.open("w"), stderr=stderr.open("w"), text=True)
    try:
        stream = _watch(proc, stdout, args.run_timeout) if follow else {}
        proc.wait(timeout=args.run_timeout)
    finally:
        proc.kill()
    if proc.returncode != 0:
        raise RuntimeError(f"`{' '.join(cmd)}` exited with {proc.returncode}; stderr tail:\n{stderr.read_text()[-3000:]}")
    return {"follower": follow, "process_s": time.perf_counter() - t0, **steady_state(out, args.skip), **stream}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--repeats", type=int, default=2, help="runs with and without the follower, alternating (default 2)")
    p.add_argument("--steps", type=int, default=40, help="learner.max_steps per run (default 40)")
    p.add_argument("--skip", type=int, default=5, help="steady state starts after this step (default 5)")
    p.add_argument("--run-timeout", type=float, default=900.0, help="seconds per run (default 900)")
    p.add_argument("--json", default=None, help="also write the results to this file")
    args = p.parse_args()
    if args.repeats < 1 or args.skip < 1 or args.steps < args.skip + 5:
        p.error("--repeats and --skip must be >= 1, and --steps >= --skip + 5")
    machine = {"cpu": cpu_model(), "physical_cores": physical_cores(), "loadavg_1m_at_start": load_1m()}
    print(f"machine: {machine['cpu']}, {machine['physical_cores']} physical cores, load avg "
          f"{machine['loadavg_1m_at_start']} at start; `launch.py train` (embedded default), "
          f"learner.max_steps={args.steps}, without / with --serve and one paced stream, {args.repeats} run(s) each",
          flush=True)
    runs: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="following_bench_") as tmp:
        for rep in range(args.repeats):
            for follow in (False, True):
                r = run_job(follow, args, Path(tmp) / f"run{rep}_{'follow' if follow else 'plain'}")
                runs.append(r)
                extra = (f", {r['switches']} switches over {r['frames']} frames, publish to frame "
                         f"{statistics.median(r['publish_to_frame_s']):.2f} s (median), max frame gap "
                         f"{r['max_frame_gap_s']:.2f} s" if follow and r["switches"] else "")
                print(f"  {'with' if follow else 'without'} follower (repeat {rep + 1}): steady "
                      f"{r['steady_steps_per_s']:.3f} steps/s (steps {r['window_steps']}){extra}", flush=True)
    plain = [r for r in runs if not r["follower"]]
    followed = [r for r in runs if r["follower"]]
    latencies = sorted(x for r in followed for x in r["publish_to_frame_s"])
    switch_ms = sorted(x for r in followed for x in r["switch_ms"])
    results = {"machine": machine, "args": vars(args), "runs": runs, "medians": {
        "steady_steps_per_s_without": statistics.median(r["steady_steps_per_s"] for r in plain),
        "steady_steps_per_s_with": statistics.median(r["steady_steps_per_s"] for r in followed),
        "publish_to_frame_s": statistics.median(latencies) if latencies else None,
        "publish_to_frame_s_max": latencies[-1] if latencies else None,
        "switch_ms": statistics.median(switch_ms) if switch_ms else None,
        "max_frame_gap_s": max(r["max_frame_gap_s"] for r in followed if r["max_frame_gap_s"] is not None),
        "jump_at_switch": statistics.fmean(x for r in followed for x in r["jump_at_switch"]),
        "jump_at_other_boundaries": statistics.fmean(x for r in followed for x in r["jump_at_other_boundaries"])}}
    m = results["medians"]
    ratio = m["steady_steps_per_s_with"] / m["steady_steps_per_s_without"]
    results["ratio_steps_per_s_with_over_without"] = ratio
    print()
    finish(results, args.json)
    print(f"RATIO: steady steps/s with / without a follower x{ratio:.2f} ({m['steady_steps_per_s_with']:.3f} / "
          f"{m['steady_steps_per_s_without']:.3f}); publish to first frame {m['publish_to_frame_s']:.2f} s median "
          f"(max {m['publish_to_frame_s_max']:.2f} s) over {len(latencies)} switches, of which the window re-cache "
          f"{m['switch_ms']:.1f} ms; longest frame gap {m['max_frame_gap_s']:.2f} s; jump at a switch / at other block "
          f"boundaries x{m['jump_at_switch'] / m['jump_at_other_boundaries']:.2f} ({m['jump_at_switch']:.2f} / "
          f"{m['jump_at_other_boundaries']:.2f} of 255)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
