"""The vision encoder (`MllamaVisionModel`; Meta's `VisionEncoder`), reference §5.1.

Tiles (N, T, 3, H, W) → features (N, T, P, output_dim), P = patches + CLS per tile. Parameter
names follow the HF checkpoint (`vision_model.*`). The local transformer runs over all T tiles of
an image jointly (T·P' tokens), with a mask that blocks only padding × padding pairs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

from guardrt.kernels.timer import Timer, cuda_timer
from guardrt.runtime.model.attention_plan import (
    CUDA_BACKENDS,
    DEFAULT_PLAN,
    AttentionPlan,
    Tuning,
    choose_plan,
)
from guardrt.runtime.model.config import VisionConfig
from guardrt.runtime.model.functional import (
    blocked_attention,
    padded_attention,
    vision_padding,
)


@dataclass(frozen=True)
class VisionMask:
    """The joint attention's padding, and how the attention runs: masked in blocks of query
    rows when traced (`blocked_attention`: no data-dependent shapes, bounded memory), or split
    when eager (`padded_attention`: flash attention for the real queries)."""

    padding: torch.Tensor  # (N, L) bool
    traced: bool
    pad_rows: list[torch.Tensor]  # per image, its padding tokens' indices (eager)
    plan: AttentionPlan = DEFAULT_PLAN  # how the unmasked attention runs (eager)

    @classmethod
    def of(cls, padding: torch.Tensor, plan: AttentionPlan = DEFAULT_PLAN) -> VisionMask:
        if torch.compiler.is_compiling():
            return cls(padding, True, [])
        return cls(padding, False, [row.nonzero().flatten() for row in padding], plan)


class AspectRatioEmbedding(nn.Module):
    """Gated per-arrangement embedding added to every token of a tile (pre/post tile embedding)."""

    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.tiles, self.dim = config.max_num_tiles, config.hidden_size
        self.embedding = nn.Embedding(config.num_aspect_ratios + 1, self.tiles * self.dim)
        self.gate = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor, aspect_ratio_ids: torch.Tensor) -> torch.Tensor:
        """x (N, T, P, D), aspect_ratio_ids (N,)."""
        table = self.embedding(aspect_ratio_ids).reshape(-1, self.tiles, 1, self.dim)  # (N,T,1,D)
        result: torch.Tensor = x + table * self.gate.tanh()
        return result


class PositionEmbedding(nn.Module):
    """Gated mix of one positional table shared by all tiles and a per-arrangement tile table."""

    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.tiles, self.patches, self.dim = (
            config.max_num_tiles,
            config.num_patches,
            config.hidden_size,
        )
        self.gate = nn.Parameter(torch.zeros(1))
        self.embedding = nn.Parameter(torch.zeros(self.patches, self.dim))
        self.tile_embedding = nn.Embedding(
            config.num_aspect_ratios + 1, self.tiles * self.patches * self.dim
        )

    def forward(self, x: torch.Tensor, aspect_ratio_ids: torch.Tensor) -> torch.Tensor:
        """x (N, T, P, D)."""
        gate = self.gate.tanh()
        x = x + (1 - gate) * self.embedding.view(1, 1, self.patches, self.dim)
        tile = self.tile_embedding(aspect_ratio_ids).reshape(-1, self.tiles, self.patches, self.dim)
        result: torch.Tensor = x + gate * tile
        return result


class VisionAttention(nn.Module):
    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        dim = config.hidden_size
        self.heads, self.head_dim = config.num_heads, config.head_dim
        self.q_proj = nn.Linear(dim, dim, bias=False)
        self.k_proj = nn.Linear(dim, dim, bias=False)
        self.v_proj = nn.Linear(dim, dim, bias=False)
        self.o_proj = nn.Linear(dim, dim, bias=False)
        self.qkv: nn.Module | None = None  # set by `fuse` (model/fuse.py)

    def fuse(self, qkv: nn.Module) -> None:
        """Compute q, k and v with one module whose output is [q, k, v] (held outside the
        module tree: its weight's views are the q/k/v weights)."""
        object.__setattr__(self, "qkv", qkv)

    def forward(self, x: torch.Tensor, mask: VisionMask) -> torch.Tensor:
        """x (N, L, D)."""
        n, length, _ = x.shape

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.view(n, length, self.heads, self.head_dim).transpose(1, 2)  # (N, H, L, d)

        if self.qkv is None:
            q, k, v = heads(self.q_proj(x)), heads(self.k_proj(x)), heads(self.v_proj(x))
        else:
            q, k, v = (heads(t) for t in self.qkv(x).chunk(3, dim=-1))  # (N, L, D) each
        if mask.traced:
            out = blocked_attention(q, k, v, mask.padding)
        else:
            out = padded_attention(q, k, v, mask.padding, mask.pad_rows, mask.plan)
        result: torch.Tensor = self.o_proj(out.transpose(1, 2).reshape(n, length, -1))
        return result


class VisionMLP(nn.Module):
    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result: torch.Tensor = self.fc2(F.gelu(self.fc1(x)))  # exact (erf) GELU
        return result


class VisionLayer(nn.Module):
    """Pre-LN block; the global ones gate both branches with tanh(gate)."""

    def __init__(self, config: VisionConfig, gated: bool) -> None:
        super().__init__()
        self.gated = gated
        self.self_attn = VisionAttention(config)
        self.mlp = VisionMLP(config)
        self.input_layernorm = nn.LayerNorm(config.hidden_size, eps=config.norm_eps)
        self.post_attention_layernorm = nn.LayerNorm(config.hidden_size, eps=config.norm_eps)
        if gated:
            self.gate_attn = nn.Parameter(torch.zeros(1))
            self.gate_ffn = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor, mask: VisionMask) -> torch.Tensor:
        attn = self.self_attn(self.input_layernorm(x), mask)
        x = x + (self.gate_attn.tanh() * attn if self.gated else attn)
        mlp = self.mlp(self.post_attention_layernorm(x))
        result: torch.Tensor = x + (self.gate_ffn.tanh() * mlp if self.gated else mlp)
        return result


