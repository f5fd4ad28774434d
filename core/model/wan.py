"""Wan2.1 DiT: the bidirectional `WanModel` (teacher, critic) and the causal
`CausalWanModel` (streaming generator), sharing every block.

State-dict keys are the original Wan ones (docs/reference.md), so Wan2.1,
Self-Forcing and Reward-Forcing checkpoints load without renaming. Tensors enter
as [B, C, F, H, W] latents; tokens per frame follow from H, W and the patch.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from core.config import StreamConfig, WanArchConfig
from core.model.attention import MaskMod, attention, block_causal_mask, teacher_forcing_mask
from core.model.kv_cache import BlockView, CheckpointedCache, KVCache, LayerView, StreamLimitError, WindowSlots

ROPE_POSITIONS = 1024  # length of the RoPE table per axis, as in Wan


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """Norms, RoPE, the time embedding and the modulation run in float32, or float64 when the model runs in float64."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def sinusoidal_embedding(dim: int, t: torch.Tensor) -> torch.Tensor:
    """[cos, sin] timestep embedding, computed in float64 as the reference does."""
    half = dim // 2
    pos = t.to(torch.float64).flatten()
    freqs = torch.pow(10000.0, -torch.arange(half, dtype=torch.float64, device=t.device) / half)
    angles = pos[:, None] * freqs[None, :]
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=1)


