"""Load and save Wan2.1 transformer weights in every layout this project meets (docs/reference.md).

Everything is normalised to the original Wan2.1 keys with no prefix (`blocks.0.self_attn.q.weight`),
the keys of `core.model.wan`, so the same weights load into `WanModel` and `CausalWanModel` whatever
file they came from. Loads are strict: a mismatch is an error naming the keys, never a partial load.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import torch
from safetensors.torch import save_file

from core.config import WanArchConfig
from core.model.fp8 import requantise_float8

StateDict = dict[str, torch.Tensor]
Model = TypeVar("Model", bound=torch.nn.Module)

WEIGHTS_FILE = "diffusion_pytorch_model.safetensors"
INDEX_FILE = WEIGHTS_FILE + ".index.json"
TORCH_SUFFIXES = (".pt", ".pth")
TRAINING_STATE = "loop_state.pt"  # marks a learner checkpoint folder (learner/checkpointing.py)
LAYOUTS = (
    "expected one of: a Wan2.1 or diffusers folder (config.json + diffusion_pytorch_model.safetensors, "
    "or shards listed in diffusion_pytorch_model.safetensors.index.json); a .safetensors file; or a .pt/.pth "
    "file holding a Self-Forcing {'generator', 'critic', 'generator_ema'} dict, an ode_init {'generator'} "
    "or {'model'} dict, or a flat (Reward-Forcing) state dict; or a training checkpoint folder "
    "(<output_dir>/checkpoints/step_N)")
WRAPPER_FRAGMENTS = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")
LEADING_PREFIXES = ("module.", "model.")  # DDP wrapper, then Self/Reward-Forcing's `model.` attribute

# diffusers WanTransformer3DModel name -> original Wan name, as key prefixes. diffusers numbers the
# block norms in call order, so its norm2 (affine, before cross-attention) is Wan's norm3.
_DIFFUSERS_TOP = {
    "condition_embedder.time_embedder.linear_1.": "time_embedding.0.",
    "condition_embedder.time_embedder.linear_2.": "time_embedding.2.",
    "condition_embedder.text_embedder.linear_1.": "text_embedding.0.",
    "condition_embedder.text_embedder.linear_2.": "text_embedding.2.",
    "condition_embedder.time_proj.": "time_projection.1.",
    "scale_shift_table": "head.modulation",
    "proj_out.": "head.head.",
}
_DIFFUSERS_BLOCK = {  # after `blocks.N.`
    "scale_shift_table": "modulation",
    "attn1.to_q.": "self_attn.q.", "attn1.to_k.": "self_attn.k.", "attn1.to_v.": "self_attn.v.",
    "attn1.to_out.0.": "self_attn.o.", "attn1.norm_q.": "self_attn.norm_q.", "attn1.norm_k.": "self_attn.norm_k.",
    "attn2.to_q.": "cross_attn.q.", "attn2.to_k.": "cross_attn.k.", "attn2.to_v.": "cross_attn.v.",
    "attn2.to_out.0.": "cross_attn.o.", "attn2.norm_q.": "cross_attn.norm_q.", "attn2.norm_k.": "cross_attn.norm_k.",
    "norm2.": "norm3.",
    "ffn.net.0.proj.": "ffn.0.",
    "ffn.net.2.": "ffn.2.",
}


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit the model; the message says what to check."""


def _preview(items: list[str], limit: int = 10) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f", ... and {len(items) - limit} more" if len(items) > limit else "")


# ---------------------------------------------------------------------------------------------- reading


def _folder(path: Path) -> Path:
    """The transformer folder: `path` itself, or `path/transformer` for a diffusers pipeline root."""
    if (path / "model_index.json").is_file() and (path / "transformer").is_dir():
        return path / "transformer"
    return path


def _read_folder(folder: Path, device: torch.device | str, dtype: torch.dtype | None) -> StateDict:
    if (folder / WEIGHTS_FILE).is_file():
        return _read_file(folder / WEIGHTS_FILE, device, dtype)
    if (folder / INDEX_FILE).is_file():
        shards = sorted(set(json.loads((folder / INDEX_FILE).read_text())["weight_map"].values()))
        sd: StateDict = {}
        for shard in shards:
            sd.update(_read_file(folder / shard, device, dtype))
        return sd
    found = sorted(p.name for p in folder.iterdir())
    raise CheckpointError(f"folder {folder} has neither {WEIGHTS_FILE} nor {INDEX_FILE}; it holds {_preview(found)}")


_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                       "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                       "U8": torch.uint8, "BOOL": torch.bool}


