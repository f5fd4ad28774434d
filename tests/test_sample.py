"""Sample records: bit-exact Arrow / Parquet / pickle round trips, the rollout-record inverse, the shipped text
context that rebuilds the encoder's padded output exactly, schema errors and the conversion of version-1 files."""

from __future__ import annotations

import pickle

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from core.algo.rollout import SelfForcedRollout, gaussian_noise
from core.algo.scheduler import FlowMatchScheduler
from core.codecs.text_encoder import TextEncoder, pad_context
from core.config import PLUMBING_CONFIG, StreamConfig, WanArchConfig, load_config
from core.model.wan import CausalWanModel
from core.records.sample import (
    SAMPLE_SCHEMA,
    Sample,
    SampleSchemaError,
    SampleWriter,
    add_text_context,
    from_record_batch,
    read_parquet,
    text_context_bytes,
    to_record_batch,
    write_parquet,
)

SCORE = {"VQ": 0.5, "MQ": -1.25, "TA": 0.0, "Overall": -0.75,
         "raw": {"VQ": 0.9, "MQ": 0.1, "TA": 0.0}, "normalized": {"VQ": 0.5, "MQ": -1.25, "TA": 0.0},
         "sampling": {}, "extra": {}}


def _tensor(dtype: torch.dtype, seed: int, shape=(1, 6, 4, 2, 3)) -> torch.Tensor:
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)
    flat = x.view(-1)
    flat[0], flat[1], flat[2], flat[3] = float("nan"), float("inf"), -0.0, 1e-300  # bits a float cast would change
    return x


def make_sample(dtype=torch.float32, context=True, i=0, **kw) -> Sample:
    fields = dict(sample_id=f"e0-i{i}", prompt_id=7 + i, prompt=f"a red circle moves left #{i} — ünïcode", epoch=0,
                  seed=2**62 + i, weight_version=3, actor="rollout-1", exit_index=2, exit_timestep=500.0 + 1e-9,
                  context_timestep=0.0, block_start_frames=[0, 3], noisy=_tensor(dtype, 1 + i), clean=_tensor(dtype, 2 + i),
                  context_input=_tensor(dtype, 3 + i) if context else None, text_context=_tensor(dtype, 4 + i, (5 + i, 8)),
                  rewards_raw=dict(SCORE["raw"]), rewards_normalized=dict(SCORE["normalized"]), overall=-0.75,
                  timings={"generate_s": 1.5, "decode_s": 0.25, "score_s": 0.125}, created_at=1.7e9 + 0.123456789)
    fields.update(kw)
    return Sample(**fields)


