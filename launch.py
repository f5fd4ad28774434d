"""The one command line: `python launch.py <command> [--config FILE] [key=value ...]`.

Commands:
  rollout   stream the causal generator block by block on the configured model, report
            per-block latency and KV-cache size, and save the latents (safetensors).

With no --config the embedded tiny default (configs/tiny.yaml) is used: CPU, no downloads.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from core.checkpoint import CheckpointError
from core.config import Config, ConfigError, load_config
from core.wan.kv_cache import StreamLimitError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}


def resolve_device(cfg: Config) -> torch.device:
    if cfg.runtime.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if cfg.runtime.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("runtime.device is cuda but no CUDA device is visible: set runtime.device=cpu or auto")
    return torch.device(cfg.runtime.device)


def build_generator(cfg: Config, device: torch.device):
    """The causal generator: random weights (seeded) or a local checkpoint when checkpoint.generator is set."""
    from core.checkpoint import load_into, load_wan_state_dict
    from core.wan.model import CausalWanModel

    torch.manual_seed(cfg.runtime.seed)
    model = CausalWanModel(cfg.model, cfg.stream)
    if cfg.checkpoint.generator:
        load_into(model, load_wan_state_dict(cfg.checkpoint.generator, role="generator", use_ema=cfg.checkpoint.use_ema))
    model.attention_backend = cfg.runtime.attention_backend
    return model.to(device=device, dtype=DTYPES[cfg.runtime.dtype]).eval().requires_grad_(False)


def cmd_rollout(cfg: Config, args: argparse.Namespace) -> None:
    from tqdm import tqdm

    from core.rollout import SelfForcedRollout, gaussian_noise
    from core.scheduler import FlowMatchScheduler

    frames = args.frames or cfg.video.num_latent_frames
    fpb = cfg.stream.num_frame_per_block
    if frames % fpb:
        raise ConfigError(f"--frames {frames} must be a multiple of stream.num_frame_per_block ({fpb})")
    device, dtype = resolve_device(cfg), DTYPES[cfg.runtime.dtype]
    model = build_generator(cfg, device)
    sched = FlowMatchScheduler.from_config(cfg.scheduler)
    timesteps = sched.denoising_timesteps(cfg.scheduler.denoising_step_list, cfg.scheduler.warp_denoising_step)
    rollout = SelfForcedRollout(model, sched, timesteps, cfg.scheduler.context_noise)

    gen = torch.Generator().manual_seed(cfg.runtime.seed)
    lh, lw = cfg.video.latent_hw
    # Text conditioning is a seeded random embedding until the umT5 encoder is wired in.
    context = torch.randn(1, cfg.model.text_len, cfg.model.text_dim, generator=gen).to(device, dtype)
    noise = gaussian_noise((1, fpb, cfg.model.in_dim, lh, lw), gen, dtype, device)
    cache = model.init_cache(1, (lh, lw))

    blocks, latencies = [], []
    bar = tqdm(total=frames, unit="latent frame", desc="rollout")
    t_prev = time.perf_counter()
    for block in rollout.stream(context, cache, noise, frames // fpb):
        if device.type == "cuda":
            torch.cuda.synchronize()
        now = time.perf_counter()
        latencies.append(now - t_prev)
        blocks.append(block.latents.float().cpu())
        bar.update(fpb)
        bar.set_postfix(cache_MiB=f"{cache.nbytes() / 2**20:.2f}", evictions=cache.evictions)
        t_prev = now
    bar.close()

    latents = torch.cat(blocks, dim=1)
    if not torch.isfinite(latents).all():
        raise RuntimeError("the generator produced non-finite latents; check the checkpoint and runtime.dtype")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    from safetensors.torch import save_file
    save_file({"latents": latents.contiguous()}, str(out), metadata={"config": cfg.model_dump_json()})
    total = sum(latencies)
    print(f"wrote {out}: latents {tuple(latents.shape)} [B, F, C, H, W]")
    print(f"{frames} latent frames in {total:.2f}s on {device} ({cfg.runtime.dtype}): "
          f"{frames / total:.1f} latent frames/s; per block median {sorted(latencies)[len(latencies) // 2] * 1e3:.1f} ms "
          f"(denoising {len(timesteps)} steps + context re-run; no VAE decode)")
    print(f"KV cache {cache.nbytes() / 2**20:.2f} MiB for {cfg.stream.cache_frames} frames, {cache.evictions} evictions")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="launch.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("rollout", help="stream the causal generator and save its latents")
    p.add_argument("--config", default=None, help="YAML config (default: configs/tiny.yaml)")
    p.add_argument("--frames", type=int, default=None, help="latent frames to generate (default: video.num_latent_frames)")
    p.add_argument("--out", default="outputs/rollout_latents.safetensors")
    p.add_argument("--checkpoint", default=None, help="generator weights (sets checkpoint.generator)")
    p.add_argument("overrides", nargs="*", help="config overrides key=value, e.g. stream.sink_size=3")
    args = parser.parse_args(argv)
    overrides = list(args.overrides) + ([f"checkpoint.generator={json.dumps(args.checkpoint)}"] if args.checkpoint else [])
    try:
        cfg = load_config(args.config, overrides)
        {"rollout": cmd_rollout}[args.command](cfg, args)
    except (ConfigError, CheckpointError, StreamLimitError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