def rope_tables(head_dim: int, positions: int = ROPE_POSITIONS, theta: float = 10000.0) -> torch.Tensor:
    """cos/sin tables [positions, head_dim // 2, 2] for the (t, h, w) split of one head.

    The head's complex pairs are split t/h/w = c - 2(c//3), c//3, c//3 (c = head_dim/2),
    each axis with its own frequency ladder (Wan's rope_params per axis).
    """
    c = head_dim // 2
    angles = []
    for axis_pairs in (c - 2 * (c // 3), c // 3, c // 3):
        axis_dim = 2 * axis_pairs
        inv = 1.0 / torch.pow(theta, torch.arange(0, axis_dim, 2, dtype=torch.float64) / axis_dim)
        angles.append(torch.outer(torch.arange(positions, dtype=torch.float64), inv))
    ang = torch.cat(angles, dim=1)
    return torch.stack([torch.cos(ang), torch.sin(ang)], dim=-1)


def apply_rope(x: torch.Tensor, tables: torch.Tensor, grid: tuple[int, int, int],
               start_frame: int | torch.Tensor = 0) -> torch.Tensor:
    """Rotate x [B, f*h*w, heads, head_dim] (interleaved pairs) at frames start_frame..start_frame+f-1.

    A tensor `start_frame` (0-d, int64) is gathered rather than sliced, so the position is data and a compiled or
    captured block step serves every position; its caller checks the table bound."""
    f, h, w = grid
    if not isinstance(start_frame, torch.Tensor) and (start_frame < 0 or start_frame + f > tables.shape[0]):
        raise StreamLimitError(
            f"RoPE position {start_frame + f - 1} is past the {tables.shape[0]}-entry table: absolute RoPE "
            "cannot go further; use stream.rope=window (Reward Forcing) for unbounded length")
    c = tables.shape[1]
    ct, ch = c - 2 * (c // 3), c // 3
    tab = tables.to(device=x.device, dtype=_compute_dtype(x))
    if isinstance(start_frame, torch.Tensor):
        frames = tab.index_select(0, start_frame.to(x.device) + torch.arange(f, device=x.device))
    else:
        frames = tab[start_frame:start_frame + f]
    per_axis = (
        frames[:, :ct].view(f, 1, 1, ct, 2).expand(f, h, w, ct, 2),
        tab[:h, ct:ct + ch].view(1, h, 1, ch, 2).expand(f, h, w, ch, 2),
        tab[:w, ct + ch:].view(1, 1, w, ch, 2).expand(f, h, w, ch, 2),
    )
    cos_sin = torch.cat(per_axis, dim=3).reshape(f * h * w, 1, c, 2)
    cos, sin = cos_sin[..., 0], cos_sin[..., 1]
    pairs = x.to(cos.dtype).unflatten(-1, (c, 2))
    re, im = pairs[..., 0], pairs[..., 1]
    out = torch.stack([re * cos - im * sin, re * sin + im * cos], dim=-1).flatten(-2)
    return out.type_as(x)


class FloatLinear(nn.Linear):
    """A Linear computed in float32 (float64 in a float64 model) whatever its weights' dtype: Wan computes the time
    embedding, its projection and the head in float32 under bf16. The weights are upcast inside this module's own
    forward, where ZeRO-3 has gathered them."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = _compute_dtype(self.weight)
        bias = None if self.bias is None else self.bias.to(dtype)
        return F.linear(x.to(dtype), self.weight.to(dtype), bias)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.to(_compute_dtype(x))
        return (xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + self.eps)).type_as(x) * self.weight


class LayerNorm(nn.LayerNorm):
    """LayerNorm evaluated in float32 (float64 for float64 models), affine applied after."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.layer_norm(x.to(_compute_dtype(x)), self.normalized_shape, eps=self.eps).type_as(x)
        if self.elementwise_affine:
            y = y * self.weight + self.bias
        return y


class _Attention(nn.Module):
    """q/k/v/o projections with RMSNorm on q and k over the full dim, before the head split."""

    def __init__(self, dim: int, num_heads: int, qk_norm: bool, eps: float):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        self.norm_q = RMSNorm(dim, eps) if qk_norm else nn.Identity()
        self.norm_k = RMSNorm(dim, eps) if qk_norm else nn.Identity()

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.unflatten(-1, (self.num_heads, self.head_dim))

    def _query(self, x: torch.Tensor) -> torch.Tensor:
        return self._heads(self.norm_q(self.q(x)))

    def _key_value(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self._heads(self.norm_k(self.k(x))), self._heads(self.v(x))


class SelfAttention(_Attention):
    def __init__(self, dim: int, num_heads: int, qk_norm: bool, eps: float):
        super().__init__(dim, num_heads, qk_norm, eps)
        self.register_buffer("qkv_weight", None, persistent=False)  # set by fuse_qkv
        self.register_buffer("qkv_bias", None, persistent=False)

    def fuse_qkv(self) -> None:
        """Project q, k and v with one matmul: their parameters become views of one [3 dim, dim] buffer (the same
        state-dict keys, no extra memory). For inference, after the weights and the device are final (a later
        `.to()` would copy the parameters apart from the buffer)."""
        dim = self.q.in_features
        projections = (self.q, self.k, self.v)
        self.qkv_weight = torch.cat([p.weight.detach() for p in projections])
        self.qkv_bias = torch.cat([p.bias.detach() for p in projections])
        for i, p in enumerate(projections):
            p.weight = nn.Parameter(self.qkv_weight[i * dim:(i + 1) * dim], requires_grad=False)
            p.bias = nn.Parameter(self.qkv_bias[i * dim:(i + 1) * dim], requires_grad=False)

    def _qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self.qkv_weight is None:
            return self._query(x), *self._key_value(x)
        q, k, v = F.linear(x, self.qkv_weight, self.qkv_bias).chunk(3, dim=-1)
        return self._heads(self.norm_q(q)), self._heads(self.norm_k(k)), self._heads(v)

    def forward(self, x: torch.Tensor, grid: tuple[int, int, int], rope: torch.Tensor, backend: str,
                mask_mod: MaskMod | None = None, rope_grids: list[tuple[int, int, int]] | None = None,
                cache: LayerView | WindowSlots | None = None, start_frame: int | torch.Tensor = 0) -> torch.Tensor:
        q, k, v = self._qkv(x)
        if cache is None:
            # Full-sequence forward; `rope_grids` splits the sequence into parts that each restart at
            # frame 0 (teacher forcing: the clean and the noisy halves share positions).
            q = self._rope_parts(q, rope, rope_grids or [grid])
            k = self._rope_parts(k, rope, rope_grids or [grid])
            out = attention(q, k, v, mask_mod=mask_mod, backend=backend)
        else:
            out = self._cached(q, k, v, grid, rope, backend, cache, start_frame)
        return self.o(out.flatten(2))

    @staticmethod
    def _rope_parts(x: torch.Tensor, rope: torch.Tensor, grids: list[tuple[int, int, int]]) -> torch.Tensor:
        sizes = [math.prod(g) for g in grids]
        return torch.cat([apply_rope(p, rope, g) for p, g in zip(x.split(sizes, dim=1), grids)], dim=1)

    @staticmethod
    def _cached(q, k, v, grid, rope, backend, cache: LayerView | WindowSlots,
                start_frame: int | torch.Tensor) -> torch.Tensor:
        f, h, w = grid
        if cache.rope == "absolute":  # keys are cached already rotated at their absolute frame
            q = apply_rope(q, rope, grid, start_frame)
            k = apply_rope(k, rope, grid, start_frame)
        keys, values = cache.update(k, v, start_frame)
        if cache.rope == "window":  # pre-RoPE keys take window positions 0..n-1, queries the last slots
            n_frames = keys.shape[1] // (h * w)
            keys = apply_rope(keys, rope, (n_frames, h, w), 0)
            q = apply_rope(q, rope, grid, n_frames - f)
        return attention(q, keys, values, backend=backend)


class CrossAttention(_Attention):
    """Text cross-attention; padded context rows are attended to (the reference does not mask them)."""

    def context_kv(self, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self._key_value(context)

    def forward(self, x: torch.Tensor, context_kv: tuple[torch.Tensor, torch.Tensor], backend: str) -> torch.Tensor:
        return self.o(attention(self._query(x), *context_kv, backend=backend).flatten(2))


class WanBlock(nn.Module):
    def __init__(self, cfg: WanArchConfig):
        super().__init__()
        dim = cfg.dim
        self.norm1 = LayerNorm(dim, cfg.eps, elementwise_affine=False)
        self.self_attn = SelfAttention(dim, cfg.num_heads, cfg.qk_norm, cfg.eps)
        self.norm3 = LayerNorm(dim, cfg.eps, elementwise_affine=True) if cfg.cross_attn_norm else nn.Identity()
        self.cross_attn = CrossAttention(dim, cfg.num_heads, cfg.qk_norm, cfg.eps)
        self.norm2 = LayerNorm(dim, cfg.eps, elementwise_affine=False)
        self.ffn = nn.Sequential(nn.Linear(dim, cfg.ffn_dim), nn.GELU(approximate="tanh"), nn.Linear(cfg.ffn_dim, dim))
        self.modulation = nn.Parameter(torch.randn(1, 6, dim) / dim**0.5)

    def forward(self, x: torch.Tensor, e: torch.Tensor, context_kv: tuple[torch.Tensor, torch.Tensor],
                **attn_kwargs) -> torch.Tensor:
        """x [B, L, dim]; e [B, F, 6, dim] per-frame modulation (L = F * tokens_per_frame), float32 (float64).

        As in Wan, the modulation, the modulated norms and the gated residual adds are computed in e's dtype; their
        results return to x's dtype (a bf16 model's linears and residual stream stay bf16)."""
        frames, dtype = e.shape[1], x.dtype
        shift_msa, scale_msa, gate_msa, shift_ffn, scale_ffn, gate_ffn = (self.modulation.unsqueeze(1) + e).chunk(6, dim=2)

        def per_frame(t: torch.Tensor) -> torch.Tensor:
            return t.unflatten(1, (frames, -1))

        h = (per_frame(self.norm1(x)) * (1 + scale_msa) + shift_msa).flatten(1, 2).to(dtype)
        x = (x + (per_frame(self.self_attn(h, **attn_kwargs)) * gate_msa).flatten(1, 2)).to(dtype)
        x = x + self.cross_attn(self.norm3(x), context_kv, attn_kwargs["backend"])
        h = (per_frame(self.norm2(x)) * (1 + scale_ffn) + shift_ffn).flatten(1, 2).to(dtype)
        return (x + (per_frame(self.ffn(h)) * gate_ffn).flatten(1, 2)).to(dtype)


class Head(nn.Module):
    def __init__(self, cfg: WanArchConfig):
        super().__init__()
        self.norm = LayerNorm(cfg.dim, cfg.eps, elementwise_affine=False)
        self.head = FloatLinear(cfg.dim, math.prod(cfg.patch_size) * cfg.out_dim)
        self.modulation = nn.Parameter(torch.randn(1, 2, cfg.dim) / cfg.dim**0.5)

    def forward(self, x: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        """e [B, F, dim]: the time embedding before projection (not e0). Modulation and output layer run in e's
        dtype, as in Wan; the output returns to x's dtype."""
        frames = e.shape[1]
        shift, scale = (self.modulation.unsqueeze(1) + e.unsqueeze(2)).chunk(2, dim=2)
        return self.head((self.norm(x).unflatten(1, (frames, -1)) * (1 + scale) + shift).flatten(1, 2)).to(x.dtype)


class _WanBase(nn.Module):
    """Embeddings, blocks and head shared by the bidirectional and the causal model."""

    def __init__(self, cfg: WanArchConfig):
        super().__init__()
        self.cfg = cfg
        dim = cfg.dim
        self.patch_embedding = nn.Conv3d(cfg.in_dim, dim, kernel_size=tuple(cfg.patch_size), stride=tuple(cfg.patch_size))
        self.text_embedding = nn.Sequential(nn.Linear(cfg.text_dim, dim), nn.GELU(approximate="tanh"), nn.Linear(dim, dim))
        self.time_embedding = nn.Sequential(FloatLinear(cfg.freq_dim, dim), nn.SiLU(), FloatLinear(dim, dim))
        self.time_projection = nn.Sequential(nn.SiLU(), FloatLinear(dim, dim * 6))
        self.blocks = nn.ModuleList(WanBlock(cfg) for _ in range(cfg.num_layers))
        self.head = Head(cfg)
        self.register_buffer("rope", rope_tables(cfg.head_dim), persistent=False)
        self.gradient_checkpointing = False
        self.attention_backend = "auto"

    def init_weights(self) -> None:
        """Wan's from-scratch initialisation (every checkpoint overwrites it): Xavier-uniform linears and patch
        embedding with zero biases, N(0, 0.02) text and time embeddings, and a zero output layer, so a new
        model starts by predicting a zero flow instead of PyTorch's default-initialised noise."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        nn.init.xavier_uniform_(self.patch_embedding.weight.flatten(1))
        for m in [*self.text_embedding.modules(), *self.time_embedding.modules()]:
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.02)
        nn.init.zeros_(self.head.head.weight)

    def initial_values(self) -> Iterator[tuple[str, torch.Tensor]]:
        """The constructor's seeded default initialisation, (name, float32 CPU tensor) per parameter, drawn from the
        CPU generator in the order the constructor draws them. A model built on the meta device (or sharded by
        ZeRO-3) takes these and gets, for the same seed, the weights a plain float32 CPU construction gets, on any
        device and in any dtype, with one layer's float32 copy in memory at a time."""

        def walk(prefix: str, module: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
            for name, child in module.named_children():  # every module here registers its own parameters last
                yield from walk(f"{prefix}{name}.", child)
            own = [name for name, _ in module.named_parameters(recurse=False)]
            if not own:
                return
            if isinstance(module, nn.Linear):  # a twin of the layer draws exactly what its constructor drew
                twin = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None)
            elif isinstance(module, nn.Conv3d):
                twin = nn.Conv3d(module.in_channels, module.out_channels, module.kernel_size, module.stride,
                                 bias=module.bias is not None)
            elif isinstance(module, (nn.LayerNorm, RMSNorm)):
                size = self.cfg.dim
                twin = nn.ParameterDict({k: torch.ones(size) if k == "weight" else torch.zeros(size) for k in own})
            elif own == ["modulation"]:  # WanBlock and Head: randn / sqrt(dim)
                twin = nn.ParameterDict({"modulation": torch.randn(1, 6 if isinstance(module, WanBlock) else 2,
                                                                   self.cfg.dim) / self.cfg.dim**0.5})
            else:
                raise TypeError(f"no seeded initialisation for the parameters {own} of {type(module).__name__}")
            for name in own:
                yield prefix + name, getattr(twin, name).detach()

        yield from walk("", self)

    def init_buffers(self, device: torch.device | str) -> None:
        """Recompute the non-persistent RoPE table (float64) on `device`: a model built on the meta device or under
        ZeRO-3's Init (which casts every floating tensor it sees) has none it can use."""
        self.rope = rope_tables(self.cfg.head_dim).to(device)

    def _apply(self, fn, recurse=True):
        # Model dtype casts (model.to(bfloat16)) must not round the float64 RoPE table.
        rope = self.rope
        out = super()._apply(fn, recurse)
        self.rope = rope.to(device=self.rope.device, dtype=torch.float64)
        return out

    def embed_context(self, context: torch.Tensor | list[torch.Tensor]) -> torch.Tensor:
        """Zero-pad each prompt embedding to text_len (padding is not masked) and embed: [B, text_len, dim]."""
        text_len = self.cfg.text_len
        if isinstance(context, torch.Tensor) and context.dim() == 3:
            context = list(context)
        rows = []
        for c in context:
            if c.shape[0] > text_len or c.shape[-1] != self.cfg.text_dim:
                raise ValueError(f"context of shape {tuple(c.shape)} does not fit "
                                 f"[<= text_len {text_len}, text_dim {self.cfg.text_dim}]")
            rows.append(F.pad(c, (0, 0, 0, text_len - c.shape[0])))
        return self.text_embedding(torch.stack(rows))

    def _embed(self, x: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int, int], torch.Tensor, torch.Tensor]:
        """Patchify x [B, C, F, H, W]; time embeddings for t [B] or [B, F] -> (tokens, grid, e [B,F,dim], e0 [B,F,6,dim]).

        e and e0 are float32 (float64 in a float64 model) whatever the weights' dtype, as Wan computes them."""
        if x.dim() != 5 or x.shape[1] != self.cfg.in_dim:
            raise ValueError(f"expected latents [B, {self.cfg.in_dim}, F, H, W], got {tuple(x.shape)}")
        pt, ph, pw = self.cfg.patch_size
        if x.shape[2] % pt or x.shape[3] % ph or x.shape[4] % pw:
            raise ValueError(f"latent grid {tuple(x.shape[2:])} is not divisible by the patch {tuple(self.cfg.patch_size)}")
        tokens = self.patch_embedding(x)
        grid = tuple(tokens.shape[2:])
        tokens = tokens.flatten(2).transpose(1, 2)
        b, f = x.shape[0], grid[0]
        t = t.reshape(b, -1)
        if t.shape[1] == 1:
            t = t.expand(b, f)
        if t.shape[1] != f:
            raise ValueError(f"timestep of shape {tuple(t.shape)} matches neither [B] nor [B, F={f}]")
        e = self.time_embedding(sinusoidal_embedding(self.cfg.freq_dim, t))
        e0 = self.time_projection(e).unflatten(1, (6, self.cfg.dim))
        return tokens, grid, e.unflatten(0, (b, f)), e0.unflatten(0, (b, f))

    def _run_blocks(self, x, e0, context, blocks: Sequence[nn.Module] | None = None, **attn_kwargs) -> torch.Tensor:
        """The transformer blocks over tokens x; `blocks` replaces them with compiled ones (the stream's fast path)."""
        cache = attn_kwargs.pop("cache", None)
        checkpointed = self.gradient_checkpointing and torch.is_grad_enabled()
        layers = cache
        if checkpointed and cache is not None:
            # The backward recomputes each block after the cache has moved on: it must read the window
            # the forward read and write nothing (kv_cache.CheckpointedCache).
            layers = CheckpointedCache(cache)
        for i, block in enumerate(blocks or self.blocks):
            ctx_kv = self._context_kv(i, block, context, cache)
            if layers is not None:
                attn_kwargs["cache"] = layers.layer(i)
            if checkpointed:
                x = checkpoint(block, x, e0, ctx_kv, use_reentrant=False, **attn_kwargs)
            else:
                x = block(x, e0, ctx_kv, **attn_kwargs)
        return x

    @staticmethod
    def _context_kv(layer: int, block: WanBlock, context: torch.Tensor, cache: KVCache | BlockView | None):
        # Without grad the text K/V are computed once per prompt and reused by every later call.
        # With grad they are recomputed, so a cache never holds tensors tied to one backward pass
        # and every grad-enabled call gets the text-side gradient.
        if cache is None or torch.is_grad_enabled():
            return block.cross_attn.context_kv(context)
        if cache.cross_kv[layer] is None:
            cache.cross_kv[layer] = block.cross_attn.context_kv(context)
        return cache.cross_kv[layer]

    def _unpatchify(self, x: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
        f, h, w = grid
        pt, ph, pw = self.cfg.patch_size
        c = self.cfg.out_dim
        x = x.reshape(x.shape[0], f, h, w, pt, ph, pw, c)
        x = torch.einsum("bfhwpqrc->bcfphqwr", x)
        return x.reshape(x.shape[0], c, f * pt, h * ph, w * pw)


class WanModel(_WanBase):
    """Bidirectional Wan2.1 (teacher / real score and critic / fake score)."""

    def forward(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor | list[torch.Tensor]) -> torch.Tensor:
        """x [B, C, F, H, W], t [B] (or [B, F]), context [B, <=text_len, text_dim] -> flow [B, C, F, H, W]."""
        tokens, grid, e, e0 = self._embed(x, t)
        ctx = self.embed_context(context)
        tokens = self._run_blocks(tokens, e0, ctx, grid=grid, rope=self.rope, backend=self.attention_backend)
        return self._unpatchify(self.head(tokens, e), grid)


class CausalWanModel(_WanBase):
    """Block-causal Wan2.1 generator: KV-cached streaming inference and masked training forwards."""

    def __init__(self, cfg: WanArchConfig, stream: StreamConfig | None = None):
        super().__init__(cfg)
        self.stream = stream or StreamConfig()

    def init_cache(self, batch: int, latent_hw: tuple[int, int], device: torch.device | None = None,
                   dtype: torch.dtype | None = None) -> KVCache:
        """An empty KV cache for one stream of `batch` videos at this latent size."""
        p = self.patch_embedding.weight
        _, ph, pw = self.cfg.patch_size
        return KVCache(self.stream, self.cfg.num_layers, batch, (latent_hw[0] // ph) * (latent_hw[1] // pw),
                       self.cfg.num_heads, self.cfg.head_dim, dtype or p.dtype, device or p.device)

    def prompt_kv(self, context: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Every layer's cross-attention K/V of one prompt embedding: what a stream's cache keeps per prompt."""
        ctx = self.embed_context(context)
        return [block.cross_attn.context_kv(ctx) for block in self.blocks]

    def forward(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor | list[torch.Tensor] | None, *,
                cache: KVCache | BlockView | None = None, start_frame: int | torch.Tensor = 0,
                clean_x: torch.Tensor | None = None, blocks: Sequence[nn.Module] | None = None) -> torch.Tensor:
        """Flow prediction for x [B, C, F, H, W] at per-frame timesteps t [B, F].

        With `cache`: x is the block starting at latent frame `start_frame`; the cache is read and
        written (only the first call of a new block advances it; later calls overwrite the same slots).
        Without: one block-causal forward over all F frames, or, with `clean_x`, a teacher-forcing
        forward where each noisy block sees the clean blocks before it.
        """
        tokens, grid, e, e0 = self._embed(x, t)
        if cache is not None and clean_x is not None:
            raise ValueError("clean_x (teacher forcing) is a full-sequence forward; do not pass a cache with it")
        if cache is not None and cache.cross_kv[0] is not None and not torch.is_grad_enabled():
            ctx = None  # cross-attention K/V already cached for this prompt
        else:
            ctx = self.embed_context(context)
        tpb = self.stream.num_frame_per_block * grid[1] * grid[2]
        kwargs = dict(grid=grid, rope=self.rope, backend=self.attention_backend, blocks=blocks)
        if cache is not None:
            kwargs.update(cache=cache, start_frame=start_frame)
        elif clean_x is None:
            kwargs.update(mask_mod=block_causal_mask(tpb))
        else:
            clean_tokens, clean_grid, _, clean_e0 = self._embed(clean_x, torch.zeros_like(t))
            if clean_grid != grid:
                raise ValueError(f"clean_x grid {clean_grid} differs from x grid {grid}")
            n = tokens.shape[1]
            tokens = torch.cat([clean_tokens, tokens], dim=1)
            e0 = torch.cat([clean_e0, e0], dim=1)
            kwargs.update(mask_mod=teacher_forcing_mask(n, tpb), rope_grids=[grid, grid])
        tokens = self._run_blocks(tokens, e0, ctx, **kwargs)
        if clean_x is not None:
            tokens = tokens[:, tokens.shape[1] // 2:]
        return self._unpatchify(self.head(tokens, e), grid)