def read_training_checkpoint(path: Path, role: str, use_ema: bool) -> dict[str, StateDict]:
    """A learner checkpoint folder (`step_N`: each engine's ZeRO shards under its tag, the loop state with the
    generator's EMA) as the Self-Forcing entry `role` / `use_ema` ask for, consolidated to fp32 on the CPU ({} when
    the EMA is asked for and the run has none yet)."""
    if use_ema:
        ema = torch.load(path / TRAINING_STATE, weights_only=False).get("ema")
        return {"generator_ema": ema["shadow"]} if ema else {}
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint  # optional: ZeRO shards only
    if not (path / role).is_dir():
        raise CheckpointError(f"training checkpoint {path} has no {role!r} engine folder; it holds "
                              f"{_preview(sorted(p.name for p in path.iterdir()))}")
    return {role: get_fp32_state_dict_from_zero_checkpoint(str(path), tag=role)}


def _cast(tensor: torch.Tensor, device: torch.device | str, dtype: torch.dtype | None) -> torch.Tensor:
    """Floating tensors to `dtype` (if given), every tensor to `device`; no copy when both already match."""
    return tensor.to(device=device, dtype=dtype if dtype is not None and tensor.is_floating_point() else None)


def _read_safetensors(path: Path, device: torch.device | str, dtype: torch.dtype | None) -> StateDict:
    """A safetensors file read tensor by tensor with plain reads (no memory map, whose touched pages would count
    as this process's memory): a tensor already in its target dtype on the CPU is read straight into its final
    buffer; any other is read into one scratch buffer, reused for every tensor, and cast from there. Peak memory
    is the result plus the largest tensor."""
    sd: StateDict = {}
    with open(path, "rb", buffering=0) as f:
        header_len = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(header_len))
        header.pop("__metadata__", None)
        entries = sorted(header.items(), key=lambda item: item[1]["data_offsets"][0])
        scratch = None
        for name, info in entries:
            start, end = info["data_offsets"]
            stored = _SAFETENSORS_DTYPES[info["dtype"]]
            numel = torch.Size(info["shape"]).numel()
            if numel * stored.itemsize != end - start:
                raise ValueError(f"tensor {name!r} holds {end - start} bytes, its shape and dtype need "
                                 f"{numel * stored.itemsize}")
            direct = torch.device(device).type == "cpu" and (dtype is None or not stored.is_floating_point
                                                              or stored == dtype)
            if direct:
                raw = torch.empty(end - start, dtype=torch.uint8)
            else:
                if scratch is None:
                    largest = max(i["data_offsets"][1] - i["data_offsets"][0] for _, i in entries)
                    scratch = torch.empty(largest, dtype=torch.uint8)
                raw = scratch[:end - start]
            f.seek(8 + header_len + start)
            if f.readinto(memoryview(raw.numpy())) != end - start:
                raise ValueError(f"the file ends inside tensor {name!r}")
            tensor = raw.view(stored).view(info["shape"])
            sd[name] = tensor if direct else _cast(tensor, device, dtype)  # another device or dtype: a new tensor
    return sd


def _read_file(path: Path, device: torch.device | str = "cpu", dtype: torch.dtype | None = None) -> object:
    try:
        if path.suffix == ".safetensors":
            return _read_safetensors(path, device, dtype)
        if path.suffix in TORCH_SUFFIXES:  # memory-mapped: only the entry that is selected and cast is read
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # torch/safetensors raise many types for a truncated or foreign file
        raise CheckpointError(f"cannot read {path} ({type(e).__name__}: {e}); is it a complete, "
                              "tensor-only checkpoint? " + LAYOUTS) from e
    raise CheckpointError(f"{path} has an unknown suffix {path.suffix!r}; {LAYOUTS}")


def _is_state_dict(obj: object) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(isinstance(v, torch.Tensor) for v in obj.values())


def _select(obj: object, path: Path, role: str, use_ema: bool) -> StateDict:
    """Pick the state dict that `role` / `use_ema` ask for out of what the file holds."""
    if _is_state_dict(obj):
        if use_ema:
            raise CheckpointError(f"{path} is a single state dict with no separate 'generator_ema' entry; "
                                  "load it with use_ema=False")
        return obj
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, not a state dict; {LAYOUTS}")
    entries = sorted(k for k, v in obj.items() if _is_state_dict(v))
    if not {"generator", "critic", "generator_ema", "model"} & set(entries):
        found = _preview(sorted(map(str, obj)))
        raise CheckpointError(f"unrecognised layout in {path}: top-level keys {found}; {LAYOUTS}")
    want = "generator_ema" if use_ema else role
    if want == "generator" and "generator" not in entries and "model" in entries:
        want = "model"  # ode_init.pt written as {"model": sd}
    if want not in entries:
        hint = " (pass use_ema=True)" if entries == ["generator_ema"] else ""
        raise CheckpointError(f"{path} has no {want!r} entry (role={role!r}, use_ema={use_ema}); "
                              f"it holds {entries}{hint}")
    return obj[want]


