"""The DeepSpeed learner and the weight broadcast on a cluster GPU node, with the project installed (DeepSpeed).

The bare one-GPU machine's check, without Ray or DeepSpeed, is `bash benchmarks/gpu_check.sh` (gpu_check.py).
What this one runs, with random weights at the shapes of --config (default: the paper's, configs/reward_forcing_1.3b.yaml:
a 1.3B student and critic, the 14B teacher, 21 latent frames at 480x832; at world size 1 that needs more memory than
an 80 GB GPU has: an H200, or `learner.teacher.arch=null` for a teacher of the student's width):

1. **Learner steps in bf16**: one `Learner.iteration` (a generator and a critic update through DeepSpeed, ZeRO
   stage of the config, world size 1, micro batches of the config's `learner.batch_size`) on a sample rolled out
   by the same weights. Reports the seconds, the peak CUDA memory against `launch.py plan`'s estimate for that
   worker (`core.plan.learner_role` at world size 1), and the EMA taken from DeepSpeed's fp32 masters: equal to
   the masters bit for bit after its first update, and the share of the elements the update moved whose bf16
   module copy did not move (what an EMA over the bf16 copies would lose).
2. **Replay-vs-rollout parity in bf16**: the learner's replay of the sample's exit steps (with grad, gradient
   checkpointing as configured) against the rollout's recorded outputs, before any update: max and mean absolute
   difference over the outputs' RMS. Float64 parity is a CPU test (tests/test_sample.py).
3. **Weight broadcast**: the actors' protocol (`weight_sync.pack` of the fp32 weights into one buffer in the
   actors' dtype, one `BroadcastGroup.broadcast`, `unpack`, `load_into` a generator) against a plain broadcast of
   a buffer of the same bytes in the same group, in two processes: NCCL with two GPUs, gloo with --device cpu.
   NCCL cannot put two ranks on one GPU; with one GPU the script times the protocol's own work around the
   broadcast (pack, unpack, load) against a plain device copy of the same bytes, and says so.

How to run (repository root):
    python benchmarks/deepspeed_learner.py                                               # one GPU node, minutes
    python benchmarks/deepspeed_learner.py --config configs/plumbing.yaml --device cpu   # the same code on CPU, ~1 min
Needs DeepSpeed (`pip install -e .`). Prints one table and writes --out (JSON).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import deepspeed  # noqa: E402

from core.algo.distill import ReDMD  # noqa: E402
from core.algo.rollout import SelfForcedRollout, gaussian_noise  # noqa: E402
from core.codecs.text_encoder import pad_context  # noqa: E402
from core.config import Config, load_config  # noqa: E402
from core.plan import learner_role, model_sizes  # noqa: E402
from core.records.checkpoint import load_into, save_safetensors  # noqa: E402
from core.records.sample import Sample, write_parquet  # noqa: E402
from core.runtime import resolve_dtype  # noqa: E402
from core.stream.pipeline import build_generator  # noqa: E402
from learner.engines import full_weights  # noqa: E402
from learner.loop import Learner  # noqa: E402
from weight_sync import BroadcastGroup, numel, pack, unpack  # noqa: E402

GB = 1e9
PROMPT_TOKENS = 24  # a typical prompt's umT5 length, eos included
SCORE = {"raw": {"VQ": 0.0, "MQ": 0.0, "TA": 0.0}, "normalized": {"VQ": 0.0, "MQ": 0.0, "TA": 0.0}, "Overall": 0.0}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def check_config(path: str, device: torch.device, work: Path, weights: Path | None, overrides: list[str]) -> Config:
    """--config at world size 1 on `device`; the student and critic from our random checkpoint, the teacher random."""
    keys = [f"runtime.device={device.type}", "learner.num_workers=1", f"learner.use_gpu={device.type == 'cuda'}",
            f"learner.output_dir={work / 'learner'}", f"learner.samples_parquet={work / 'sample.parquet'}",
            "learner.teacher.checkpoint=null", "learner.ema_start_step=0", "checkpoint.use_ema=false",
            f"checkpoint.generator={weights}" if weights else "checkpoint.generator=null"]
    if weights:
        keys.append(f"learner.critic_checkpoint={weights}")
    return load_config(path, keys + overrides)


def make_sample(cfg: Config, device: torch.device) -> Sample:
    """One training rollout of the student in the actors' dtype (runtime.dtype), for a random prompt context."""
    dtype = resolve_dtype(cfg.runtime.dtype)
    generator = build_generator(cfg, device, dtype)
    gen = torch.Generator().manual_seed(0)
    rows = torch.randn(min(PROMPT_TOKENS, cfg.model.text_len), cfg.model.text_dim, generator=gen).to(device, dtype)
    hw = cfg.video.latent_hw
    shape = (1, cfg.stream.num_frame_per_block, cfg.model.in_dim, *hw)
    distill = ReDMD(cfg)
    rollout = SelfForcedRollout(generator, distill.scheduler, distill.rollout_timesteps, cfg.scheduler.context_noise)
    blocks = cfg.video.num_latent_frames // cfg.stream.num_frame_per_block
    record = rollout.training_rollout(pad_context([rows], cfg.model.text_len), generator.init_cache(1, hw),
                                      gaussian_noise(shape, gen, dtype, device), blocks, generator=gen)
    return Sample.from_rollout(record, score=SCORE, text_context=rows, sample_id="gpu-check", prompt_id=0,
                               prompt="random context", epoch=0, seed=0, weight_version=0, actor="deepspeed_learner")


