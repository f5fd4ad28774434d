"""One GPU check, on one bare H100/H200, in under 8 minutes: the questions only a GPU answers.

It needs only PyTorch, the packages such a machine has (transformers, safetensors, numpy, pyyaml, pillow) and
benchmarks/gpu_requirements.txt; it never imports Ray, DeepSpeed or PyAV (the Ray-free `core` runs everything).
Random weights at the real widths (speed and memory do not depend on their values). Sections, each on its own:
a failed one is reported and the others run; each writes its results as soon as it ends.

- **attention**: on Wan's shapes (a stream block against its window, a training clip against itself, and that
  clip block-causal), each attention backend's time, TFLOP/s (4·B·H·Lq·Lk·D per call, the dense count even
  where a mask skips work) and the kernel that actually ran (the profiler's top kernel by device time).
- **train**: one real-width Re-DMD iteration on one GPU, twice (the second, with every optimizer state
  allocated, is the one reported): a self-forced rollout, the generator's replay of its exit steps with the
  DMD loss and an update, a critic update. bf16 modules, fp32 master weights with AdamW on them (what
  DeepSpeed's bf16 optimizer keeps on one GPU), gradient checkpointing on, a teacher of the student's width
  (the 14B does not fit beside the rest on one GPU). Step times and the peak memory against `launch.py plan`'s
  items for the same config.
- **precision**: bf16 against float32 on the same weights, noise and prompt: one block's x0, a rollout's
  latents and decoded frames (uint8 levels), and whether the EMA sink moves (its change over the evictions,
  with the float32 accumulator and with the reference's in-cache one).
- **stream**: `benchmarks/stream_session.py`'s one method (its docstring) at 832x480 with the Wan VAE, per
  configuration: eager, compiled, CUDA graphs, + overlapped decode, + FP8 when torchao is there. TTFF, FPS end
  to end and denoise-only, p50/p99 per-block latency early and late, peak memory, and the frames' difference
  from eager's. It gets what is left of the time budget; configurations not started in time are listed.

    bash benchmarks/gpu_check.sh              # the GPU run: installs .whl/ (make gpu-wheels), writes $OUT
    bash benchmarks/gpu_check.sh --dry-run    # the same code at tiny sizes on the CPU (a test runs it)

Writes gpu_check.json and gpu_check.md into --out (default outputs/gpu_check).
"""

from __future__ import annotations

import argparse
import copy
import functools
import gc
import json
import os
import platform
import sys
import time
import traceback
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from anywhere

import torch  # noqa: E402

from benchmarks import stream_session  # noqa: E402
from benchmarks.common import cpu_model  # noqa: E402
from core.algo.distill import ReDMD  # noqa: E402
from core.algo.rollout import SelfForcedRollout, gaussian_noise  # noqa: E402
from core.codecs.text_encoder import pad_context  # noqa: E402
from core.codecs.video import to_uint8_frames  # noqa: E402
from core.codecs.wan_vae import WanVAE  # noqa: E402
from core.config import PLUMBING_CONFIG, REPO_ROOT, Config, load_config  # noqa: E402
from core.model.attention import attention, attention_kernel, block_causal_mask, flash_available  # noqa: E402
from core.model.wan import CausalWanModel, WanModel  # noqa: E402
from core.plan import learner_role, model_sizes  # noqa: E402

GB = 1e9
PROMPT_TOKENS = 24  # a typical prompt's umT5 length
PAPER_CONFIG = REPO_ROOT / "configs" / "reward_forcing_1.3b.yaml"
# the paper's training config on one GPU: no weight files, a teacher of the student's width, micro batch 1
TRAIN_OVERRIDES = ["checkpoint.generator=null", "text_encoder.checkpoint=null", "text_encoder.tokenizer=null",
                   "vae.checkpoint=null", "learner.teacher.arch=null", "learner.teacher.checkpoint=null",
                   "learner.critic_checkpoint=null", "reward.backend=motion", "reward.checkpoint=null",
                   "learner.num_workers=1", "learner.batch_size=1", "learner.precision=bf16",
                   "learner.gradient_checkpointing=true"]
