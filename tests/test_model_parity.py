"""guardrt's mllama against transformers 5.17 on small random configs, tensor by tensor.

Under `semantics="transformers"` every logit of every position must match transformers'
`MllamaForConditionalGeneration` within 1e-4 relative, for text-only and 1 to 4 tile inputs, GQA
ratios 1, 2 and 4, and cross-attention layers in several places. The "meta" differences are each
checked against the quantity computed by hand from transformers' own layers.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from guardrt.runtime.model.checkpoint import load_model
from guardrt.runtime.model.mllama import MllamaModel
from guardrt.runtime.preprocess import TiledImage
from guardrt.runtime.prompt import encode_prompt
from guardrt.runtime.tokenizer import IMAGE_ID, Tokenizer
from guardrt.testing.references import hf_inputs, hf_model
from tests.models import DEVICE, TEXT_VARIANTS, image, small_config, write_small

RTOL = 1e-4


def diff_line(
    name: str, ours: torch.Tensor, ref: torch.Tensor, rtol: float = RTOL
) -> tuple[bool, str]:
    """A readable per-tensor verdict: OK / NOT OK, max abs diff, relative to the ref's scale."""
    if ours.shape != ref.shape:
        return False, f"NOT OK {name}: shape {list(ours.shape)} vs {list(ref.shape)}"
    error = (ours.float() - ref.float()).abs().max().item()
    scale = max(ref.float().abs().max().item(), 1e-12)
    ok = error <= rtol * scale
    verdict = "OK    " if ok else "NOT OK"
    return ok, f"{verdict} {name}: max abs diff {error:.3e}, relative {error / scale:.3e}"


def assert_all_close(pairs: list[tuple[str, torch.Tensor, torch.Tensor]]) -> None:
    results = [diff_line(name, ours, ref) for name, ours, ref in pairs]
    assert all(ok for ok, _ in results), "\n" + "\n".join(line for _, line in results)


class Pair:
    """One small checkpoint loaded by transformers and by guardrt (both semantics)."""

    def __init__(self, directory: Path) -> None:
        self.hf = hf_model(directory).to(DEVICE)
        self.ours = {
            s: load_model(directory, semantics=s, device=DEVICE) for s in ("transformers", "meta")
        }
        for model in self.ours.values():
            model.setup_caches(4, 512)


@pytest.fixture(scope="module", autouse=True)
def on_device() -> Iterator[None]:
    """New tensors on the test device; on CUDA, exact fp32 (no TF32) so 1e-4 means fp32."""
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.set_default_device(DEVICE)
    yield
    torch.set_default_device("cpu")


def inputs_for(prompt: list[int], tiled: TiledImage | None) -> dict[str, torch.Tensor]:
    return {key: value.to(DEVICE) for key, value in hf_inputs(prompt, tiled).items()}


