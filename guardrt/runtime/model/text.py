"""The text decoder (`MllamaTextModel`): 40 layers, 8 of them gated cross-attention (§5.3).

Parameter names follow the HF checkpoint (`language_model.model.*`). Layers own weights, not
K/V: each attention layer hands its step's K/V to the step's `KVStore` and attends to what it
returns. The runtime's store is a preallocated cache addressed by slot and position
(`model/cache.py`); the exported decoder graph's store concatenates past K/V inputs and collects
present K/V outputs (`guardrt/export/decoder.py`). Cross-attention K/V are computed once per
image (`image_kv`). Every step runs the same layer plan; only an all-text batch skips the cross
layers (they would add exactly zero to every row).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn

from guardrt.runtime.model.config import TextConfig
from guardrt.runtime.model.functional import (
    add_rms_norm,
    attention_rows,
    rms_norm,
    rope_heads,
    silu_mul,
)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)

    def add(self, x: torch.Tensor, delta: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(x + delta, this norm of it): the residual add before the norm, fused with it on a
        GPU; (x, norm(x)) when delta is None."""
        return add_rms_norm(x, delta, self.weight, self.eps)


class MLP(nn.Module):
    def __init__(self, config: TextConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

        self.gate_up: nn.Module | None = None  # set by `fuse` (model/fuse.py)

    def fuse(self, gate_up: nn.Module) -> None:
        """Compute gate and up with one module whose output is [gate, up] (…, 2·I). Held
        outside the module tree: its weight's views are gate_proj's and up_proj's weights."""
        object.__setattr__(self, "gate_up", gate_up)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate_up is None:
            gate, up = self.gate_proj(x), self.up_proj(x)
        else:
            gate, up = self.gate_up(x).chunk(2, dim=-1)  # (…, I) each
        result: torch.Tensor = self.down_proj(silu_mul(gate, up))  # one kernel on a GPU
        return result


class KVStore(Protocol):
    """Where one step's attention layers put and find K/V."""

    def self_kv(self, layer: int, kv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Take self layer `layer`'s K (RoPE applied) and V of this step's tokens, side by side
        in kv (B, S, 2, Hkv, d) (a view of the projection's output: one write stores both);
        return the keys and values to attend to, each (B, Hkv, K, d), in the order the step's
        `self_bias` describes."""
        ...

    def cross_kv(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Cross layer `layer`'s image K and V, each (B, Hkv, L, d)."""
        ...

    def image_keys(self) -> int:
        """L: the image keys `cross_kv` holds (read off the store, without gathering any)."""
        ...


@dataclass
class StepInputs:
    """What every layer of one forward step reads (built once per step by the model)."""

    kv: KVStore
    positions: torch.Tensor  # (B, S) position of each token
    cos: torch.Tensor  # (B, S, head_dim)
    sin: torch.Tensor  # (B, S, head_dim)
    # Additive masks (`attention_bias`: 0 or -inf, rows folded for grouped heads), built once
    # per step: (B, 1, g·S, K) over the keys `kv.self_kv` returns; over the image keys
    # (B, 1, g·S, L), or (B, 1, 1, L) ("meta": cross_key_mask), None when no cross layer runs.
    self_bias: torch.Tensor
    cross_bias: torch.Tensor | None
    cross_rows: torch.Tensor  # (B, S, 1): rows at/after their image (the MLP branch keeps these)
    attn_rows: torch.Tensor  # (B, S, 1): rows whose cross-attention output is kept (semantics)
    use_cross: bool  # False when no request of the batch has an image
    # An exported graph's run-time choice (a 0-D bool: some row has an image), for one graph
    # that serves text and image batches; None where `use_cross` decides on the host.
    cross_when: torch.Tensor | None = None


class Projections(nn.Module):
    """q/k/v/o of a grouped-query attention layer (no biases); `index` counts layers of its
    kind (self or cross) and names its K/V in the step's store."""

    def __init__(self, config: TextConfig, index: int) -> None:
        super().__init__()
        self.index = index
        dim, kv_dim = config.hidden_size, config.num_kv_heads * config.head_dim
        self.heads, self.kv_heads = config.num_heads, config.num_kv_heads
        self.head_dim = config.head_dim
        self.q_proj = nn.Linear(dim, dim, bias=False)
        self.k_proj = nn.Linear(dim, kv_dim, bias=False)
        self.v_proj = nn.Linear(dim, kv_dim, bias=False)
        self.o_proj = nn.Linear(dim, dim, bias=False)


class SelfAttention(Projections):
    def __init__(self, config: TextConfig, index: int) -> None:
        super().__init__(config, index)
        self.qkv: nn.Module | None = None  # set by `fuse` (model/fuse.py)

    def fuse(self, qkv: nn.Module) -> None:
        """Compute q, k and v with one module whose output is [q, k, v]. Held outside the
        module tree: its weight's views are the q/k/v weights the checkpoint names."""
        object.__setattr__(self, "qkv", qkv)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, S, D) → the q, k and v heads (B, H + 2·Hkv, S, d): views of one projection's
        output (the unfused projections' outputs are concatenated first)."""
        b, s, _ = x.shape
        if self.qkv is None:
            qkv = torch.cat((self.q_proj(x), self.k_proj(x), self.v_proj(x)), dim=-1)
        else:
            qkv = self.qkv(x)  # (B, S, (H + 2·Hkv)·d)
        return qkv.reshape(b, s, -1, self.head_dim).transpose(1, 2)  # a view when contiguous

    def forward(self, x: torch.Tensor, step: StepInputs) -> torch.Tensor:
        b, s, _ = x.shape
        # RoPE on q and k in one call; on a GPU in place, so k and v stay side by side.
        heads = rope_heads(self._heads(x), self.heads + self.kv_heads, step.cos, step.sin)
        q = heads[:, : self.heads]  # (B, H, S, d)
        kv = heads[:, self.heads :].transpose(1, 2).view(b, s, 2, self.kv_heads, self.head_dim)
        keys, values = step.kv.self_kv(self.index, kv)  # kv (B, S, 2, Hkv, d) → (B, Hkv, K, d)
        out = attention_rows(q, keys, values, step.self_bias)  # (B, S, H·d)
        result: torch.Tensor = self.o_proj(out)
        return result


class SelfAttentionLayer(nn.Module):
    def __init__(self, config: TextConfig, index: int) -> None:
        super().__init__()
        self.self_attn = SelfAttention(config, index)
        self.mlp = MLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(
        self, x: torch.Tensor, delta: torch.Tensor | None, step: StepInputs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, S, D): the residual stream without `delta`, the previous layer's last branch
        (None before the first layer). Returns the stream with delta and this layer's attention
        added, and the MLP branch for the next layer to add (`TextModel.forward`)."""
        x, h = self.input_layernorm.add(x, delta)
        x, h = self.post_attention_layernorm.add(x, self.self_attn(h, step))
        return x, self.mlp(h)


class CrossAttention(Projections):
    """Attention to an image's K/V (8 kv heads repeated, no RoPE), q and k RMS-normalised."""

    def __init__(self, config: TextConfig, index: int) -> None:
        super().__init__(config, index)
        self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
        self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps)

    def image_kv(self, vision_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """K (RMS-normalised) and V of projected vision states (N, L, D): each (N, Hkv, L, d)."""
        n, length, _ = vision_states.shape
        k = self.k_proj(vision_states).view(n, length, self.kv_heads, self.head_dim)
        v = self.v_proj(vision_states).view(n, length, self.kv_heads, self.head_dim)
        return self.k_norm(k).transpose(1, 2), v.transpose(1, 2)

    def forward(self, x: torch.Tensor, step: StepInputs) -> torch.Tensor:
        b, s, _ = x.shape
        q = self.q_proj(x).view(b, s, self.heads, self.head_dim).transpose(1, 2)  # (B,H,S,d)
        q = self.q_norm(q)
        keys, values = step.kv.cross_kv(self.index)  # (B, Hkv, L, d)
        if step.cross_bias is None:
            raise ValueError("a cross layer ran in a step built without cross-attention masks")
        out = attention_rows(q, keys, values, step.cross_bias)  # (B, S, H·d)
        result: torch.Tensor = self.o_proj(out * step.attn_rows.to(out.dtype))
        return result


class CrossAttentionLayer(nn.Module):
    """h = x + tanh(g_attn)·attn; out = h + tanh(g_mlp)·row·MLP(h)."""

    def __init__(self, config: TextConfig, index: int) -> None:
        super().__init__()
        self.cross_attn = CrossAttention(config, index)
        self.mlp = MLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.cross_attn_attn_gate = nn.Parameter(torch.zeros(1))
        self.cross_attn_mlp_gate = nn.Parameter(torch.zeros(1))

    def forward(
        self, x: torch.Tensor, delta: torch.Tensor | None, step: StepInputs
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """As `SelfAttentionLayer.forward`; without an image in the batch, (x, delta) pass
        through (the layer would add exactly zero)."""
        if not step.use_cross:
            return x, delta
        if step.cross_when is None:
            return self._cross(x, delta, step)
        # Traced for export: an If node (torch.cond) runs the layer only when `cross_when`.
        # Its operands must be tensors, so a missing delta is carried as zeros (x + 0 is x).
        carried = torch.zeros_like(x) if delta is None else delta

        def run(x: torch.Tensor, carried: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return self._cross(x, carried, step)

        def skip(x: torch.Tensor, carried: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return x.clone(), carried.clone()  # (a branch may not return its inputs)

        x, carried = torch.cond(step.cross_when, run, skip, (x, carried))
        return x, carried

    def _cross(
        self, x: torch.Tensor, delta: torch.Tensor | None, step: StepInputs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        x, h = self.input_layernorm.add(x, delta)
        attn = self.cross_attn_attn_gate.tanh() * self.cross_attn(h, step)
        x, h = self.post_attention_layernorm.add(x, attn)
        mlp = self.mlp(h) * step.cross_rows.to(x.dtype)
        return x, self.cross_attn_mlp_gate.tanh() * mlp


class TextModel(nn.Module):
    def __init__(self, config: TextConfig) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size + 8, config.hidden_size)
        cross, plain = config.cross_attention_layers, config.self_attention_layers
        self.layers = nn.ModuleList(
            CrossAttentionLayer(config, cross.index(i)) if i in cross
            else SelfAttentionLayer(config, plain.index(i))
            for i in range(config.num_layers)
        )  # fmt: skip
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, tokens: torch.Tensor, step: StepInputs) -> torch.Tensor:
        """tokens (B, S) → final hidden states (B, S, D), before the final norm.

        Each layer's last branch (its MLP's output) is handed to the next layer as `delta`
        rather than added here: the next layer adds it in its first norm's kernel (the same
        sum, rounded once as torch's add rounds it). Only the last layer's is added here."""
        x: torch.Tensor = self.embed_tokens(tokens)
        delta: torch.Tensor | None = None
        for layer in self.layers:
            x, delta = layer(x, delta, step)
        return x if delta is None else x + delta


class LanguageModel(nn.Module):
    """The decoder and its head (checkpoint prefix `language_model.`)."""

    def __init__(self, config: TextConfig) -> None:
        super().__init__()
        self.model = TextModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