STREAM_CONFIGS = {"full": "eager,compiled,graphs,graphs+overlap,graphs+overlap+fp8",
                  "dry": "eager,eager+overlap,graphs+overlap+fp8"}
# stream_session's windows: (near block, far block, samples, FPS from, FPS blocks, compared blocks)
STREAM_WINDOWS = {"full": (10, 40, 10, 2, 20, 6), "dry": (2, 5, 2, 1, 4, 2)}
STREAM_START_S = {"full": 60, "dry": 0}  # a configuration starts only with this much of the budget left
SECTIONS = ("attention", "train", "precision", "stream")
NOT_HERE = ("ray", "deepspeed", "av")  # absent on the GPU machine: never imported by this check


class Run:
    """What every section needs: the device, the sizes (full or dry), the seed and the clock."""

    def __init__(self, dry: bool, seed: int, save: Callable[[str, dict], None]):
        self.dry, self.seed = dry, seed
        self.size = "dry" if dry else "full"
        self.device = torch.device("cpu" if dry else "cuda")
        self.cuda = self.device.type == "cuda"
        self.save = save  # (section, its results so far): written at once, so a timeout keeps them

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def now(self) -> float:
        self.sync()
        return time.perf_counter()

    def reset_peak(self) -> None:
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)

    def peak_bytes(self) -> int | None:
        return torch.cuda.max_memory_allocated(self.device) if self.cuda else None

    def free(self) -> None:
        gc.collect()
        if self.cuda:
            torch.cuda.empty_cache()

    def stream_config(self, dtype: str, extra: list[str] | None = None) -> Config:
        """stream_session's architecture (wan-1.3b, or the tiny plumbing one) in `dtype` on this device."""
        arch = stream_session.ARCHS["tiny" if self.dry else "wan-1.3b"]
        return load_config(PLUMBING_CONFIG, arch + [f"runtime.device={self.device.type}", f"runtime.dtype={dtype}",
                                                    f"runtime.seed={self.seed}"] + (extra or []))


# ------------------------------------------------------------------------------------------------ attention


