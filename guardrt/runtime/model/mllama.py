"""`MllamaForConditionalGeneration` composed: vision encoder → projector → decoder → head.

Tensors in, tensors out; preprocessing and prompting live outside. The parameter tree matches
the HF hub checkpoint's key names (`vision_model.*`, `multi_modal_projector.*`,
`language_model.model.*`, `language_model.lm_head.*`), so loading maps names in one place.

Semantics (reference §10): "meta" (default, what the model was trained with) takes the vision
features from the inputs of the listed local layers and zeroes the cross-attention output of
rows before `<|image|>`; "transformers" reproduces transformers ≥ 4.56 (layer outputs; only the
cross MLP branch is zeroed on those rows). Either way a request without an image gets exactly
nothing from the cross layers, as if they were skipped.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

from guardrt.export.quantize import QuantizedEmbedding
from guardrt.runtime.errors import ConfigError
from guardrt.runtime.model.cache import CacheLayout, KVCache
from guardrt.runtime.model.config import ModelConfig
from guardrt.runtime.model.functional import (
    attention_bias,
    causal_cache_mask,
    cross_key_mask,
    cross_masks,
    image_rows,
    rope_cos_sin,
    rope_inv_freq,
)
from guardrt.runtime.model.text import (
    CrossAttentionLayer,
    KVStore,
    LanguageModel,
    StepInputs,
)
from guardrt.runtime.model.vision import VisionModel

if TYPE_CHECKING:  # a type only: the kernels' module imports the model's config
    from guardrt.kernels.fp8_image import Fp8ImageChoice

Semantics = Literal["meta", "transformers"]
SEMANTICS: tuple[Semantics, ...] = ("meta", "transformers")


class MllamaModel(nn.Module):
    def __init__(self, config: ModelConfig, semantics: Semantics = "meta") -> None:
        super().__init__()
        if semantics not in SEMANTICS:
            raise ConfigError(f"semantics must be one of {SEMANTICS}, not {semantics!r}")
        self.config, self.semantics = config, semantics
        self.vision_model = VisionModel(config.vision, semantics)
        self.multi_modal_projector = nn.Linear(config.vision.output_dim, config.text.hidden_size)
        self.language_model = LanguageModel(config.text)
        self.inv_freq: torch.Tensor
        self.register_buffer(
            "inv_freq", rope_inv_freq(config.text.rope, config.text.head_dim), persistent=False
        )
        self.max_batch = self.max_seq = 0
        self._cache: KVCache | None = None
        # What an fp8 load measured: the image products it kept in bf16 (`quantize_for_serving`)
        self.fp8_image: Fp8ImageChoice | None = None

    @property
    def weight_dtype(self) -> torch.dtype:
        """The model's dtype (read off the token embedding, which an int8 table remembers)."""
        embed = self.language_model.model.embed_tokens
        return embed.dtype if isinstance(embed, QuantizedEmbedding) else embed.weight.dtype

    @property
    def device(self) -> torch.device:
        embed = self.language_model.model.embed_tokens
        return embed.device if isinstance(embed, QuantizedEmbedding) else embed.weight.device

    @property
    def image_keys(self) -> int:
        """Cross-attention keys per image: every tile slot, padding tiles included (6404)."""
        return self.config.vision.max_num_tiles * self.config.vision.num_patches

    def cross_layers(self) -> list[CrossAttentionLayer]:
        return [m for m in self.language_model.model.layers if isinstance(m, CrossAttentionLayer)]

    def image_kv_projections(self) -> list[nn.Module]:
        """The cross layers' k/v projections: they read an image's patches (6,404 rows) when
        its K/V are written, never a step's tokens."""
        return [p for c in self.cross_layers() for p in (c.cross_attn.k_proj, c.cross_attn.v_proj)]

    def setup_caches(
        self,
        max_batch: int,
        max_seq: int,
        capacity: int | None = None,
        image_rows: int | None = None,
    ) -> None:
        """Allocate the K/V cache (`model/cache.py`) for `max_batch` rows of `max_seq`
        positions, on the weights' device and dtype (0, 0 frees it); `capacity` positions now
        (default all), more as steps need them; image K/V for the first `image_rows` rows
        (default all)."""
        text = self.config.text
        layout = CacheLayout(
            self_layers=len(text.self_attention_layers),
            cross_layers=len(text.cross_attention_layers),
            rows=max_batch,
            kv_heads=text.num_kv_heads,
            max_seq=max_seq,
            image_keys=self.image_keys if max_batch else 0,
            head_dim=text.head_dim,
            image_rows=image_rows,
        )
        self._cache = KVCache(
            layout, device=self.device, dtype=self.weight_dtype, capacity=capacity
        )
        self.max_batch, self.max_seq = max_batch, max_seq

    @property
    def cache(self) -> KVCache:
        if self._cache is None or self.max_batch == 0:
            raise RuntimeError("setup_caches(max_batch, max_seq) must be called first")
        return self._cache

    def encode_images(
        self,
        pixel_values: torch.Tensor,
        aspect_ratio_ids: torch.Tensor,
        aspect_ratio_mask: torch.Tensor,
    ) -> torch.Tensor:
        """(N, T, 3, H, W), (N,), (N, T) → projected vision states (N, T·P, hidden)."""
        features = self.vision_model(pixel_values, aspect_ratio_ids, aspect_ratio_mask)
        states = self.multi_modal_projector(features)  # (N, T, P, hidden)
        result: torch.Tensor = states.flatten(1, 2)
        return result

    def image_kv(self, vision_states: torch.Tensor) -> torch.Tensor:
        """Projected vision states (N, L, hidden) → K (normalised) and V of every cross layer,
        (cross layers, 2, N, Hkv, L, d): what the cache and the exported graphs hold."""
        per_layer = [torch.stack(c.cross_attn.image_kv(vision_states)) for c in self.cross_layers()]
        return torch.stack(per_layer)

    def write_images(self, slots: torch.Tensor, vision_states: torch.Tensor) -> None:
        """Cross-attention K/V of each image, once, into the cache rows `slots` (N,)."""
        self.cache.write_images(slots, self.image_kv(vision_states))

    def clear_images(self, slots: torch.Tensor) -> None:
        """Zero the image K/V of rows that hold no image."""
        self.cache.clear_images(slots)

    def forward(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor,
        slots: torch.Tensor,
        image_start: torch.Tensor,
        num_tiles: torch.Tensor,
        logit_index: torch.Tensor,
        *,
        kv_len: int | None = None,
        use_cross: bool | None = None,
        vocab: torch.Tensor | None = None,
        log_probs: bool = False,
    ) -> torch.Tensor:
        """One step for a batch of B requests (prefill or decode) on the cache.

        tokens, positions (B, S); slots (B,) cache rows; image_start (B,) the position of each
        request's `<|image|>` (any position past its text when it has none); num_tiles (B,),
        0 for no image; logit_index (B, R) indices into S of the rows whose logits are wanted.
        Returns fp32 logits (B, R, vocab). Positions must be written in order per slot (a step
        covers positions after the last).

        kv_len (> every position: the cache positions attended to) and use_cross (whether any
        row has an image) are read off the tensors when not given; a caller that knows them on
        the host passes them, so the step never waits for the GPU (and can be captured in a
        CUDA graph). vocab (V',) token ids: logits (B, R, V') of those tokens only. log_probs:
        log-softmax over the whole vocabulary instead of logits (then at `vocab` only).
        """
        if kv_len is None:
            kv_len = int(positions.max()) + 1
        self.cache.reserve(kv_len)  # callers passing kv_len reserved their padded positions
        if use_cross is None:
            use_cross = bool((num_tiles > 0).any())
        return self.step(
            tokens,
            positions,
            image_start,
            num_tiles,
            logit_index,
            kv=self.cache.step(slots, positions, kv_len),
            self_mask=causal_cache_mask(positions, kv_len),
            use_cross=use_cross,
            vocab=vocab,
            log_probs=log_probs,
        )

    def step(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor,
        image_start: torch.Tensor,
        num_tiles: torch.Tensor,
        logit_index: torch.Tensor,
        *,
        kv: KVStore,
        self_mask: torch.Tensor,
        use_cross: bool | torch.Tensor,
        vocab: torch.Tensor | None = None,
        log_probs: bool = False,
    ) -> torch.Tensor:
        """The decoder over any K/V store (the cache here, graph inputs in export): `forward`'s
        arguments, the store, its self-attention mask (B, 1, S, K) and whether to run the
        cross layers at all (they add exactly zero to rows without an image): a bool decided
        on the host, or a 0-D bool tensor decided at run time (If nodes in a traced graph)."""
        cross_when = use_cross if isinstance(use_cross, torch.Tensor) else None
        use_cross = cross_when is not None or bool(use_cross)
        dtype = self.weight_dtype
        cos, sin = rope_cos_sin(self.inv_freq, positions, dtype)
        has_image = num_tiles > 0  # (B,)
        crossing = use_cross and bool(self.config.text.cross_attention_layers)
        image_keys = kv.image_keys() if crossing else self.image_keys
        per_tile = self.config.vision.num_patches
        if self.semantics == "meta":  # rows before the image are zeroed: one mask per row
            rows = image_rows(positions, image_start)
            cross_mask = cross_key_mask(num_tiles, image_keys, per_tile)
        else:
            cross_mask, rows = cross_masks(positions, image_start, num_tiles, image_keys, per_tile)
        attn_rows = rows if self.semantics == "meta" else has_image[:, None, None].expand_as(rows)
        heads, kv_heads = self.config.text.num_heads, self.config.text.num_kv_heads
        step = StepInputs(
            kv=kv,
            positions=positions,
            cos=cos,
            sin=sin,
            self_bias=attention_bias(self_mask, heads, kv_heads, dtype),
            cross_bias=attention_bias(cross_mask, heads, kv_heads, dtype) if crossing else None,
            cross_rows=rows,
            attn_rows=attn_rows,
            use_cross=use_cross,
            cross_when=cross_when,
        )
        hidden = self.language_model.model(tokens, step)  # (B, S, D)
        picked = torch.gather(
            hidden, 1, logit_index[..., None].expand(-1, -1, hidden.shape[-1])
        )  # (B, R, D)
        normed = self.language_model.model.norm(picked)
        head = self.language_model.lm_head
        if log_probs:  # the normaliser needs every logit; then only `vocab`'s come back
            scores = torch.log_softmax(head(normed).float(), dim=-1)  # (B, R, vocab)
            return scores if vocab is None else scores[..., vocab]  # (B, R, V')
        if vocab is None:
            logits = head(normed)  # (B, R, vocab)
        elif isinstance(head, nn.Linear):  # read only the head's rows of `vocab`
            logits = F.linear(normed, head.weight[vocab])  # (B, R, V')
        else:
            logits = head(normed)[..., vocab]
        result: torch.Tensor = logits.float()
        return result
