"""Pure functions of the mllama forward: norms, RoPE, attention and its masks (reference §5).

Modules hold weights and call these; everything here is a function of its tensor arguments.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F  # noqa: N812

from guardrt.kernels import fused
from guardrt.runtime.model.attention_plan import DEFAULT_PLAN, AttentionPlan, planned_attention
from guardrt.runtime.model.config import RopeConfig


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x·rsqrt(mean(x²) + eps) computed in fp32, cast back, then scaled (as HF and Meta); one
    fused kernel on a GPU (`guardrt/kernels/fused.py`, which holds the reference)."""
    return fused.rms_norm(x, weight, eps)


def add_rms_norm(
    x: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """A residual add and the RMSNorm after it: (x + delta, rms_norm(x + delta)), or (x,
    rms_norm(x)) when delta is None; one fused kernel on a GPU (`guardrt/kernels/fused.py`)."""
    return fused.add_rms_norm(x, delta, weight, eps)


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """SwiGLU's silu(gate) · up; one fused kernel on a GPU (`guardrt/kernels/fused.py`)."""
    return fused.silu_mul(gate, up)


def rope_inv_freq(rope: RopeConfig, head_dim: int) -> torch.Tensor:
    """(head_dim/2,) fp32 inverse frequencies, llama3-scaled when configured.

    Bitwise equal to HF's `_compute_llama3_parameters` and Meta's `apply_scaling`.
    """
    inv_freq = 1.0 / (
        rope.theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim)
    )
    if not rope.llama3:
        return inv_freq
    low_wavelen = rope.original_max_position / rope.low_freq_factor
    high_wavelen = rope.original_max_position / rope.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / rope.factor, inv_freq)
    smooth = (rope.original_max_position / wavelen - rope.low_freq_factor) / (
        rope.high_freq_factor - rope.low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled)


