"""Reward service throughput: dynamic batching vs batch size 1, and HTTP vs in-process calls.

What it measures
----------------
One local Ray (`ray.init(address="local", num_cpus=4)`) with Serve's HTTP proxy on a free
localhost port. The same backend is deployed twice with `reward_service.app.build_app`:

    app "b<N>"  at /b<N>  reward_service.max_batch_size = --max-batch-size (default 8)
    app "b1"    at /b1    reward_service.max_batch_size = 1
    (both with batch_wait_timeout_s = --batch-wait, default 0.05 s; one replica of 1 CPU each)

One video (`--frames` x `--size` x `--size` uint8 RGB, default 16 x 64 x 64, 16 fps, random
pixels, a fixed prompt) is scored `--clients` x `--requests` times per path (default 8 x 8 = 64),
`--clients` callers at once, along these paths:

* HTTP: `--clients` threads, each with its own `RewardHTTPClient` (httpx, one keep-alive
  connection) calling `score_frames`, i.e. POST /v1/score with raw uint8 frames as
  `application/octet-stream` (client -> Serve HTTP proxy actor -> replica). Against both apps.
* handle: `RewardHandleClient(app).score` with uint8 numpy frames from the driver, `--clients`
  coroutines under one `asyncio.gather` (driver -> replica through a DeploymentHandle, no HTTP;
  the path rollout actors use). Against both apps.
* direct: `backend.score_batch` called in the driver process on a backend built from the same
  config (no Ray at all), sequentially, in batches of --max-batch-size and of 1. This is the
  model's own cost: the ceiling for any served path on this machine.

Every path is warmed up (untimed: `--clients` concurrent requests, twice) before it is timed.
The paths run one after another (never overlapping), `--rounds` times in turn (default 2), so
drift on a shared machine hits all of them; requests/s is total requests over total time, with
the per-round values alongside. For the served paths the script also prints per-request latency
(p50/p95) and the batch sizes the server actually formed during the timed run (from
GET /v1/info `batching.recent_batch_sizes`, which keeps the last 32 batches; the batches of a run
are the newest ones whose sizes add up to its request count).

Ratios printed (targets from the issue):
  batching   HTTP b<N> / HTTP b1 requests/s           (target >= 2x at 8 concurrent clients)
  transport  HTTP b<N> / handle b<N>                   (target >= 0.8x; "in-process" = the
             DeploymentHandle path, i.e. same replica and batching, minus HTTP and the proxy)
             HTTP b<N> / direct score_batch(<N>) and handle b<N> / direct score_batch(<N>)
             (against the model called in the driver process with full batches: the ceiling)

Backends
--------
`--backend videoreward` (default): a tiny random Qwen2-VL VideoReward checkpoint in the released
folder layout (model_config.json + checkpoint-<step>/model.pth with a LoRA-wrapped state dict,
tokenizer, config.json), written to a temporary folder by `write_release` of
`tests/videoreward_release.py` (what the tests use; it needs peft and transformers).
The backend runs on CPU in float32 (`reward.device=cpu reward.dtype=float32`). Note that the
release's sampling rules upscale small frames to at least 128*28*28 pixels: a 64x64 video is
read as 4 frames of 336x336 (288 video tokens + the ~780-token prompt); with `--size 96` or more
the frames are downscaled to the checkpoint's max_frame_pixels (56x56, 8 video tokens).

`--backend motion`: the pixel scorer (no weights). Its score_batch loops over the videos one by
one, so batching can only save per-batch overhead there; expect little from it.

How to run (from the repository root)
-------------------------------------
    python benchmarks/reward_service_throughput.py                       # videoreward, 8 clients x 8 requests
    python benchmarks/reward_service_throughput.py --backend motion --requests 16
    python benchmarks/reward_service_throughput.py --size 96 --json out.json

Needs Ray with Serve, httpx, torch and this repository's `core` and `reward_service`
packages; `--backend videoreward` also needs transformers, peft and pytest. `--threads`
(default 1) sets torch's intra-op threads in the driver and, through OMP_NUM_THREADS in the
runtime env, in the replicas: on a small or shared CPU one thread per process keeps the
processes from oversubscribing the cores.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))  # run as a script from anywhere

import numpy as np  # noqa: E402

from benchmarks.common import cpu_model, finish, local_ray_serve  # noqa: E402

PROMPT = "a red circle moves left across a blue background"
FPS = 16.0


# ----------------------------------------------------------------------------- setup


def machine_info(threads: int) -> dict:
    import ray
    import torch

    cpu = cpu_model()
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return {"cpu": cpu, "cores": os.cpu_count(), "usable_cores": usable, "python": platform.python_version(),
            "torch": torch.__version__, "ray": ray.__version__, "torch_threads": threads,
            "loadavg_1m_at_start": round(load[0], 2) if load else None}


def build_tiny_videoreward(root: Path) -> Path:
    """A tiny random VideoReward release folder under `root` (tests/videoreward_release.py, what the tests use)."""
    sys.path.insert(0, str(REPO_ROOT / "tests"))
    from videoreward_release import write_release

    folder = Path(tempfile.mkdtemp(prefix="VideoReward-", dir=root))
    return write_release(folder).root


def overrides_for(args, checkpoint: Path | None, app: str, batch: int) -> list[str]:
    backend = [f"reward.backend={args.backend}"]
    if args.backend != "motion":  # the model backends run on CPU in float32 here; motion has no settings
        backend += ["reward.dtype=float32"] + (["reward.device=cpu"] if args.backend == "videoreward" else [])
    out = [*backend, f"reward_service.app_name={app}", f"reward_service.max_batch_size={batch}",
           f"reward_service.batch_wait_timeout_s={args.batch_wait}", "reward_service.num_cpus=1",
           f"reward_service.max_ongoing_requests={max(16, 2 * args.clients)}",
           f"reward_service.max_queued_requests={max(32, 4 * args.clients)}"]
    if checkpoint is not None:
        out.append(f"reward.checkpoint={checkpoint}")
    return out



# ----------------------------------------------------------------------------- paths


def run_http(url: str, video: np.ndarray, clients: int, requests: int) -> tuple[float, list[float]]:
    """`clients` threads, `requests` POSTs each; (wall seconds, per-request latencies in s)."""
    from reward_service.client import RewardHTTPClient

    latencies: list[float] = []
    errors: list[BaseException] = []
    lock = threading.Lock()
    start_line = threading.Barrier(clients + 1, timeout=120)

    def worker() -> None:
        mine = []
        try:
            with RewardHTTPClient(url, timeout_s=300, retries=0) as client:
                client.http.get(url + "/healthz").raise_for_status()  # connect before the clock starts
                start_line.wait()
                for _ in range(requests):
                    t = time.perf_counter()
                    client.score_frames(video, FPS, PROMPT)
                    mine.append(time.perf_counter() - t)
        except Exception as e:  # noqa: BLE001 (collected, raised by the caller)
            start_line.abort()  # nobody waits forever for a client that died before the start
            with lock:
                errors.append(e)
        with lock:
            latencies.extend(mine)

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(clients)]
    for th in threads:
        th.start()
    try:
        start_line.wait()
    except threading.BrokenBarrierError:
        pass  # a client failed before the start; reported below
    t0 = time.perf_counter()
    for th in threads:
        th.join()
    wall = time.perf_counter() - t0
    if errors:
        cause = next((e for e in errors if not isinstance(e, threading.BrokenBarrierError)), errors[0])
        raise RuntimeError(f"{len(errors)} HTTP client(s) failed: {cause!r}")
    return wall, latencies


def run_handle(app: str, video: np.ndarray, clients: int, requests: int) -> tuple[float, list[float]]:
    """`clients` coroutines, `requests` DeploymentHandle calls each, under one asyncio.gather."""
    from reward_service.client import RewardHandleClient

    async def main() -> tuple[float, list[float]]:
        client = RewardHandleClient(app, timeout_s=300, retries=0)
        latencies: list[float] = []

        async def worker() -> None:
            for _ in range(requests):
                t = time.perf_counter()
                await client.score(video, FPS, PROMPT)
                latencies.append(time.perf_counter() - t)

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(clients)))
        return time.perf_counter() - t0, latencies

    return asyncio.run(main())


def run_direct(backend, video: np.ndarray, total: int, batch: int) -> tuple[float, list[float]]:
    """`backend.score_batch` in this process, sequentially, `total` videos in batches of `batch`."""
    from core.reward.base import VideoInput

    videos = [VideoInput(video, FPS, PROMPT) for _ in range(batch)]
    t0 = time.perf_counter()
    done = 0
    while done < total:
        n = min(batch, total - done)
        backend.score_batch(videos[:n])
        done += n
    return time.perf_counter() - t0, []


def batches_of_run(info: dict, requests: int) -> tuple[list[int], bool]:
    """The newest recent_batch_sizes adding up to `requests` (the batches of the run that just ended);
    the bool says whether the whole run is covered (the server keeps only the last 32)."""
    recent = info["batching"]["recent_batch_sizes"]
    picked, total = [], 0
    for size in reversed(recent):
        if total >= requests:
            break
        picked.append(size)
        total += size
    return picked[::-1], total >= requests


# ----------------------------------------------------------------------------- main


def verdict(ok: bool) -> str:
    return "met" if ok else "NOT met"


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, max(0, round(q * (len(values) - 1))))]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--backend", choices=("videoreward", "motion"), default="videoreward")
    p.add_argument("--frames", type=int, default=16, help="frames per video (default 16)")
    p.add_argument("--size", type=int, default=64, help="frame height and width in pixels (default 64)")
    p.add_argument("--clients", type=int, default=8, help="concurrent callers (default 8)")
    p.add_argument("--requests", type=int, default=8, help="requests per caller per round (default 8)")
    p.add_argument("--rounds", type=int, default=2, help="times every path is timed, in turn (default 2)")
    p.add_argument("--max-batch-size", type=int, default=8, help="max_batch_size of the batched app (default 8)")
    p.add_argument("--batch-wait", type=float, default=0.05, help="batch_wait_timeout_s (default 0.05)")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads per process (default 1)")
    p.add_argument("--json", default=None, help="also write the results to this file")
    args = p.parse_args()
    if min(args.frames, args.size, args.clients, args.requests, args.rounds, args.threads) < 1:
        p.error("--frames, --size, --clients, --requests, --rounds and --threads must be >= 1")
    if args.max_batch_size < 2:
        p.error("--max-batch-size must be >= 2 (the batched app is compared with batch size 1)")

    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    import httpx
    import torch
    from ray import serve

    from core.config import load_config
    from core.reward.registry import build_backend
    from reward_service.app import build_app

    torch.set_num_threads(args.threads)
    logging.getLogger("ray").setLevel(logging.WARNING)
    logging.getLogger("ray.serve").setLevel(logging.WARNING)

    machine = machine_info(args.threads)
    b = args.max_batch_size
    total = args.clients * args.requests
    print(f"machine: {machine['cpu']}, {machine['cores']} cores ({machine['usable_cores']} usable), "
          f"load avg {machine['loadavg_1m_at_start']} at start; Python {machine['python']}, torch {machine['torch']}, "
          f"ray {machine['ray']}; {args.threads} torch thread(s) per process", flush=True)
    print(f"backend {args.backend}; video {args.frames}x{args.size}x{args.size} uint8 at {FPS:g} fps "
          f"({args.frames * args.size * args.size * 3} bytes); {args.clients} concurrent callers x {args.requests} "
          f"requests = {total} per path per round, {args.rounds} round(s); apps: max_batch_size {b} and 1, "
          f"batch_wait_timeout_s {args.batch_wait}", flush=True)

    video = np.random.default_rng(0).integers(0, 256, (args.frames, args.size, args.size, 3), dtype=np.uint8)
    apps = {f"b{b}": b, "b1": 1}

    workdir = Path(tempfile.mkdtemp(prefix="reward_bench_"))
    results: dict = {"machine": machine, "args": vars(args), "paths": {}, "ratios": {}}
    stack = contextlib.ExitStack()
    try:
        checkpoint = None
        if args.backend == "videoreward":
            t = time.perf_counter()
            checkpoint = build_tiny_videoreward(workdir)
            print(f"tiny VideoReward checkpoint (tests/videoreward_release.py) at {checkpoint} "
                  f"in {time.perf_counter() - t:.1f} s", flush=True)

        base = stack.enter_context(local_ray_serve(4, 300, {"OMP_NUM_THREADS": str(args.threads)}))
        configs = {}
        for name, batch in apps.items():
            configs[name] = load_config(REPO_ROOT / "configs" / "reward_service.yaml",
                                        overrides_for(args, checkpoint, name, batch))
            serve.run(build_app(configs[name]), name=name, route_prefix=f"/{name}")
        for name in apps:
            assert httpx.get(f"{base}/{name}/healthz", timeout=60).json() == {"status": "ok"}
        direct_backend = build_backend(configs[f"b{b}"].reward)

        # name -> (kind, target, batch)
        paths = {
            f"HTTP b{b}": ("http", f"b{b}", b), "HTTP b1": ("http", "b1", 1),
            f"handle b{b}": ("handle", f"b{b}", b), "handle b1": ("handle", "b1", 1),
            f"direct b{b}": ("direct", None, b), "direct b1": ("direct", None, 1),
        }

        def once(kind: str, target: str | None, batch: int, requests: int) -> tuple[float, list[float]]:
            if kind == "http":
                return run_http(f"{base}/{target}", video, args.clients, requests)
            if kind == "handle":
                return run_handle(target, video, args.clients, requests)
            return run_direct(direct_backend, video, args.clients * requests, batch)

        t = time.perf_counter()
        for kind, target, batch in paths.values():  # warm-up: untimed
            once(kind, target, batch, 2)
        print(f"warm-up done in {time.perf_counter() - t:.1f} s", flush=True)

        stats = {name: {"wall": [], "latency": [], "batches": [], "covered": True} for name in paths}
        for r in range(args.rounds):
            for name, (kind, target, batch) in paths.items():
                wall, latency = once(kind, target, batch, args.requests)
                s = stats[name]
                s["wall"].append(wall)
                s["latency"].extend(latency)
                if target is not None:
                    info = httpx.get(f"{base}/{target}/v1/info", timeout=60).json()
                    sizes, covered = batches_of_run(info, total)
                    s["batches"].extend(sizes)
                    s["covered"] &= covered
                print(f"  round {r + 1}: {name:<10} {total / wall:8.2f} req/s", flush=True)

        print()
        header = (f"{'path':<10} {'batch':>5} {'req':>5} {'req/s':>8} {'per round':>20} {'p50 ms':>8} {'p95 ms':>8}  "
                  "batches formed (timed runs)")
        print(header)
        rps = {}
        for name, (kind, target, batch) in paths.items():
            s = stats[name]
            n = total * len(s["wall"])
            rps[name] = n / sum(s["wall"])
            rounds = "/".join(f"{total / w:.1f}" for w in s["wall"])
            lat = s["latency"]
            p50 = f"{percentile(lat, 0.5) * 1e3:8.1f}" if lat else f"{'-':>8}"
            p95 = f"{percentile(lat, 0.95) * 1e3:8.1f}" if lat else f"{'-':>8}"
            if s["batches"]:
                sizes = s["batches"]
                hist = ", ".join(f"{sizes.count(k)} of {k}" for k in sorted(set(sizes), reverse=True))
                note = "" if s["covered"] else " (the last 32 of each run)"
                formed = f"mean {statistics.mean(sizes):.2f}: {hist}{note}"
            else:
                formed = f"(score_batch of {batch}, sequential)"
            print(f"{name:<10} {batch:>5} {n:>5} {rps[name]:8.2f} {rounds:>20} {p50} {p95}  {formed}")
            results["paths"][name] = {"kind": kind, "batch": batch, "requests": n, "req_per_s": rps[name],
                                      "per_round_req_per_s": [total / w for w in s["wall"]],
                                      "latency_ms_p50": percentile(lat, 0.5) * 1e3 if lat else None,
                                      "latency_ms_p95": percentile(lat, 0.95) * 1e3 if lat else None,
                                      "batch_sizes": s["batches"], "batch_sizes_cover_runs": s["covered"]}

        ratios = {
            f"batching HTTP b{b}/b1": rps[f"HTTP b{b}"] / rps["HTTP b1"],
            f"batching handle b{b}/b1": rps[f"handle b{b}"] / rps["handle b1"],
            f"batching direct b{b}/b1": rps[f"direct b{b}"] / rps["direct b1"],
            f"HTTP/handle b{b}": rps[f"HTTP b{b}"] / rps[f"handle b{b}"],
            f"HTTP/direct b{b}": rps[f"HTTP b{b}"] / rps[f"direct b{b}"],
            f"handle/direct b{b}": rps[f"handle b{b}"] / rps[f"direct b{b}"],
        }
        results["ratios"] = ratios
        print()
        print(f"RATIOS: batching (HTTP, {args.clients} clients) b{b}/b1 x{ratios[f'batching HTTP b{b}/b1']:.2f} "
              f"[target >= 2x: {verdict(ratios[f'batching HTTP b{b}/b1'] >= 2)}]; "
              f"handle b{b}/b1 x{ratios[f'batching handle b{b}/b1']:.2f}; "
              f"direct score_batch({b})/score_batch(1) x{ratios[f'batching direct b{b}/b1']:.2f}")
        print(f"RATIOS: HTTP / in-process (DeploymentHandle, same app b{b}) x{ratios[f'HTTP/handle b{b}']:.2f} "
              f"[target >= 0.8x: {verdict(ratios[f'HTTP/handle b{b}'] >= 0.8)}]; "
              f"HTTP / direct score_batch({b}) in the driver x{ratios[f'HTTP/direct b{b}']:.2f}; "
              f"handle / direct x{ratios[f'handle/direct b{b}']:.2f}")
        finish(results, args.json)
        return 0
    finally:
        stack.close()
        import shutil

        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