def _top_kernel(fn: Callable[[], torch.Tensor], cuda: bool) -> str:
    """The kernel (CUDA) or operator (CPU) that took the most device time in one call of `fn`."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CUDA] if cuda else [ProfilerActivity.CPU]
    with profile(activities=activities) as prof:
        fn()
        if cuda:
            torch.cuda.synchronize()
    key = "self_device_time_total" if cuda else "self_cpu_time_total"
    events = [e for e in prof.key_averages() if getattr(e, key, 0) > 0]
    if not events:
        return "unknown"
    return max(events, key=lambda e: getattr(e, key)).key[:90]


def attention_section(run: Run, deadline: float) -> dict:
    if run.dry:
        heads, head_dim, tokens_per_frame, dtype = 2, 32, 16, torch.float32
    else:
        heads, head_dim, tokens_per_frame, dtype = 12, 128, 1560, torch.bfloat16
    block, window, clip = 3 * tokens_per_frame, 9 * tokens_per_frame, 21 * tokens_per_frame
    shapes = [("stream block vs window", block, window, None), ("training clip", clip, clip, None),
              ("training clip, block-causal", clip, clip, block_causal_mask(block))]
    backends = ["auto", "sdpa", "flex", "math"] + (["flash"] if flash_available() else [])
    reps = 2 if run.dry else 10
    rows = []
    gen = torch.Generator(device=run.device).manual_seed(run.seed)
    for name, lq, lk, mask in shapes:
        q = torch.randn(1, lq, heads, head_dim, generator=gen, device=run.device, dtype=dtype)
        k = torch.randn(1, lk, heads, head_dim, generator=gen, device=run.device, dtype=dtype)
        v = torch.randn(1, lk, heads, head_dim, generator=gen, device=run.device, dtype=dtype)
        flops = 4 * heads * lq * lk * head_dim
        for backend in backends:
            row = {"shape": name, "q_tokens": lq, "kv_tokens": lk, "backend": backend}
            if time.perf_counter() > deadline:
                rows.append(row | {"skipped": "out of time"})
                continue
            if backend == "math" and lq * lk * heads * 4 > 8 * GB:
                rows.append(row | {"skipped": "the scores alone would take over 8 GB"})
                continue
            call = functools.partial(attention, q, k, v, mask_mod=mask, backend=backend)
            try:
                call()  # warm-up: compiles flex, picks kernels
                t0 = run.now()
                for _ in range(reps):
                    call()
                seconds = (run.now() - t0) / reps
                row |= {"ms": seconds * 1e3, "tflops": flops / seconds / 1e12, "kernel": _top_kernel(call, run.cuda)}
                if mask is None:
                    row["project_reports"] = attention_kernel(backend, run.device, dtype)
            except Exception as e:  # noqa: BLE001 - a backend that cannot run here is a finding, not a stop
                row["failed"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:200]
            rows.append(row)
    return {"dtype": str(dtype).removeprefix("torch."), "heads": heads, "head_dim": head_dim, "rows": rows}


# ------------------------------------------------------------------------------------------------ train


class MasterWeights:
    """A bf16 module's fp32 master copy with AdamW on it and gradient clipping: what DeepSpeed's bf16 optimizer
    keeps on one GPU (the module's params and grads in bf16; the masters, their fp32 grads, Adam's m and v)."""

    def __init__(self, module: torch.nn.Module, lr: float, betas: tuple[float, float], weight_decay: float,
                 grad_clip: float):
        self.params = [p for p in module.parameters() if p.requires_grad]
        self.masters = [p.detach().float().clone().requires_grad_(True) for p in self.params]
        for m in self.masters:
            m.grad = torch.zeros_like(m)  # the fp32 gradient partition, kept like DeepSpeed's
        self.grad_clip = grad_clip
        fused = self.masters[0].is_cuda  # one kernel, and no temporary the size of m or v (foreach makes one)
        self.optimizer = torch.optim.AdamW(self.masters, lr=lr, betas=betas, eps=1e-8, weight_decay=weight_decay,
                                           fused=fused, foreach=not fused)

    @torch.no_grad()
    def step(self) -> float:
        """Move the bf16 grads into the fp32 ones, clip, step the masters and copy them back; the grad norm."""
        for p, m in zip(self.params, self.masters):
            m.grad.copy_(p.grad)
            p.grad = None
        norm = torch.nn.utils.clip_grad_norm_(self.masters, self.grad_clip)
        self.optimizer.step()
        for p, m in zip(self.params, self.masters):
            p.copy_(m)
        return float(norm)


def train_config(run: Run) -> Config:
    if run.dry:
        return load_config(PLUMBING_CONFIG, ["learner.precision=bf16", "learner.gradient_checkpointing=true",
                                             "learner.batch_size=1", f"runtime.seed={run.seed}"])
    return load_config(PAPER_CONFIG, TRAIN_OVERRIDES + [f"runtime.seed={run.seed}"])


def plan_items(cfg: Config) -> dict:
    role = learner_role(cfg, model_sizes(cfg))
    return {"total_bytes": role.total, "items": {i.name: i.bytes for i in role.items}}


def train_section(run: Run, deadline: float) -> dict:
    cfg = train_config(run)
    lc, dtype = cfg.learner, torch.bfloat16
    planned = plan_items(cfg)
    torch.manual_seed(run.seed)
    t0 = run.now()
    with torch.device(run.device):
        generator, critic, teacher = CausalWanModel(cfg.model, cfg.stream), WanModel(cfg.model), WanModel(cfg.model)
    for model in (generator, critic, teacher):
        model.to(dtype)
        model.attention_backend = cfg.runtime.attention_backend
    generator.gradient_checkpointing = critic.gradient_checkpointing = True
    teacher.eval().requires_grad_(False)
    gen_opt = MasterWeights(generator, lc.generator_lr, tuple(lc.betas), lc.weight_decay, lc.grad_clip)
    critic_opt = MasterWeights(critic, lc.critic_lr, tuple(lc.betas), lc.weight_decay, lc.grad_clip)
    build_s = run.now() - t0

    distill = ReDMD(cfg)
    rng = torch.Generator().manual_seed(run.seed)
    rows = torch.randn(min(PROMPT_TOKENS, cfg.model.text_len), cfg.model.text_dim, generator=rng)
    context = pad_context([rows.to(run.device, dtype)], cfg.model.text_len)
    negative = pad_context([torch.randn(rows.shape, generator=rng).to(run.device, dtype)], cfg.model.text_len)
    fpb, hw = cfg.stream.num_frame_per_block, cfg.video.latent_hw
    blocks = cfg.video.num_latent_frames // fpb
    iterations = []
    for i in range(2):
        if time.perf_counter() > deadline:
            break
        run.reset_peak()
        t = run.now()
        generator.eval()
        with torch.no_grad():
            rollout = SelfForcedRollout(generator, distill.scheduler, distill.rollout_timesteps,
                                        cfg.scheduler.context_noise)
            noise = gaussian_noise((1, fpb, cfg.model.in_dim, *hw), rng, dtype, run.device)
            record = rollout.training_rollout(context, generator.init_cache(1, hw), noise, blocks, generator=rng)
        rollout_s, t = run.now() - t, run.now()
        generator.train()
        x = distill.replay(generator, record, context)
        loss, stats = distill.generator_loss(x, critic, teacher, context, negative, torch.ones(1, device=run.device),
                                             rng, ["random context"])
        loss.backward()
        gen_norm = gen_opt.step()
        generator_s, t = run.now() - t, run.now()
        del x, loss
        loss, _ = distill.critic_loss(critic, record.clean_latents().to(dtype), context, rng)
        loss.backward()
        critic_norm = critic_opt.step()
        critic_s = run.now() - t
        iterations.append({"rollout_s": rollout_s, "generator_step_s": generator_s, "critic_step_s": critic_s,
                           "peak_bytes": run.peak_bytes(), "generator_grad_norm": gen_norm,
                           "critic_grad_norm": critic_norm, "exit_index": record.exit_index} | stats)
        del loss, record
    report = iterations[-1] if iterations else {}
    measured = report.get("peak_bytes")
    return {"config": "configs/reward_forcing_1.3b.yaml at world size 1, teacher of the student's width"
            if not run.dry else "configs/plumbing.yaml, bf16", "build_s": build_s,
            "parameters": {"generator": sum(p.numel() for p in generator.parameters()),
                           "critic": sum(p.numel() for p in critic.parameters()),
                           "teacher": sum(p.numel() for p in teacher.parameters())},
            "iterations": iterations, "plan": planned,
            "measured_over_plan": measured / planned["total_bytes"] if measured else None}


# ------------------------------------------------------------------------------------------------ precision


def _sink(cache, sink_tokens: int) -> torch.Tensor:
    return cache.layers[0].k[:, :sink_tokens].float().cpu()


def _rollout(cfg: Config, generator: CausalWanModel, context: torch.Tensor, seed: int, blocks: int,
             device: torch.device):
    """Latents and the cache after `blocks` blocks of `generator`, noise from `seed`."""
    dtype = next(generator.parameters()).dtype
    sched = ReDMD(cfg)
    rollout = SelfForcedRollout(generator, sched.scheduler, sched.rollout_timesteps, cfg.scheduler.context_noise,
                                cfg.stream.context_rerun)
    hw = cfg.video.latent_hw
    cache = generator.init_cache(1, hw)
    noise = gaussian_noise((1, cfg.stream.num_frame_per_block, cfg.model.in_dim, *hw),
                           torch.Generator().manual_seed(seed), dtype, device)
    with torch.no_grad():
        latents = rollout.generate(context.to(dtype), cache, noise, blocks)
    return latents, cache


def precision_section(run: Run, deadline: float) -> dict:
    cfg32 = run.stream_config("float32")
    torch.manual_seed(run.seed)
    with torch.device(run.device):
        gen32 = CausalWanModel(cfg32.model, cfg32.stream).eval().requires_grad_(False)
    gen32.attention_backend = cfg32.runtime.attention_backend
    gen16 = copy.deepcopy(gen32).to(torch.bfloat16)
    gen32.load_state_dict({k: v.float() for k, v in gen16.state_dict().items()})  # both hold the same values
    rng = torch.Generator().manual_seed(run.seed)
    rows = torch.randn(min(PROMPT_TOKENS, cfg32.model.text_len), cfg32.model.text_dim, generator=rng)
    context = pad_context([rows.to(run.device)], cfg32.model.text_len)
    s = cfg32.stream
    window_blocks = s.local_attn_size // s.num_frame_per_block
    blocks = window_blocks + (2 if run.dry else 4)  # past the window's fill: every later block evicts into the sink
    sink_tokens = s.sink_size * cfg32.tokens_per_frame
    out: dict = {"blocks": blocks, "evicting_blocks": blocks - window_blocks, "alpha": s.compression_alpha}

    # one block's x0 at the first denoising step
    hw = cfg32.video.latent_hw
    x = torch.randn(1, cfg32.model.in_dim, s.num_frame_per_block, *hw, generator=rng).to(run.device)
    t = torch.full((1, s.num_frame_per_block), 1000.0, device=run.device)
    with torch.no_grad():
        f32 = gen32(x, t, context, cache=gen32.init_cache(1, hw), start_frame=0).float()
        f16 = gen16(x.bfloat16(), t, context.bfloat16(), cache=gen16.init_cache(1, hw), start_frame=0).float()
    out["block_flow_rel_error"] = float((f16 - f32).norm() / f32.norm())

    runs = {"float32": (cfg32, gen32), "bfloat16": (run.stream_config("bfloat16"), gen16)}
    if "ema_sink_accumulator" in type(s).model_fields:
        runs["bfloat16, in-cache EMA (reference)"] = (run.stream_config("bfloat16", ["stream.ema_sink_accumulator=cache"]),
                                                       gen16)
    latents, sinks = {}, {}
    for name, (cfg, gen) in runs.items():
        if time.perf_counter() > deadline:
            out.setdefault("skipped", []).append(name)
            continue
        gen.stream = cfg.stream  # the cache follows the model's stream settings
        _, filled = _rollout(cfg, gen, context, run.seed, window_blocks, run.device)
        latents[name], cache = _rollout(cfg, gen, context, run.seed, blocks, run.device)
        before, after = _sink(filled, sink_tokens), _sink(cache, sink_tokens)
        sinks[name] = after
        out.setdefault("ema_sink", {})[name] = {
            "relative_change": float((after - before).norm() / before.norm()),
            "elements_changed": float((after != before).float().mean())}
    ref = latents["float32"].float()
    codec = WanVAE.from_config(cfg32, run.device, torch.float32) if not run.dry else None

    def frames(latent: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return to_uint8_frames(codec.decode(latent.float().transpose(1, 2))[0]).int()
    ref_frames = frames(ref) if codec is not None else None
    for name, lat in latents.items():
        if name == "float32":
            continue
        entry = out.setdefault("rollout", {}).setdefault(name, {})
        entry["latent_rel_error"] = float((lat.float() - ref).norm() / ref.norm())
        entry["sink_rel_error_vs_float32"] = float((sinks[name] - sinks["float32"]).norm() / sinks["float32"].norm())
        if ref_frames is not None:
            diff = (frames(lat) - ref_frames).abs()
            entry["frames_levels"] = {"max": int(diff.max()), "mean": float(diff.float().mean())}
    return out


# ------------------------------------------------------------------------------------------------ stream


def stream_section(run: Run, deadline: float) -> dict:
    near, far, samples, fps_from, fps_blocks, compare = STREAM_WINDOWS[run.size]
    args = argparse.Namespace(seed=run.seed, near_block=near, far_block=far, samples=samples, fps_from=fps_from,
                              fps_blocks=fps_blocks, compare_blocks=compare)
    dtype = "float32" if run.dry else "bfloat16"
    clock = stream_session.Clock(run.device)
    results: dict[str, dict] = {}
    reference = None
    section = {"dtype": dtype, "windows": vars(args), "results": results}
    for name in STREAM_CONFIGS[run.size].split(","):
        if deadline - time.perf_counter() < STREAM_START_S[run.size]:
            results[name] = {"skipped": "out of time before it started"}
            continue
        pipe = None
        try:
            pipe = stream_session.build_pipeline(run.stream_config(dtype, stream_session.CONFIGS[name]), run.device)
            with torch.no_grad():
                r = stream_session.measure(pipe, args, clock, run.cuda)
            if reference is None:
                reference = r["frames"]
            else:
                r["same_video"] = stream_session.compare_frames(r["frames"], reference)
            del r["frames"], r["per_block"]
            r["block_step"] = pipe.block_step.mode
            results[name] = r
            print(f"    {name}: FPS end to end {r['fps_end_to_end']:.1f}, TTFF {r['ttff_median_s']:.3f} s", flush=True)
        except ValueError as e:  # CUDA graphs on a CPU, FP8 without torchao or an FP8 GPU: refused up front
            results[name] = {"skipped": str(e)}
        except Exception as e:  # noqa: BLE001 - one configuration's failure never hides the others'
            traceback.print_exc()
            results[name] = {"failed": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]}
        del pipe
        run.free()
        run.save("stream", section)
    return section


# ------------------------------------------------------------------------------------------------ report


def _fmt(value, spec: str = ".3g") -> str:
    return "-" if value is None else format(value, spec)


def markdown(report: dict) -> str:
    m = report["machine"]
    lines = [f"# GPU check ({'dry run, CPU' if report['dry_run'] else m.get('gpu', '?')})", "",
             f"{m.get('gpu', m['cpu'])}; torch {m['torch']}, CUDA {m.get('cuda')}; Python {m['python']}; "
             f"{report['wall_s']:.0f} s in all", ""]
    for name, section in report["sections"].items():
        lines.append(f"## {name} ({section.get('seconds', 0):.0f} s)")
        if "failed" in section or "skipped" in section:
            lines += [f"{'FAILED' if 'failed' in section else 'skipped'}: "
                      f"{section.get('failed') or section.get('skipped')}", ""]
            continue
        if name == "attention":
            lines += ["| shape | backend | ms | TFLOP/s | kernel that ran | project reports |", "|---|---|---|---|---|---|"]
            for r in section["rows"]:
                note = r.get("failed") or r.get("skipped")
                lines.append(f"| {r['shape']} | {r['backend']} | " + (f"{note} | | | |" if note else
                             f"{r['ms']:.3g} | {r['tflops']:.3g} | {r['kernel']} | {r.get('project_reports', '')} |"))
        elif name == "train":
            for i, it in enumerate(section["iterations"]):
                lines.append(f"- iteration {i + 1}: rollout {it['rollout_s']:.2f} s, generator step "
                             f"{it['generator_step_s']:.2f} s, critic step {it['critic_step_s']:.2f} s, peak "
                             + (f"{it['peak_bytes'] / GB:.2f} GB" if it["peak_bytes"] else "not measured on a CPU"))
            plan = section["plan"]
            lines.append(f"- plan: {plan['total_bytes'] / GB:.3g} GB in all; measured peak / plan "
                         f"{_fmt(section['measured_over_plan'], '.2f')} (the plan adds up every phase's items)")
            lines += [f"  - {k}: {v / GB:.3g} GB" for k, v in plan["items"].items()]
        elif name == "precision":
            lines.append(f"- one block's flow, bf16 vs float32: relative error {section['block_flow_rel_error']:.2e}")
            for run_name, r in section.get("rollout", {}).items():
                levels = r.get("frames_levels")
                lines.append(f"- {run_name} rollout of {section['blocks']} blocks: latents rel. error "
                             f"{r['latent_rel_error']:.2e}, sink rel. error {r['sink_rel_error_vs_float32']:.2e}"
                             + (f", frames max/mean {levels['max']}/{levels['mean']:.2f} levels" if levels else ""))
            for run_name, r in section.get("ema_sink", {}).items():
                lines.append(f"- EMA sink over {section['evicting_blocks']} evicting blocks, {run_name}: relative "
                             f"change {r['relative_change']:.2e}, elements changed {r['elements_changed']:.1%}")
        elif name == "stream":
            lines += ["| config | TTFF s | FPS end to end | FPS denoise | x eager | near p50/p99 ms | far p50/p99 ms | "
                      "peak GB | vs eager max/mean levels |", "|---|---|---|---|---|---|---|---|---|"]
            results = section["results"]
            base = next((r for r in results.values() if "fps_end_to_end" in r), None)
            for cfg_name, r in results.items():
                if "skipped" in r or "failed" in r:
                    why = f"skipped: {r['skipped']}" if "skipped" in r else f"FAILED: {r['failed']}"
                    lines.append(f"| {cfg_name} | {why[:160]} | | | | | | | |")
                    continue
                same = r.get("same_video")
                lines.append(
                    f"| {cfg_name} | {r['ttff_median_s']:.3f} | {r['fps_end_to_end']:.1f} | {r['fps_denoise']:.1f} | "
                    f"x{r['fps_end_to_end'] / base['fps_end_to_end']:.2f} | "
                    f"{r['near']['p50_s'] * 1e3:.1f}/{r['near']['p99_s'] * 1e3:.1f} | "
                    f"{r['far']['p50_s'] * 1e3:.1f}/{r['far']['p99_s'] * 1e3:.1f} | {r['peak_memory_bytes'] / GB:.2f} | "
                    + (f"{same['max_levels']}/{same['mean_levels']:.2f} |" if same else "- |"))
        lines.append("")
    lines.append(f"not imported: {', '.join(NOT_HERE)}" if not report["imported"] else
                 f"IMPORTED: {', '.join(report['imported'])}")
    return "\n".join(lines) + "\n"


def machine(run: Run) -> dict:
    info = {"cpu": cpu_model(), "python": platform.python_version(), "torch": torch.__version__,
            "cuda": torch.version.cuda, "torchao": _version("torchao"), "flash_attn": flash_available()}
    if run.cuda:
        info |= {"gpu": torch.cuda.get_device_name(run.device),
                 "capability": ".".join(map(str, torch.cuda.get_device_capability(run.device))),
                 "gpu_memory_gb": torch.cuda.get_device_properties(run.device).total_memory / GB}
    return info


def _version(package: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dry-run", action="store_true", help="the same code at tiny sizes on the CPU")
    ap.add_argument("--out", default=str(REPO_ROOT / "outputs" / "gpu_check"), help="folder for the JSON and MD")
    ap.add_argument("--budget-s", type=float, default=None,
                    help="seconds for all sections (default 420 on the GPU, 600 dry); the stream gets what is left")
    ap.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated, of {', '.join(SECTIONS)}")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    sections = args.sections.split(",")
    if unknown := [s for s in sections if s not in SECTIONS]:
        ap.error(f"unknown --sections {unknown}; choose from {', '.join(SECTIONS)}")
    if not args.dry_run and not torch.cuda.is_available():
        ap.error(f"no CUDA device is visible (torch {torch.__version__}): run --dry-run for the CPU rehearsal")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    report: dict = {"dry_run": args.dry_run, "sections": {}, "wall_s": 0.0, "imported": []}

    def save(name: str, section: dict) -> None:
        report["sections"][name] = section
        report["wall_s"] = time.perf_counter() - started
        report["imported"] = [m for m in NOT_HERE if m in sys.modules]
        (out / "gpu_check.json").write_text(json.dumps(report, indent=2, default=str))
        (out / "gpu_check.md").write_text(markdown(report))

    run = Run(args.dry_run, args.seed, save)
    torch.set_num_threads(min(4, os.cpu_count() or 1))
    deadline = started + (args.budget_s or (600 if run.dry else 420))
    report["machine"] = machine(run)
    print(f"gpu check ({'dry run, CPU, tiny sizes' if run.dry else report['machine']['gpu']}): "
          f"{', '.join(sections)}; torch {torch.__version__}, torchao {report['machine']['torchao']}", flush=True)
    functions = {"attention": attention_section, "train": train_section, "precision": precision_section,
                 "stream": stream_section}
    for name in sections:
        print(f"== {name}", flush=True)
        t0 = time.perf_counter()
        try:
            result = functions[name](run, deadline)
        except Exception as e:  # noqa: BLE001 - a failed section never hides the others
            traceback.print_exc()
            result = {"failed": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]}
        result["seconds"] = time.perf_counter() - t0
        run.free()
        save(name, result)
    print()
    print(markdown(report))
    print(f"wrote {out / 'gpu_check.json'} and {out / 'gpu_check.md'}")
    failed = [n for n, s in report["sections"].items() if "failed" in s]
    if failed:
        print(f"sections that failed: {', '.join(failed)} (the others' results stand)")
    return 1 if failed or report["imported"] else 0


if __name__ == "__main__":
    sys.exit(main())
