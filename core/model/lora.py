"""Runtime LoRA adapters for the Wan DiT (`WanModel`, `CausalWanModel`).

An adapter is a set of low-rank updates `W += scale * B @ A` on the model's `nn.Linear` layers,
keyed by their original Wan names (`blocks.0.self_attn.q`, `blocks.3.ffn.0`, ...; docs/reference.md
sections 1 and 6). Two on-disk formats are read, from local paths only:

* PEFT: a folder with `adapter_config.json` (`r`, `lora_alpha`, optional `use_rslora`) and
  `adapter_model.safetensors` (or `adapter_model.bin`); scale = lora_alpha / r, or
  lora_alpha / sqrt(r) with rsLoRA, exactly as PEFT computes it.
* LongLive-style `lora.pt` (or a bare `.safetensors` of LoRA tensors): `{"generator_lora": sd}` or
  the state dict itself. Such a file carries no config, so the rank is read from the tensor shapes
  and alpha comes from the caller: `alpha=None` means alpha = rank, i.e. scale 1. LongLive's
  released `lora.pt` was trained with rank 256 and alpha 256 (every Linear of every attention
  block), so the default reproduces it; pass `alpha=` for adapters trained with another alpha.

Keys may carry the wrappers training adds (`base_model.model.`, `model.`, `module.`, FSDP /
activation-checkpointing / torch.compile fragments, PEFT's `.default` adapter name) and diffusers
module names (`attn1.to_q`, `ffn.net.0.proj`, ...); all of them are normalised to Wan names.

Two ways to use an adapter:

* `merge` folds it into the weights (no per-step cost) and returns a `MergedLora` record that
  `unmerge` uses to put back the bit-exact original weights (a copy is kept, nothing is subtracted,
  so repeated merge/unmerge cycles never drift).
* `applied` is a context manager that leaves the weights alone and adds the low-rank path with
  forward hooks, for per-session adapters on a model shared by several sessions.

Every operation validates the whole adapter against the model first and raises `LoraError`
before touching anything, so a bad adapter never leaves a half-modified model behind.
"""

from __future__ import annotations

import contextlib
import json
import math
import re
import weakref
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file

from core.records.checkpoint import WRAPPER_FRAGMENTS, wan_key_from_diffusers

PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
LONGLIVE_ENTRY = "generator_lora"
LAYOUTS = (
    f"expected a PEFT folder ({PEFT_CONFIG} + {' or '.join(PEFT_WEIGHTS)}), or a .pt/.pth/.bin/.safetensors "
    f"file holding {{'{LONGLIVE_ENTRY}': state_dict}} or the LoRA state dict itself (LongLive lora.pt), "
    "with keys '<module>.lora_A.weight' / '<module>.lora_B.weight'")
# Leading prefixes, longest first: PEFT's wrapper, then the training wrappers' attribute names
# (Self-Forcing / LongLive `model.`, DDP `module.`, diffusers pipelines `transformer.`, ComfyUI
# `diffusion_model.`). No Wan key starts with any of them.
_PREFIXES = ("base_model.model.", "model.", "module.", "transformer.", "diffusion_model.")
LORA_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<part>[AB])(?:\.(?P<name>[^.]+))?\.weight$")
_MAX_LISTED = 10

Pair = tuple[torch.Tensor, torch.Tensor]


class LoraError(ValueError):
    """An adapter that cannot be read or does not fit the model; the message names the offenders."""


def _preview(items: list[str]) -> str:
    shown = "; ".join(items[:_MAX_LISTED])
    return shown + (f"; ... and {len(items) - _MAX_LISTED} more" if len(items) > _MAX_LISTED else "")


def wan_module_name(name: str) -> str:
    """A module name as `core.model.wan` spells it, whatever wrappers the trainer had around it."""
    for fragment in WRAPPER_FRAGMENTS:
        name = name.replace(fragment, "")
    stripped = True
    while stripped:
        stripped = False
        for prefix in _PREFIXES:
            if name.startswith(prefix):
                name, stripped = name[len(prefix):], True
    if name.startswith("blocks.") and name.count(".") < 2:
        return name  # not a block submodule; `wan_key_from_diffusers` expects `blocks.N.<rest>`
    return wan_key_from_diffusers(name + ".weight")[: -len(".weight")]  # diffusers names; Wan names pass through