def rope_cos_sin(
    inv_freq: torch.Tensor, positions: torch.Tensor, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin (B, S, head_dim) for integer positions (B, S): angles in fp32, then cast."""
    freqs = positions.float()[..., None] * inv_freq.to(positions.device)  # (B, S, D/2)
    angles = torch.cat((freqs, freqs), dim=-1)  # (B, S, D)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def rope_heads(
    heads: torch.Tensor, rotated: int, cos: torch.Tensor, sin: torch.Tensor
) -> torch.Tensor:
    """RoPE on the first `rotated` of heads (B, N, S, D) (q and k), the rest (v) kept: one
    fused kernel on a GPU, writing in place (`guardrt/kernels/fused.py`). Use the result."""
    return fused.rope_heads(heads, rotated, cos, sin)


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None
) -> torch.Tensor:
    """SDPA with grouped kv heads: q (B, H, S, D), k/v (B, Hkv, L, D), boolean mask (B, 1 or H,
    S or 1, L) where True = may attend. Returns (B, H, S, D). Every row must allow a key.
    Grouped, it is `attention_rows` with the mask made additive (the decoder's layers share
    one `attention_bias` a step and call that); ungrouped (the vision tower), plain SDPA."""
    b, heads, s, d = q.shape
    if heads == k.shape[1]:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    bias = None if mask is None else attention_bias(mask, heads, k.shape[1], q.dtype)
    return attention_rows(q, k, v, bias).view(b, s, heads, d).transpose(1, 2)


# SDPA's memory-efficient CUDA kernel wants every stride of a bias but the last to be a
# multiple of 8 elements (`mem_eff_alignment` in `preprocess_mask`, ATen's attention.cpp, as
# read; 16 is a multiple of it); other biases it pads and slices on every call: one copy per
# layer per step. The cross layers' bias has 6,404 image keys (6,404 % 8 = 4), so every image
# step paid it, graphs included.
BIAS_ALIGN = 16


def attention_bias(
    mask: torch.Tensor, heads: int, kv_heads: int, dtype: torch.dtype, align: int | None = None
) -> torch.Tensor:
    """What `attention_rows` takes for a boolean mask (B, 1 or H, S or 1, L), True = may attend:
    0 there and -inf elsewhere, in the queries' dtype (the values SDPA would make of the mask),
    its rows folded as grouped query heads are (B, 1 or Hkv, g·S or 1, L). Built once per step
    and read by every layer: SDPA converts a boolean mask again in every call (a `where` and
    two scalar tensors, three kernels on a GPU), and a per-query mask would be folded (copied)
    in every call too. Its rows start `align` elements apart (default: `BIAS_ALIGN` on a GPU,
    1 elsewhere and while tracing, so exported graphs get no slice): a view of the first L
    columns of a wider tensor, whose extra columns no kernel reads."""
    if heads != kv_heads:
        mask = _fold_mask(mask, mask.shape[0], kv_heads, heads // kv_heads, mask.shape[2])
    if align is None:
        align = BIAS_ALIGN if mask.is_cuda and not torch.compiler.is_compiling() else 1
    keys = mask.shape[-1]
    width = -(-keys // align) * align
    padded = torch.zeros((*mask.shape[:-1], width), dtype=dtype, device=mask.device)
    bias = padded[..., :keys]  # (B, 1 or Hkv, g·S or 1, L), rows `width` apart
    return bias.masked_fill_(~mask, float("-inf"))


def attention_rows(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """SDPA of q (B, H, S, D) over k/v (B, Hkv, L, D) with the mask as `attention_bias` made
    it, laid out for the output projection: (B, S, H·D), head h at columns h·D….

    Grouped heads are folded into the queries instead of repeating K/V: head h reads kv head
    h // g (g = H / Hkv, as `repeat_interleave` would pair them), so the g query heads of a kv
    head become g·S query rows of one head. Same math per query row, and no (B, H, L, D) copy of
    the keys: for a cross layer that copy is 6,404 keys × 32 heads per step. The output
    (B, Hkv, g·S, D) then reaches (B, S, H·D) in one permuting copy at most, where a transpose
    of (B, H, S, D) would add a second for a step of several tokens."""
    b, heads, s, d = q.shape
    kv_heads = k.shape[1]
    group = heads // kv_heads
    rows = q.reshape(b, kv_heads, group * s, d)  # (B, Hkv, g·S, D), head-major within a group
    out = F.scaled_dot_product_attention(rows, k, v, attn_mask=bias)  # (B, Hkv, g·S, D)
    unfolded = out.view(b, kv_heads, group, s, d).permute(0, 3, 1, 2, 4)  # (B, S, Hkv, g, D)
    return unfolded.reshape(b, s, heads * d)  # head h = hkv·g + j


def _fold_mask(
    mask: torch.Tensor, batch: int, kv_heads: int, group: int, queries: int
) -> torch.Tensor:
    """A mask broadcastable to (B, H, S, L) as (B', 1 or Hkv, g·S, L) for folded queries."""
    keys = mask.shape[-1]
    if mask.dim() == 4 and mask.shape[1] == 1 and mask.shape[2] == 1:
        return mask  # the same for every head and query: it broadcasts over the folded rows
    if mask.dim() == 4 and mask.shape[1] == 1:  # the same for every head: repeat only g times
        rows = mask.expand(mask.shape[0], 1, queries, keys)[:, :, None]  # (B', 1, 1, S, L)
        return rows.expand(-1, -1, group, -1, -1).reshape(mask.shape[0], 1, group * queries, keys)
    full = mask.expand(batch, kv_heads * group, queries, keys)  # (B, H, S, L)
    return full.reshape(batch, kv_heads, group * queries, keys)


def causal_cache_mask(positions: torch.Tensor, cache_len: int) -> torch.Tensor:
    """(B, 1, S, cache_len) bool: query at position p sees cache slots 0..p.

    Slots past a row's own tokens may hold another step's leftovers; position order hides them.
    """
    slots = torch.arange(cache_len, device=positions.device)
    return (slots[None, None, :] <= positions[:, :, None])[:, None]  # (B, 1, S, L)


def past_and_step_mask(positions: torch.Tensor, past_len: int) -> torch.Tensor:
    """(B, 1, S, past_len + S) bool over keys [past K/V, this step's K/V] (the exported decoder).

    Past slot j holds position j and is valid for a row only below its first position this step
    (slots past it are another row's leftovers); this step's keys follow position order, so a
    right-padded row's pad keys sit after all its real queries.
    """
    slots = torch.arange(past_len, device=positions.device)  # (P,)
    past = slots[None, None, :] < positions[:, :1, None]  # (B, 1, P)
    step = positions[:, None, :] <= positions[:, :, None]  # (B, S, S): key t, query s
    return torch.cat((past.expand(-1, positions.shape[1], -1), step), dim=-1)[:, None]


def vision_padding(
    aspect_ratio_mask: torch.Tensor, num_patches: int, padded_patches: int
) -> torch.Tensor:
    """(N, T·padded) bool: True for tokens of padding tiles and for the pad slots of every tile."""
    tiles = aspect_ratio_mask.shape[-1]
    slot_is_pad = torch.arange(padded_patches, device=aspect_ratio_mask.device) >= num_patches
    pad = (aspect_ratio_mask[:, :, None] == 0) | slot_is_pad[None, None, :]  # (N, T, P')
    return pad.reshape(-1, tiles * padded_patches)


def padded_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    padding: torch.Tensor,
    pad_rows: list[torch.Tensor],
    plan: AttentionPlan = DEFAULT_PLAN,
) -> torch.Tensor:
    """The vision tower's attention without an arbitrary mask (reference §5.1 step 7).

    q, k, v (N, H, L, d); padding (N, L) bool; pad_rows[i] the indices of image i's padding
    tokens. The mask blocks only padding-query × padding-key pairs, so it splits exactly: every
    query attends to every key unmasked (one flash-attention call, run as `plan` says), then
    each image's padding queries, few for a full image, are recomputed against its real keys.
    """
    out = planned_attention(q, k, v, plan)  # (N, H, L, d), a view when padded
    for image, rows in enumerate(pad_rows):
        if rows.numel() == 0:
            continue
        keys = ~padding[image]  # (L,) the real keys
        fixed = F.scaled_dot_product_attention(
            q[image : image + 1, :, rows],  # (1, H, R, d)
            k[image : image + 1],
            v[image : image + 1],
            attn_mask=keys[None, None, None, :],  # (1, 1, 1, L)
        )
        out[image : image + 1, :, rows] = fixed
    return out


# Query rows per block of the traced vision attention (`blocked_attention`): 8 blocks of a full
# image's 6,432 tokens, so an exported graph holds (N, 16, 804, 6432) fp32 scores at a time,
# 331 MB an image, where the whole (N, 16, 6432, 6432) is 2.6 GB and its mask, softmax and
# product several more: ONNX Runtime's CPU run of one 4-tile image peaked at 13.6 GB before.
TRACED_QUERY_BLOCK = 804


def blocked_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    padding: torch.Tensor,
    block: int | None = None,
) -> torch.Tensor:
    """The vision tower's masked attention for traced graphs (no data-dependent shapes), in
    blocks of at most `block` query rows, each with its rows of `vision_mask`: a row's softmax
    reads only its own scores, so the blocks concatenated are the whole attention, and an
    exported graph materialises one block's scores at a time (its runtime frees each block's
    before the next). q, k, v (N, H, L, d); padding (N, L) bool → (N, H, L, d); `block`
    defaults to `TRACED_QUERY_BLOCK`, read when called."""
    block = block or TRACED_QUERY_BLOCK
    length = q.shape[2]
    blocks = []
    for start in range(0, length, block):
        rows = slice(start, min(start + block, length))
        mask = vision_mask(padding, rows)  # (N, 1, b, L)
        blocks.append(F.scaled_dot_product_attention(q[:, :, rows], k, v, attn_mask=mask))
    return torch.cat(blocks, dim=2)


