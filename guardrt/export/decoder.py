"""The exported decoder graph: one step (prefill or decode) with K/V as inputs and outputs.

The same `MllamaModel.step` the runtime runs, over a `KVStore` that concatenates the past K/V
input with this step's K/V and collects the latter as the `present_kv` output; the caller keeps
the cache and writes `present_kv` back at the rows' positions. Inputs and outputs:

    input_ids     (B, S) int64       right-padded tokens
    position_ids  (B, S) int64       position of each token (padding continues the count)
    past_kv       (Ls, 2, B, Hkv, P, d)  K then V of the Ls self layers at positions 0..P-1
    cross_kv      (C, 2, B, Hkv, L, d)   image K/V of the C cross layers (the vision graph's
                                     output; L = 1 zeros for an all-text batch)
    image_start   (B,) int64         position of `<|image|>` (any position past the text: none)
    num_tiles     (B,) int64         0 for a request without an image
    logit_index   (B, R) int64       indices into S of the rows whose logits are wanted
    vocab         (V,) int64         the token ids whose logits come back (all of them: arange)
    →
    logits        (B, R, V) float32  at `vocab`'s ids, in its order
    normaliser    (B, R) float32     log-sum-exp of every logit of the row, so log-softmax at
                                     `vocab` is logits - normaliser
    present_kv    (Ls, 2, B, Hkv, S, d)  this step's K/V, to store at position_ids

The head computes all 128,256 logits (the normaliser needs them), but the reduction and the
pick happen here, where the logits are: a constrained step brings back ~20 values a row, not
513 KB, and the host never sums a vocabulary (`GraphSteps`, `DeviceSteps`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from guardrt.export.graphs import GraphSpec, check_traced
from guardrt.export.onnx_ops import trace
from guardrt.export.subgraphs import localize_file
from guardrt.runtime.engine.manifest import TensorSpec
from guardrt.runtime.model.functional import past_and_step_mask
from guardrt.runtime.model.mllama import MllamaModel

DECODER_INPUTS = (
    "input_ids",
    "position_ids",
    "past_kv",
    "cross_kv",
    "image_start",
    "num_tiles",
    "logit_index",
    "vocab",
)
DECODER_OUTPUTS = ("logits", "normaliser", "present_kv")


class GraphKV:
    """A `KVStore` over graph inputs: attend to [past, present]; remember present."""

    def __init__(self, past_kv: torch.Tensor, cross_kv: torch.Tensor) -> None:
        self.past_kv, self.cross = past_kv, cross_kv
        self.presents: list[torch.Tensor] = []

    def self_kv(self, layer: int, kv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        present = kv.permute(2, 0, 3, 1, 4)  # (B, S, 2, Hkv, d) → (2, B, Hkv, S, d)
        self.presents.append(present)
        past = self.past_kv[layer]  # (2, B, Hkv, P, d)
        return torch.cat((past[0], present[0]), dim=2), torch.cat((past[1], present[1]), dim=2)

    def cross_kv(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.cross[layer, 0], self.cross[layer, 1]

    def image_keys(self) -> int:
        return self.cross.shape[-2]  # symbolic when traced: no int()


def log_sum_exp(logits: torch.Tensor) -> torch.Tensor:
    """(..., vocab) → (...): max + log Σ exp(x - max), spelled out rather than torch.logsumexp,
    which exports as one ReduceLogSumExp: ONNX Runtime's CPU kernel for it took 2.2 ms a
    128,256-logit row pair (ReduceMax/Sub/Exp/ReduceSum: 0.2 ms), and TensorRT's importer may
    lower it without the max shift (exp overflows past 88). A NaN logit anywhere in a row makes
    the row's normaliser NaN (exp and the sum propagate it whatever the max does), and with it
    every log-probability: the verdict fails closed."""
    top = logits.amax(dim=-1, keepdim=True)  # (..., 1)
    total = torch.exp(logits - top).sum(dim=-1, keepdim=True)  # (..., 1), ≥ 1 unless NaN
    return (top + torch.log(total)).squeeze(-1)


def conditional_cross_for(engine_format: str) -> bool:
    """Whether an engine of `engine_format` gets If nodes around its cross layers. ONNX: yes; a
    text-only step then skips them as the torch engine does (the 8 of 40 layers' projections
    and MLPs: ~20% of a text step; a 350-token prefill of an 8-layer, 2-cross model went from
    753 to 613 ms in ONNX Runtime on a 2-core CPU, with identical outputs). TensorRT: not yet:
    its parser takes If nodes, but how its builder fuses across them, and so the image steps'
    speed, cannot be measured without TensorRT (not on our machines), so its graph stays flat."""
    return engine_format == "onnx"


def cross_layers_note(conditional: bool) -> str:
    """What the manifest says of the decoder's cross layers."""
    if conditional:
        return "run only when a row of the batch has an image (If nodes)"
    return "always run (an all-text batch attends to one zero key, which adds exactly zero)"


