"""Where training prompts come from, in which order, and how a run resumes without losing any.

`PromptSource` reads prompts from a text file (one per line) or a Parquet file, shuffles
them per epoch deterministically from the run seed, optionally keeps one shard of every
epoch, and hands out `WorkItem`s. It is the run's cursor: items taken but not yet
acknowledged are tracked, re-issued when released (their rollout was lost) and saved in
`state()`, so that after a restart every prompt of an epoch is acknowledged exactly once.
One instance lives in one process (the coordinator); it is not thread-safe.
"""

from __future__ import annotations

import hashlib
from collections import deque
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from core.config import REPO_ROOT

DEFAULT_PROMPTS = REPO_ROOT / "prompts" / "tiny.txt"
PARQUET_SUFFIXES = (".parquet", ".pq")
STATE_VERSION = 1
_ITEM_SEED_TAG = 0x5EED  # keeps item-seed entropy apart from the permutation's (seed, epoch)


@dataclass(frozen=True)
class WorkItem:
    """One rollout to run: prompt `index` (position in the epoch's permutation) of `epoch`."""

    epoch: int
    index: int
    prompt_id: int
    prompt: str
    seed: int  # noise seed of this rollout, derived from (run seed, epoch, index)

    @property
    def sample_id(self) -> str:
        return f"e{self.epoch}-i{self.index}"

    def to_dict(self) -> dict:
        return asdict(self)