def _normalise_key(key: str) -> str:
    for fragment in WRAPPER_FRAGMENTS:
        key = key.replace(fragment, "")
    while key.startswith(LEADING_PREFIXES):
        key = key.split(".", 1)[1]
    return key


def wan_key_from_diffusers(key: str) -> str:
    """Rename one diffusers key to Wan; unknown keys pass through and surface in `load_into`."""
    table, head, rest = _DIFFUSERS_TOP, "", key
    if key.startswith("blocks."):
        index, rest = key[len("blocks."):].split(".", 1)
        table, head = _DIFFUSERS_BLOCK, f"blocks.{index}."
    for src, dst in table.items():
        if rest.startswith(src):
            return head + dst + rest[len(src):]
    return key


def _is_diffusers(keys: list[str]) -> bool:
    return any(k.startswith("condition_embedder.") or ".attn1." in k for k in keys)


def load_wan_state_dict(path: str | Path, role: str = "generator", use_ema: bool = False,
                        device: torch.device | str = "cpu", dtype: torch.dtype | None = None) -> StateDict:
    """Read Wan transformer weights from any supported layout as {original Wan key: tensor}.

    `role` ("generator" or "critic") and `use_ema` pick the entry of a Self-Forcing file; a file
    without the asked-for entry is an error, since loading some other weights would go unnoticed.
    Wrapper fragments (FSDP, activation checkpointing, torch.compile, DDP `module.`), the `model.`
    prefix and diffusers names are undone here, so callers only ever see one key scheme.
    Tensors are read onto `device` in `dtype` (floating ones; None keeps the stored dtype) one at a time, so a
    float32 file is never held whole in float32 when bfloat16 is wanted.
    """
    if role not in ("generator", "critic"):
        raise CheckpointError(f"role must be 'generator' or 'critic', got {role!r}")
    if use_ema and role != "generator":
        raise CheckpointError("use_ema=True selects 'generator_ema'; there is no EMA of the critic")
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist; {LAYOUTS}")
    if (path / TRAINING_STATE).is_file():
        obj = read_training_checkpoint(path, role, use_ema)
        if not obj:
            raise CheckpointError(f"training checkpoint {path} has no EMA of the generator yet (the learner keeps it "
                                  "from learner.ema_start_step on): read its raw weights with checkpoint.use_ema=false")
    else:
        obj = _read_folder(_folder(path), device, dtype) if path.is_dir() else _read_file(path, device, dtype)
    raw = _select(obj, path, role, use_ema)
    sd = {_normalise_key(k): _cast(v, device, dtype) for k, v in raw.items()}
    if len(sd) != len(raw):
        raise CheckpointError(f"{path}: keys collide once wrapper prefixes are stripped (e.g. both "
                              "'model.x' and 'x'); the file mixes two state dicts")
    if _is_diffusers(list(sd)):
        sd = {wan_key_from_diffusers(k): v for k, v in sd.items()}
    if "patch_embedding.weight" not in sd:
        raise CheckpointError(f"{path} does not look like a Wan transformer (no patch_embedding.weight); "
                              f"its keys start {_preview(sorted(sd), 5)}")
    return sd


def arch_from_folder(path: str | Path) -> WanArchConfig:
    """The architecture stored in a Wan2.1 or diffusers folder's config.json, so it need not be retyped."""
    config_path = _folder(Path(path)) / "config.json"
    if not config_path.is_file():
        raise CheckpointError(f"{config_path} does not exist; arch_from_folder needs a Wan2.1 or diffusers "
                              "transformer folder")
    try:
        raw = json.loads(config_path.read_text())
        if raw.get("_class_name") == "WanTransformer3DModel" or "num_attention_heads" in raw:  # diffusers
            heads = raw["num_attention_heads"]
            raw = dict(dim=heads * raw["attention_head_dim"], num_heads=heads, ffn_dim=raw["ffn_dim"],
                       num_layers=raw["num_layers"], freq_dim=raw["freq_dim"], text_dim=raw["text_dim"],
                       in_dim=raw["in_channels"], out_dim=raw["out_channels"], patch_size=list(raw["patch_size"]),
                       eps=raw["eps"], qk_norm=raw.get("qk_norm") is not None, cross_attn_norm=raw["cross_attn_norm"])
        return WanArchConfig(**{k: v for k, v in raw.items() if k in WanArchConfig.model_fields})
    except (KeyError, ValueError) as e:  # ValueError covers bad JSON and pydantic validation
        raise CheckpointError(f"{config_path} is not a valid Wan2.1 or diffusers transformer config: {e!r}") from e


# ---------------------------------------------------------------------------------------------- loading