# ---------------------------------------------------------------------------------------------- adapter


@dataclass(eq=False)
class LoraAdapter:
    """Low-rank updates for a Wan DiT: `layers[name] = (A [r, in], B [out, r])`, delta W = scale * B @ A.

    `name` is the original Wan module name (`blocks.0.self_attn.q`); `source` says where the
    adapter came from, for error messages and logs. Tensors keep their stored dtype and device;
    `merge` / `applied` move and cast them as they need.
    """

    layers: dict[str, Pair]
    scale: float
    source: str = "<memory>"

    def __post_init__(self) -> None:
        if not self.layers:
            raise LoraError(f"{self.source}: the adapter holds no LoRA layers")
        if not math.isfinite(self.scale):
            raise LoraError(f"{self.source}: scale must be finite, got {self.scale}")
        bad = []
        for name, (a, b) in self.layers.items():
            if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
                bad.append(f"{name}: A {tuple(a.shape)}, B {tuple(b.shape)}")
        if bad:
            raise LoraError(f"{self.source}: LoRA pairs must be A [r, in] and B [out, r] with the same r "
                            f"(only Linear layers are supported); got {_preview(bad)}")

    @property
    def rank(self) -> int:
        """The largest rank over the layers (PEFT adapters and LongLive's lora.pt use one rank throughout)."""
        return max(a.shape[0] for a, _ in self.layers.values())

    # ------------------------------------------------------------------------------------------ loading

    @classmethod
    def load(cls, path: str | Path, alpha: float | None = None) -> LoraAdapter:
        """Read a PEFT folder or a LongLive-style `lora.pt`, detected from what `path` holds.

        `alpha` overrides the PEFT config's `lora_alpha`; for config-less files it is the only
        source of alpha, and None means alpha = rank (scale 1, LongLive's rank 256 / alpha 256).
        """
        path = Path(path)
        if not path.exists():
            raise LoraError(f"LoRA adapter {path} does not exist; {LAYOUTS}")
        if path.is_dir():
            return cls._load_peft(path, alpha)
        return cls.from_state_dict(_select_entry(_read(path), path), alpha=alpha, source=str(path))

    @classmethod
    def from_state_dict(cls, state_dict: Mapping[str, torch.Tensor], alpha: float | None = None,
                        source: str = "<memory>", rslora: bool = False) -> LoraAdapter:
        """Build an adapter from PEFT-style `...lora_A.weight` / `...lora_B.weight` tensors.

        Without a config the rank comes from the shapes; scale = alpha / r (alpha / sqrt(r) with
        `rslora`), and `alpha=None` means alpha = r, i.e. scale 1. A given alpha needs one rank
        across layers, since a single scale could not be right for all of them otherwise.
        """
        layers = lora_pairs(state_dict, source)
        ranks = sorted({a.shape[0] for a, _ in layers.values() if a.dim() == 2})
        if alpha is None:
            scale = 1.0
        elif len(ranks) != 1:
            raise LoraError(f"{source}: layers have different ranks {ranks}, so alpha={alpha} gives no single "
                            "scale; pass alpha=None (scale 1) or split the adapter")
        else:
            scale = lora_scale(float(alpha), ranks[0], rslora)
        return cls(layers, scale, source)

    @classmethod
    def _load_peft(cls, folder: Path, alpha: float | None) -> LoraAdapter:
        config_path = folder / PEFT_CONFIG
        weights = next((folder / w for w in PEFT_WEIGHTS if (folder / w).is_file()), None)
        if not config_path.is_file() or weights is None:
            found = sorted(p.name for p in folder.iterdir())
            raise LoraError(f"folder {folder} is not a PEFT adapter: it needs {PEFT_CONFIG} and one of "
                            f"{', '.join(PEFT_WEIGHTS)}, and holds {_preview(found) or 'nothing'}")
        try:
            config = json.loads(config_path.read_text())
            r, lora_alpha = int(config["r"]), float(config["lora_alpha"])
        except (KeyError, TypeError, ValueError) as e:  # ValueError covers bad JSON
            raise LoraError(f"{config_path} is not a valid PEFT LoRA config (needs numeric 'r' and "
                            f"'lora_alpha'): {e!r}") from e
        unsupported = [
            f"{key}={config[key]!r}" for key, ok in (
                ("peft_type", lambda v: str(v).upper() == "LORA"), ("use_dora", lambda v: not v),
                ("fan_in_fan_out", lambda v: not v), ("lora_bias", lambda v: not v),
                ("use_qalora", lambda v: not v), ("rank_pattern", lambda v: not v),
                ("alpha_pattern", lambda v: not v))
            if key in config and not ok(config[key])]
        if unsupported:
            raise LoraError(f"{config_path}: unsupported PEFT options {', '.join(unsupported)}; only plain LoRA "
                            "with one rank and alpha for every layer is supported")
        adapter = cls.from_state_dict(_read(weights), alpha=lora_alpha if alpha is None else alpha,
                                      source=str(folder), rslora=bool(config.get("use_rslora", False)))
        if adapter.rank != r or any(a.shape[0] != r for a, _ in adapter.layers.values()):
            raise LoraError(f"{folder}: {PEFT_CONFIG} says r={r} but the tensors have rank(s) "
                            f"{sorted({a.shape[0] for a, _ in adapter.layers.values()})}")
        return adapter

    # ------------------------------------------------------------------------------------------ validation

    def check(self, model: nn.Module) -> dict[str, nn.Linear]:
        """Match every layer to a Linear of `model` with the right shape, or raise naming the offenders.

        Returns {module name: Linear}. Called by `merge` and `applied` before they change anything.
        """
        linears = _linears(model)
        missing = [name for name in self.layers if name not in linears]
        if missing:
            examples = ", ".join(sorted(linears)[:4])
            raise LoraError(f"{self.source}: {len(missing)} adapter module(s) match no Linear layer of the "
                            f"{type(model).__name__}: {_preview(sorted(missing))} (model Linears are named like "
                            f"{examples}, ...); is the adapter for another model or depth?")
        wrong = []
        for name, (a, b) in self.layers.items():
            lin = linears[name]
            if a.shape[1] != lin.in_features or b.shape[0] != lin.out_features:
                wrong.append(f"{name}: model in={lin.in_features} out={lin.out_features}, adapter "
                             f"A {tuple(a.shape)} B {tuple(b.shape)}")
        if wrong:
            raise LoraError(f"{self.source}: {len(wrong)} adapter layer(s) do not fit the model's shapes "
                            f"(was it trained for another model size?): {_preview(wrong)}")
        return {name: linears[name] for name in self.layers}