def load_prompts(path: str | Path) -> tuple[list[int], list[str]]:
    """(prompt_ids, prompts) of a text file (blank lines skipped, ids 0.. in order of the kept
    lines) or a Parquet file (column `prompt`, optional integer column `prompt_id`)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompt file {path} does not exist")
    if path.suffix.lower() in PARQUET_SUFFIXES:
        table = pq.read_table(str(path))
        if "prompt" not in table.column_names:
            raise ValueError(f"prompt file {path} has no 'prompt' column (columns: {table.column_names})")
        prompts = table.column("prompt").to_pylist()
        bad = [i for i, p in enumerate(prompts) if not isinstance(p, str) or not p.strip()]
        if bad:
            raise ValueError(f"prompt file {path}: empty or non-string prompts at rows {bad[:10]}")
        prompts = [p.strip() for p in prompts]
        if "prompt_id" in table.column_names:
            ids = table.column("prompt_id").to_pylist()
            if not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
                raise ValueError(f"prompt file {path}: column 'prompt_id' must hold integers without nulls")
            if len(set(ids)) != len(ids):
                raise ValueError(f"prompt file {path}: column 'prompt_id' has duplicate ids")
        else:
            ids = list(range(len(prompts)))
    else:
        prompts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        ids = list(range(len(prompts)))
    if not prompts:
        raise ValueError(f"prompt file {path} holds no prompts")
    return ids, prompts


class PromptSource:
    """Deterministic, shardable, resumable stream of WorkItems over a prompt file.

    Epoch e's order is `default_rng((seed, e)).permutation(n)`; shard (rank, world_size)
    takes positions rank, rank + world_size, ... of it, so item indices (and sample ids)
    are the same whatever the number of shards.
    """

    def __init__(self, path: str | Path = DEFAULT_PROMPTS, seed: int = 0, shard: tuple[int, int] = (0, 1)):
        rank, world = shard
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        if not 0 <= rank < world:
            raise ValueError(f"shard must be (rank, world_size) with 0 <= rank < world_size, got {shard}")
        self.path = Path(path)
        self.prompt_ids, self.prompts = load_prompts(path)
        if rank >= len(self.prompts):
            raise ValueError(f"shard {rank} of {world} gets no prompts: {path} holds only {len(self.prompts)}")
        self.seed, self.rank, self.world_size = seed, rank, world
        self.fingerprint = hashlib.sha256(
            "\n".join(f"{i}\t{p}" for i, p in zip(self.prompt_ids, self.prompts)).encode()).hexdigest()
        self.epoch = 0
        self._pos = 0                                 # next position in this shard's list of the epoch
        self._order = self._permutation(0)
        self._inflight: dict[str, WorkItem] = {}      # taken, not acked, not released (in take order)
        self._reissue: deque[WorkItem] = deque()      # released (or restored), to hand out first

    # ---- order -------------------------------------------------------------------------
    def _permutation(self, epoch: int) -> np.ndarray:
        return np.random.default_rng((self.seed, epoch)).permutation(len(self.prompts))

    def item_seed(self, epoch: int, index: int) -> int:
        """A 63-bit noise seed from (seed, epoch, index): fits an int64 column and torch.manual_seed."""
        state = np.random.SeedSequence((self.seed, epoch, index, _ITEM_SEED_TAG)).generate_state(1, np.uint64)
        return int(state[0]) >> 1

    def item(self, epoch: int, index: int, order: np.ndarray | None = None) -> WorkItem:
        order = self._permutation(epoch) if order is None else order
        j = int(order[index])
        return WorkItem(epoch, index, self.prompt_ids[j], self.prompts[j], self.item_seed(epoch, index))

    def epoch_items(self, epoch: int) -> list[WorkItem]:
        """This shard's items of `epoch`, in hand-out order."""
        order = self._permutation(epoch)
        return [self.item(epoch, i, order) for i in range(self.rank, len(order), self.world_size)]

    def __len__(self) -> int:
        """Items per epoch in this shard."""
        return len(range(self.rank, len(self.prompts), self.world_size))

    # ---- cursor ------------------------------------------------------------------------
    @property
    def outstanding(self) -> list[WorkItem]:
        """Items handed out and not acknowledged: queued for re-issue first, then in flight."""
        return list(self._reissue) + list(self._inflight.values())

    def take(self) -> WorkItem:
        """The next item: a released one if any, else the next new one (rolling into the next epoch)."""
        if self._reissue:
            item = self._reissue.popleft()
        else:
            index = self.rank + self._pos * self.world_size
            if index >= len(self.prompts):
                self.epoch, self._pos, index = self.epoch + 1, 0, self.rank
                self._order = self._permutation(self.epoch)
            item = self.item(self.epoch, index, self._order)
            self._pos += 1
        self._inflight[item.sample_id] = item
        return item

    def ack(self, item: WorkItem | str) -> bool:
        """Mark an item done for good (its sample was consumed or dropped). False when it was not
        outstanding (already acked: a late duplicate the caller should drop)."""
        key = item if isinstance(item, str) else item.sample_id
        if self._inflight.pop(key, None) is not None:
            return True
        for queued in self._reissue:  # a released item whose original rollout arrived after all
            if queued.sample_id == key:
                self._reissue.remove(queued)
                return True
        return False

    def release(self, item: WorkItem | str) -> bool:
        """Hand an in-flight item out again (its rollout was lost). False when it was not in flight."""
        key = item if isinstance(item, str) else item.sample_id
        found = self._inflight.pop(key, None)
        if found is None:
            return False
        self._reissue.append(found)
        return True

    # ---- persistence -------------------------------------------------------------------
    def state(self) -> dict:
        """JSON-serialisable cursor: where new items continue and which are still outstanding."""
        return {"version": STATE_VERSION, "seed": self.seed, "shard": [self.rank, self.world_size],
                "num_prompts": len(self.prompts), "fingerprint": self.fingerprint,
                "epoch": self.epoch, "next_index": self.rank + self._pos * self.world_size,
                "outstanding": [it.to_dict() for it in self.outstanding]}

    @classmethod
    def from_state(cls, path: str | Path, seed: int, shard: tuple[int, int], state: dict) -> "PromptSource":
        """Resume from `state()`: outstanding items are re-issued first, then new items continue."""
        src = cls(path, seed, shard)
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"prompt-source state version {state.get('version')!r} is not {STATE_VERSION}")
        mismatch = [f"{k}: state {state.get(k)!r} != now {now!r}" for k, now in
                    (("seed", seed), ("shard", [src.rank, src.world_size]), ("num_prompts", len(src.prompts)),
                     ("fingerprint", src.fingerprint)) if state.get(k) != now]
        if mismatch:
            raise ValueError(f"prompt-source state does not match {path} (same file, seed and shard needed to "
                             "resume without skipping or repeating prompts):\n  " + "\n  ".join(mismatch))
        next_index = int(state["next_index"])
        if (next_index - src.rank) % src.world_size or next_index < src.rank:
            raise ValueError(f"prompt-source state: next_index {next_index} is not in shard {src.rank}/{src.world_size}")
        src.epoch, src._pos = int(state["epoch"]), (next_index - src.rank) // src.world_size
        src._order = src._permutation(src.epoch)
        for d in state["outstanding"]:
            if (int(d["index"]) - src.rank) % src.world_size:
                raise ValueError(f"prompt-source state: outstanding item {d} is not in shard {src.rank}/{src.world_size}")
            item = src.item(int(d["epoch"]), int(d["index"]))
            if item.to_dict() != d:
                raise ValueError(f"prompt-source state: outstanding item {d} does not match the prompt file ({item})")
            src._reissue.append(item)
        return src
