"""Streaming inference: per-block latency, FPS, time to first frame and memory of one `StreamSession`.

What it measures
----------------
`core.stream.session.StreamSession` is the unit the CLI and the serving deployment stream with:
`next_chunk()` denoises the next 3-latent-frame block (4 steps + the context re-run that writes
its clean K/V), decodes it through the streaming VAE decoder and returns uint8 frames on the
host (9 video frames for the first block, 12 for each later one). The script builds a
`VideoPipeline` (random weights: speed does not depend on their values), then

1. cold start: a throwaway session; time to first frame = session creation (prompt encoding,
   KV cache, decoder) + its first `next_chunk()`, the first in the process (lazy init, kernel
   selection included). It then runs until the window has started evicting, and does one
   `switch_prompt`, so every code path has run once before anything else is timed.
2. one long session (the measured one): warm time to first frame (its creation + first chunk),
   then block after block to video frame `--far-frame` (default 1000) and a little past. Every block's
   denoise and decode seconds (`VideoChunk.denoise_s` / `decode_s`, read after a CUDA
   synchronise) and the wall time around `next_chunk()` ("total": denoise + decode + the uint8
   copy to the host) are recorded, with the process CPU time around `next_chunk()` (on a CPU
   run the measure least disturbed by other processes: time spent waiting for a core is not
   counted), `session.memory_bytes()` (KV cache + kept clean latents) and
   `session.cache.evictions`.
   - points: the `--samples` blocks (default 5) around video frame `--near-frame` (30: blocks
     1..5, frames 9..68; block 0 is left out, it has fewer frames) and around `--far-frame`
     (1000: blocks 81..85, frames 969..1028): median / min / max latency, memory at the point's
     last block. The near blocks span the window filling up (window 12: blocks 1 and 2 attend
     to 6 and 9 latent frames, blocks 3..5 to all 12; window 9: only block 1 is short). They are
     those of a second session (same prompt and seed) created when the long session reaches the
     far point, and the two are timed interleaved, near block, far block, near block, ..., so
     that load changes on a shared machine fall on both points alike (the same blocks of the
     long session, timed earlier, are in the JSON). The target is
     flat: frame-1000 / frame-30 about x1.0 for both (the window holds a fixed number of frames;
     past it, frames are evicted into the EMA sink). `memory_bytes()` is flat by construction
     once the window is full (preallocated cache buffers, a bounded deque of latents), so two
     wider readings follow, each with the long session alone alive: on CUDA
     `torch.cuda.memory_allocated` after the near blocks and after the interleaved blocks (once
     the second session is deleted); everywhere the process's resident set size (RSS), as the
     median over the long session's blocks 1..20 and over the 20 blocks before the far point
     (one RSS reading swings by +-10% with the allocator's churn). Anything else that grew with
     the stream would show there.
   - throughput: blocks `--warmup` .. `--warmup + --blocks - 1` (default 2..21, i.e. 20 blocks
     after a 2-block warm-up): FPS denoise-only = video frames / sum(denoise s), FPS end to end
     = video frames / sum(total s); on CUDA the peak `torch.cuda.max_memory_allocated` over those
     blocks (weights, VAE, text encoder, KV cache and activations: everything the process holds).
3. prompt switches: `--switches` (default 5) times `switch_prompt(new prompt)` (LongLive-style
   KV re-cache: the clean latents still in the window re-run at t = context_noise under the new
   prompt) followed by one `next_chunk()`; median switch seconds, relative to the median total
   (and denoise) of the blocks right after the switches. Each prompt is new, so the switch includes encoding it; the same
   encoder's time for other new prompts is reported separately.
4. one more fresh session: the warm time to first frame is the median of 3 (with step 2's two).

`--arch tiny` (default): the plumbing config (configs/plumbing.yaml: dim 64, 2 layers, 64x64
video, EMA-sink window 12 / sink 3) in float32, on CPU unless `--device cuda`.

`--arch wan-1.3b` (CUDA only): the full Wan2.1-T2V-1.3B transformer (dim 1536, 30 layers, 12
heads) at 832x480 (latent 60x104, 1560 tokens per latent frame) in bfloat16 with the window of
configs/reward_forcing_1.3b_stream.yaml (local_attn_size 9, sink 3, rope window, EMA sink, alpha
0.999), a random Wan2.1 VAE of the real width (base_dim 96, no checkpoint) and a random small
umT5 encoder of the real output width (4096; 2 layers instead of 24, byte tokenizer). Text
encoding happens only at session creation and in `switch_prompt`, never in the per-block loop,
so the small encoder changes neither FPS figure; it makes the time to first frame and the switch
cost lower than with umT5-XXL (whose time is reported nowhere here). The generator is built
directly on the GPU (no full-size CPU copy). The FPS figures are printed next to the published
ones (one H100): Reward Forcing 23.1, LongLive 20.7, Self Forcing 17.0; the papers do not say
what their FPS includes (denoising only or VAE decode too, warm-up, what exactly is timed).

How to run (from the repository root)
-------------------------------------
    python benchmarks/stream_session.py                                   # tiny, CPU, 1 thread (~1 min)
    python benchmarks/stream_session.py --far-frame 2000 --json stream.json
    python benchmarks/stream_session.py --arch wan-1.3b --device cuda --json stream_1.3b.json

Needs torch, transformers and diffusers plus this repository's `core` package; no Ray.
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
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
from core.model.attention import BACKENDS  # noqa: E402
from core.model.wan import CausalWanModel  # noqa: E402
from core.runtime import DTYPES  # noqa: E402
from core.stream.pipeline import VideoPipeline  # noqa: E402
from core.stream.session import StreamSession  # noqa: E402

ARCHS = {
    "tiny": [],
    # Wan2.1-T2V-1.3B (REFERENCE.md section 1) at 832x480, with the stream window of
    # configs/reward_forcing_1.3b_stream.yaml; random VAE of Wan's width, random small text encoder
    "wan-1.3b": ["model.dim=1536", "model.ffn_dim=8960", "model.num_heads=12", "model.num_layers=30",
                 "model.freq_dim=256", "model.text_dim=4096", "model.text_len=512",
                 "video.height=480", "video.width=832",
                 "stream.num_frame_per_block=3", "stream.local_attn_size=9", "stream.sink_size=3",
                 "stream.rope=window", "stream.sink_mode=ema", "stream.compression_alpha=0.999",
                 "vae.base_dim=96"],
}
# (method, FPS on one H100 as published, note); REFERENCE.md section 9
PUBLISHED = [("Reward Forcing", 23.1, ""), ("LongLive", 20.7, "24.8 with FP8"), ("Self Forcing", 17.0, "")]
PROMPT = "a red fox trotting through fresh snow at dawn, tracking shot"
SWITCH_PROMPTS = ["the fox stops and looks at the camera, snow falling", "a city street at night in the rain",
                  "a sailboat on a calm sea at sunset", "a close-up of a hummingbird at a flower",
                  "a train crossing a bridge over a canyon", "time-lapse of clouds over mountains"]
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
    return VideoPipeline(cfg, generator, TextEncoder.from_config(cfg, device, dtype),
                         WanVAE.from_config(cfg, device, dtype), device)


def rss_bytes() -> int:
    """Resident set size of this process now (0 where /proc is missing)."""
    try:
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


class Clock:
    """Wall seconds; on CUDA read after a synchronise."""

    def __init__(self, device: torch.device):
        self.device = device

    def __call__(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()


def block_of_frame(frame: int, fpb: int) -> int:
    """Index of the block whose decoded frames contain video frame `frame` (block 0: 1 + 4(fpb-1) frames,
    later blocks 4 fpb)."""
    first = 1 + 4 * (fpb - 1)
    return 0 if frame < first else 1 + (frame - first) // (4 * fpb)


def point_blocks(frame: int, fpb: int, samples: int) -> list[int]:
    """`samples` consecutive blocks centred on the one holding `frame`, never block 0 (fewer frames)."""
    start = max(1, block_of_frame(frame, fpb) - samples // 2)
    return list(range(start, start + samples))


def first_chunk(pipe: VideoPipeline, prompt: str, seed: int, clock: Clock) -> tuple[StreamSession, dict]:
    """A new session and its first chunk: time to first frame = creation + first next_chunk()."""
    t0 = clock()
    session = StreamSession(pipe, prompt, seed)
    t1 = clock()
    chunk = session.next_chunk()
    t2 = clock()
    return session, {"ttff_s": t2 - t0, "create_s": t1 - t0, "denoise_s": chunk.denoise_s, "decode_s": chunk.decode_s,
                     "frames": len(chunk.frames)}


def timed_chunk(session: StreamSession, clock: Clock) -> dict:
    t0, c0 = clock(), time.process_time()
    chunk = session.next_chunk()
    total, cpu = clock() - t0, time.process_time() - c0
    return {"block": chunk.block, "first_frame": chunk.first_frame, "frames": len(chunk.frames),
            "denoise_s": chunk.denoise_s, "decode_s": chunk.decode_s, "total_s": total, "cpu_s": cpu,
            "memory_bytes": session.memory_bytes(), "evictions": session.cache.evictions, "rss_bytes": rss_bytes()}


def summarise(blocks: list[dict]) -> dict:
    out: dict = {"blocks": [b["block"] for b in blocks],
                 "frames": [blocks[0]["first_frame"], blocks[-1]["first_frame"] + blocks[-1]["frames"] - 1]}
    for k in ("denoise_s", "decode_s", "total_s", "cpu_s"):
        vals = [b[k] for b in blocks]
        out[k] = {"median": statistics.median(vals), "min": min(vals), "max": max(vals)}
    out["memory_bytes"] = blocks[-1]["memory_bytes"]
    out["evictions"] = blocks[-1]["evictions"]
    return out


def ms(x: float) -> str:
    return f"{x * 1e3:.2f}"


def print_points(points: dict, cuda: bool) -> None:
    cols = ["point", "blocks", "video frames", "denoise ms", "decode ms", "total ms", "total min..max ms",
            "memory_bytes MiB", "evictions"] + (["CUDA alloc MiB"] if cuda else ["CPU ms"])
    rows = []
    for name, p in points.items():
        row = [name, f"{p['blocks'][0]}..{p['blocks'][-1]}", f"{p['frames'][0]}..{p['frames'][1]}",
               ms(p["denoise_s"]["median"]), ms(p["decode_s"]["median"]), ms(p["total_s"]["median"]),
               f"{ms(p['total_s']['min'])}..{ms(p['total_s']['max'])}", f"{p['memory_bytes'] / MiB:.3f}",
               str(p["evictions"])]
        row.append(f"{p['cuda_allocated_bytes'] / MiB:.1f}" if cuda else ms(p["cpu_s"]["median"]))
        rows.append(row)
    widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(cols)]
    print("  ".join(c.rjust(w) for c, w in zip(cols, widths)))
    for row in rows:
        print("  ".join(v.rjust(w) for v, w in zip(row, widths)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", choices=sorted(ARCHS), default="tiny", help="tiny (default; CPU) or wan-1.3b (CUDA only)")
    ap.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: float32 (tiny), bfloat16 (wan-1.3b)")
    ap.add_argument("--near-frame", type=int, default=30, help="video frame of the near point (default 30)")
    ap.add_argument("--far-frame", type=int, default=1000, help="video frame of the far point (default 1000)")
    ap.add_argument("--samples", type=int, default=5, help="blocks timed around each point (default 5)")
    ap.add_argument("--warmup", type=int, default=2, help="blocks of the measured session before the FPS blocks (default 2)")
    ap.add_argument("--blocks", type=int, default=20, help="blocks the FPS and peak memory are measured over (default 20)")
    ap.add_argument("--switches", type=int, default=5, help="switch_prompt calls timed (default 5)")
    ap.add_argument("--attention-backend", choices=BACKENDS, default="auto")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="extra config overrides")
    ap.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None, help="also write the results to this file")
    args = ap.parse_args()

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        ap.error(f"--device {args.device}: no CUDA device is visible (torch {torch.__version__}, "
                 f"torch.cuda.is_available() is False)")
    if args.arch == "wan-1.3b" and device.type != "cuda":
        ap.error("--arch wan-1.3b needs a GPU: run it with --device cuda on a machine with CUDA "
                 "(the 1.3B model at 832x480 would take minutes per block on a CPU)")
    if args.samples < 1 or args.warmup < 1 or args.blocks < 1 or args.switches < 0:
        ap.error("--samples, --warmup and --blocks must be >= 1, --switches >= 0")
    if not 0 <= args.near_frame < args.far_frame:
        ap.error("need 0 <= --near-frame < --far-frame")
    dtype_name = args.dtype or ("bfloat16" if args.arch == "wan-1.3b" else "float32")
    torch.set_num_threads(args.threads)
    cfg = load_config(PLUMBING_CONFIG, ARCHS[args.arch] + [f"runtime.device={device.type}", f"runtime.dtype={dtype_name}",
                                                f"runtime.seed={args.seed}",
                                                f"runtime.attention_backend={args.attention_backend}"] + args.set)
    cuda = device.type == "cuda"
    clock = Clock(device)

    machine = machine_info(device)
    print(f"machine: {machine['cpu']}, {machine['physical_cores']} physical cores, {machine['logical_cpus']} logical CPUs"
          + (f" | GPU {machine['gpu']} (CUDA {machine['cuda']})" if cuda else "")
          + f"; load avg {machine['loadavg_1m_at_start']} at start; Python {machine['python']}, torch {machine['torch']}, "
          f"{machine['torch_threads']} torch threads")
    m, s, v = cfg.model, cfg.stream, cfg.video
    fpb = s.num_frame_per_block
    window_blocks = s.cache_frames // fpb
    print(f"--arch {args.arch}: dim {m.dim}, {m.num_layers} layers, {m.num_heads} heads; {v.width}x{v.height} video, "
          f"latent {v.latent_hw[0]}x{v.latent_hw[1]} = {cfg.tokens_per_frame} tokens/latent frame; {dtype_name} on {device}; "
          f"stream: {fpb}-frame blocks, window {s.local_attn_size} (sink {s.sink_size}, rope {s.rope}, sink {s.sink_mode}, "
          f"alpha {s.compression_alpha}); {len(cfg.scheduler.denoising_step_list)} denoising steps; VAE base_dim "
          f"{cfg.vae.base_dim}; text encoder: random, {cfg.text_encoder.tiny_layers} layers, width {m.text_dim}", flush=True)

    near_blocks = point_blocks(args.near_frame, fpb, args.samples)
    far_blocks = point_blocks(args.far_frame, fpb, args.samples)
    fps_blocks = list(range(args.warmup, args.warmup + args.blocks))
    if far_blocks[0] <= max(near_blocks[-1], fps_blocks[-1]):
        ap.error(f"--far-frame {args.far_frame} is too close: its blocks ({far_blocks[0]}..) must come after the near "
                 f"blocks (..{near_blocks[-1]}) and the FPS blocks (..{fps_blocks[-1]})")
    n_blocks = far_blocks[-1] + 1

    t0 = time.perf_counter()
    pipe = build_pipeline(cfg, device)
    build_s = time.perf_counter() - t0
    weight_bytes = sum(p.numel() * p.element_size() for p in pipe.generator.parameters())
    print(f"pipeline built in {build_s:.1f} s (generator {sum(p.numel() for p in pipe.generator.parameters()) / 1e6:.1f} M "
          f"params, {weight_bytes / MiB:.1f} MiB)", flush=True)

    with torch.no_grad():
        # 1. cold start, then every path (eviction, EMA sink, steady decode, switch) once, untimed
        session, cold = first_chunk(pipe, PROMPT, args.seed, clock)
        print(f"cold time to first frame: {cold['ttff_s']:.3f} s ({cold['frames']} frames; creation {cold['create_s']:.3f} s)",
              flush=True)
        while session.blocks < window_blocks + 2:
            session.next_chunk()
        session.switch_prompt(SWITCH_PROMPTS[-1])
        session.next_chunk()
        del session

        # 2. the measured session, up to the far point; then the far point's blocks interleaved, block by
        #    block, with the near point's blocks of a second session (same prompt and seed), so that load
        #    changes on a shared machine fall on both points alike
        print(f"measured session: {n_blocks} blocks ({1 + 4 * (fpb - 1) + (n_blocks - 1) * 4 * fpb} video frames); points: "
              f"blocks {near_blocks[0]}..{near_blocks[-1]} (second session) interleaved with {far_blocks[0]}..{far_blocks[-1]}; "
              f"FPS over blocks {fps_blocks[0]}..{fps_blocks[-1]}", flush=True)
        session, warm = first_chunk(pipe, PROMPT, args.seed, clock)
        ttff = [warm]
        records: list[dict] = []
        mem: dict = {}
        t_start = time.perf_counter()
        while session.blocks < far_blocks[0]:
            b = session.blocks
            if cuda and b == fps_blocks[0]:
                torch.cuda.reset_peak_memory_stats(device)
            records.append(timed_chunk(session, clock))
            if cuda and b == fps_blocks[-1]:
                mem["fps_peak_bytes"] = torch.cuda.max_memory_allocated(device)
            if cuda and b == near_blocks[-1]:
                mem["near"] = torch.cuda.memory_allocated(device)
            if b % 20 == 0:
                print(f"  block {b}: frame {records[-1]['first_frame']}, {ms(records[-1]['total_s'])} ms "
                      f"({time.perf_counter() - t_start:.0f} s)", flush=True)
        near_session, w = first_chunk(pipe, PROMPT, args.seed, clock)
        ttff.append(w)
        while near_session.blocks < near_blocks[0]:
            near_session.next_chunk()
        near_recs, far_recs = [], []
        for _ in range(args.samples):
            near_recs.append(timed_chunk(near_session, clock))
            far_recs.append(timed_chunk(session, clock))
        del near_session
        gc.collect()
        if cuda:
            mem["far"] = torch.cuda.memory_allocated(device)  # the long session alone again, as at "near"
        while session.blocks < n_blocks:
            records.append(timed_chunk(session, clock))
        records += far_recs
        records.sort(key=lambda r: r["block"])
        by_block = {r["block"]: r for r in records}
        points = {f"frame ~{args.near_frame}": summarise(near_recs), f"frame ~{args.far_frame}": summarise(far_recs)}
        if cuda:
            points[f"frame ~{args.near_frame}"]["cuda_allocated_bytes"] = mem["near"]
            points[f"frame ~{args.far_frame}"]["cuda_allocated_bytes"] = mem["far"]
        # process RSS: one reading swings by +-10% with the allocator's churn (VAE activations), so
        # compare medians over 20 blocks of the long session alone, early and just before the far point
        rss_early = [by_block[b]["rss_bytes"] for b in range(1, min(21, far_blocks[0]))]
        rss_late = [by_block[b]["rss_bytes"] for b in range(max(1, far_blocks[0] - 20), far_blocks[0])]
        rss = {"early_blocks": [1, min(21, far_blocks[0]) - 1], "late_blocks": [max(1, far_blocks[0] - 20), far_blocks[0] - 1],
               "early_median_bytes": statistics.median(rss_early), "late_median_bytes": statistics.median(rss_late)}
        near_in_long = summarise([by_block[b] for b in near_blocks])  # the same blocks of the long session, not interleaved
        fps_recs = [by_block[b] for b in fps_blocks]
        frames = sum(r["frames"] for r in fps_recs)
        throughput = {"blocks": fps_blocks, "video_frames": frames,
                      "denoise_s": sum(r["denoise_s"] for r in fps_recs), "decode_s": sum(r["decode_s"] for r in fps_recs),
                      "total_s": sum(r["total_s"] for r in fps_recs)}
        throughput["fps_denoise"] = frames / throughput["denoise_s"]
        throughput["fps_end_to_end"] = frames / throughput["total_s"]
        if cuda:
            throughput["cuda_peak_allocated_bytes"] = mem["fps_peak_bytes"]

        # 3. prompt switches on the long session, each followed by one block
        switches, after, encodes = [], [], []
        for i in range(args.switches):
            prompt = f"{SWITCH_PROMPTS[i % (len(SWITCH_PROMPTS) - 1)]}, take {i}"  # new text: not in the encoder's cache
            t0 = clock()
            session.switch_prompt(prompt)
            switches.append(clock() - t0)
            after.append(timed_chunk(session, clock))
            t0 = clock()
            pipe.text_encoder.encode([f"{prompt}, again"])  # another new prompt: encoding alone
            encodes.append(clock() - t0)
        del session

        # 4. one more warm session for the time to first frame
        for i in range(1):
            s2, w = first_chunk(pipe, f"{PROMPT}, take {i}", args.seed + 1 + i, clock)
            ttff.append(w)
            del s2

    near, far = points[f"frame ~{args.near_frame}"], points[f"frame ~{args.far_frame}"]
    switch = None
    if switches:
        switch = {"switch_s": switches, "median_s": statistics.median(switches),
                  "encode_new_prompt_median_s": statistics.median(encodes),
                  "block_after_switch_total_median_s": statistics.median(r["total_s"] for r in after),
                  "recached_blocks": window_blocks}
        adj = {k: statistics.median(r[k] for r in after) for k in ("total_s", "denoise_s")}
        switch["per_block"] = switch["median_s"] / adj["total_s"]  # the blocks right after: same load, same time
        switch["per_denoise"] = switch["median_s"] / adj["denoise_s"]
    ratios = {k: far[k]["median"] / near[k]["median"] for k in ("total_s", "denoise_s", "decode_s", "cpu_s")}
    ratios["memory_bytes"] = far["memory_bytes"] / near["memory_bytes"]
    ratios["rss_median_bytes"] = (rss["late_median_bytes"] / rss["early_median_bytes"] if rss["early_median_bytes"]
                                  else float("nan"))
    if cuda:
        ratios["cuda_allocated_bytes"] = far["cuda_allocated_bytes"] / near["cuda_allocated_bytes"]
    ttff_warm = statistics.median(t["ttff_s"] for t in ttff)

    print()
    print(f"per block (median of {args.samples}; total = wall around next_chunk(): denoise + decode + uint8 copy to host"
          + ("" if cuda else "; CPU = process CPU time around next_chunk(), less sensitive to other processes") + "):")
    print_points(points, cuda)
    print()
    print(f"throughput over blocks {fps_blocks[0]}..{fps_blocks[-1]} ({frames} video frames): "
          f"FPS denoise-only {throughput['fps_denoise']:.2f}, FPS end to end (with VAE decode) "
          f"{throughput['fps_end_to_end']:.2f}; denoise {throughput['denoise_s']:.3f} s, decode {throughput['decode_s']:.3f} s, "
          f"total {throughput['total_s']:.3f} s"
          + (f"; peak CUDA allocated {throughput['cuda_peak_allocated_bytes'] / GiB:.2f} GiB" if cuda else ""))
    print(f"time to first frame (session creation + first chunk of {cold['frames']} frames): cold {cold['ttff_s']:.3f} s "
          f"(first session in the process), warm {ttff_warm:.3f} s (median of {len(ttff)}: "
          + ", ".join(f"{t['ttff_s']:.3f}" for t in ttff) + ")")
    if switch:
        print(f"switch_prompt: median {ms(switch['median_s'])} ms over {len(switches)} (re-runs the {window_blocks} blocks "
              f"in the window; includes encoding the new prompt, alone {ms(switch['encode_new_prompt_median_s'])} ms) "
              f"= x{switch['per_block']:.2f} the total of the block right after it (median "
              f"{ms(switch['block_after_switch_total_median_s'])} ms), x{switch['per_denoise']:.2f} its denoise")
    print(f"session memory_bytes (KV cache + kept clean latents): {near['memory_bytes'] / MiB:.3f} MiB at frame "
          f"~{args.near_frame}, {far['memory_bytes'] / MiB:.3f} MiB at frame ~{args.far_frame} "
          f"({near['evictions']} and {far['evictions']} window evictions); process RSS median over blocks "
          f"{rss['early_blocks'][0]}..{rss['early_blocks'][1]}: {rss['early_median_bytes'] / MiB:.1f} MiB, over blocks "
          f"{rss['late_blocks'][0]}..{rss['late_blocks'][1]}: {rss['late_median_bytes'] / MiB:.1f} MiB")
    if args.arch == "wan-1.3b":
        gpu = machine.get("gpu", str(device))
        print("published FPS (one H100; what it includes is not specified by the papers):")
        for name, fps, note in PUBLISHED:
            print(f"  {name:15s} {fps:5.1f}" + (f" ({note})" if note else ""))
        print(f"  {'this run':15s} denoise-only {throughput['fps_denoise']:.1f}, end to end {throughput['fps_end_to_end']:.1f} "
              f"on {gpu}, random weights, {v.width}x{v.height}, {dtype_name}, {args.attention_backend} attention")
    parts = [f"frame ~{args.far_frame}/~{args.near_frame} (median of {args.samples} blocks): latency total "
             f"x{ratios['total_s']:.2f} (denoise x{ratios['denoise_s']:.2f}, decode x{ratios['decode_s']:.2f}), "
             f"session memory_bytes x{ratios['memory_bytes']:.2f}, process RSS (median of {len(rss_early)} blocks) "
             f"x{ratios['rss_median_bytes']:.2f}"
             + (f", CUDA allocated x{ratios['cuda_allocated_bytes']:.2f}" if cuda else
                f", process CPU time x{ratios['cpu_s']:.2f}")]
    if switch:
        parts.append(f"switch_prompt / one block x{switch['per_block']:.2f} (/ its denoise x{switch['per_denoise']:.2f})")
    if args.arch == "wan-1.3b":
        parts.append(f"FPS end to end {throughput['fps_end_to_end']:.1f} / published 23.1 (Reward Forcing, H100) "
                     f"x{throughput['fps_end_to_end'] / 23.1:.2f}, denoise-only x{throughput['fps_denoise'] / 23.1:.2f}")
    print("RATIOS: " + " | ".join(parts))

    results = {"machine": machine, "args": vars(args), "config": {"arch": m.model_dump(), "stream": s.model_dump(),
               "video": [v.width, v.height], "latent_hw": list(v.latent_hw), "tokens_per_frame": cfg.tokens_per_frame,
               "dtype": dtype_name, "vae_base_dim": cfg.vae.base_dim},
               "build_s": build_s, "generator_weight_bytes": weight_bytes, "ttff_cold": cold, "ttff_warm": ttff,
               "ttff_warm_median_s": ttff_warm, "points": points, "rss": rss,
               "near_point_in_long_session": near_in_long, "throughput": throughput, "switch": switch,
               "blocks_after_switch": after, "ratios": ratios, "per_block": records,
               "published_fps_h100": {name: fps for name, fps, _ in PUBLISHED}}
    finish(results, args.json)


if __name__ == "__main__":
    main()