class DecoderGraph(nn.Module):
    """With `conditional_cross`, the cross layers sit in If nodes that run them only when some
    row has an image (`num_tiles`); without, they always run (text rows get exactly zero)."""

    def __init__(self, model: MllamaModel, conditional_cross: bool = False) -> None:
        super().__init__()
        self.model, self.conditional_cross = model, conditional_cross

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        past_kv: torch.Tensor,
        cross_kv: torch.Tensor,
        image_start: torch.Tensor,
        num_tiles: torch.Tensor,
        logit_index: torch.Tensor,
        vocab: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        dtype = self.model.weight_dtype  # K/V cross the graph boundary in fp32 (numpy has no bf16)
        kv = GraphKV(past_kv.to(dtype), cross_kv.to(dtype))
        logits = self.model.step(
            input_ids,
            position_ids,
            image_start,
            num_tiles,
            logit_index,
            kv=kv,
            self_mask=past_and_step_mask(position_ids, past_kv.shape[4]),
            # One graph for every batch: text rows get exactly zero from the cross layers.
            use_cross=(num_tiles > 0).any() if self.conditional_cross else True,
        )  # (B, R, vocab size) f32
        normaliser = log_sum_exp(logits)  # (B, R)
        picked = logits.index_select(-1, vocab)  # (B, R, V)
        presents = torch.stack(kv.presents).to(torch.float32)  # (Ls, 2, B, Hkv, S, d)
        return picked, normaliser, presents


def decoder_spec(model: MllamaModel, path: Path, kv_dtype: str = "float32") -> GraphSpec:
    text = model.config.text
    selfs, crosses = len(text.self_attention_layers), len(text.cross_attention_layers)
    heads, dim = text.num_kv_heads, text.head_dim
    return GraphSpec(
        path,
        (
            TensorSpec("input_ids", "int64", ("batch", "tokens")),
            TensorSpec("position_ids", "int64", ("batch", "tokens")),
            TensorSpec("past_kv", kv_dtype, (selfs, 2, "batch", heads, "past", dim)),
            TensorSpec("cross_kv", kv_dtype, (crosses, 2, "batch", heads, "image_keys", dim)),
            TensorSpec("image_start", "int64", ("batch",)),
            TensorSpec("num_tiles", "int64", ("batch",)),
            TensorSpec("logit_index", "int64", ("batch", "rows")),
            TensorSpec("vocab", "int64", ("vocab_ids",)),
        ),
        (
            TensorSpec("logits", "float32", ("batch", "rows", "vocab_ids")),
            TensorSpec("normaliser", "float32", ("batch", "rows")),
            TensorSpec("present_kv", kv_dtype, (selfs, 2, "batch", heads, "tokens", dim)),
        ),
    )


def export_decoder(
    model: MllamaModel, path: Path, max_batch: int, max_seq: int, conditional_cross: bool = False
) -> GraphSpec:
    """Trace the decoder graph, dynamic in batch, tokens, past length, image keys and rows
    (`DecoderGraph` says what `conditional_cross` does)."""
    example, dynamic = decoder_example(model, max_batch, max_seq)
    trace(
        DecoderGraph(model, conditional_cross),
        example,
        path,
        DECODER_INPUTS,
        DECODER_OUTPUTS,
        dynamic,
    )
    if conditional_cross:  # each cross layer's weights into its If branch (`subgraphs.py`)
        localize_file(path)
    return check_traced(decoder_spec(model, path))


def decoder_example(
    model: MllamaModel, max_batch: int, max_seq: int
) -> tuple[tuple[torch.Tensor, ...], tuple[dict[int, Any], ...]]:
    """The tensors the decoder graph is traced from, on the model's device (as
    `graphs.vision_example`), and their dynamic dims: no example dim is 1 or 0, which the
    exporter would specialize."""
    text = model.config.text
    selfs, crosses = len(text.self_attention_layers), len(text.cross_attention_layers)
    heads, dim, dtype = text.num_kv_heads, text.head_dim, torch.float32
    batch, tokens, past, rows = 2, 5, 3, 2
    device = model.device
    example = (
        torch.ones(batch, tokens, dtype=torch.int64, device=device),
        torch.arange(past, past + tokens, device=device).repeat(batch, 1),
        torch.zeros(selfs, 2, batch, heads, past, dim, dtype=dtype, device=device),
        torch.zeros(crosses, 2, batch, heads, model.image_keys, dim, dtype=dtype, device=device),
        torch.zeros(batch, dtype=torch.int64, device=device),
        torch.ones(batch, dtype=torch.int64, device=device),
        torch.zeros(batch, rows, dtype=torch.int64, device=device),
        torch.arange(3, dtype=torch.int64, device=device),
    )
    dim_b = torch.export.Dim("batch", min=1, max=max_batch)
    dim_s = torch.export.Dim("tokens", min=1, max=max_seq)
    dim_p = torch.export.Dim("past", min=0, max=max_seq)
    dim_l = torch.export.Dim("image_keys", min=1, max=model.image_keys)
    dim_r = torch.export.Dim("rows", min=1, max=max_seq)
    dim_v = torch.export.Dim("vocab_ids", min=1, max=text.vocab_size)
    dynamic = (
        {0: dim_b, 1: dim_s},
        {0: dim_b, 1: dim_s},
        {2: dim_b, 4: dim_p},
        {2: dim_b, 4: dim_l},
        {0: dim_b},
        {0: dim_b},
        {0: dim_b, 1: dim_r},
        {0: dim_v},
    )
    return example, dynamic