def mismatch_report(expected_shapes: dict[str, tuple[int, ...]], state_dict: StateDict) -> str | None:
    """The missing keys, unexpected keys and shape mismatches of `state_dict`, one line each; None if it fits."""
    missing = sorted(set(expected_shapes) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected_shapes))
    shapes = sorted(f"{k} (model {tuple(expected_shapes[k])}, checkpoint {tuple(state_dict[k].shape)})"
                    for k in set(expected_shapes) & set(state_dict)
                    if tuple(expected_shapes[k]) != tuple(state_dict[k].shape))
    parts = [f"{name} ({len(keys)}): {_preview(keys)}" for name, keys in
             (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", shapes)) if keys]
    return "\n  ".join(parts) or None


def load_into(model: Model, state_dict: StateDict) -> Model:
    """Strictly load `state_dict` into `model`; any mismatch raises first. A model on the meta device takes the
    tensors themselves, in their dtype and on their device (no second copy); any other is cast to its dtypes, and its
    float8 weights (runtime.fp8) are quantised again from the new ones."""
    expected = model.state_dict()
    report = mismatch_report({k: v.shape for k, v in expected.items()}, state_dict)
    if report:
        raise CheckpointError(
            "checkpoint does not fit the model; nothing was loaded.\n  " + report + "\n"
            "Check: the architecture config (model.dim / ffn_dim / num_heads / num_layers ...; arch_from_folder "
            "reads it from a Wan or diffusers folder), the role (generator vs critic) and use_ema, and that the "
            "file is a Wan2.1 T2V transformer.")
    if any(t.is_meta for t in expected.values()):
        model.load_state_dict(state_dict, strict=True, assign=True)
    else:
        cast = {k: v.to(expected[k].dtype) for k, v in state_dict.items()}
        model.load_state_dict(requantise_float8(expected, cast), strict=True)
    return model


Reader = Callable[[torch.device | str, torch.dtype], StateDict]  # (device, dtype) -> the checkpoint's weights in them


def reader(path: str | Path, role: str = "generator", use_ema: bool = False) -> Reader:
    """`load_wan_state_dict` of this checkpoint, deferred until the device and dtype are known."""
    return lambda device, dtype: load_wan_state_dict(path, role, use_ema, device, dtype)


def build_wan(make: Callable[[], Model], device: torch.device | str, dtype: torch.dtype, read: Reader | None,
              seed: int) -> Model:
    """A Wan model (`make()`) built on the meta device and materialised once, in `dtype` on `device`: from the
    checkpoint `read` reads straight into them, or, when None, with the weights `make()` draws after
    `torch.manual_seed(seed)` in float32 on the CPU (its `initial_values`), so seeded models agree across
    processes, devices and dtypes. No float32 copy and no random initialisation precede a checkpoint; the RoPE
    table is computed on `device` (`init_buffers`)."""
    with torch.device("meta"):
        model = make()
    if read is not None:
        load_into(model, read(device, dtype))
    else:
        torch.manual_seed(seed)
        load_into(model, {k: v.to(device=device, dtype=dtype) for k, v in model.initial_values()})
    model.init_buffers(device)
    return model


# How a Wan model is made real: build(make, read) -> make()'s model with the weights `read` reads (seeded ones when
# None). `materialise` is the plain one; the learner passes a ZeRO-3 one (learner.engines.zero3_build).
WanBuild = Callable[[Callable[[], torch.nn.Module], Reader | None], torch.nn.Module]


def materialise(device: torch.device | str, dtype: torch.dtype, seed: int) -> WanBuild:
    """Wan models built on the meta device and materialised in `dtype` on `device` (`build_wan`)."""
    return lambda make, read: build_wan(make, device, dtype, read, seed)


# ---------------------------------------------------------------------------------------------- saving


def _cpu(state_dict: StateDict, prefix: str = "") -> StateDict:
    return {prefix + k: v.detach().cpu().contiguous() for k, v in state_dict.items()}


def save_self_forcing(path: str | Path, generator: StateDict, critic: StateDict | None = None,
                      generator_ema: StateDict | None = None) -> None:
    """Write the Self-Forcing `.pt` layout (`model.`-prefixed keys) that its and our loaders read."""
    entries = {"generator": generator, "critic": critic, "generator_ema": generator_ema}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    torch.save({name: _cpu(sd, "model.") for name, sd in entries.items() if sd is not None}, path)


def save_safetensors(path: str | Path, state_dict: StateDict) -> None:
    """Write a flat safetensors file with original Wan keys (no pickle, memory-mappable)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_file(_cpu(state_dict), str(path))


def save_wan_folder(folder: str | Path, model: torch.nn.Module) -> None:
    """Write a Wan2.1-style folder (config.json with the model's arch + weights) that reloads on its own."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = {"_class_name": "WanModel", "model_type": "t2v", **model.cfg.model_dump()}
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    save_safetensors(folder / WEIGHTS_FILE, model.state_dict())
