"""Weight publication: WeightPublisher.publish (object store) + an actor's load vs a plain ray.put + ray.get of the same bytes.

What it measures
----------------
One local Ray (`ray.init(address="local", num_cpus=2)`, never an existing cluster; no
dashboard). For each state-dict size in --sizes (default tiny,medium), the generator's
parameters as the learner publishes them (`learner.engines.full_weights`: named parameters,
detached CPU copies) are moved to another process in two ways, one after the other, the
order alternating between repeats:

* baseline: `ray.put(state_dict)` in the driver, then one call to a receiver actor that does
  `ray.get(ref)` and touches every tensor (sums each in its own dtype, which reads every byte
  once; the checksum comes back and is checked).
  I.e. the object-store round trip of the same bytes, nothing else.
* ours: `weight_sync.WeightPublisher(receiver, dtype).publish(version, weights)`
  (the cast to the actors' dtype, `ray.put`, and the `publish(version, [ref])` control call,
  waited for), then one call to the receiver's `load()`, which does what
  `actors/worker.py::RolloutWorker._switch_weights` does: fetch the ref and
  `core.records.checkpoint.load_into(model, state_dict)` into the receiver's CausalWanModel of that
  architecture (strict key/shape check, copy into the parameters).

The receiver is a stand-in for `actors.pool.RolloutPool` + `RolloutWorker` (a real pool
needs the reward service): one actor whose `publish(version, [ref])` keeps the ref as the
pool does (refusing versions that are not newer) and whose `load()` is the worker's load.
In production the ref travels to the worker inside the rollout call that happens anyway;
here `load()` is a separate call, so ours makes one more actor call than the baseline,
which is the cost of the pool's publish control call.

Times are wall seconds in the driver from before the put to the end of the load / touch
call (median of --repeats after --warmup untimed ones), with the receiver's own get, load /
touch times reported alongside. Ratio = ours / baseline per size (target <= 1.2x).

Sizes (fp32; MB = 10^6 bytes): tiny = the plumbing config's generator (dim 64, 2 layers,
0.59 MB); medium = dim 1024, ffn 4096, 8 heads, 4 layers (321 MB); large = the same with 8
layers (590 MB); wan-1.3b = Wan2.1-T2V-1.3B (5.7 GB; needs that much free memory several
times over: driver, object store, receiver).

How to run (from the repository root)
-------------------------------------
    python benchmarks/weight_publish.py                          # tiny + medium, fp32 (~1 min)
    python benchmarks/weight_publish.py --sizes tiny,medium,large --repeats 7 --json publish.json
    python benchmarks/weight_publish.py --dtype bfloat16         # fp32 master weights published as bf16

Needs Ray, torch and this repository's packages.
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import statistics
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))  # run as a script from anywhere

from benchmarks.common import cpu_model, finish, load_1m, physical_cores  # noqa: E402

MB = 1e6
DTYPE_NAMES = ("float32", "bfloat16", "float16")


def arch_for(size: str):
    from core.config import PLUMBING_CONFIG, WAN_1_3B, WanArchConfig, load_config

    if size == "tiny":
        return load_config(PLUMBING_CONFIG, []).model
    if size == "medium":
        return WanArchConfig(dim=1024, ffn_dim=4096, num_heads=8, num_layers=4)
    if size == "large":
        return WanArchConfig(dim=1024, ffn_dim=4096, num_heads=8, num_layers=8)
    if size == "wan-1.3b":
        return WAN_1_3B
    raise ValueError(size)


SIZES = ("tiny", "medium", "large", "wan-1.3b")


def touch(state_dict: dict) -> float:
    """Read every byte once: the sum of each tensor in its own dtype (memory-bound), added up in float64."""
    return sum(float(v.sum()) for v in state_dict.values())


def make_receiver_class():
    import ray

    @ray.remote(num_cpus=1)
    class Receiver:
        """Stand-in for RolloutPool (publish keeps the ref) + RolloutWorker (load = _load_weights)."""

        def __init__(self, arch: dict, stream: dict, dtype: str):
            import torch

            from core.config import StreamConfig, WanArchConfig
            from core.model.wan import CausalWanModel

            torch.set_num_threads(1)
            self.model = CausalWanModel(WanArchConfig(**arch), StreamConfig(**stream))
            self.model = self.model.to(getattr(torch, dtype)).eval().requires_grad_(False)
            from weight_sync import WeightRelay

            self.relay = WeightRelay()  # RolloutPool's record of the published version
            self.loaded_version = 0  # RolloutWorker's WeightSubscriber.version

        def publish(self, version: int, refs: list, reason: str | None = None,
                    step: int = 0) -> None:  # RolloutPool.publish
            self.relay.publish(version, refs[0], reason, step)

        def load(self) -> dict:
            """RolloutWorker._switch_weights(version, [ref]) with what the pool holds, timed in parts."""
            import ray

            from core.records.checkpoint import load_into

            if self.relay.version == self.loaded_version or self.relay.ref is None:
                return {"get_s": 0.0, "apply_s": 0.0}
            start = time.perf_counter()
            state_dict = ray.get(self.relay.ref)
            got = time.perf_counter()
            load_into(self.model, state_dict)
            self.loaded_version = self.relay.version
            return {"get_s": got - start, "apply_s": time.perf_counter() - got}

        def get_touch(self, refs: list) -> dict:
            """Baseline: get the state dict and read every tensor (a sum in its own dtype)."""
            import ray

            start = time.perf_counter()
            state_dict = ray.get(refs[0])
            got = time.perf_counter()
            checksum = touch(state_dict)
            return {"get_s": got - start, "apply_s": time.perf_counter() - got, "checksum": checksum}

        def param_checksum(self) -> float:
            import torch

            return float(torch.stack([p.sum(dtype=torch.float64) for p in self.model.parameters()]).sum())

    return Receiver


def run_size(args, size: str, Receiver) -> dict:
    import ray
    import torch

    from core.config import PLUMBING_CONFIG, load_config
    from core.model.wan import CausalWanModel
    from weight_sync import WeightPublisher

    dtype = getattr(torch, args.dtype)
    arch = arch_for(size)
    stream = load_config(PLUMBING_CONFIG, []).stream
    t0 = time.perf_counter()
    torch.manual_seed(args.seed)
    model = CausalWanModel(arch, stream)
    # as learner.engines.full_weights: fp32 master parameters, detached CPU copies
    weights = {k: p.detach().cpu().clone() for k, p in model.named_parameters()}
    del model
    published = {k: v.to(dtype) for k, v in weights.items()}  # the bytes that travel (baseline puts these)
    nbytes = sum(v.numel() * v.element_size() for v in published.values())
    n_tensors = len(published)
    expected = float(torch.stack([v.sum(dtype=torch.float64) for v in published.values()]).sum())
    expected_touch = touch(published)
    receiver = Receiver.remote(arch.model_dump(), stream.model_dump(), args.dtype)
    ray.get(receiver.param_checksum.remote())  # constructed (model built) before any timing
    print(f"  {size}: {len(published)} tensors, {nbytes / MB:.1f} MB in {args.dtype}; models built in "
          f"{time.perf_counter() - t0:.1f} s", flush=True)

    publisher = WeightPublisher(receiver, dtype)
    version = 0
    runs = {"baseline": [], "ours": []}
    try:
        for r in range(args.warmup + args.repeats):
            for path in (("baseline", "ours") if r % 2 == 0 else ("ours", "baseline")):
                if path == "baseline":
                    start = time.perf_counter()
                    ref = ray.put(published)
                    put = time.perf_counter()
                    remote = ray.get(receiver.get_touch.remote([ref]))
                    end = time.perf_counter()
                    if abs(remote["checksum"] - expected_touch) > 1e-6 * max(1.0, abs(expected_touch)):
                        raise RuntimeError(f"baseline checksum {remote['checksum']} != {expected_touch}")
                    del ref
                    res = {"put_s": put - start, "call_s": end - put, "total_s": end - start, **remote}
                else:
                    version += 1
                    start = time.perf_counter()
                    publish_s = publisher.publish(version, weights)
                    put = time.perf_counter()
                    remote = ray.get(receiver.load.remote())
                    end = time.perf_counter()
                    res = {"put_s": put - start, "publish_s": publish_s, "call_s": end - put, "total_s": end - start,
                           **remote}
                if r >= args.warmup:
                    runs[path].append(res)
        loaded = ray.get(receiver.param_checksum.remote())
        if abs(loaded - expected) > 1e-6 * max(1.0, abs(expected)):
            raise RuntimeError(f"the receiver's parameters (checksum {loaded}) are not the published ones ({expected})")
    finally:
        ray.kill(receiver, no_restart=True)
        del published, weights
        time.sleep(1)  # let the receiver process exit and its objects be freed before the next size
    out = {"size": size, "arch": arch.model_dump(), "tensors": n_tensors, "bytes": nbytes, "dtype": args.dtype}
    for path, rs in runs.items():
        out[path] = {k: statistics.median(x[k] for x in rs) for k in ("put_s", "call_s", "total_s", "get_s", "apply_s")}
        out[path]["total_all_s"] = [x["total_s"] for x in rs]
        out[path]["total_min_s"] = min(x["total_s"] for x in rs)
        out[path]["total_max_s"] = max(x["total_s"] for x in rs)
    out["ratio"] = out["ours"]["total_s"] / out["baseline"]["total_s"]
    print(f"  {size}: baseline {out['baseline']['total_s'] * 1e3:.1f} ms, ours {out['ours']['total_s'] * 1e3:.1f} ms "
          f"(median of {args.repeats}), ours/baseline x{out['ratio']:.2f}", flush=True)
    return out


def print_table(results: list[dict]) -> None:
    """Medians. put = ray.put (ours: the whole publish(): cast + put + control call); call = the receiver's
    load() / get_touch() as seen by the driver, of which get and load/touch are timed inside the receiver."""
    cols = ["size", "MB", "path", "put ms", "call ms", "call: get ms", "call: load/touch ms", "total ms", "min..max ms",
            "MB/s"]
    rows = []
    for res in results:
        for path in ("baseline", "ours"):
            r = res[path]
            rows.append([res["size"], f"{res['bytes'] / MB:.1f}", path, f"{r['put_s'] * 1e3:.1f}", f"{r['call_s'] * 1e3:.1f}",
                         f"{r['get_s'] * 1e3:.1f}", f"{r['apply_s'] * 1e3:.1f}", f"{r['total_s'] * 1e3:.1f}",
                         f"{r['total_min_s'] * 1e3:.1f}..{r['total_max_s'] * 1e3:.1f}",
                         f"{res['bytes'] / MB / r['total_s']:.0f}"])
    widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(cols)]
    print("  ".join(c.rjust(w) for c, w in zip(cols, widths)))
    for row in rows:
        print("  ".join(v.rjust(w) for v, w in zip(row, widths)))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="tiny,medium", help=f"comma-separated, of {', '.join(SIZES)} (default tiny,medium)")
    ap.add_argument("--dtype", choices=DTYPE_NAMES, default="float32",
                    help="the actors' dtype the publisher casts to (default float32, the tiny config's)")
    ap.add_argument("--repeats", type=int, default=5, help="timed repeats per size and path (default 5)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed repeats per size and path first (default 1)")
    ap.add_argument("--num-cpus", type=int, default=2, help="logical CPUs given to ray.init (default 2)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None, help="also write the results to this file")
    args = ap.parse_args()
    sizes = [s.strip() for s in args.sizes.split(",") if s.strip()]
    if not sizes or any(s not in SIZES for s in sizes):
        ap.error(f"--sizes must be a comma-separated list of {', '.join(SIZES)}")
    if args.repeats < 1 or args.warmup < 0:
        ap.error("--repeats must be >= 1 and --warmup >= 0")

    os.environ["OMP_NUM_THREADS"] = "1"
    import ray
    import torch

    torch.set_num_threads(1)
    logging.getLogger("ray").setLevel(logging.WARNING)
    machine = {"cpu": cpu_model(), "physical_cores": physical_cores(), "logical_cpus": os.cpu_count() or 1,
               "python": platform.python_version(), "torch": torch.__version__, "ray": ray.__version__,
               "loadavg_1m_at_start": load_1m()}
    print(f"machine: {machine['cpu']}, {machine['physical_cores']} physical cores, {machine['logical_cpus']} logical "
          f"CPUs; load avg {machine['loadavg_1m_at_start']} at start; Python {machine['python']}, torch "
          f"{machine['torch']}, ray {machine['ray']}", flush=True)
    print("compared, per size, driver wall time until another process holds the weights: "
          "[baseline] ray.put(state_dict) + a receiver actor's ray.get(ref) and a sum of every tensor; "
          f"[ours] WeightPublisher(receiver, {args.dtype}).publish(version, weights) (cast + ray.put + "
          "publish(version, [ref]) control call) + the receiver's load(): ray.get(ref) + core.records.checkpoint.load_into "
          "into its CausalWanModel (RolloutWorker._switch_weights). Receiver = stand-in for RolloutPool + RolloutWorker "
          f"(one actor, 1 torch thread). {args.warmup} warm-up + {args.repeats} timed repeats per size and path, "
          "order alternating.", flush=True)

    results: dict = {"machine": machine, "args": vars(args), "sizes": []}
    ray.init(address="local", num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False,
             configure_logging=False, runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})
    try:
        Receiver = make_receiver_class()
        for size in sizes:
            results["sizes"].append(run_size(args, size, Receiver))
    finally:
        ray.shutdown()

    print()
    print_table(results["sizes"])
    print()
    parts = [f"{r['size']} ({r['bytes'] / MB:.1f} MB) x{r['ratio']:.2f} [{'met' if r['ratio'] <= 1.2 else 'NOT met'}]"
             for r in results["sizes"]]
    print("RATIOS: weight publish ours/baseline (publish + load_into vs put + get + touch; target <= 1.2x): "
          + ", ".join(parts))
    finish(results, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
