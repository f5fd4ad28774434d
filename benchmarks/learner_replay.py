"""Learner cost of one generator update: replay of a recorded rollout vs an in-learner Self-Forcing rollout.

What it measures
----------------
On one config (default: the plumbing config, `configs/plumbing.yaml`: 21
latent frames = 7 blocks of 3, 4 denoising steps, EMA-sink window), for each exit index
e in --exits (default 0,1,2,3), the learner side of one generator update on one video:

* replay (ours, `learner/loop.py::Learner.generator_update`): a sample recorded beforehand
  by `SelfForcedRollout.training_rollout` under no_grad (what a rollout actor sends) is
  replayed with grad by `core.algo.distill.ReDMD(cfg).replay(generator, record, context)`: per
  block one exit-step forward with grad and the context re-run without grad. Then
  `ReDMD.generator_loss(...)` (critic + teacher with CFG, from `build_score_models`) and
  `loss.backward()`.
* in-learner rollout (Self Forcing's learner): the generator runs the whole training rollout
  inside the learner: per block, the denoising steps before the exit step without grad, the
  exit step with grad, and the context re-run without grad (implemented below with
  `SelfForcedRollout.predict_x0`, `renoise` and `_write_context`, in the same order as
  `training_rollout`, with the same noise seed and weights, so both paths give the same
  exit-step predictions: their max difference is printed). Then the same generator_loss +
  backward.

Both paths use the same exit index, the same generator, critic, teacher, context embeddings
and loss RNG seed. Per path it counts generator forward calls (a forward pre-hook on the
generator, split by grad mode), generator forwards reached by backward (a hook on each
grad-enabled forward's output), score-model (critic / teacher) forwards, and `backward()`
calls, and times three phases (generator forward part, generator_loss, backward). Times
are the median of --repeats measurements after --warmup untimed ones; replay and rollout
alternate within each repeat. The average over exit indices (uniformly drawn in training)
is the ratio of the summed medians.

Excluded from both paths: the actor side (text encoding, decoding, reward; the actor's own
no-grad rollout), the optimizer step and the EMA/publication that follow the update.
Context embeddings are random tensors of the text encoder's output shape.

Also measured (unless --no-critic): one critic update. Self Forcing's critic update runs
the generator rollout again without grad to get its sample; ours reads the clean latents the
actor sent. Both then compute `ReDMD.critic_loss` + backward. With the default
`learner.dfake_gen_update_ratio` 5, a training iteration is one critic update and every 5th
iteration also a generator update; the "training cycle" ratio (1 generator + 5 critic updates,
averaged over exit indices) is computed from the measured medians.

How to run (from the repository root)
-------------------------------------
    python benchmarks/learner_replay.py --threads 1                    # tiny config, CPU (~25 s)
    python benchmarks/learner_replay.py --threads 1 --repeats 9 --json replay.json
    python benchmarks/learner_replay.py --device cuda --arch wan-1.3b   # 1.3B architecture, bf16, CUDA

Needs torch and this repository's `core` package; no Ray, no DeepSpeed.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from anywhere

import torch  # noqa: E402

from benchmarks.common import cpu_model, finish, load_1m, physical_cores  # noqa: E402
from core.algo.distill import ReDMD, build_score_models  # noqa: E402
from core.algo.losses import reward_weights  # noqa: E402
from core.algo.rollout import RolloutRecord, SelfForcedRollout, gaussian_noise  # noqa: E402
from core.config import load_config  # noqa: E402
from core.runtime import DTYPES  # noqa: E402
from core.stream.pipeline import build_generator  # noqa: E402

# --arch presets: config overrides on top of --config (architecture and video size)
ARCHS = {
    "tiny": [],
    # Wan2.1-T2V-1.3B architecture (core.config.WanArchConfig defaults), 480x832 video, random weights
    "wan-1.3b": ["model.dim=1536", "model.ffn_dim=8960", "model.num_heads=12", "model.num_layers=30",
                 "model.freq_dim=256", "model.text_dim=4096", "model.text_len=512",
                 "video.height=480", "video.width=832"],
}
PATHS = ("replay", "rollout")


class Counters:
    """Forward calls of the generator (by grad mode) and of the score models; backward reaching the generator."""

    def __init__(self, generator: torch.nn.Module, score_models: list[torch.nn.Module]):
        self.reset()
        generator.register_forward_pre_hook(self._gen_pre)
        generator.register_forward_hook(self._gen_post)
        for m in score_models:
            m.register_forward_pre_hook(self._score_pre)

    def reset(self) -> None:
        self.gen_fwd_grad = self.gen_fwd_nograd = self.gen_bwd = self.score_fwd = self.backward_calls = 0

    def _gen_pre(self, module, args) -> None:
        if torch.is_grad_enabled():
            self.gen_fwd_grad += 1
        else:
            self.gen_fwd_nograd += 1

    def _gen_post(self, module, args, output) -> None:
        if isinstance(output, torch.Tensor) and output.requires_grad:
            output.register_hook(self._gen_grad)

    def _gen_grad(self, grad: torch.Tensor) -> None:
        self.gen_bwd += 1

    def _score_pre(self, module, args) -> None:
        self.score_fwd += 1

    def snapshot(self) -> dict:
        return {"gen_fwd_grad": self.gen_fwd_grad, "gen_fwd_nograd": self.gen_fwd_nograd, "gen_fwd":
                self.gen_fwd_grad + self.gen_fwd_nograd, "gen_bwd": self.gen_bwd, "score_fwd": self.score_fwd,
                "backward_calls": self.backward_calls}


class Clock:
    def __init__(self, device: torch.device):
        self.device = device

    def __call__(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()


def in_learner_rollout(rollout: SelfForcedRollout, context: torch.Tensor, generator: torch.nn.Module,
                       noise_fn, num_blocks: int, exit_index: int, latent_hw: tuple[int, int]) -> torch.Tensor:
    """Self Forcing's generator output in its learner: the whole training rollout run in the learner, every
    block denoised up to the exit step (steps before it without grad, the exit step with grad), then the
    context re-run without grad. Same order of forwards and noise draws as `training_rollout`."""
    ts = rollout.timesteps
    cache = generator.init_cache(1, latent_hw)
    outputs = []
    for block in range(num_blocks):
        start = cache.frames
        x = noise_fn(block, -1)
        with torch.no_grad():
            for i in range(exit_index):
                x0 = rollout.predict_x0(x, float(ts[i]), context, cache, start)
                x = rollout.renoise(x0, noise_fn(block, i), float(ts[i + 1]))
        with torch.enable_grad():
            x0 = rollout.predict_x0(x, float(ts[exit_index]), context, cache, start)
        outputs.append(x0)
        with torch.no_grad():
            rollout._write_context(x0.detach(), context, cache, start, block, noise_fn)
    return torch.cat(outputs, dim=1)


def machine_info(device: torch.device) -> dict:
    info = {"cpu": cpu_model(), "physical_cores": physical_cores(), "logical_cpus": os.cpu_count() or 1,
            "python": platform.python_version(), "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "device": str(device), "loadavg_1m_at_start": load_1m()}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", choices=sorted(ARCHS), default="tiny", help="tiny (default; CPU) or wan-1.3b (CUDA)")
    ap.add_argument("--config", default="configs/plumbing.yaml", help="YAML config (default: configs/plumbing.yaml)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="extra config overrides")
    ap.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: float32 on CPU, bfloat16 on CUDA")
    ap.add_argument("--exits", default="0,1,2,3", help="exit indices to measure (default 0,1,2,3)")
    ap.add_argument("--repeats", type=int, default=7, help="timed repeats per exit and path (default 7)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed repeats per exit and path first (default 2)")
    ap.add_argument("--no-critic", dest="critic", action="store_false", help="skip the critic-update comparison")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None, help="also write the results to this file")
    args = ap.parse_args()

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda but no CUDA device is visible")
    if args.arch != "tiny" and device.type == "cpu":
        ap.error(f"--arch {args.arch} needs --device cuda")
    dtype = DTYPES[args.dtype or ("bfloat16" if device.type == "cuda" else "float32")]
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.repeats < 1 or args.warmup < 0:
        ap.error("--repeats must be >= 1 and --warmup >= 0")

    cfg = load_config(args.config, ARCHS[args.arch] + [f"runtime.device={device.type}",
                                                       f"runtime.dtype={str(dtype).removeprefix('torch.')}",
                                                       f"runtime.seed={args.seed}"] + args.set)
    n_steps = len(cfg.scheduler.denoising_step_list)
    exits = sorted({int(e) for e in args.exits.split(",") if e.strip()})
    if not exits or min(exits) < 0 or max(exits) >= n_steps:
        ap.error(f"--exits must be in [0, {n_steps})")
    fpb = cfg.stream.num_frame_per_block
    num_blocks = cfg.video.num_latent_frames // fpb
    latent_hw = cfg.video.latent_hw
    arch = cfg.model

    machine = machine_info(device)
    print(f"machine: {machine['cpu']}, {machine['physical_cores']} physical cores, {machine['logical_cpus']} logical CPUs"
          + (f" | GPU {machine['gpu']}" if "gpu" in machine else "")
          + f"; load avg {machine['loadavg_1m_at_start']} at start; Python {machine['python']}, torch {machine['torch']}, "
          f"{machine['torch_threads']} torch threads")
    print(f"config {args.config} --arch {args.arch}: dim {arch.dim}, {arch.num_layers} layers; "
          f"{cfg.video.num_latent_frames} latent frames = {num_blocks} blocks of {fpb}, latent {latent_hw[0]}x{latent_hw[1]}, "
          f"{n_steps} denoising steps, context_noise {cfg.scheduler.context_noise}; {str(dtype).removeprefix('torch.')} on "
          f"{device}; {args.warmup} warm-up + {args.repeats} timed repeats per exit and path")
    print("compared: learner side of one generator update on one video: [replay] ReDMD.replay of a recorded sample "
          "vs [rollout] Self Forcing's in-learner training rollout (steps before the exit without grad, exit step "
          "with grad, context re-run without grad); both followed by ReDMD.generator_loss + loss.backward(). "
          "Excluded from both: actor side (text encoding, decode, reward), optimizer step, EMA, publication.",
          flush=True)

    # models: trainable generator (as learner/engines.py builds it), critic and frozen teacher
    t0 = time.perf_counter()
    generator = build_generator(cfg, torch.device("cpu"), torch.float32).train().requires_grad_(True)
    generator = generator.to(device=device, dtype=dtype)
    teacher, critic = build_score_models(cfg)
    teacher, critic = teacher.to(device=device, dtype=dtype), critic.to(device=device, dtype=dtype)
    counters = Counters(generator, [critic, teacher])
    distill = ReDMD(cfg)
    rollout = SelfForcedRollout(generator, distill.scheduler, distill.rollout_timesteps, cfg.scheduler.context_noise)
    g = torch.Generator().manual_seed(args.seed)
    context = torch.randn(1, arch.text_len, arch.text_dim, generator=g).to(device, dtype)
    negative_context = torch.randn(1, arch.text_len, arch.text_dim, generator=g).to(device, dtype)
    weights = reward_weights(torch.tensor([0.3], dtype=torch.float64), cfg.learner.beta)
    print(f"models built in {time.perf_counter() - t0:.1f} s: generator {sum(p.numel() for p in generator.parameters()):,} "
          f"params, critic and teacher {sum(p.numel() for p in critic.parameters()):,} each", flush=True)

    def noise_fn(exit_index: int):
        gen = torch.Generator().manual_seed(args.seed * 1000 + exit_index)
        return gaussian_noise((1, fpb, arch.in_dim, *latent_hw), gen, dtype, device)

    # the recorded samples (what actors send): one training rollout per exit index, no grad
    records: dict[int, RolloutRecord] = {}
    with torch.no_grad():
        for e in exits:
            records[e] = rollout.training_rollout(context, generator.init_cache(1, latent_hw), noise_fn(e), num_blocks,
                                                  exit_index=e)

    clock = Clock(device)

    def generator_step(path: str, e: int) -> tuple[dict, torch.Tensor]:
        generator.zero_grad(set_to_none=True)
        counters.reset()
        loss_rng = torch.Generator().manual_seed(args.seed + 17 * e)  # same noise level for both paths
        t_start = clock()
        if path == "replay":
            x = distill.replay(generator, records[e], context)
        else:
            x = in_learner_rollout(rollout, context, generator, noise_fn(e), num_blocks, e, latent_hw)
        t_gen = clock()
        loss, _ = distill.generator_loss(x, critic, teacher, context, negative_context, weights, loss_rng, ["a prompt"])
        t_loss = clock()
        loss.backward()
        counters.backward_calls += 1
        t_end = clock()
        times = {"gen_s": t_gen - t_start, "loss_s": t_loss - t_gen, "backward_s": t_end - t_loss, "total_s": t_end - t_start}
        return {**times, **counters.snapshot()}, x.detach()

    def critic_step(path: str, e: int) -> dict:
        critic.zero_grad(set_to_none=True)
        counters.reset()
        loss_rng = torch.Generator().manual_seed(args.seed + 31 * e)
        t_start = clock()
        if path == "replay":  # ours: the clean latents the actor sent
            clean = records[e].clean_latents()
        else:  # Self Forcing: the rollout again, without grad
            with torch.no_grad():
                clean = rollout.training_rollout(context, generator.init_cache(1, latent_hw), noise_fn(e), num_blocks,
                                                 exit_index=e).clean_latents()
        t_gen = clock()
        loss, _ = distill.critic_loss(critic, clean, context, loss_rng)
        t_loss = clock()
        loss.backward()
        counters.backward_calls += 1
        t_end = clock()
        return {"gen_s": t_gen - t_start, "loss_s": t_loss - t_gen, "backward_s": t_end - t_loss,
                "total_s": t_end - t_start, **counters.snapshot()}

    def measure(step, label: str) -> dict:
        out = {}
        for e in exits:
            runs = {p: [] for p in PATHS}
            max_diff = None
            for r in range(args.warmup + args.repeats):
                xs = {}
                for p in (PATHS if r % 2 == 0 else PATHS[::-1]):  # alternate which path goes first
                    res = step(p, e)
                    if isinstance(res, tuple):
                        res, xs[p] = res
                    if r >= args.warmup:
                        runs[p].append(res)
                if xs:
                    max_diff = float((xs["replay"].double() - xs["rollout"].double()).abs().max())
            summary = {}
            for p in PATHS:
                rs = runs[p]
                med = {k: statistics.median(r[k] for r in rs) for k in ("gen_s", "loss_s", "backward_s", "total_s")}
                counts = {k: v for k, v in rs[-1].items() if not k.endswith("_s")}
                summary[p] = {**med, **counts, "total_min_s": min(r["total_s"] for r in rs),
                              "total_max_s": max(r["total_s"] for r in rs), "total_all_s": [r["total_s"] for r in rs]}
            summary["max_abs_diff"] = max_diff
            out[str(e)] = summary
            print(f"  {label} exit {e}: replay {summary['replay']['total_s'] * 1e3:.1f} ms, rollout "
                  f"{summary['rollout']['total_s'] * 1e3:.1f} ms (median of {args.repeats})", flush=True)
        return out

    results: dict = {"machine": machine, "args": vars(args), "config": {"arch": arch.model_dump(), "latent_hw": list(latent_hw),
                     "num_latent_frames": cfg.video.num_latent_frames, "num_blocks": num_blocks, "denoising_steps": n_steps,
                     "dtype": str(dtype)}}
    results["generator_update"] = measure(generator_step, "generator update")
    if args.critic:
        results["critic_update"] = measure(critic_step, "critic update")

    def table(name: str, res: dict, gen_label: str) -> None:
        print(f"\n{name}")
        cols = ["exit", "path", "gen fwd grad/no-grad", "gen bwd", "score fwd", "backward()",
                f"{gen_label} ms", "loss ms", "backward ms", "total ms", "min..max ms"]
        rows = []
        for e, s in res.items():
            for p in PATHS:
                r = s[p]
                rows.append([e, p, f"{r['gen_fwd_grad']}/{r['gen_fwd_nograd']}", str(r["gen_bwd"]), str(r["score_fwd"]),
                             str(r["backward_calls"]), f"{r['gen_s'] * 1e3:.1f}", f"{r['loss_s'] * 1e3:.1f}",
                             f"{r['backward_s'] * 1e3:.1f}", f"{r['total_s'] * 1e3:.1f}",
                             f"{r['total_min_s'] * 1e3:.1f}..{r['total_max_s'] * 1e3:.1f}"])
        widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(cols)]
        print("  ".join(c.rjust(w) for c, w in zip(cols, widths)))
        for row in rows:
            print("  ".join(v.rjust(w) for v, w in zip(row, widths)))

    def ratios(res: dict) -> dict:
        out = {}
        for e, s in res.items():
            out[e] = {"wall": s["replay"]["total_s"] / s["rollout"]["total_s"],
                      "gen_fwd": s["replay"]["gen_fwd"] / s["rollout"]["gen_fwd"] if s["rollout"]["gen_fwd"] else None}
        tot = {p: sum(s[p]["total_s"] for s in res.values()) for p in PATHS}
        fwd = {p: sum(s[p]["gen_fwd"] for s in res.values()) for p in PATHS}
        out["avg"] = {"wall": tot["replay"] / tot["rollout"],
                      "gen_fwd": fwd["replay"] / fwd["rollout"] if fwd["rollout"] else None}
        return out

    gu = results["generator_update"]
    table("generator update (medians; gen = ReDMD.replay [replay] or the in-learner rollout [rollout])", gu, "gen")
    diffs = {e: s["max_abs_diff"] for e, s in gu.items()}
    print("replay vs in-learner rollout, max |exit-step prediction difference| per exit: "
          + ", ".join(f"{e}: {d:.2e}" for e, d in diffs.items()))
    results["ratios"] = {"generator_update": ratios(gu)}
    if args.critic:
        table("critic update (medians; gen = reading the sample's clean latents [replay] or a no-grad rollout "
              "[rollout], then ReDMD.critic_loss + backward)", results["critic_update"], "gen")
        results["ratios"]["critic_update"] = ratios(results["critic_update"])
    print()
    rg = results["ratios"]["generator_update"]
    met = "met" if rg["avg"]["wall"] <= 0.5 else "NOT met"
    exit_keys = [e for e in rg if e != "avg"]
    print("RATIOS: generator update replay/rollout wall " + ", ".join(f"exit {e} x{rg[e]['wall']:.2f}" for e in exit_keys)
          + f", avg over exits x{rg['avg']['wall']:.2f} [target <= 0.5x: {met}]; generator forwards "
          + ", ".join(f"exit {e} {gu[e]['replay']['gen_fwd']}/{gu[e]['rollout']['gen_fwd']}" for e in exit_keys)
          + f", avg x{rg['avg']['gen_fwd']:.2f}; backward() 1/1, generator forwards backpropagated "
          f"{gu[exit_keys[0]]['replay']['gen_bwd']}/{gu[exit_keys[0]]['rollout']['gen_bwd']}")
    if args.critic:
        rc = results["ratios"]["critic_update"]
        cu = results["critic_update"]
        print("RATIOS: critic update (ours reads the sample, Self Forcing re-runs the rollout without grad) wall "
              + ", ".join(f"exit {e} x{rc[e]['wall']:.2f}" for e in exit_keys) + f", avg x{rc['avg']['wall']:.2f}; "
              "generator forwards " + ", ".join(f"{cu[e]['replay']['gen_fwd']}/{cu[e]['rollout']['gen_fwd']}"
                                                for e in exit_keys))
        # a training cycle: dfake_gen_update_ratio iterations = that many critic updates + one generator update
        k = cfg.learner.dfake_gen_update_ratio
        cyc = {p: sum(gu[e][p]["total_s"] + k * cu[e][p]["total_s"] for e in exit_keys) for p in PATHS}
        cyc_fwd = {p: sum(gu[e][p]["gen_fwd"] + k * cu[e][p]["gen_fwd"] for e in exit_keys) for p in PATHS}
        results["ratios"]["training_cycle"] = {"critic_updates_per_generator_update": k,
                                               "wall": cyc["replay"] / cyc["rollout"],
                                               "gen_fwd": cyc_fwd["replay"] / cyc_fwd["rollout"]}
        print(f"RATIOS: training cycle (1 generator + {k} critic updates, learner.dfake_gen_update_ratio={k}; computed "
              f"from the medians above, avg over exits) replay/rollout wall x{cyc['replay'] / cyc['rollout']:.2f}, "
              f"generator forwards x{cyc_fwd['replay'] / cyc_fwd['rollout']:.2f}")
    finish(results, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