def _read(path: Path) -> object:
    try:
        if path.suffix == ".safetensors":
            return load_file(str(path), device="cpu")
        if path.suffix in (".pt", ".pth", ".bin"):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch/safetensors raise many types for a truncated or foreign file
        raise LoraError(f"cannot read {path} ({type(e).__name__}: {e}); is it a complete, tensor-only "
                        f"file? {LAYOUTS}") from e
    raise LoraError(f"{path} has an unknown suffix {path.suffix!r}; {LAYOUTS}")


def _select_entry(obj: object, path: Path) -> Mapping[str, torch.Tensor]:
    """The LoRA state dict of a LongLive-style file: its `generator_lora` entry, or the file itself."""
    if isinstance(obj, dict) and isinstance(obj.get(LONGLIVE_ENTRY), dict):
        return obj[LONGLIVE_ENTRY]
    if isinstance(obj, dict) and any(isinstance(k, str) and ".lora_" in k for k in obj):
        return obj
    if isinstance(obj, dict):
        found = _preview(sorted(map(str, obj))) or "nothing"
        raise LoraError(f"unrecognised layout in {path}: top-level keys {found}; {LAYOUTS}")
    raise LoraError(f"{path} holds a {type(obj).__name__}, not a dict; {LAYOUTS}")


def is_lora_key(key: str) -> bool:
    """Whether a state-dict key belongs to a LoRA adapter (A / B weights, or a variant this module refuses)."""
    return ".lora_" in key