def vision_mask(padding: torch.Tensor, rows: slice = slice(None)) -> torch.Tensor:
    """(N, 1, L, L) bool from (N, L) padding, or its query `rows` only (N, 1, b, L): only
    padding-query × padding-key pairs are blocked (reference §5.1 step 7); real tokens attend
    to everything."""
    return ~(padding[:, None, rows, None] & padding[:, None, None, :])


def cross_masks(
    positions: torch.Tensor,
    image_start: torch.Tensor,
    num_tiles: torch.Tensor,
    keys: int,
    per_tile: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-attention key mask (B, 1, S, keys) and row mask (B, S, 1).

    positions (B, S); image_start (B,) the position of `<|image|>` (a position past any text when
    the request has no image); num_tiles (B,); keys = tiles·per_tile, or fewer for an exported
    graph's text-only batch (a placeholder key). Rows at or after the image see its real tiles.
    A row that sees nothing (before the image, or no image) attends uniformly to every key,
    as HF and Meta do to avoid NaN; its output is then zeroed or not per semantics.
    """
    row = image_rows(positions, image_start)[..., 0]  # (B, S)
    key_real = image_keys_mask(num_tiles, keys, per_tile)  # (B, L)
    sees = row[:, :, None] & key_real[:, None, :]  # (B, S, L)
    mask = sees | ~row[:, :, None]  # (B, S, L): blind rows attend uniformly
    return mask[:, None], row[..., None]


def image_rows(positions: torch.Tensor, image_start: torch.Tensor) -> torch.Tensor:
    """(B, S, 1) bool: the rows at or after their `<|image|>`."""
    return (positions >= image_start[:, None])[..., None]


def image_keys_mask(num_tiles: torch.Tensor, keys: int, per_tile: int) -> torch.Tensor:
    """(B, L) bool: the keys of each row's real tiles."""
    tile_of_key = torch.arange(keys, device=num_tiles.device) // per_tile  # (L,)
    return tile_of_key[None, :] < num_tiles[:, None]


def cross_key_mask(num_tiles: torch.Tensor, keys: int, per_tile: int) -> torch.Tensor:
    """(B, 1, 1, L) bool: one cross-attention mask for every query of a row, its real tiles'
    keys (every key for a row without an image, so no row is fully masked).

    Exact where the output of rows before the image is zeroed ("meta" semantics): the rows that
    see the image see exactly these keys, and what the others attend to is thrown away. It
    broadcasts over heads and queries, so nothing of size S × L is built per step."""
    key_real = image_keys_mask(num_tiles, keys, per_tile)  # (B, L)
    return (key_real | (num_tiles == 0)[:, None])[:, None, None]
