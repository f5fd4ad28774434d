"""Prompt source: deterministic per-epoch shuffles, disjoint shards, and resume without skips or repeats."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from core.records.prompts import DEFAULT_PROMPTS, PromptSource, WorkItem, load_prompts


@pytest.fixture
def prompts_file(tmp_path):
    path = tmp_path / "p.txt"
    path.write_text("\n".join(f"prompt {i}" + ("\n\n   " if i % 5 == 0 else "") for i in range(23)) + "\n")
    return path


def take(src: PromptSource, n: int) -> list[WorkItem]:
    return [src.take() for _ in range(n)]


def test_text_file_and_embedded_default(prompts_file):
    ids, prompts = load_prompts(prompts_file)
    assert ids == list(range(23)) and prompts == [f"prompt {i}" for i in range(23)]  # blank lines skipped
    src = PromptSource()
    assert src.path == DEFAULT_PROMPTS and 20 <= len(src) <= 30 and all(p.strip() for p in src.prompts)


def test_deterministic_and_epochs_differ(prompts_file):
    a, b = PromptSource(prompts_file, seed=3), PromptSource(prompts_file, seed=3)
    items = take(a, 2 * 23 + 1)
    assert items == take(b, 2 * 23 + 1)
    assert [it.epoch for it in items] == [0] * 23 + [1] * 23 + [2]
    assert [it.index for it in items[:23]] == list(range(23))
    e0, e1 = [it.prompt_id for it in items[:23]], [it.prompt_id for it in items[23:46]]
    assert sorted(e0) == sorted(e1) == list(range(23)) and e0 != e1
    assert all(it.prompt == f"prompt {it.prompt_id}" for it in items)
    assert [it.prompt_id for it in take(PromptSource(prompts_file, seed=4), 23)] != e0
    seeds = [it.seed for it in items]
    assert len(set(seeds)) == len(seeds) and all(0 <= s < 2**63 for s in seeds)
    assert items[5].sample_id == "e0-i5" and items[30].sample_id == "e1-i7"


def test_shards_are_disjoint_and_cover_the_epoch(prompts_file):
    full = PromptSource(prompts_file, seed=1).epoch_items(2)
    shards = [PromptSource(prompts_file, seed=1, shard=(r, 4)) for r in range(4)]
    parts = [s.epoch_items(2) for s in shards]
    assert [len(p) for p in parts] == [len(s) for s in shards] == [6, 6, 6, 5]
    assert sorted((it for p in parts for it in p), key=lambda it: it.index) == full  # same ids, prompts and seeds
    assert [it.index for it in take(shards[1], 7)] == [1, 5, 9, 13, 17, 21, 1]  # rolls into epoch 1
    assert shards[1].epoch == 1


def test_release_reissues_in_release_order_and_ack_is_once(prompts_file):
    src = PromptSource(prompts_file, seed=0)
    a, b, c, d = take(src, 4)
    assert src.release(c) and src.release(a) and not src.release(a)
    assert [it.sample_id for it in src.outstanding] == [c.sample_id, a.sample_id, b.sample_id, d.sample_id]
    assert take(src, 3) == [c, a, src.epoch_items(0)[4]]
    assert src.ack(a) and not src.ack(a)      # a late duplicate is reported
    assert src.ack(b.sample_id)               # acks by sample id too (what the learner has)
    assert src.release(d) and src.ack(d)      # the lost rollout's sample arrived after all
    assert take(src, 1) == [src.epoch_items(0)[5]]  # d is not re-issued
    assert not src.release(d)


def test_resume_never_skips_or_repeats_within_an_epoch(prompts_file):
    src = PromptSource(prompts_file, seed=7)
    taken = take(src, 7)
    acked = [it.sample_id for it in taken[:5] if src.ack(it)]
    state = json.loads(json.dumps(src.state()))  # what a checkpoint stores
    assert state["epoch"] == 0 and state["next_index"] == 7 and len(state["outstanding"]) == 2

    resumed = PromptSource.from_state(prompts_file, 7, (0, 1), state)
    assert take(resumed, 2) == taken[5:]  # outstanding items come back first
    resumed.release(taken[6])             # an actor dies on one of them
    while True:
        item = resumed.take()
        if item.epoch > 0:
            break
        if resumed.ack(item):
            acked.append(item.sample_id)
    resumed.ack(taken[5])
    assert sorted(acked + [taken[5].sample_id]) == sorted(it.sample_id for it in src.epoch_items(0))
    assert len(set(acked)) == len(acked)


def test_resume_with_shards_and_epoch_boundary(prompts_file):
    src = PromptSource(prompts_file, seed=2, shard=(1, 3))
    items = take(src, len(src))  # the whole epoch, none acked
    resumed = PromptSource.from_state(prompts_file, 2, (1, 3), src.state())
    assert take(resumed, len(src)) == items
    assert resumed.take() == src.epoch_items(1)[0]


def test_restore_refuses_another_file_seed_or_shard(prompts_file, tmp_path):
    state = PromptSource(prompts_file, seed=1).state()
    other = tmp_path / "other.txt"
    other.write_text(prompts_file.read_text().replace("prompt 3", "prompt three"))
    with pytest.raises(ValueError, match="fingerprint"):
        PromptSource.from_state(other, 1, (0, 1), state)
    with pytest.raises(ValueError, match="seed"):
        PromptSource.from_state(prompts_file, 2, (0, 1), state)
    with pytest.raises(ValueError, match="shard"):
        PromptSource.from_state(prompts_file, 1, (0, 2), state)


def test_parquet_input(tmp_path):
    path = tmp_path / "p.parquet"
    pq.write_table(pa.table({"prompt": ["a cat", "a dog", "a fox"], "prompt_id": [10, 20, 30]}), path)
    assert load_prompts(path) == ([10, 20, 30], ["a cat", "a dog", "a fox"])
    items = PromptSource(path, seed=0).epoch_items(0)
    assert sorted((it.prompt_id, it.prompt) for it in items) == [(10, "a cat"), (20, "a dog"), (30, "a fox")]
    pq.write_table(pa.table({"prompt": ["x", "y"]}), path)
    assert load_prompts(path) == ([0, 1], ["x", "y"])


def test_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        PromptSource(tmp_path / "missing.txt")
    (tmp_path / "empty.txt").write_text("\n  \n")
    with pytest.raises(ValueError, match="no prompts"):
        PromptSource(tmp_path / "empty.txt")
    pq.write_table(pa.table({"text": ["a"]}), tmp_path / "nocol.parquet")
    with pytest.raises(ValueError, match="no 'prompt' column"):
        load_prompts(tmp_path / "nocol.parquet")
    pq.write_table(pa.table({"prompt": ["a", None]}), tmp_path / "null.parquet")
    with pytest.raises(ValueError, match="rows \\[1\\]"):
        load_prompts(tmp_path / "null.parquet")
    pq.write_table(pa.table({"prompt": ["a", "b"], "prompt_id": [1, 1]}), tmp_path / "dup.parquet")
    with pytest.raises(ValueError, match="duplicate"):
        load_prompts(tmp_path / "dup.parquet")
    (tmp_path / "two.txt").write_text("a\nb\n")
    with pytest.raises(ValueError, match="gets no prompts"):
        PromptSource(tmp_path / "two.txt", shard=(2, 3))
    with pytest.raises(ValueError, match="rank"):
        PromptSource(tmp_path / "two.txt", shard=(3, 3))