class VisionEncoder(nn.Module):
    def __init__(self, config: VisionConfig, layers: int, gated: bool) -> None:
        super().__init__()
        self.layers = nn.ModuleList(VisionLayer(config, gated) for _ in range(layers))


class VisionModel(nn.Module):
    """`semantics` decides which hidden states are the intermediate features (reference §5.1.7):
    "meta" takes the inputs of the listed local layers (what the model was trained with),
    "transformers" their outputs (transformers ≥ 4.56)."""

    def __init__(self, config: VisionConfig, semantics: str) -> None:
        super().__init__()
        self.config = config
        self.take_inputs = semantics == "meta"
        dim = config.hidden_size
        self.patch_embedding = nn.Conv2d(
            3, dim, kernel_size=config.patch_size, stride=config.patch_size, bias=False
        )
        self.class_embedding = nn.Parameter(torch.zeros(dim))
        self.gated_positional_embedding = PositionEmbedding(config)
        self.pre_tile_positional_embedding = AspectRatioEmbedding(config)
        self.post_tile_positional_embedding = AspectRatioEmbedding(config)
        self.layernorm_pre = nn.LayerNorm(dim, eps=config.norm_eps)
        self.layernorm_post = nn.LayerNorm(dim, eps=config.norm_eps)
        self.transformer = VisionEncoder(config, config.num_layers, gated=False)
        self.global_transformer = VisionEncoder(config, config.num_global_layers, gated=True)
        self.attention_plan = DEFAULT_PLAN  # set by `tune_attention`

    def tune_attention(
        self,
        backends: tuple[str | None, ...] = CUDA_BACKENDS,
        timer: Timer | None = None,
    ) -> Tuning:
        """Time the joint attention of one full image (max tiles) each way `choose_plan`
        knows on this model's device and dtype, and run it the fastest way from now on. Only
        on a GPU unless a `timer` is given: on the CPU torch's default stands."""
        weight = self.patch_embedding.weight
        if timer is None and weight.device.type != "cuda":
            return Tuning(self.attention_plan)
        config = self.config
        length = config.max_num_tiles * config.padded_patches
        shape = (1, config.num_heads, length, config.head_dim)  # (N, H, L, d)
        tuning = choose_plan(shape, weight.dtype, weight.device, backends, timer or cuda_timer)
        self.attention_plan = tuning.plan
        return tuning

    def _embed(self, pixel_values: torch.Tensor, aspect_ratio_ids: torch.Tensor) -> torch.Tensor:
        """(N, T, 3, H, W) → (N, T, P, D): patches, tile embedding, CLS, positions, LN."""
        n, tiles = pixel_values.shape[:2]
        weight = self.patch_embedding.weight
        patches = self.patch_embedding(pixel_values.flatten(0, 1).to(weight.dtype))  # (NT,D,g,g)
        x = patches.flatten(2).transpose(1, 2).reshape(n, tiles, -1, weight.shape[0])  # (N,T,g²,D)
        x = self.pre_tile_positional_embedding(x, aspect_ratio_ids)
        cls = self.class_embedding.expand(n, tiles, 1, -1)  # the CLS gets no tile embedding
        x = torch.cat((cls, x), dim=2)  # (N, T, P, D)
        x = self.gated_positional_embedding(x, aspect_ratio_ids)
        result: torch.Tensor = self.layernorm_pre(x)
        return result

    def forward(
        self,
        pixel_values: torch.Tensor,
        aspect_ratio_ids: torch.Tensor,
        aspect_ratio_mask: torch.Tensor,
    ) -> torch.Tensor:
        """pixel_values (N, T, 3, H, W), aspect_ratio_ids (N,), aspect_ratio_mask (N, T) →
        (N, T, P, D·(1 + k)): [global output | k intermediate features interleaved per channel]."""
        config = self.config
        n, tiles = pixel_values.shape[:2]
        patches, padded = config.num_patches, config.padded_patches
        x = self._embed(pixel_values, aspect_ratio_ids)
        # Zeros appended after layernorm_pre: P → P' slots per tile, then one joint sequence.
        x = F.pad(x, (0, 0, 0, padded - patches)).reshape(n, tiles * padded, -1)  # (N, L, D)
        padding = vision_padding(aspect_ratio_mask, patches, padded).to(x.device)  # (N, L)
        mask = VisionMask.of(padding, self.attention_plan)
        wanted, features = set(config.intermediate_layers), {}
        for index, layer in enumerate(self.transformer.layers):
            if self.take_inputs and index in wanted:
                features[index] = x
            x = layer(x, mask)
            if not self.take_inputs and index in wanted:
                features[index] = x
        x = self.layernorm_post(x).reshape(n, tiles, padded, -1)
        x = self.post_tile_positional_embedding(x, aspect_ratio_ids).reshape(n, tiles * padded, -1)
        for layer in self.global_transformer.layers:
            x = layer(x, mask)
        chosen = [features[i] for i in config.intermediate_layers]
        stacked = torch.stack(chosen, dim=-1).reshape(n, tiles, padded, -1)  # (N,T,P',D·k)
        x = torch.cat((x.reshape(n, tiles, padded, -1), stacked), dim=-1)
        return x[:, :, :patches]  # drop the pad slots: (N, T, P, D·(1+k))
