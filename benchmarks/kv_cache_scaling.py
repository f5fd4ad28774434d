"""KV-cache scaling of streaming generation: per-block latency and cache memory at frame 30 vs frame N.

What it measures
----------------
One stream of `SelfForcedRollout.stream` with the Reward Forcing EMA-sink window
(rope="window", sink_mode="ema", local_attn_size=12, sink_size=3,
num_frame_per_block=3, compression_alpha=0.999) is run for `--frames` latent
frames (default 300). Around latent frame 30 and around the last frame it records

* per-block latency: the wall time between two consecutive blocks of the stream,
  i.e. the context re-run (t=0) of the previous block plus the 4 denoising steps
  of this one. `--samples` blocks (default 5, at most 6) ending at the point are
  timed, all with the window already full; median, min and max are printed (and
  the process CPU time per block in the JSON). On CUDA the clock is read after a
  synchronise. A few untimed warm-up blocks of both cache layouts run first.
* KV-cache memory: `cache.nbytes()` (the allocated buffers, including the cached
  cross-attention K/V), the bytes of K/V actually held (filled tokens), the
  number of latent frames each query attends to, and on CUDA the peak of
  `torch.cuda.max_memory_allocated()` over the timed blocks minus the memory
  allocated before the cache was created.

The ratio frame-N / frame-30 is expected near 1.0 for the window: bounded memory
and constant per-block cost. In the same run, the same weights are streamed with
no window (local_attn_size=-1, rope="absolute"), whose cache must hold every
frame: it gets `max_cache_frames = --frames` when that fits in the device's free
memory, otherwise it runs as far as fits and the bytes it would need for
`--frames` (tokens * layers * heads * head_dim * 2 (K and V) * dtype bytes) are
printed. Note that `KVCache` preallocates its buffers, so `cache.nbytes()` is
flat over a stream in both cases; the baseline's growth shows in its allocation
size (proportional to the video length), its held K/V and its attended frames.

Weights are random (speed does not depend on their values); the text context is
random [1, text_len, text_dim]; noise is `core.algo.rollout.gaussian_noise`.

How to run (from the repository root)
-------------------------------------
    python benchmarks/kv_cache_scaling.py                       # tiny arch, CPU, 300 frames
    python benchmarks/kv_cache_scaling.py --frames 120 --json out.json
    python benchmarks/kv_cache_scaling.py --arch wan-1.3b       # Wan2.1-T2V-1.3B, 480x832, bf16, on CUDA

Needs torch plus this repository's `core` package (which imports pydantic and pyyaml
through core.config); no Ray.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from anywhere

import torch  # noqa: E402

from benchmarks.common import cpu_model  # noqa: E402
from core.algo.rollout import SelfForcedRollout, gaussian_noise  # noqa: E402
from core.algo.scheduler import FlowMatchScheduler  # noqa: E402
from core.config import WAN_1_3B, StreamConfig, WanArchConfig  # noqa: E402
from core.model.attention import BACKENDS  # noqa: E402
from core.model.kv_cache import KVCache  # noqa: E402
from core.model.wan import ROPE_POSITIONS, CausalWanModel  # noqa: E402
from core.runtime import DTYPES  # noqa: E402

# --arch presets: (architecture, latent H x W). Tiny: 8x8 latent -> 4x4 = 16 tokens per frame.
ARCHS = {
    "tiny": (WanArchConfig(dim=64, ffn_dim=128, num_heads=2, num_layers=2, freq_dim=32, text_dim=32, text_len=16), (8, 8)),
    "wan-1.3b": (WAN_1_3B, (60, 104)),  # 480x832 video through the 8x VAE
}
DENOISING_STEPS = [1000, 750, 500, 250]  # 4-step list, warped onto the shift-5 schedule
NEAR_FRAME = 30
MiB = 2**20

WINDOW = StreamConfig(rope="window", sink_mode="ema", local_attn_size=12, sink_size=3,
                      num_frame_per_block=3, compression_alpha=0.999)


def machine_info(device: torch.device) -> dict:
    info = {"cpu": cpu_model(), "torch": torch.__version__, "python": platform.python_version(),
            "torch_threads": torch.get_num_threads(), "device": str(device)}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def free_bytes(device: torch.device) -> int:
    """Memory that a new allocation could take on this device now."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
        return torch.cuda.mem_get_info(device)[0]
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 2**62  # unknown: assume it fits


