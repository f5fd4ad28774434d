"""The Sample record rollout actors emit and the learner consumes, as one Arrow schema.

A sample is everything the learner needs to replay one training rollout
(`SelfForcedRollout.replay_exit_steps`) and weight it by its reward, plus where it came
from (prompt, epoch, seed, weights version, actor) and how long it took. It carries the prompt's
text context as the actor encoded it (only the rows up to the prompt's length, in the rollout dtype):
the learner rebuilds the padded context from it (`core.codecs.text_encoder.pad_context`), so learners
load no text encoder; `text_context_bytes` is what that costs per sample. It crosses the
Ray object store as a `pyarrow.RecordBatch` (zero-copy, language-neutral, no torch pickles)
and is written to Parquet as is, so a run's samples can be inspected or re-used offline.

Tensors are stored as raw little-endian bytes plus a shape and a dtype-name column, so
float32, float64 and bfloat16 (which numpy and Arrow cannot represent) round-trip bit-exactly.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import torch

from core.algo.rollout import ReplayBlock, RolloutRecord
from core.reward.base import AXES
from core.runtime import DTYPES

TIMING_KEYS = ("generate_s", "decode_s", "score_s", "load_weights_s")
TENSOR_COLUMNS = ("noisy", "clean", "context_input", "text_context")
SCHEMA_VERSION = "2"  # 2: text_context added (version 1 files hold none; `add_text_context` converts them)
_TENSOR_SCHEMA_COLUMNS = {f"{t}{suffix}" for t in TENSOR_COLUMNS for suffix in ("", "_shape", "_dtype")}

_AXES_STRUCT = pa.struct([pa.field(k, pa.float64(), nullable=False) for k in AXES])


def _tensor_fields(name: str, nullable: bool) -> list[pa.Field]:
    return [
        pa.field(name, pa.large_binary(), nullable=nullable,
                 metadata={"doc": f"{name}: raw bytes of the contiguous CPU tensor (native little-endian)"}),
        pa.field(f"{name}_shape", pa.list_(pa.int64()), nullable=nullable, metadata={"doc": f"shape of {name}"}),
        pa.field(f"{name}_dtype", pa.string(), nullable=nullable,
                 metadata={"doc": f"torch dtype name of {name}: {', '.join(DTYPES)}"}),
    ]


def _f(name: str, type_: pa.DataType, doc: str, nullable: bool = False) -> pa.Field:
    return pa.field(name, type_, nullable=nullable, metadata={"doc": doc})


SAMPLE_SCHEMA: pa.Schema = pa.schema([
    _f("sample_id", pa.string(), "unique work id 'e{epoch}-i{index}' (core.records.prompts.WorkItem.sample_id)"),
    _f("prompt_id", pa.int64(), "id of the prompt in the prompt source"),
    _f("prompt", pa.string(), "the prompt text"),
    _f("epoch", pa.int64(), "prompt-source epoch the work item belongs to"),
    _f("seed", pa.int64(), "noise seed of the rollout (derived from run seed, epoch and index)"),
    _f("weight_version", pa.int64(), "version of the generator weights the rollout ran with (staleness)"),
    _f("actor", pa.string(), "name of the rollout actor that produced the sample"),
    _f("exit_index", pa.int64(), "denoising step at which every block exited (shared by all blocks)"),
    _f("exit_timestep", pa.float64(), "timestep of the exit step (replay input timestep)"),
    _f("context_timestep", pa.float64(), "timestep of the context re-run (scheduler.context_noise)"),
    _f("block_start_frames", pa.list_(pa.int64()), "start latent frame of each block in the KV cache"),
    *_tensor_fields("noisy", nullable=False),          # exit-step inputs of all blocks, [B, F, C, H, W]
    *_tensor_fields("clean", nullable=False),          # exit-step predictions of all blocks, [B, F, C, H, W]
    *_tensor_fields("context_input", nullable=True),   # context re-run inputs (null when context_noise == 0)
    *_tensor_fields("text_context", nullable=False),   # the prompt's umT5 rows [tokens, text_dim], unpadded
    _f("rewards_raw", _AXES_STRUCT, "raw reward per axis (VQ visual, MQ motion, TA text alignment)"),
    _f("rewards_normalized", _AXES_STRUCT, "z-normalised reward per axis"),
    _f("overall", pa.float64(), "sum of the normalised axes (RewardScore.overall)"),
    _f("timings", pa.struct([pa.field(k, pa.float64(), nullable=True) for k in TIMING_KEYS]),
       "seconds spent per phase; a null field was not measured"),
    _f("created_at", pa.float64(), "unix time the sample was made"),
], metadata={"sample_schema_version": SCHEMA_VERSION})


class SampleSchemaError(ValueError):
    """A RecordBatch / Parquet file that does not hold samples of SAMPLE_SCHEMA."""


@dataclass
class Sample:
    sample_id: str
    prompt_id: int
    prompt: str
    epoch: int
    seed: int
    weight_version: int
    actor: str
    exit_index: int
    exit_timestep: float
    context_timestep: float
    block_start_frames: list[int]
    noisy: torch.Tensor                  # [B, F, C, H, W], all blocks' exit-step inputs along frames
    clean: torch.Tensor                  # same shape: the exit-step predictions
    context_input: torch.Tensor | None   # same shape, or None when the context re-run saw `clean`
    text_context: torch.Tensor           # [tokens, text_dim]: the prompt's encoder rows up to its length (eos included)
    rewards_raw: dict[str, float]
    rewards_normalized: dict[str, float]
    overall: float
    timings: dict[str, float] = field(default_factory=dict)
    created_at: float = field(default_factory=time.time)

    def __post_init__(self) -> None:
        for name in ("rewards_raw", "rewards_normalized"):
            if set(getattr(self, name)) != set(AXES):
                raise ValueError(f"Sample.{name} must have exactly the keys {AXES}, got {sorted(getattr(self, name))}")
        unknown = set(self.timings) - set(TIMING_KEYS)
        if unknown:
            raise ValueError(f"Sample.timings: unknown keys {sorted(unknown)} (known: {TIMING_KEYS})")
        if self.noisy.dim() != 5 or self.clean.shape != self.noisy.shape:
            raise ValueError(f"Sample.noisy and .clean must be [B, F, C, H, W] of one shape, "
                             f"got {tuple(self.noisy.shape)} and {tuple(self.clean.shape)}")
        if self.context_input is not None and self.context_input.shape != self.noisy.shape:
            raise ValueError(f"Sample.context_input shape {tuple(self.context_input.shape)} != noisy {tuple(self.noisy.shape)}")
        if self.text_context.dim() != 2 or self.text_context.shape[0] == 0:
            raise ValueError(f"Sample.text_context must be [tokens, text_dim] with tokens >= 1, "
                             f"got {tuple(self.text_context.shape)}")
        n, frames = len(self.block_start_frames), self.noisy.shape[1]
        if n == 0 or frames % n:
            raise ValueError(f"Sample: {frames} frames cannot be split into {n} equal blocks (block_start_frames)")

    @property
    def frames_per_block(self) -> int:
        return self.noisy.shape[1] // len(self.block_start_frames)

    @classmethod
    def from_rollout(cls, record: RolloutRecord, *, score: dict, text_context: torch.Tensor, sample_id: str,
                     prompt_id: int, prompt: str, epoch: int, seed: int, weight_version: int, actor: str,
                     timings: dict[str, float] | None = None, created_at: float | None = None) -> "Sample":
        """Pack a training rollout, the valid rows of its prompt's context (`TextEncoder.encode_valid`) and its
        reward (`RewardScore.to_dict()`) into one CPU sample."""
        blocks = record.blocks
        if not blocks:
            raise ValueError("Sample.from_rollout: the record has no blocks")
        sizes = {b.noisy.shape[1] for b in blocks}
        if len(sizes) != 1:
            raise ValueError(f"Sample.from_rollout: blocks must have one frame count, got {sorted(sizes)}")
        has_ctx = {b.context_input is not None for b in blocks}
        if len(has_ctx) != 1:
            raise ValueError("Sample.from_rollout: context_input must be set on all blocks or on none")

        def cat(name: str) -> torch.Tensor:
            return torch.cat([getattr(b, name).detach() for b in blocks], dim=1).cpu().contiguous()

        return cls(
            sample_id=sample_id, prompt_id=int(prompt_id), prompt=prompt, epoch=int(epoch), seed=int(seed),
            weight_version=int(weight_version), actor=actor, exit_index=int(record.exit_index),
            exit_timestep=float(record.exit_timestep), context_timestep=float(record.context_timestep),
            block_start_frames=[int(b.start_frame) for b in blocks],
            noisy=cat("noisy"), clean=cat("clean"), context_input=cat("context_input") if has_ctx == {True} else None,
            text_context=text_context.detach().cpu().contiguous(),
            rewards_raw={k: float(score["raw"][k]) for k in AXES},
            rewards_normalized={k: float(score["normalized"][k]) for k in AXES},
            overall=float(score["Overall"]), timings={k: float(v) for k, v in (timings or {}).items()},
            created_at=time.time() if created_at is None else float(created_at))

    def to_rollout_record(self, device: torch.device | str | None = None) -> RolloutRecord:
        """The inverse of `from_rollout`: blocks split back by frame count, ready for `replay_exit_steps`."""
        f = self.frames_per_block

        def split(x: torch.Tensor | None) -> list[torch.Tensor | None]:
            if x is None:
                return [None] * len(self.block_start_frames)
            return [c.to(device).contiguous() for c in x.split(f, dim=1)]

        blocks = [ReplayBlock(start, n, c, ci) for start, n, c, ci in
                  zip(self.block_start_frames, split(self.noisy), split(self.clean), split(self.context_input))]
        return RolloutRecord(self.exit_index, self.exit_timestep, self.context_timestep, blocks)


def _tensor_to_bytes(x: torch.Tensor) -> tuple[bytes, list[int], str]:
    name = str(x.dtype).removeprefix("torch.")
    if name not in DTYPES:
        raise TypeError(f"Sample tensors must be one of {list(DTYPES)}, got {x.dtype}")
    flat = x.detach().cpu().contiguous().reshape(-1)
    return flat.view(torch.uint8).numpy().tobytes(), list(x.shape), name


def _tensor_from_bytes(data: bytes, shape: list[int], dtype: str, column: str) -> torch.Tensor:
    if dtype not in DTYPES:
        raise SampleSchemaError(f"column {column}_dtype: unknown dtype {dtype!r} (known: {list(DTYPES)})")
    dt = DTYPES[dtype]
    n = 1
    for s in shape:
        n *= s
    if len(data) != n * dt.itemsize:
        raise SampleSchemaError(f"column {column}: {len(data)} bytes do not hold {dtype} of shape {shape}")
    if n == 0:
        return torch.empty(shape, dtype=dt)
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).view(dt).reshape(shape)


def to_record_batch(samples: list[Sample]) -> pa.RecordBatch:
    """Samples as one RecordBatch of SAMPLE_SCHEMA (what goes through the object store)."""
    cols: dict[str, list] = {f.name: [] for f in SAMPLE_SCHEMA}
    for s in samples:
        for f in SAMPLE_SCHEMA:
            if f.name not in _TENSOR_SCHEMA_COLUMNS:
                cols[f.name].append(getattr(s, f.name))
        for name in TENSOR_COLUMNS:
            x = getattr(s, name)
            data, shape, dtype = _tensor_to_bytes(x) if x is not None else (None, None, None)
            cols[name].append(data)
            cols[f"{name}_shape"].append(shape)
            cols[f"{name}_dtype"].append(dtype)
    arrays = [pa.array(cols[f.name], type=f.type) for f in SAMPLE_SCHEMA]
    return pa.RecordBatch.from_arrays(arrays, schema=SAMPLE_SCHEMA)


def check_schema(schema: pa.Schema, where: str = "record batch") -> None:
    """Raise SampleSchemaError naming every missing or mistyped column (extra columns are allowed)."""
    problems = []
    for f in SAMPLE_SCHEMA:
        idx = schema.get_field_index(f.name)
        if idx < 0:
            problems.append(f"missing column {f.name!r} ({f.type})")
        elif not schema.field(idx).type.equals(f.type):
            problems.append(f"column {f.name!r} has type {schema.field(idx).type}, expected {f.type}")
    if problems and all("text_context" in p for p in problems) and schema.get_field_index("text_context") < 0:
        raise SampleSchemaError(
            f"{where} holds samples of schema version 1, recorded before samples carried their prompt's text context "
            "(column text_context); learners no longer load a text encoder to re-encode prompts. Convert the file "
            "once with core.records.sample.add_text_context(src, dst, TextEncoder.from_config(cfg, 'cpu', "
            "dtype).encode_valid), with the text encoder config and runtime.dtype the samples were made with, or "
            "record the samples again")
    if problems:
        raise SampleSchemaError(f"{where} is not a Sample batch (core.records.sample.SAMPLE_SCHEMA):\n  " + "\n  ".join(problems))


def from_record_batch(batch: pa.RecordBatch | pa.Table) -> list[Sample]:
    """The samples of a RecordBatch (or Table) of SAMPLE_SCHEMA; tensors come back on CPU."""
    check_schema(batch.schema)
    nulls = [f.name for f in SAMPLE_SCHEMA if not f.nullable and batch.column(f.name).null_count]
    if nulls:
        raise SampleSchemaError(f"record batch has nulls in non-nullable columns {nulls}")
    cols = {f.name: batch.column(f.name).to_pylist() for f in SAMPLE_SCHEMA}
    samples = []
    for i in range(batch.num_rows):
        row = {name: values[i] for name, values in cols.items()}
        tensors = {}
        for name in TENSOR_COLUMNS:
            data = row.pop(name)
            shape, dtype = row.pop(f"{name}_shape"), row.pop(f"{name}_dtype")
            tensors[name] = None if data is None else _tensor_from_bytes(data, shape, dtype, name)
        row["timings"] = {k: v for k, v in row["timings"].items() if v is not None}
        samples.append(Sample(**row, **tensors))
    return samples


def write_parquet(path: str | Path, samples: list[Sample]) -> Path:
    """Write samples to one Parquet file (overwrites); for appending use `SampleWriter`."""
    with SampleWriter(path) as w:
        w.write(samples)
    return Path(path)


class SampleWriter:
    """Append samples to one Parquet file, one row group per `write` call (keeps memory bounded)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._writer = pq.ParquetWriter(str(self.path), SAMPLE_SCHEMA)

    def write(self, samples: list[Sample]) -> None:
        if samples:
            self._writer.write_batch(to_record_batch(samples))

    def close(self) -> None:
        self._writer.close()

    def __enter__(self) -> "SampleWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_parquet(path: str | Path) -> list[Sample]:
    """Samples from a Parquet file, or from every *.parquet file of a folder in name order."""
    path = Path(path)
    if path.is_dir():
        files: Iterable[Path] = sorted(path.glob("*.parquet"))
    elif path.is_file():
        files = [path]
    else:
        raise FileNotFoundError(f"no Parquet file or folder at {path}")
    samples: list[Sample] = []
    for f in files:
        table = pq.read_table(str(f))
        check_schema(table.schema, where=str(f))
        for batch in table.to_batches():
            samples.extend(from_record_batch(batch))
    return samples