def lora_pairs(state_dict: Mapping[str, torch.Tensor], source: str,
               module_name: Callable[[str], str | None] = wan_module_name) -> dict[str, Pair]:
    """Group `<module>.lora_A/B[.<adapter>].weight` tensors into (A, B) pairs by module name.

    `module_name` maps a stored module name to the model's (None: a module the model does not use, dropped).
    Anything else (DoRA, LoRA biases, embedding LoRA), two adapters in one file, or a half pair is an error."""
    parts: dict[str, dict[str, torch.Tensor]] = {}
    foreign, names = [], set()
    for key, value in state_dict.items():
        match = LORA_KEY.match(key) if isinstance(key, str) else None
        if match is None or not isinstance(value, torch.Tensor):
            foreign.append(str(key))
            continue
        names.add(match["name"] or "default")
        module = module_name(match["module"])
        if module is None:
            continue
        slot = parts.setdefault(module, {})
        if match["part"] in slot:
            raise LoraError(f"{source}: two {match['part']} tensors for module {module} once prefixes are "
                            "stripped; the file mixes several adapters or models")
        slot[match["part"]] = value
    if foreign:
        raise LoraError(f"{source}: {len(foreign)} key(s) are not LoRA A/B weights (DoRA, LoRA biases, embedding "
                        f"LoRA and modules_to_save are not supported): {_preview(sorted(foreign))}; {LAYOUTS}")
    if len(names) > 1:
        raise LoraError(f"{source}: the state dict holds several PEFT adapters {sorted(names)}; save one")
    unpaired = sorted(f"{m} (only {next(iter(p))})" for m, p in parts.items() if len(p) != 2)
    if unpaired:
        raise LoraError(f"{source}: {len(unpaired)} module(s) lack their A or B tensor: {_preview(unpaired)}")
    if not parts:
        raise LoraError(f"{source}: no LoRA tensors found; {LAYOUTS}")
    return {m: (p["A"], p["B"]) for m, p in sorted(parts.items())}


def lora_scale(alpha: float, rank: int, rslora: bool = False) -> float:
    """PEFT's scale of the low-rank update: alpha / r, or alpha / sqrt(r) with rsLoRA."""
    return alpha / (math.sqrt(rank) if rslora else rank)


def folded(weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor, factor: float,
           dtype: torch.dtype | None = None) -> torch.Tensor:
    """W + factor * B @ A, summed in float32 (float64 for a float64 weight), in `dtype` (default: W's)."""
    acc = _float(weight)
    delta = (b.to(weight.device, acc) @ a.to(weight.device, acc)).mul_(factor)
    return (weight.to(acc) + delta).to(dtype or weight.dtype)


def _linears(model: nn.Module) -> dict[str, nn.Linear]:
    """The model's Linear layers by Wan name (wrappers such as torch.compile's `_orig_mod.` removed)."""
    return {wan_module_name(name): m for name, m in model.named_modules() if isinstance(m, nn.Linear)}


def _check_weight(weight: float) -> float:
    weight = float(weight)
    if not math.isfinite(weight):
        raise LoraError(f"LoRA weight must be finite, got {weight}")
    return weight


# ---------------------------------------------------------------------------------------------- merge


@dataclass(eq=False)
class MergedLora:
    """What `merge` changed: the untouched original weights, to restore them bit-exactly.

    `versions` holds each weight's in-place version counter right after the merge (`versions_before`:
    right before); `unmerge` refuses to run when a weight was modified since (a later merge still in
    place, an optimizer step, a weight broadcast), because restoring the copy would silently undo
    that change too.
    """

    source: str
    weight: float
    scale: float
    originals: dict[str, torch.Tensor]
    versions: dict[str, int] = field(repr=False)
    versions_before: dict[str, int] = field(repr=False)
    active: bool = True


# The merges in place on each model, oldest first; weak, so records never keep a model alive.
_MERGED: weakref.WeakKeyDictionary[nn.Module, list[MergedLora]] = weakref.WeakKeyDictionary()


def _float(w: torch.Tensor) -> torch.dtype:
    """The dtype low-rank products are summed in: float32, or float64 for a float64 model."""
    return torch.float64 if w.dtype == torch.float64 else torch.float32