def kv_bytes(frames: int, tokens_per_frame: int, arch: WanArchConfig, dtype: torch.dtype, batch: int = 1) -> int:
    """Self-attention K and V for `frames` latent frames over all layers."""
    elem = torch.empty((), dtype=dtype).element_size()
    return frames * tokens_per_frame * arch.num_layers * arch.num_heads * arch.head_dim * 2 * elem * batch


def held_bytes(cache: KVCache) -> int:
    """Bytes of K/V the cache currently holds (filled slots of every layer)."""
    return sum(t[:, :c.local_end].numel() * t.element_size() for c in cache.layers for t in (c.k, c.v))


class Clock:
    """(wall seconds, process CPU seconds); on CUDA the wall clock is read after a synchronise."""

    def __init__(self, device: torch.device):
        self.device = device

    def __call__(self) -> tuple[float, float]:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter(), time.process_time()


def run_stream(name: str, model: CausalWanModel, stream_cfg: StreamConfig, context: torch.Tensor,
               latent_hw: tuple[int, int], frames: int, points: list[int], samples: int,
               device: torch.device, dtype: torch.dtype, seed: int) -> dict:
    """Stream `frames` latent frames; time the `samples` blocks that end at each frame in `points`."""
    model.stream = stream_cfg
    fpb = stream_cfg.num_frame_per_block
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.empty_cache()
    mem_base = torch.cuda.memory_allocated(device) if cuda else 0

    cache = model.init_cache(1, latent_hw)
    scheduler = FlowMatchScheduler(shift=5.0)
    rollout = SelfForcedRollout(model, scheduler, scheduler.denoising_timesteps(DENOISING_STEPS))
    generator = torch.Generator(device=device).manual_seed(seed)
    noise = gaussian_noise((1, fpb, model.cfg.in_dim, *latent_hw), generator, dtype, device)

    # block index -> point it is timed for; the first block of each window resets the CUDA peak
    timed = {p // fpb - 1 - i: p for p in points for i in range(samples)}
    first_of_window = {p // fpb - samples for p in points}
    results = {p: {"latency_s": [], "cpu_time_s": []} for p in points}
    finite = True
    clock = Clock(device)
    if cuda and 0 in first_of_window:
        torch.cuda.reset_peak_memory_stats(device)
    prev = clock()
    for blk in rollout.stream(context, cache, noise, num_blocks=frames // fpb):
        now = clock()  # context re-run of the previous block + 4 denoising steps of this one
        point = timed.get(blk.index)
        if point is not None:
            r = results[point]
            r["latency_s"].append(now[0] - prev[0])
            r["cpu_time_s"].append(now[1] - prev[1])
            if blk.index == point // fpb - 1:  # last block of the window: read the memory
                finite = finite and bool(torch.isfinite(blk.latents).all())
                r.update(end_frame=blk.start_frame + fpb, cache_nbytes=cache.nbytes(), held_kv_bytes=held_bytes(cache),
                         attended_frames=cache.layers[0].local_end // cache.tokens_per_frame)
                if cuda:
                    r["cuda_peak_delta_bytes"] = torch.cuda.max_memory_allocated(device) - mem_base
                    r["cuda_alloc_delta_bytes"] = torch.cuda.memory_allocated(device) - mem_base
        if cuda and blk.index + 1 in first_of_window:
            torch.cuda.reset_peak_memory_stats(device)
        del blk
        prev = clock()

    for r in results.values():
        lat = r["latency_s"]
        r.update(median_s=statistics.median(lat), min_s=min(lat), max_s=max(lat),
                 cpu_median_s=statistics.median(r["cpu_time_s"]))
    out = {"name": name, "frames": frames, "stream": stream_cfg.model_dump(), "finite_outputs": finite,
           "points": {str(p): results[p] for p in points}}
    near, far = str(points[0]), str(points[-1])
    keys = ["median_s", "cpu_median_s", "cache_nbytes", "held_kv_bytes"] + (["cuda_peak_delta_bytes"] if cuda else [])
    out["ratios"] = {k: out["points"][far][k] / out["points"][near][k] for k in keys}
    del cache
    return out


def warmup(model: CausalWanModel, context: torch.Tensor, latent_hw: tuple[int, int], device: torch.device,
           dtype: torch.dtype, seed: int) -> None:
    """A few untimed blocks of both cache layouts (window with eviction, no window) on throwaway caches,
    so that one-time costs (allocator, kernel selection, lazy init) land in neither measured stream."""
    fpb = WINDOW.num_frame_per_block
    base = StreamConfig(rope="absolute", local_attn_size=-1, num_frame_per_block=fpb, max_cache_frames=2 * fpb)
    for cfg, blocks in ((WINDOW, WINDOW.local_attn_size // fpb + 2), (base, 2)):
        model.stream = cfg
        scheduler = FlowMatchScheduler(shift=5.0)
        rollout = SelfForcedRollout(model, scheduler, scheduler.denoising_timesteps(DENOISING_STEPS))
        noise = gaussian_noise((1, fpb, model.cfg.in_dim, *latent_hw), torch.Generator(device=device).manual_seed(seed),
                               dtype, device)
        for _ in rollout.stream(context, model.init_cache(1, latent_hw), noise, num_blocks=blocks):
            pass
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def print_table(runs: list[dict], cuda: bool) -> None:
    cols = ["stream", "frame", "blocks", "median ms", "min..max ms", "attended fr", "cache alloc MiB", "held K/V MiB"]
    if cuda:
        cols.append("CUDA peak Δ MiB")
    rows = []
    for run in runs:
        for p, r in run["points"].items():
            row = [run["name"], p, str(len(r["latency_s"])), f"{r['median_s'] * 1e3:.2f}",
                   f"{r['min_s'] * 1e3:.2f}..{r['max_s'] * 1e3:.2f}", str(r["attended_frames"]),
                   f"{r['cache_nbytes'] / MiB:.3f}", f"{r['held_kv_bytes'] / MiB:.3f}"]
            if cuda:
                row.append(f"{r['cuda_peak_delta_bytes'] / MiB:.1f}")
            rows.append(row)
    widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(cols)]
    print("  ".join(c.rjust(w) for c, w in zip(cols, widths)))
    for row in rows:
        print("  ".join(v.rjust(w) for v, w in zip(row, widths)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", choices=sorted(ARCHS), default="tiny")
    ap.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: float32 (tiny), bfloat16 (wan-1.3b)")
    ap.add_argument("--frames", type=int, default=300, help="latent frames to stream; the far point (default 300)")
    ap.add_argument("--samples", type=int, default=5, help="blocks timed around each point (default 5, at most 6)")
    ap.add_argument("--attention-backend", choices=BACKENDS, default="auto")
    ap.add_argument("--skip-baseline", action="store_true", help="only the EMA-sink window stream")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, default=None, help="write all numbers here")
    args = ap.parse_args()

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = DTYPES[args.dtype or ("bfloat16" if args.arch == "wan-1.3b" else "float32")]
    if args.threads:
        torch.set_num_threads(args.threads)
    arch, latent_hw = ARCHS[args.arch]
    if args.arch != "tiny" and device.type == "cpu":
        print(f"warning: --arch {args.arch} on CPU is very slow; use --frames 36 --samples 1 for a smoke test", file=sys.stderr)
    fpb = WINDOW.num_frame_per_block
    tokens_per_frame = (latent_hw[0] // arch.patch_size[1]) * (latent_hw[1] // arch.patch_size[2])
    if args.frames % fpb or args.samples < 1 or args.frames - args.samples * fpb < NEAR_FRAME:
        ap.error(f"--frames must be a multiple of {fpb} and at least {NEAR_FRAME} + samples * {fpb}")
    if NEAR_FRAME - args.samples * fpb < WINDOW.local_attn_size:
        ap.error(f"--samples too large: the blocks timed around frame {NEAR_FRAME} must start after the "
                 f"{WINDOW.local_attn_size}-frame window has filled (at most {(NEAR_FRAME - WINDOW.local_attn_size) // fpb})")

    info = machine_info(device)
    print(f"machine: {info['cpu']}" + (f" | GPU {info['gpu']}" if "gpu" in info else "")
          + f" | torch {info['torch']} | python {info['python']} | {info['torch_threads']} threads")
    print(f"arch {args.arch}: dim {arch.dim}, {arch.num_layers} layers, {arch.num_heads} heads, latent "
          f"{latent_hw[0]}x{latent_hw[1]} = {tokens_per_frame} tokens/frame, {str(dtype).removeprefix('torch.')} on {device}, "
          f"{len(DENOISING_STEPS)} denoising steps + context re-run per {fpb}-frame block, attention {args.attention_backend}")

    torch.manual_seed(args.seed)
    t0 = time.perf_counter()
    with torch.device(device):
        model = CausalWanModel(arch, WINDOW)
    model = model.to(dtype).eval().requires_grad_(False)
    model.attention_backend = args.attention_backend
    context = torch.randn(1, arch.text_len, arch.text_dim, device=device, dtype=dtype)
    print(f"model built in {time.perf_counter() - t0:.1f} s; streaming {args.frames} latent frames, "
          f"timing {args.samples} blocks ending at frame {NEAR_FRAME} and at frame {args.frames}")

    warmup(model, context, latent_hw, device, dtype, args.seed)
    runs = [run_stream("ema-window", model, WINDOW, context, latent_hw, args.frames, [NEAR_FRAME, args.frames],
                       args.samples, device, dtype, args.seed)]

    baseline_note = None
    needed = kv_bytes(args.frames, tokens_per_frame, arch, dtype)
    if not args.skip_baseline:
        # No window: the cache must be allocated for the whole video. Leave room for activations
        # (twice the windowed run's peak beyond its own cache, at least 10% of free memory).
        free = free_bytes(device)
        win_far = runs[0]["points"][str(args.frames)]
        activations = win_far.get("cuda_peak_delta_bytes", 0) - win_far["cache_nbytes"]
        headroom = max(2 * activations, free // 10, 256 * MiB)
        per_frame = kv_bytes(1, tokens_per_frame, arch, dtype)
        max_frames = min((free - headroom) // per_frame, ROPE_POSITIONS)  # absolute RoPE ends at its table
        base_frames = min(args.frames, max_frames // fpb * fpb)
        if base_frames < args.frames:
            why = (f"absolute RoPE ends at frame {ROPE_POSITIONS}" if max_frames == ROPE_POSITIONS else
                   f"only {free / 2**30:.2f} GiB is free (less {headroom / 2**30:.2f} GiB headroom for activations)")
            baseline_note = (f"no-window baseline: {args.frames} frames need {needed / 2**30:.2f} GiB of K/V but {why}; "
                             f"ran {base_frames} frames")
            print(baseline_note)
        far = base_frames if base_frames - args.samples * fpb >= NEAR_FRAME else None
        if far is None:
            print("no-window baseline skipped: not even frame "
                  f"{NEAR_FRAME + args.samples * fpb} fits")
        else:
            base_cfg = StreamConfig(rope="absolute", sink_mode="static", local_attn_size=-1, sink_size=0,
                                    num_frame_per_block=fpb, max_cache_frames=base_frames)
            runs.append(run_stream("no-window", model, base_cfg, context, latent_hw, base_frames, [NEAR_FRAME, far],
                                   args.samples, device, dtype, args.seed))

    print()
    print_table(runs, device.type == "cuda")
    print()
    window_kv = kv_bytes(WINDOW.local_attn_size, tokens_per_frame, arch, dtype)
    print(f"self-attention K/V for {args.frames} frames with no window: {needed / MiB:.2f} MiB "
          f"(vs {window_kv / MiB:.2f} MiB for the 12-frame window, x{needed / window_kv:.1f})")
    for run in runs:
        if not run["finite_outputs"]:
            print(f"note: {run['name']} produced non-finite latents (random weights); timings are still valid")
    parts = []
    for run in runs:
        near, far = list(run["points"])
        rat = run["ratios"]
        part = (f"{run['name']} frame {far}/{near}: latency x{rat['median_s']:.2f}, "
                f"cache.nbytes x{rat['cache_nbytes']:.2f}, held K/V x{rat['held_kv_bytes']:.2f}")
        if "cuda_peak_delta_bytes" in rat:
            part += f", CUDA peak Δ x{rat['cuda_peak_delta_bytes']:.2f}"
        parts.append(part)
    print("RATIOS: " + " | ".join(parts))

    if args.json:
        payload = {"machine": info, "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                   "arch": arch.model_dump(), "latent_hw": list(latent_hw), "tokens_per_frame": tokens_per_frame,
                   "dtype": str(dtype), "denoising_steps": DENOISING_STEPS,
                   "no_window_kv_bytes_needed": needed, "window_kv_bytes": window_kv,
                   "baseline_note": baseline_note, "runs": runs}
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(payload, indent=2))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
