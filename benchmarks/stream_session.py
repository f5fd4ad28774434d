"""Streaming speed, one stated method: eager / compiled / CUDA graphs / FP8 / overlapped decode, side by side.

The method (the serving page and /v1/metrics use the same definitions)
----------------------------------------------------------------------
Every configuration streams the same model (the same seeded random weights: speed does not depend on their
values) through `core.stream.session.StreamSession`, the unit the CLI and the serving deployment stream with.
Per configuration, in this order:

1. warm-up, timed and reported, excluded from everything below: `warm_up(pipe)` (torch.compile of every stream
   shape, CUDA-graph capture; nothing on the eager path), then one throwaway session through the window's fill,
   two steady blocks and a prompt switch, so lazy initialisation (kernel selection, allocator growth) is excluded
   for the eager path too;
2. time to first frame, median of 3 fresh sessions: from the `start` (session creation: prompt encoding, the
   cache) until the first block's uint8 frames are on the host (`next_chunk()` returned). The server adds JPEG
   encoding and the network;
3. one long session to block `--far-block` + `--samples`. Per block: the wall time the caller of `next_chunk()`
   waits (`VideoChunk.wall_s`: denoise + decode + copy to the host; with overlapped decode the next block denoises
   meanwhile, so it is max(denoise, decode) or less), the denoise and the decode seconds (each read after its
   CUDA stream is synchronised);
   - FPS denoise-only = video frames / sum of denoise seconds, FPS end to end = video frames / sum of per-block
     wall seconds, over blocks `--fps-from` .. `--fps-from` + `--fps-blocks` - 1;
   - per-block wall p50 / p99 over `--samples` blocks from block `--near-block` (default 10) and from block
     `--far-block` (default 1000): flat means the ratio is about 1;
   - peak memory: CUDA `max_memory_allocated` over the session (weights, graph pools, caches, activations);
     on CPU the process's peak RSS so far (monotonic over the run, so only the first configuration's is its own);
4. a prompt switch (`switch_prompt`, KV re-cache), median of 3;
5. the same video? The first `--compare-blocks` blocks' frames against the first configuration's (uint8 levels):
   compiled and graphs reorder float arithmetic, FP8 rounds the linear layers' inputs.

Ratios are to the first configuration (`--configs`, default eager first), all measured in this one run.

`--arch tiny` (default): the plumbing config (dim 64, 2 layers, 64x64 video, EMA-sink window 12 / sink 3) in
float32 on CPU. `--arch wan-1.3b` (CUDA only): Wan2.1-T2V-1.3B (dim 1536, 30 layers) at 832x480 in bfloat16 with
configs/reward_forcing_1.3b_stream.yaml's window (9 frames, EMA sink 3, window RoPE), a random Wan2.1 VAE of the
real width and a random 2-layer text encoder of the real output width (4096; text encoding is outside the per-block
loop). Its FPS is printed next to the published ones (one H100), whose method the papers do not state.

    python benchmarks/stream_session.py                                  # tiny, CPU: eager, compiled, eager+overlap
    python benchmarks/stream_session.py --arch wan-1.3b --device cuda    # benchmarks/gpu_check.sh runs this method

Needs torch, transformers and diffusers plus this repository's `core` package; no Ray.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import resource
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from anywhere

import torch  # noqa: E402

from benchmarks.common import cpu_model, finish, load_1m, physical_cores  # noqa: E402
from core.codecs.text_encoder import TextEncoder  # noqa: E402
from core.codecs.wan_vae import WanVAE  # noqa: E402
from core.config import PLUMBING_CONFIG, Config, load_config  # noqa: E402
from core.model.attention import BACKENDS, attention_kernel  # noqa: E402
from core.model.fp8 import float8_linears  # noqa: E402
from core.model.wan import CausalWanModel  # noqa: E402
from core.runtime import DTYPES  # noqa: E402
from core.stream.block_step import compile_counters  # noqa: E402
from core.stream.pipeline import VideoPipeline  # noqa: E402
from core.stream.session import StreamSession, warm_up  # noqa: E402

ARCHS = {
    "tiny": [],
    # Wan2.1-T2V-1.3B (docs/reference.md) at 832x480, with the stream window of
    # configs/reward_forcing_1.3b_stream.yaml; random VAE of Wan's width, random small text encoder
    "wan-1.3b": ["model.dim=1536", "model.ffn_dim=8960", "model.num_heads=12", "model.num_layers=30",
                 "model.freq_dim=256", "model.text_dim=4096", "model.text_len=512",
                 "video.height=480", "video.width=832",
                 "stream.num_frame_per_block=3", "stream.local_attn_size=9", "stream.sink_size=3",
                 "stream.rope=window", "stream.sink_mode=ema", "stream.compression_alpha=0.999",
                 "vae.base_dim=96"],
}
_GRAPHS = ["runtime.compile=true", "runtime.cuda_graphs=true"]
CONFIGS = {
    "eager": [],
    "eager+overlap": ["runtime.overlap_decode=true"],
    "compiled": ["runtime.compile=true"],
    "compiled+overlap": ["runtime.compile=true", "runtime.overlap_decode=true"],
    "graphs": _GRAPHS,
    "graphs+overlap": _GRAPHS + ["runtime.overlap_decode=true"],
    "graphs+fp8": _GRAPHS + ["runtime.fp8=true"],
    "graphs+overlap+fp8": _GRAPHS + ["runtime.overlap_decode=true", "runtime.fp8=true"],
    "graphs+no-rerun": _GRAPHS + ["stream.context_rerun=false"],
}
DEFAULT_CONFIGS = {"cpu": "eager,compiled,eager+overlap",
                   "cuda": "eager,compiled,graphs,graphs+overlap,graphs+fp8,graphs+overlap+fp8"}
# (method, FPS on one H100 as published, note); docs/reference.md
PUBLISHED = [("Reward Forcing", 23.1, ""), ("LongLive", 20.7, "24.8 with FP8"), ("Self Forcing", 17.0, "")]
PROMPT = "a red fox"  # short: the tiny config reads 16 bytes
SWITCH_PROMPT = "a city at night"
MiB, GiB = 2**20, 2**30


def machine_info(device: torch.device) -> dict:
    info = {"cpu": cpu_model(), "physical_cores": physical_cores(), "logical_cpus": os.cpu_count() or 1,
            "python": platform.python_version(), "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "device": str(device), "loadavg_1m_at_start": load_1m()}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    return info


def build_pipeline(cfg: Config, device: torch.device) -> VideoPipeline:
    """`VideoPipeline.from_config(cfg)`; on CUDA the generator is initialised on the GPU itself instead
    (`build_generator` draws its seeded weights on the CPU, layer by layer, so that every process agrees: 1.4B
    draws for values that do not matter here). Text encoder and VAE are small: built as from_config builds them."""
    if device.type != "cuda":
        return VideoPipeline.from_config(cfg)
    dtype = DTYPES[cfg.runtime.dtype]
    torch.manual_seed(cfg.runtime.seed)
    with torch.device(device):
        generator = CausalWanModel(cfg.model, cfg.stream)
    generator.attention_backend = cfg.runtime.attention_backend
    generator = generator.to(dtype=dtype).eval().requires_grad_(False)
    if cfg.runtime.fp8:
        float8_linears(generator)
    return VideoPipeline(cfg, generator, TextEncoder.from_config(cfg, device, dtype),
                         WanVAE.from_config(cfg, device, dtype), device)


class Clock:
    """Wall seconds; on CUDA read after a device synchronise (between blocks nothing else is running)."""

    def __init__(self, device: torch.device):
        self.device = device

    def __call__(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile: with few samples p99 is the largest, stated as such."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered) + 0.5) - 1))]


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def measure(pipe: VideoPipeline, args: argparse.Namespace, clock: Clock, cuda: bool) -> dict:
    """Steps 1-5 of the module docstring for one configuration."""
    t0 = time.perf_counter()
    compile_s = warm_up(pipe)
    with StreamSession(pipe, PROMPT, args.seed + 100) as throwaway:
        window_blocks = -(-pipe.cfg.stream.cache_frames // pipe.cfg.stream.num_frame_per_block)
        for _ in range(window_blocks + 2):
            throwaway.next_chunk()
        throwaway.switch_prompt(SWITCH_PROMPT)
        throwaway.next_chunk()
    warm_s = time.perf_counter() - t0

    compiled_before = compile_counters()
    ttff = []
    for i in range(3):
        t = clock()
        with StreamSession(pipe, f"{PROMPT} {i}", args.seed + 1 + i) as session:
            session.next_chunk(more=False)
            ttff.append(clock() - t)

    if cuda:
        torch.cuda.reset_peak_memory_stats(pipe.device)
    blocks, frames = [], []
    last = args.far_block + args.samples
    t_start = time.perf_counter()
    with StreamSession(pipe, PROMPT, args.seed) as session:
        while session.blocks < last:
            chunk = session.next_chunk(more=session.blocks + 1 < last)
            blocks.append({"block": chunk.block, "frames": len(chunk.frames), "wall_s": chunk.wall_s,
                           "denoise_s": chunk.denoise_s, "decode_s": chunk.decode_s})
            if chunk.block < args.compare_blocks:
                frames.append(chunk.frames)
            if chunk.block % 100 == 0:
                print(f"    block {chunk.block}: {chunk.wall_s * 1e3:.1f} ms ({time.perf_counter() - t_start:.0f} s)",
                      flush=True)
        memory_bytes, evictions = session.memory_bytes(), session.cache.evictions
        switches = []
        for i in range(3):
            t = clock()
            session.switch_prompt(f"{SWITCH_PROMPT} {i}")
            switches.append(clock() - t)
            session.next_chunk(more=i < 2)
    peak = torch.cuda.max_memory_allocated(pipe.device) if cuda else peak_rss_bytes()

    fps_blocks = blocks[args.fps_from:args.fps_from + args.fps_blocks]
    video_frames = sum(b["frames"] for b in fps_blocks)
    near = [b["wall_s"] for b in blocks[args.near_block:args.near_block + args.samples]]
    far = [b["wall_s"] for b in blocks[args.far_block:args.far_block + args.samples]]
    return {"warm_up_s": warm_s, "compile_capture_s": compile_s, "ttff_s": ttff, "ttff_median_s": statistics.median(ttff),
            "fps_denoise": video_frames / sum(b["denoise_s"] for b in fps_blocks),
            "fps_end_to_end": video_frames / sum(b["wall_s"] for b in fps_blocks),
            "fps_video_frames": video_frames,
            "near": {"p50_s": percentile(near, 50), "p99_s": percentile(near, 99)},
            "far": {"p50_s": percentile(far, 50), "p99_s": percentile(far, 99)},
            "far_over_near_p50": percentile(far, 50) / percentile(near, 50),
            "peak_memory_bytes": peak, "session_memory_bytes": memory_bytes, "evictions": evictions,
            "switch_median_s": statistics.median(switches), "per_block": blocks, "frames": frames,
            "graphs_compiled_after_warm_up": compile_counters()["graphs"] - compiled_before["graphs"]}


def compare_frames(frames: list[torch.Tensor], reference: list[torch.Tensor]) -> dict:
    diff = torch.cat([(a.int() - b.int()).abs().flatten() for a, b in zip(frames, reference)])
    return {"max_levels": int(diff.max()), "mean_levels": float(diff.float().mean())}


def print_table(results: dict, reference: str, cuda: bool, args: argparse.Namespace) -> None:
    cols = ["config", "warm-up s", "TTFF s", "FPS denoise", "FPS end to end", "x " + reference,
            f"block {args.near_block} p50/p99 ms", f"block {args.far_block} p50/p99 ms", "far/near",
            "peak " + ("CUDA GiB" if cuda else "RSS GiB"), "switch ms", "vs " + reference + " max/mean levels"]
    rows = []
    base = results[reference]
    for name, r in results.items():
        if "skipped" in r:
            rows.append([name, "skipped: " + r["skipped"]] + [""] * (len(cols) - 2))
            continue
        same = r.get("same_video")
        rows.append([name, f"{r['warm_up_s']:.1f}", f"{r['ttff_median_s']:.3f}", f"{r['fps_denoise']:.1f}",
                     f"{r['fps_end_to_end']:.1f}",
                     f"x{r['fps_end_to_end'] / base['fps_end_to_end']:.2f}" if "fps_end_to_end" in base else "",
                     f"{r['near']['p50_s'] * 1e3:.1f}/{r['near']['p99_s'] * 1e3:.1f}",
                     f"{r['far']['p50_s'] * 1e3:.1f}/{r['far']['p99_s'] * 1e3:.1f}", f"x{r['far_over_near_p50']:.2f}",
                     f"{r['peak_memory_bytes'] / GiB:.2f}", f"{r['switch_median_s'] * 1e3:.1f}",
                     f"{same['max_levels']}/{same['mean_levels']:.3f}" if same else "-"])
    widths = [max(len(c), *(len(row[i]) for row in rows if i == 0 or not row[1].startswith("skipped")))
              for i, c in enumerate(cols)]
    print("  ".join(c.rjust(w) for c, w in zip(cols, widths)))
    for row in rows:
        if row[1].startswith("skipped"):
            print(f"{row[0].rjust(widths[0])}  {row[1]}")
        else:
            print("  ".join(v.rjust(w) for v, w in zip(row, widths)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", choices=sorted(ARCHS), default="tiny", help="tiny (default; CPU) or wan-1.3b (CUDA only)")
    ap.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: float32 (tiny), bfloat16 (wan-1.3b)")
    ap.add_argument("--configs", default=None,
                    help=f"comma-separated, the first is the reference; of {', '.join(CONFIGS)} "
                         f"(default: {DEFAULT_CONFIGS['cpu']} on CPU, {DEFAULT_CONFIGS['cuda']} on CUDA)")
    ap.add_argument("--near-block", type=int, default=10, help="first block of the near latency point (default 10)")
    ap.add_argument("--far-block", type=int, default=1000, help="first block of the far latency point (default 1000)")
    ap.add_argument("--samples", type=int, default=20, help="blocks per latency point (default 20)")
    ap.add_argument("--fps-from", type=int, default=2, help="first block of the FPS window (default 2)")
    ap.add_argument("--fps-blocks", type=int, default=20, help="blocks in the FPS window (default 20)")
    ap.add_argument("--compare-blocks", type=int, default=6, help="blocks whose frames are compared (default 6)")
    ap.add_argument("--deadline-s", type=float, default=None,
                    help="skip the configurations not started by then (a budgeted GPU run keeps what it measured)")
    ap.add_argument("--attention-backend", choices=BACKENDS, default="auto")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="extra config overrides")
    ap.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None, help="also write the results to this file")
    args = ap.parse_args()

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        ap.error(f"--device {args.device}: no CUDA device is visible (torch {torch.__version__})")
    if args.arch == "wan-1.3b" and device.type != "cuda":
        ap.error("--arch wan-1.3b needs a GPU: run it with --device cuda (minutes per block on a CPU)")
    configs = (args.configs or DEFAULT_CONFIGS[device.type]).split(",")
    if unknown := [c for c in configs if c not in CONFIGS]:
        ap.error(f"unknown --configs {unknown}; choose from {', '.join(CONFIGS)}")
    if args.fps_from < 0 or args.fps_blocks < 1 or args.samples < 1:
        ap.error("--fps-from must be >= 0, --fps-blocks and --samples >= 1")
    if not args.fps_from + args.fps_blocks <= args.far_block + args.samples or not args.near_block < args.far_block:
        ap.error("the FPS window and the near point must lie before the end of the far point")
    dtype_name = args.dtype or ("bfloat16" if args.arch == "wan-1.3b" else "float32")
    torch.set_num_threads(args.threads)
    base = ARCHS[args.arch] + [f"runtime.device={device.type}", f"runtime.dtype={dtype_name}",
                               f"runtime.seed={args.seed}", f"runtime.attention_backend={args.attention_backend}"]
    cuda = device.type == "cuda"
    clock = Clock(device)
    machine = machine_info(device)
    print(f"machine: {machine['cpu']}, {machine['physical_cores']} physical cores"
          + (f" | GPU {machine['gpu']} (CUDA {machine['cuda']})" if cuda else "")
          + f"; load avg {machine['loadavg_1m_at_start']}; Python {machine['python']}, torch {machine['torch']}, "
          f"{machine['torch_threads']} torch threads")
    cfg = load_config(PLUMBING_CONFIG, base + args.set)
    m, s, v = cfg.model, cfg.stream, cfg.video
    print(f"--arch {args.arch}: dim {m.dim}, {m.num_layers} layers; {v.width}x{v.height}, {cfg.tokens_per_frame} tokens "
          f"per latent frame; {dtype_name}; {s.num_frame_per_block}-frame blocks, window {s.local_attn_size} (sink "
          f"{s.sink_size}, {s.sink_mode}); {len(cfg.scheduler.denoising_step_list)} steps; attention "
          f"{attention_kernel(args.attention_backend, device, DTYPES[dtype_name])}")
    print(f"method: warm-up excluded; TTFF = start to the first block's frames on the host (median of 3); per block = "
          f"the wall time next_chunk() makes its caller wait; FPS over blocks {args.fps_from}..{args.fps_from + args.fps_blocks - 1}"
          f" (denoise-only: frames / denoise s; end to end: frames / per-block wall s); p50/p99 over {args.samples} "
          f"blocks from block {args.near_block} and from block {args.far_block}", flush=True)

    started = time.perf_counter()
    results: dict[str, dict] = {}
    reference_frames = None
    for name in configs:
        if args.deadline_s is not None and time.perf_counter() - started > args.deadline_s:
            results[name] = {"skipped": f"--deadline-s {args.deadline_s:g} passed before it started"}
            continue
        print(f"  {name}: {' '.join(CONFIGS[name]) or '(defaults)'}", flush=True)
        try:
            pipe = build_pipeline(load_config(PLUMBING_CONFIG, base + CONFIGS[name] + args.set), device)
        except ValueError as e:  # cuda_graphs on a CPU, fp8 without torchao or an FP8 GPU: say so, measure the rest
            results[name] = {"skipped": str(e)}
            print(f"    skipped: {e}", flush=True)
            continue
        with torch.no_grad():
            r = measure(pipe, args, clock, cuda)
        if reference_frames is None:
            reference_frames = r["frames"]
        else:
            r["same_video"] = compare_frames(r["frames"], reference_frames)
        del r["frames"]
        r["block_step"] = pipe.block_step.mode
        results[name] = r
        print(f"    warm-up {r['warm_up_s']:.1f} s, FPS end to end {r['fps_end_to_end']:.1f}, denoise {r['fps_denoise']:.1f}, "
              f"graphs compiled after warm-up {r['graphs_compiled_after_warm_up']}", flush=True)
        if args.json:  # what is measured so far survives a budget's timeout
            Path(args.json).write_text(json.dumps({"machine": machine, "args": vars(args), "results": results,
                                                   "partial": True}, indent=2, default=str))
        del pipe
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()

    reference = configs[0]
    print()
    print_table(results, reference, cuda, args)
    measured = {k: r for k, r in results.items() if "skipped" not in r}
    if reference in measured:
        print("RATIOS (same run, to " + reference + "): " + " | ".join(
            f"{k} end to end x{r['fps_end_to_end'] / measured[reference]['fps_end_to_end']:.2f}, denoise "
            f"x{r['fps_denoise'] / measured[reference]['fps_denoise']:.2f}, TTFF "
            f"x{r['ttff_median_s'] / measured[reference]['ttff_median_s']:.2f}" for k, r in measured.items() if k != reference))
    if args.arch == "wan-1.3b" and measured:
        best = max(measured, key=lambda k: measured[k]["fps_end_to_end"])
        print("published FPS on one H100 (method unstated): " + ", ".join(
            f"{n} {f}" + (f" ({note})" if note else "") for n, f, note in PUBLISHED)
            + f"; this run's best end to end: {best} {measured[best]['fps_end_to_end']:.1f} on {machine.get('gpu')}")
    finish({"machine": machine, "args": vars(args), "method": __doc__.split("\n\n")[1], "results": results,
            "published_fps_h100": {n: f for n, f, _ in PUBLISHED}}, args.json)


if __name__ == "__main__":
    main()