def same_bits(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return (a.dtype == b.dtype and a.shape == b.shape
            and torch.equal(a.contiguous().view(-1).view(torch.uint8), b.contiguous().view(-1).view(torch.uint8)))


def assert_same(a: Sample, b: Sample) -> None:
    for name in Sample.__dataclass_fields__:
        x, y = getattr(a, name), getattr(b, name)
        if name in ("noisy", "clean", "context_input", "text_context"):
            assert same_bits(x, y), name
        else:
            assert x == y and type(x) is type(y), name


CASES = [(torch.float32, True), (torch.float64, False), (torch.bfloat16, True), (torch.bfloat16, False)]


@pytest.mark.parametrize("dtype,context", CASES, ids=["f32", "f64-noctx", "bf16", "bf16-noctx"])
def test_record_batch_round_trip_is_bit_exact(dtype, context):
    samples = [make_sample(dtype, context, i) for i in range(3)]
    batch = to_record_batch(samples)
    assert batch.schema.equals(SAMPLE_SCHEMA) and batch.num_rows == 3
    for got, want in zip(from_record_batch(batch), samples):
        assert_same(got, want)
    # what the Ray object store does with a RecordBatch
    for got, want in zip(from_record_batch(pickle.loads(pickle.dumps(batch))), samples):
        assert_same(got, want)


def test_mixed_dtypes_in_one_batch_and_empty_batch():
    samples = [make_sample(d, c, i) for i, (d, c) in enumerate(CASES)]
    for got, want in zip(from_record_batch(to_record_batch(samples)), samples):
        assert_same(got, want)
    assert from_record_batch(to_record_batch([])) == []


@pytest.mark.parametrize("dtype,context", CASES, ids=["f32", "f64-noctx", "bf16", "bf16-noctx"])
def test_parquet_round_trip_is_bit_exact(tmp_path, dtype, context):
    samples = [make_sample(dtype, context, i) for i in range(3)]
    write_parquet(tmp_path / "a.parquet", samples)
    for got, want in zip(read_parquet(tmp_path / "a.parquet"), samples, strict=True):
        assert_same(got, want)


def test_parquet_append_and_folder(tmp_path):
    first, second = [make_sample(i=0)], [make_sample(torch.bfloat16, False, i=1), make_sample(i=2)]
    with SampleWriter(tmp_path / "run" / "00.parquet") as w:
        w.write(first)
        w.write([])
        w.write(second)
    write_parquet(tmp_path / "run" / "01.parquet", [make_sample(torch.float64, i=3)])
    got = read_parquet(tmp_path / "run")
    assert [s.sample_id for s in got] == ["e0-i0", "e0-i1", "e0-i2", "e0-i3"]
    assert_same(got[1], second[0])
    with pytest.raises(FileNotFoundError):
        read_parquet(tmp_path / "missing.parquet")


def test_timings_subset_round_trips():
    s = make_sample(timings={})
    assert from_record_batch(to_record_batch([s]))[0].timings == {}


# ---- the rollout-record inverse, on a real training rollout --------------------------------------------------

ARCH = WanArchConfig(dim=32, ffn_dim=64, num_heads=2, num_layers=2, freq_dim=16, text_dim=16, text_len=8)


@pytest.mark.parametrize("context_noise", [0, 50])
def test_to_rollout_record_inverts_from_rollout_and_replays(context_noise):
    stream = StreamConfig(rope="window", local_attn_size=12, sink_size=3, sink_mode="ema")
    torch.manual_seed(0)
    model = CausalWanModel(ARCH, stream).to(torch.float64).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    sched = FlowMatchScheduler()
    rollout = SelfForcedRollout(model, sched, sched.denoising_timesteps([1000, 750, 500, 250]), context_noise)
    g = torch.Generator().manual_seed(1)
    rows = torch.randn(5, ARCH.text_dim, generator=g, dtype=torch.float64)  # a prompt of 5 tokens
    ctx = pad_context([rows], ARCH.text_len)
    noise = gaussian_noise((1, 3, ARCH.in_dim, 4, 4), g, torch.float64, "cpu")
    record = rollout.training_rollout(ctx, model.init_cache(1, (4, 4)), noise, num_blocks=3, exit_index=2)

    sample = Sample.from_rollout(record, score=SCORE, text_context=rows, sample_id="e0-i4", prompt_id=9, prompt="p",
                                 epoch=0, seed=5, weight_version=1, actor="a", timings={"generate_s": 0.5})
    assert sample.noisy.shape == (1, 9, ARCH.in_dim, 4, 4) and sample.frames_per_block == 3
    assert sample.overall == -0.75 and sample.rewards_raw == SCORE["raw"]
    received = from_record_batch(pickle.loads(pickle.dumps(to_record_batch([sample]))))[0]
    rebuilt = received.to_rollout_record()

    assert (rebuilt.exit_index, rebuilt.exit_timestep, rebuilt.context_timestep) == \
        (record.exit_index, record.exit_timestep, record.context_timestep)
    assert len(rebuilt.blocks) == len(record.blocks) == 3
    for a, b in zip(rebuilt.blocks, record.blocks):
        assert a.start_frame == b.start_frame
        assert same_bits(a.noisy, b.noisy) and same_bits(a.clean, b.clean) and same_bits(a.context_input, b.context_input)
    assert (record.blocks[0].context_input is None) == (context_noise == 0)

    learner_ctx = pad_context([received.text_context], ARCH.text_len)  # what the learner rebuilds from the sample
    assert same_bits(learner_ctx, ctx)
    replayed = rollout.replay_exit_steps(rebuilt, learner_ctx, model.init_cache(1, (4, 4)))
    assert replayed.requires_grad
    assert (replayed - record.clean_latents()).abs().max() < 1e-12
    with torch.no_grad():
        assert torch.equal(replayed, rollout.replay_exit_steps(record, ctx, model.init_cache(1, (4, 4))))


# ---- the text context a sample carries -----------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=["f64", "f32", "bf16"])
def test_shipped_text_context_rebuilds_the_encoders_output_exactly(dtype):
    """What an actor ships (valid rows, after Arrow and pickle) padded by the learner is TextEncoder.encode's
    output bit for bit, for prompts of different lengths, one truncated at text_len."""
    cfg = load_config(PLUMBING_CONFIG)
    prompts = ["red circle", "x", "a very long prompt " * 4]
    fresh = TextEncoder.from_config(cfg, "cpu", dtype)  # encodes from scratch: no cache shared with `actor`
    actor = TextEncoder.from_config(cfg, "cpu", dtype)
    rows = actor.encode_valid(prompts)
    assert [len(r) for r in rows][:2] == [len("red circle") + 1, 2] and len(rows[2]) == cfg.model.text_len
    samples = [make_sample(dtype, i=i, text_context=r) for i, r in enumerate(rows)]
    received = from_record_batch(pickle.loads(pickle.dumps(to_record_batch(samples))))
    for prompt, sample in zip(prompts, received):
        rebuilt = pad_context([sample.text_context], cfg.model.text_len)
        assert same_bits(rebuilt, fresh.encode([prompt])), prompt
    assert same_bits(pad_context([s.text_context for s in received], cfg.model.text_len), fresh.encode(prompts))


def test_text_context_bytes_are_what_a_sample_carries():
    sample = make_sample(torch.bfloat16, text_context=torch.ones(37, 24, dtype=torch.bfloat16))
    batch = to_record_batch([sample])
    assert len(batch.column("text_context")[0].as_py()) == text_context_bytes(37, 24, torch.bfloat16) == 37 * 24 * 2
    assert text_context_bytes(100, 4096, torch.bfloat16) == 819_200  # 1.3B: 8 KiB per token in bf16


def test_version_1_files_are_named_and_converted(tmp_path):
    """A file recorded before samples carried their context: a clear error saying how to convert it, and the
    conversion gives each sample its prompt's rows from the encoder the samples were made with."""
    samples = [make_sample(i=i) for i in range(3)]
    old = to_record_batch(samples)
    keep = [n for n in old.schema.names if not n.startswith("text_context")]
    v1 = pa.Table.from_batches([pa.RecordBatch.from_arrays([old.column(n) for n in keep], names=keep)])
    pq.write_table(v1, tmp_path / "v1.parquet", row_group_size=2)
    with pytest.raises(SampleSchemaError, match="schema version 1.*add_text_context"):
        read_parquet(tmp_path / "v1.parquet")
    by_prompt = {s.prompt: s.text_context for s in samples}
    add_text_context(tmp_path / "v1.parquet", tmp_path / "v2.parquet", lambda ps: [by_prompt[p] for p in ps])
    for got, want in zip(read_parquet(tmp_path / "v2.parquet"), samples, strict=True):
        assert_same(got, want)
    with pytest.raises(SampleSchemaError, match="already has"):
        add_text_context(tmp_path / "v2.parquet", tmp_path / "v3.parquet", lambda ps: [])


# ---- errors ---------------------------------------------------------------------------------------------------

def test_wrong_schema_names_missing_and_mistyped_columns():
    batch = to_record_batch([make_sample()])
    broken = pa.RecordBatch.from_arrays(
        [batch.column(n).cast(pa.string()) if n == "seed" else batch.column(n)
         for n in batch.schema.names if n not in ("clean_dtype", "rewards_raw")],
        names=[n for n in batch.schema.names if n not in ("clean_dtype", "rewards_raw")])
    with pytest.raises(SampleSchemaError) as e:
        from_record_batch(broken)
    msg = str(e.value)
    assert "missing column 'clean_dtype'" in msg and "missing column 'rewards_raw'" in msg
    assert "column 'seed' has type string, expected int64" in msg
    extra = batch.append_column("note", pa.array(["x"]))  # extra columns are tolerated
    assert from_record_batch(extra)[0].sample_id == "e0-i0"


def test_nulls_and_corrupt_tensor_columns_are_errors():
    batch = to_record_batch([make_sample()])
    i = batch.schema.get_field_index("prompt")
    nulled = batch.set_column(i, pa.field("prompt", pa.string()), pa.array([None], pa.string()))
    with pytest.raises(SampleSchemaError, match="prompt"):
        from_record_batch(nulled)
    i = batch.schema.get_field_index("noisy_shape")
    wrong = batch.set_column(i, SAMPLE_SCHEMA.field("noisy_shape"), pa.array([[1, 2, 3]], pa.list_(pa.int64())))
    with pytest.raises(SampleSchemaError, match="noisy: .* bytes do not hold float32 of shape"):
        from_record_batch(wrong)


def test_sample_validation():
    with pytest.raises(ValueError, match="rewards_raw"):
        make_sample(rewards_raw={"VQ": 1.0})
    with pytest.raises(ValueError, match="timings"):
        make_sample(timings={"gen": 1.0})
    with pytest.raises(ValueError, match="equal blocks"):
        make_sample(block_start_frames=[0, 3, 5, 7])
    with pytest.raises(ValueError, match="one shape"):
        make_sample(clean=torch.zeros(1, 3, 4, 2, 3))
    with pytest.raises(ValueError, match="text_context"):
        make_sample(text_context=torch.zeros(0, 8))
    with pytest.raises(TypeError, match="int64"):
        to_record_batch([make_sample(noisy=torch.zeros(1, 6, 4, 2, 3, dtype=torch.int64),
                                     clean=torch.zeros(1, 6, 4, 2, 3, dtype=torch.int64))])