@pytest.fixture(scope="module", params=sorted(TEXT_VARIANTS))
def pair(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Pair:
    variant: str = request.param
    return Pair(write_small(tmp_path_factory.mktemp(variant), small_config(variant), seed=7))


def prompt_for(tiled: TiledImage | None, tok: Tokenizer, text: str = "Is this fine?") -> list[int]:
    content: list[dict[str, Any]] = [{"type": "text", "text": text}]
    if tiled is not None:
        content.insert(0, {"type": "image"})
    return encode_prompt([{"role": "user", "content": content}], tokenizer=tok)


def our_logits(model: MllamaModel, prompt: list[int], tiled: TiledImage | None) -> torch.Tensor:
    """Prefill logits at every position, (S, vocab)."""
    n = len(prompt)
    start, tiles = model.max_seq, 0
    with torch.inference_mode():
        if tiled is not None:
            inputs = inputs_for(prompt, tiled)
            states = model.encode_images(
                inputs["pixel_values"][:, 0],
                inputs["aspect_ratio_ids"][:, 0],
                inputs["aspect_ratio_mask"][:, 0],
            )
            model.write_images(torch.tensor([0]), states)
            start, tiles = prompt.index(IMAGE_ID), tiled.num_tiles
        logits = model(
            torch.tensor([prompt]),
            torch.arange(n)[None],
            torch.tensor([0]),
            torch.tensor([start]),
            torch.tensor([tiles]),
            torch.arange(n)[None],
        )
    result: torch.Tensor = logits[0]
    return result


@pytest.mark.parametrize("tiles", [0, 1, 2, 3, 4], ids=lambda t: f"{t}-tiles" if t else "text-only")
def test_logits_match_transformers(pair: Pair, tok: Tokenizer, tiles: int) -> None:
    tiled = image(tiles, seed=tiles) if tiles else None
    prompt = prompt_for(tiled, tok)
    inputs = inputs_for(prompt, tiled)
    ours = pair.ours["transformers"]
    pairs: list[tuple[str, torch.Tensor, torch.Tensor]] = []
    with torch.inference_mode():
        reference = pair.hf(**inputs).logits[0]
        if tiled is not None:
            vision_args = (
                inputs["pixel_values"],
                inputs["aspect_ratio_ids"],
                inputs["aspect_ratio_mask"],
            )
            hf_vision = pair.hf.model.vision_model(*vision_args).last_hidden_state[:, 0]
            our_vision = ours.vision_model(*(a[:, 0] for a in vision_args))
            pairs.append(("vision features", our_vision, hf_vision))
            hf_states = pair.hf.model.multi_modal_projector(hf_vision)
            pairs.append(("projected states", ours.multi_modal_projector(our_vision), hf_states))
    pairs.append(("logits, every position", our_logits(ours, prompt, tiled), reference))
    assert_all_close(pairs)


def test_meta_vision_features_are_layer_inputs(pair: Pair) -> None:
    """Meta's intermediate features are the inputs of the listed local layers (reference
    §5.1.7): rebuilt by hand from transformers' own layers with pre-hooks."""
    tiled = image(3, seed=11)
    inputs = inputs_for([IMAGE_ID], tiled)
    vision = pair.hf.model.vision_model
    captured: dict[int, torch.Tensor] = {}

    def hook(index: int) -> Any:
        def capture(
            _module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
        ) -> None:
            captured[index] = (args[0] if args else next(iter(kwargs.values()))).clone()

        return capture

    handles = [
        layer.register_forward_pre_hook(hook(i), with_kwargs=True)
        for i, layer in enumerate(vision.transformer.layers)
    ]
    try:
        with torch.inference_mode():
            args = (inputs["pixel_values"], inputs["aspect_ratio_ids"], inputs["aspect_ratio_mask"])
            reference = vision(*args).last_hidden_state[0, 0]  # (T, P, D·(1+k))
            ours = pair.ours["meta"].vision_model(*(a[:, 0] for a in args))[0]
    finally:
        for handle in handles:
            handle.remove()
    config = pair.ours["meta"].config.vision
    tiles, padded, dim = config.max_num_tiles, config.padded_patches, config.hidden_size
    chosen = [captured[i].reshape(tiles, padded, dim) for i in config.intermediate_layers]
    by_hand = torch.stack(chosen, dim=-1).reshape(tiles, padded, -1)[:, : config.num_patches]
    assert_all_close(
        [
            ("global part (same in both)", ours[..., :dim], reference[..., :dim]),
            ("intermediate part = layer inputs", ours[..., dim:], by_hand),
        ]
    )
    assert not torch.allclose(ours[..., dim:], reference[..., dim:]), "semantics did not change"


def test_meta_zeroes_cross_attention_before_the_image(pair: Pair, tok: Tokenizer) -> None:
    """With Meta's row mask the rows before `<|image|>` get nothing from the image: their logits
    are those of the same prefix with no image at all (transformers' text-only path)."""
    tiled = image(2, seed=5)
    prompt = prompt_for(tiled, tok)
    before = prompt.index(IMAGE_ID)
    meta = our_logits(pair.ours["meta"], prompt, tiled)
    with torch.inference_mode():
        prefix = pair.hf(input_ids=torch.tensor([prompt[:before]])).logits[0]
    assert_all_close([("meta rows before <|image|> vs text-only prefix", meta[:before], prefix)])
    transformers = our_logits(pair.ours["transformers"], prompt, tiled)
    assert (meta[:before] - transformers[:before]).abs().max() > 1e-3  # HF's rows do get some
    assert (meta[before:] - transformers[before:]).abs().max() > 1e-3


def test_text_only_identical_in_both_semantics(pair: Pair, tok: Tokenizer) -> None:
    prompt = prompt_for(None, tok)
    meta, transformers = (our_logits(pair.ours[s], prompt, None) for s in ("meta", "transformers"))
    assert torch.equal(meta, transformers)


def test_reduced_precisions_run(tmp_path: Path, tok: Tokenizer) -> None:
    """bf16 and fp16 on the CPU: finite and close to fp32 at the verdict position."""
    directory = write_small(tmp_path, small_config("gqa2-cross2,4"), seed=3)
    tiled = image(4, seed=2)
    prompt = prompt_for(tiled, tok)
    results = {}
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        model = load_model(directory, dtype=dtype, device=DEVICE)
        model.setup_caches(1, 256)
        results[dtype] = our_logits(model, prompt, tiled)[-1]
        assert torch.isfinite(results[dtype]).all(), dtype
    for dtype in (torch.bfloat16, torch.float16):
        error = (results[dtype] - results[torch.float32]).abs().max()
        assert error < 0.05 * results[torch.float32].abs().max(), dtype


def iterate_steps(model: MllamaModel, prompt: list[int], steps: int) -> Iterator[int]:
    """Text-only greedy generation one token at a time through the cache (for the test below)."""
    with torch.inference_mode():
        logits = model(
            torch.tensor([prompt]),
            torch.arange(len(prompt))[None],
            torch.tensor([1]),
            torch.tensor([model.max_seq]),
            torch.tensor([0]),
            torch.tensor([[len(prompt) - 1]]),
        )
        position = len(prompt)
        for _ in range(steps):
            token = int(logits[0, -1].argmax())
            yield token
            logits = model(
                torch.tensor([[token]]),
                torch.tensor([[position]]),
                torch.tensor([1]),
                torch.tensor([model.max_seq]),
                torch.tensor([0]),
                torch.tensor([[0]]),
            )
            position += 1


def test_cached_decode_matches_full_forward(pair: Pair, tok: Tokenizer) -> None:
    """Decoding through the K/V cache (slot 1) gives what a full forward of the whole sequence
    gives at each step."""
    prompt = prompt_for(None, tok, "Tell me a story.")
    ours = pair.ours["transformers"]
    generated = list(iterate_steps(ours, prompt, 6))
    with torch.inference_mode():
        full = pair.hf(input_ids=torch.tensor([prompt + generated])).logits[0]
    expected = full[len(prompt) - 1 : -1].argmax(-1).tolist()
    assert generated == expected
