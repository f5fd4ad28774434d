"""A broadcast group of its own from the learner's rank 0 to the rollout actors, for weight syncs.

The group has its own TCPStore, so it lives beside the learner's Ray Train process group and
spans processes Ray Train does not know about. A sync packs the whole state dict into one
contiguous buffer and broadcasts it once (NCCL on GPUs, gloo on CPUs): one collective per
sync, never one per parameter. Ray-free, like the rest of `core`; Ray code decides who joins.
"""

from __future__ import annotations

from datetime import timedelta

import torch
import torch.distributed as dist

Layout = list[tuple[str, list[int]]]


def pack(weights: dict[str, torch.Tensor], dtype: torch.dtype, device: torch.device | str) -> tuple[torch.Tensor, Layout]:
    """All tensors, cast to `dtype`, in one flat buffer on `device`, and the (name, shape) layout to undo it."""
    layout = [(k, list(v.shape)) for k, v in weights.items()]
    buffer = torch.empty(sum(v.numel() for v in weights.values()), dtype=dtype, device=device)
    offset = 0
    for v in weights.values():
        buffer[offset:offset + v.numel()].copy_(v.reshape(-1))
        offset += v.numel()
    return buffer, layout


def numel(layout: Layout) -> int:
    return sum(int(torch.Size(shape).numel()) for _, shape in layout)


def unpack(buffer: torch.Tensor, layout: Layout) -> dict[str, torch.Tensor]:
    """Views of `buffer` shaped as `layout` says."""
    out, offset = {}, 0
    for name, shape in layout:
        n = int(torch.Size(shape).numel())
        out[name] = buffer[offset:offset + n].view(shape)
        offset += n
    return out


class BroadcastGroup:
    def __init__(self, host: str, port: int, rank: int, world_size: int, backend: str, timeout_s: float):
        """Join the group (rank 0 hosts its store); blocks until all `world_size` members have joined."""
        if backend not in ("gloo", "nccl"):
            raise ValueError(f"broadcast backend must be gloo or nccl, got {backend!r}")
        timeout = timedelta(seconds=timeout_s)
        store = dist.PrefixStore(f"weights-{port}", dist.TCPStore(host, port, world_size, is_master=rank == 0,
                                                                   timeout=timeout))
        if backend == "nccl":
            self.device = torch.device("cuda", torch.cuda.current_device())
            self.pg = dist.ProcessGroupNCCL(store, rank, world_size)
        else:
            self.device = torch.device("cpu")
            self.pg = dist.ProcessGroupGloo(store, rank, world_size, timeout)
        self.rank, self.world_size, self.backend = rank, world_size, backend

    def broadcast(self, buffer: torch.Tensor) -> torch.Tensor:
        """Rank 0 sends `buffer`; every other rank receives into it (in place)."""
        opts = dist.BroadcastOptions()
        opts.rootRank = 0
        self.pg.broadcast([buffer], opts).wait()
        return buffer
