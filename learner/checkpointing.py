"""Learner checkpoints: the whole loop state, written atomically, pruned, resumed, exported.

A checkpoint is a directory `step_XXXXXXXX` under `<output_dir>/checkpoints` holding both
DeepSpeed engines with their optimizers (tags `generator` and `critic`, every rank writes its
ZeRO shard), `loop_state.pt` (step, weight version, fp32 EMA, metrics counters), `cursor.json`
(step, weight version and the pool's prompt cursor: what a resuming driver reads, a few bytes) and
one `rng_rank{r}.pt` per rank. Everything is written into a hidden `.tmp-`
directory first and renamed into place only once every rank has finished, so a crash mid-save
leaves the last good checkpoint untouched; a leftover `.tmp-` directory is never read.
Multi-node runs need `output_dir` on a filesystem all learner nodes share.

`export_weights` consolidates a checkpoint offline (no DeepSpeed engine, CPU) into the
Self-Forcing `.pt` layout and a flat safetensors file that `launch.py generate` loads.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import torch
import torch.distributed as dist

from core.records.checkpoint import TRAINING_STATE, read_training_checkpoint, save_safetensors, save_self_forcing

_STEP_DIR = re.compile(r"^step_(\d{8})$")
CURSOR_FILE = "cursor.json"
ENGINE_TAGS = ("generator", "critic")


def checkpoint_dir(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def list_checkpoints(root: str | Path) -> list[Path]:
    """Complete checkpoints under `root`, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if p.is_dir() and _STEP_DIR.match(p.name)), key=lambda p: p.name)


def latest_checkpoint(root: str | Path) -> Path | None:
    found = list_checkpoints(root)
    return found[-1] if found else None


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def save(root: str | Path, step: int, engines: dict, loop_state: dict | None, cursor: dict | None, rng_state: dict,
         keep_last: int) -> Path:
    """Write a checkpoint of `step` (collective: every rank calls it; `loop_state` and `cursor` matter on rank 0 only)."""
    root = Path(root)
    rank = dist.get_rank() if dist.is_initialized() else 0
    final, tmp = root / f"step_{step:08d}", root / f".tmp-step_{step:08d}"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier()
    for tag in ENGINE_TAGS:
        engines[tag].save_checkpoint(str(tmp), tag=tag, save_latest=False)
    torch.save(rng_state, tmp / f"rng_rank{rank}.pt")
    if rank == 0:
        torch.save(loop_state, tmp / TRAINING_STATE)
        (tmp / CURSOR_FILE).write_text(json.dumps(cursor))
    _barrier()
    if rank == 0:
        if final.exists():  # re-saving a step (e.g. on shutdown right after a periodic save)
            shutil.rmtree(final)
        tmp.rename(final)
        for old in list_checkpoints(root)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return final


def load(path: str | Path, engines: dict) -> tuple[dict, dict | None]:
    """Restore both engines (with optimizers) from `path`; returns (loop_state, this rank's rng state or None)."""
    path = Path(path)
    if not (path / TRAINING_STATE).is_file():
        raise FileNotFoundError(f"{path} is not a learner checkpoint (no loop_state.pt)")
    for tag in ENGINE_TAGS:
        load_path, _ = engines[tag].load_checkpoint(str(path), tag=tag, load_optimizer_states=True,
                                                    load_lr_scheduler_states=True)
        if load_path is None:
            raise RuntimeError(f"DeepSpeed could not load the {tag} engine from {path}")
    rank = dist.get_rank() if dist.is_initialized() else 0
    rng_file = path / f"rng_rank{rank}.pt"
    rng = torch.load(rng_file, weights_only=False) if rng_file.is_file() else None
    return torch.load(path / TRAINING_STATE, weights_only=False), rng


def read_cursor(path: str | Path) -> dict:
    """A checkpoint's cursor (step, weight version, prompt cursor) without loading its weights or EMA."""
    file = Path(path) / CURSOR_FILE
    if not file.is_file():
        raise FileNotFoundError(f"{path} has no {CURSOR_FILE}: it is not a complete learner checkpoint")
    return json.loads(file.read_text())


def generator_weights(path: str | Path, use_ema: bool = True) -> dict[str, torch.Tensor]:
    """Checkpoint `path`'s generator as one fp32 state dict (Wan keys), offline: the EMA when `use_ema` and the EMA
    exists, else the raw weights consolidated from the ZeRO shards."""
    path = Path(path)
    ema = read_training_checkpoint(path, "generator", True) if use_ema else {}
    return ema.get("generator_ema") or read_training_checkpoint(path, "generator", False)["generator"]


def export_weights(path: str | Path, out_dir: str | Path | None = None) -> dict[str, Path]:
    """Consolidate checkpoint `path` into `<out_dir>/reward_forcing.pt` (Self-Forcing layout: generator, critic,
    generator_ema) and `<out_dir>/generator.safetensors` (the EMA weights once the EMA exists, else the raw ones)."""
    path = Path(path)
    out_dir = Path(out_dir) if out_dir is not None else path / "export"
    generator, critic = (read_training_checkpoint(path, tag, False)[tag] for tag in ENGINE_TAGS)
    ema_weights = read_training_checkpoint(path, "generator", True).get("generator_ema")
    files = {"self_forcing_pt": out_dir / "reward_forcing.pt", "safetensors": out_dir / "generator.safetensors"}
    save_self_forcing(files["self_forcing_pt"], generator, critic, ema_weights)
    save_safetensors(files["safetensors"], ema_weights or generator)
    return files