@torch.no_grad()
def merge(model: nn.Module, adapter: LoraAdapter, weight: float = 1.0,
          backup_device: torch.device | str | None = "cpu") -> MergedLora:
    """Fold `adapter` into `model`: W += weight * scale * B @ A, summed in float32, cast back to W's dtype.

    The touched original weights are copied to `backup_device` first (CPU by default, so the copy
    does not take accelerator memory from KV caches; None keeps them on the weights' device), and
    the returned record is what `unmerge` needs. Validation happens before any weight changes; if
    the update itself fails midway (e.g. out of memory), the weights already changed are restored.
    Merges stack (undo them in reverse order).
    """
    weight = _check_weight(weight)
    targets = adapter.check(model)
    factor = weight * adapter.scale
    before = {name: lin.weight._version for name, lin in targets.items()}
    originals = {name: lin.weight.detach().to(backup_device, copy=True) if backup_device is not None
                 else lin.weight.detach().clone() for name, lin in targets.items()}
    done = []
    try:
        for name, lin in targets.items():
            a, b = adapter.layers[name]
            lin.weight.copy_(folded(lin.weight, a, b, factor))
            done.append(name)
    except BaseException:
        for name in done:
            targets[name].weight.copy_(originals[name])
        raise
    record = MergedLora(adapter.source, weight, adapter.scale, originals,
                        {name: lin.weight._version for name, lin in targets.items()}, before)
    _MERGED.setdefault(model, []).append(record)
    return record


@torch.no_grad()
def unmerge(model: nn.Module, merged: MergedLora) -> None:
    """Undo `merge` by copying back the original weights it saved (bit-exact, no subtraction).

    Raises `LoraError` without changing anything if the record was already undone, belongs to
    another model, or one of its weights changed since the merge (e.g. a later merge touching the
    same layers is still in place: undo that one first).
    """
    stack = _MERGED.get(model, [])
    if not any(r is merged for r in stack):
        where = "was already undone" if not merged.active else "was made on another model object"
        raise LoraError(f"the merge of {merged.source} {where}")
    linears = _linears(model)
    problems = [f"{name}: {'no longer a Linear of the model' if name not in linears else 'modified after the merge'}"
                for name in merged.originals
                if name not in linears or linears[name].weight._version != merged.versions[name]]
    if problems:
        raise LoraError(f"cannot unmerge {merged.source}: {_preview(problems)}; undo later merges first, or "
                        "reload the base weights instead")
    for name, original in merged.originals.items():
        linears[name].weight.copy_(original)
    stack[:] = [r for r in stack if r is not merged]
    # The copy-back bumped the version counters; earlier merges whose weights this one found
    # untouched now see them in exactly their post-merge state again.
    for earlier in stack:
        for name in earlier.versions.keys() & merged.originals.keys():
            if earlier.versions[name] == merged.versions_before[name]:
                earlier.versions[name] = linears[name].weight._version
    merged.active = False


# ---------------------------------------------------------------------------------------------- hooks


@contextlib.contextmanager
def applied(model: nn.Module, adapter: LoraAdapter, weight: float = 1.0) -> Iterator[None]:
    """Run `model` with `adapter` added on the fly, leaving its weights untouched; undone on exit.

    Forward hooks on the target Linears add weight * scale * (x @ A^T) @ B^T to their outputs, so
    one shared model can serve sessions with different adapters (or none) without merging. The hooks
    live on the shared modules: every forward inside the `with` sees the adapter, so sessions that
    share a model must take turns (no concurrent forwards from another thread). Contexts nest, the
    adapters adding up. The low-rank path runs in the model's dtype, like PEFT's.
    """
    weight = _check_weight(weight)
    targets = adapter.check(model)
    factor = weight * adapter.scale
    handles = []
    try:
        for name, lin in targets.items():
            a, b = adapter.layers[name]
            w = lin.weight
            a_w = a.detach().to(w.device, w.dtype)
            b_w = (b.detach().to(w.device, _float(w)) * factor).to(w.dtype)
            handles.append(lin.register_forward_hook(_lora_hook(a_w, b_w)))
        yield
    finally:
        for handle in handles:
            handle.remove()


def _lora_hook(a: torch.Tensor, b: torch.Tensor):
    def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> torch.Tensor:
        return output + F.linear(F.linear(inputs[0].to(a.dtype), a), b).to(output.dtype)
    return hook
