"""Publishing generator weights to the rollout actors: one control call per version, never one per parameter.

Object store (everywhere, the default): rank 0 puts the whole state dict (in the actors' dtype)
into the object store once and hands the pool a single reference; each actor pulls it between
rollouts (`RolloutWorker._load_weights`).

Broadcast (GPU clusters: NCCL; gloo on CPU): rank 0 and the actors form a group of their own
(`core.weight_sync`); a sync is one `RolloutPool.publish_broadcast` call plus one broadcast of a
single packed buffer, which actors stage and switch to between rollouts. It waits until every
actor takes part (at most one rollout). When an actor has restarted or died the pool refuses,
that version goes by object store, and the group is re-formed for the next one.
"""

from __future__ import annotations

import socket
import time

import ray
import torch

from core.weight_sync import BroadcastGroup, pack


class ObjectStorePublisher:
    def __init__(self, pool: ray.actor.ActorHandle, dtype: torch.dtype):
        self.pool = pool
        self.dtype = dtype

    def publish(self, version: int, weights: dict[str, torch.Tensor]) -> float:
        """Make `weights` the actors' weights of `version`; returns the seconds spent."""
        start = time.perf_counter()
        ref = ray.put({k: v.to(self.dtype) for k, v in weights.items()})
        ray.get(self.pool.publish.remote(version, [ref]))
        return time.perf_counter() - start


class BroadcastPublisher:
    def __init__(self, pool: ray.actor.ActorHandle, dtype: torch.dtype, backend: str, timeout_s: float):
        self.pool, self.dtype, self.backend, self.timeout_s = pool, dtype, backend, timeout_s
        self.fallback = ObjectStorePublisher(pool, dtype)
        self.group = None
        self.syncs = {"broadcast": 0, "object_store": 0}
        self._join()

    def _join(self) -> None:
        """Form a new group with every actor (rank 0 hosts it here); on failure, publish by object store."""
        self.group = None
        if not ray.get(self.pool.can_form_weight_group.remote()):
            return
        host = ray.util.get_node_ip_address()
        with socket.socket() as sock:
            sock.bind(("", 0))
            port = sock.getsockname()[1]
        world = len(ray.get(self.pool.metrics.remote())["actors"]) + 1
        joined = self.pool.join_weight_group.remote(host, port, self.backend, self.timeout_s)
        try:
            group = BroadcastGroup(host, port, 0, world, self.backend, self.timeout_s)
        except Exception:  # noqa: BLE001 - an actor that cannot join: this sync and the next go by object store
            group = None
        if ray.get(joined) and group is not None:
            self.group = group

    def publish(self, version: int, weights: dict[str, torch.Tensor]) -> float:
        start = time.perf_counter()
        if self.group is not None:
            buffer, layout = pack(weights, self.dtype, self.group.device)
            if ray.get(self.pool.publish_broadcast.remote(version, layout)):
                try:
                    self.group.broadcast(buffer)
                    self.syncs["broadcast"] += 1
                    return time.perf_counter() - start
                except Exception:  # noqa: BLE001 - a member vanished mid-sync (timeout): resend by object store
                    self.group = None
        self.fallback.publish(version, weights)
        self.syncs["object_store"] += 1
        self._join()
        return time.perf_counter() - start