def replay_parity(learner: Learner, sample: Sample) -> dict:
    """The learner's replay (with grad, as in training) of the sample against the rollout's recorded outputs."""
    m = learner.models
    record = sample.to_rollout_record(m.device)
    for b in record.blocks:
        b.noisy, b.clean = b.noisy.to(m.dtype), b.clean.to(m.dtype)
    context = pad_context([sample.text_context.to(m.device)], learner.cfg.model.text_len).to(m.dtype)
    with torch.enable_grad():
        replayed = learner.distill.replay(m.generator_module, record, context).detach().float()
    recorded = record.clean_latents().float()
    diff = (replayed - recorded).abs()
    scale = recorded.pow(2).mean().sqrt().item()
    return {"max_abs_over_rms": diff.max().item() / scale, "mean_abs_over_rms": diff.mean().item() / scale,
            "dtype": str(m.dtype).removeprefix("torch.")}


def module_copies(learner: Learner) -> dict[str, torch.Tensor]:
    return {k: p.detach().cpu().clone() for k, p in learner.models.generator.module.named_parameters()}


def masters_check(learner: Learner, before: dict[str, torch.Tensor]) -> dict:
    """The EMA after its first update against DeepSpeed's fp32 masters, and how much of the update the module's
    copies (bf16 under bf16) show: elements whose master moved while their copy stayed where it was (`before`)."""
    engine = learner.models.generator
    masters = full_weights(engine, learner.learner.zero_stage)
    after = module_copies(learner)
    moved = invisible = 0
    for k, master in masters.items():
        changed = master.cpu() != before[k].float()
        moved += int(changed.sum())
        invisible += int((changed & (after[k] == before[k])).sum())
    return {"ema_equals_masters": all(torch.equal(learner.ema.shadow[k].cpu(), masters[k].cpu()) for k in masters),
            "master_dtype": str(next(iter(masters.values())).dtype).removeprefix("torch."),
            "module_dtype": str(next(iter(after.values())).dtype).removeprefix("torch."),
            "master_update_invisible_in_module": invisible / max(moved, 1), "master_elements_moved": moved}


def learner_checks(cfg: Config, device: torch.device, sample: Sample) -> dict:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
    deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    learner = Learner(cfg, device, sample.text_context)
    build_s = time.perf_counter() - start
    out = {"build_s": build_s, "parity": replay_parity(learner, sample)}
    before = module_copies(learner)
    _sync(device)
    start = time.perf_counter()
    metrics = learner.iteration()
    _sync(device)
    out.update(iteration_s=time.perf_counter() - start, generator_loss=metrics["generator_loss"],
               critic_loss=metrics["critic_loss"], masters=masters_check(learner, before))
    estimate = learner_role(cfg, model_sizes(cfg)).per_gpu
    out["plan_estimate_gb"] = estimate / GB
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
        out.update(peak_allocated_gb=peak / GB, peak_over_plan=peak / estimate)
    del learner
    torch.distributed.destroy_process_group()
    return out


# ---------------------------------------------------------------------------------------------- broadcast

def _broadcast_rank(rank: int, cfg: Config, port: int, backend: str, repeats: int, results: dict) -> None:
    """Rank 0 publishes the generator's fp32 weights; rank 1 is an actor loading them into its generator."""
    device = torch.device("cuda", rank) if backend == "nccl" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dtype = resolve_dtype(cfg.runtime.dtype)
    model = build_generator(cfg, device, torch.float32 if rank == 0 else dtype)
    group = BroadcastGroup("127.0.0.1", port, rank, 2, backend, timeout_s=600)
    weights = dict(model.named_parameters())
    layout = [(k, list(v.shape)) for k, v in weights.items()]
    plain = torch.empty(numel(layout), dtype=dtype, device=device)
    times: dict[str, list[float]] = {"protocol": [], "plain": []}
    for i in range(repeats + 1):  # the first round warms both up and is not counted
        for kind in (("protocol", "plain") if i % 2 else ("plain", "protocol")):
            group.broadcast(torch.zeros(1, device=device))  # both ranks start together
            _sync(device)
            start = time.perf_counter()
            if kind == "plain":
                group.broadcast(plain)
            elif rank == 0:
                group.broadcast(pack(weights, dtype, device)[0])
            else:
                buffer = torch.empty(numel(layout), dtype=dtype, device=device)
                load_into(model, unpack(group.broadcast(buffer), layout))
            _sync(device)
            if i:
                times[kind].append(time.perf_counter() - start)
    if rank == 1:
        results.update({k: statistics.median(v) for k, v in times.items()}, bytes=plain.numel() * dtype.itemsize)