def add_text_context(src: str | Path, dst: str | Path, encode: Callable[[list[str]], list[torch.Tensor]]) -> Path:
    """Convert a Parquet file of schema-version-1 samples (no text_context) to this schema, giving each sample
    its prompt's valid rows from `encode` (`TextEncoder.encode_valid` of the encoder and dtype the samples were
    made with); one row group per batch of the source. Returns `dst`."""
    table = pq.read_table(str(src))
    if table.schema.get_field_index("text_context") >= 0:
        raise SampleSchemaError(f"{src} already has a text_context column")
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    with pq.ParquetWriter(str(dst), SAMPLE_SCHEMA) as writer:
        for batch in table.to_batches():
            if batch.num_rows == 0:
                continue
            cols = {name: batch.column(name) for name in batch.schema.names}
            data, shapes, dtypes = zip(*(_tensor_to_bytes(r) for r in encode(cols["prompt"].to_pylist())))
            for name, values in (("", data), ("_shape", shapes), ("_dtype", dtypes)):
                cols[f"text_context{name}"] = pa.array(list(values), type=SAMPLE_SCHEMA.field(f"text_context{name}").type)
            check_schema(pa.schema([pa.field(n, c.type) for n, c in cols.items()]), where=str(src))
            writer.write_batch(pa.RecordBatch.from_arrays([cols[f.name] for f in SAMPLE_SCHEMA], schema=SAMPLE_SCHEMA))
    return dst


def text_context_bytes(tokens: int, text_dim: int, dtype: torch.dtype) -> int:
    """Bytes of one sample's text context: `tokens` rows (the prompt's real length, at most model.text_len) of
    `text_dim` values in the rollout dtype; Arrow adds its shape and dtype name, a few dozen bytes. The padded
    context a learner rebuilds is `text_context_bytes(model.text_len, ...)`, never shipped."""
    return tokens * text_dim * dtype.itemsize