def broadcast_check(cfg: Config, device: torch.device, repeats: int) -> dict:
    two_gpus = device.type == "cuda" and torch.cuda.device_count() >= 2
    if device.type == "cpu" or two_gpus:
        backend = "nccl" if two_gpus else "gloo"
        with mp.Manager() as manager:
            results = manager.dict()
            mp.spawn(_broadcast_rank, args=(cfg, _free_port(), backend, repeats, results), nprocs=2)
            out = dict(results)
        return {"method": f"two processes, {backend}", "bytes": out["bytes"], "protocol_s": out["protocol"],
                "plain_s": out["plain"], "ratio": out["protocol"] / out["plain"]}
    # one GPU: NCCL refuses two ranks on one device; time the protocol's own work around the broadcast
    dtype = resolve_dtype(cfg.runtime.dtype)
    model = build_generator(cfg, device, torch.float32)
    actor = build_generator(cfg, device, dtype)
    weights = dict(model.named_parameters())
    layout = [(k, list(v.shape)) for k, v in weights.items()]
    plain_src = torch.empty(numel(layout), dtype=dtype, device=device)
    plain_dst = torch.empty_like(plain_src)
    times: dict[str, list[float]] = {"protocol": [], "plain": []}
    for i in range(repeats + 1):
        for kind in ("protocol", "plain"):
            _sync(device)
            start = time.perf_counter()
            if kind == "plain":
                plain_dst.copy_(plain_src)
            else:
                buffer = pack(weights, dtype, device)[0]
                load_into(actor, unpack(plain_dst.copy_(buffer), layout))
            _sync(device)
            if i:
                times[kind].append(time.perf_counter() - start)
    protocol, plain = statistics.median(times["protocol"]), statistics.median(times["plain"])
    return {"method": "one GPU: pack + device copy + unpack + load vs the device copy alone (no second rank)",
            "bytes": plain_src.numel() * dtype.itemsize, "protocol_s": protocol, "plain_s": plain,
            "ratio": protocol / plain}


# ---------------------------------------------------------------------------------------------- main

def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/reward_forcing_1.3b.yaml")
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--repeats", type=int, default=3, help="timed broadcast rounds (median)")
    parser.add_argument("--out", default="deepspeed_learner.json")
    parser.add_argument("overrides", nargs="*", help="config overrides key=value")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but no CUDA device is visible; use --device cpu for the CPU run", file=sys.stderr)
        return 2
    device = torch.device(args.device)
    result: dict = {"config": args.config, "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                    "torch": torch.__version__, "deepspeed": deepspeed.__version__}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        start = time.perf_counter()
        # one random file starts the student and the critic, drawn with another seed than the random teacher's:
        # a critic equal to the teacher would make the DMD gradient exactly zero
        random_cfg = check_config(args.config, device, work, None, args.overrides + ["runtime.seed=1"])
        weights = work / "student.safetensors"
        save_safetensors(weights, build_generator(random_cfg, device, resolve_dtype(random_cfg.runtime.dtype)).state_dict())
        cfg = check_config(args.config, device, work, weights, args.overrides)
        sample = make_sample(cfg, device)
        write_parquet(work / "sample.parquet", [sample])
        result["setup_s"] = time.perf_counter() - start
        print(f"set-up (random student written, one rollout): {result['setup_s']:.1f} s", flush=True)
        result["learner"] = learner_checks(cfg, device, sample)
        print("learner checks done", flush=True)
        result["broadcast"] = broadcast_check(cfg, device, args.repeats)
    Path(args.out).write_text(json.dumps(result, indent=2))
    lr, bc = result["learner"], result["broadcast"]
    rows = [("device", result["device"]),
            ("learner: build (meta, straight to device)", f"{lr['build_s']:.1f} s"),
            ("learner: one iteration (generator + critic)", f"{lr['iteration_s']:.1f} s"),
            ("learner: peak allocated / plan estimate", f"{lr.get('peak_allocated_gb', float('nan')):.1f} GB / "
             f"{lr['plan_estimate_gb']:.1f} GB ({lr.get('peak_over_plan', float('nan')):.2f}x)"),
            ("EMA equals fp32 masters after update 1", str(lr["masters"]["ema_equals_masters"])),
            ("masters / module dtype", f"{lr['masters']['master_dtype']} / {lr['masters']['module_dtype']}"),
            ("share of the masters' update the module copies miss",
             f"{lr['masters']['master_update_invisible_in_module']:.3f}"),
            (f"replay vs rollout ({lr['parity']['dtype']}): max|d|/rms, mean|d|/rms",
             f"{lr['parity']['max_abs_over_rms']:.2e}, {lr['parity']['mean_abs_over_rms']:.2e}"),
            (f"weights: {bc['method']}", f"{bc['bytes'] / GB:.2f} GB: {bc['protocol_s'] * 1e3:.1f} ms vs plain "
             f"{bc['plain_s'] * 1e3:.1f} ms ({bc['ratio']:.2f}x)")]
    width = max(len(k) for k, _ in rows)
    print("\n".join(f"{k:<{width}}  {v}" for k, v in rows))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
