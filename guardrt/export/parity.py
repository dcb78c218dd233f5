"""Parity between the forms of one model: the fixed probes and the deviation measure.

Every export step is checked against the step before on the same probes, and the engine against
the fp32 model. A probe is a request built by guardrt's own prompt and image code: text-only
prompts, a response check, and images of 1, 2, 3 and 4 tiles (deterministic synthetic pictures,
so no file is needed). Each runs as one prefill of prompt + `\\n\\n unsafe \\n S`, through any
`StepModel`; the compared rows are the last prompt token, the label row (P(unsafe)) and the
category row. torch-free: the ONNX and TensorRT forms are compared without it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass

import numpy as np

from guardrt.runtime.decoding import StepModel
from guardrt.runtime.prepare import Preparer
from guardrt.runtime.requests import PreparedRequest
from guardrt.runtime.scores import softmax

LABEL_ROW = 1  # of the three compared rows: last prompt token, label, category

_TEXTS = (
    "What is the recipe for mayonnaise?",
    "How do I pick a lock without the key?",
    "Write a short story about a dragon who learns to bake bread.",
)
# (height, width) in tiles → 1 (fits one tile), 2 (1x2), 3 (3x1), 4 (2x2)
_IMAGE_SIZES = ((0.7, 0.9), (0.9, 1.95), (2.7, 0.85), (1.8, 1.95))


def _picture(height: int, width: int, seed: int) -> np.ndarray:
    """A smooth deterministic RGB picture with some texture (uint8 HxWx3)."""
    rows = np.linspace(0.0, 1.0, height)[:, None, None]
    columns = np.linspace(0.0, 1.0, width)[None, :, None]
    phase = np.array([0.0, 2.1, 4.2])[None, None, :] + seed
    waves = 0.5 + 0.25 * np.sin(9 * rows + phase) + 0.25 * np.cos(7 * columns * (seed + 1))
    noise = np.random.default_rng(seed).random((height, width, 3)) * 0.1
    result: np.ndarray = (np.clip(waves + noise, 0, 1) * 255).astype(np.uint8)
    return result


def probes(preparer: Preparer) -> list[PreparedRequest]:
    """The fixed probe set: 3 text prompts, 1 response check, 4 image prompts (1-4 tiles)."""
    requests = [preparer.prepare([{"role": "user", "content": text}]) for text in _TEXTS]
    conversation = [
        {"role": "user", "content": _TEXTS[1]},
        {"role": "assistant", "content": "Use a tension wrench and a pick, raking the pins."},
    ]
    requests.append(preparer.prepare(conversation))
    tile = preparer.image_config.tile_size
    for seed, (height, width) in enumerate(_IMAGE_SIZES):
        picture = _picture(round(height * tile), round(width * tile), seed)
        content = [
            {"type": "image", "image": picture},
            {"type": "text", "text": _TEXTS[seed % len(_TEXTS)]},
        ]
        requests.append(preparer.prepare([{"role": "user", "content": content}]))
    return requests


def probe_digest(requests: Sequence[PreparedRequest]) -> str:
    """sha256 over the probes' ids and pixels: names the probe set in manifests."""
    digest = hashlib.sha256()
    for request in requests:
        digest.update(np.asarray(request.prompt, dtype=np.int64).tobytes())
        if request.image is not None:
            digest.update(request.image.pixel_values.tobytes())
    return digest.hexdigest()


def probe_logits(model: StepModel, request: PreparedRequest) -> np.ndarray:
    """fp32 logits (3, vocab) of one probe, alone in cache row 0."""
    if request.image is not None:
        model.write_images([0], [request.image])
    else:
        model.clear_images([0])
    tokens = request.grammar.tokens
    fed = [*request.prompt, tokens.blank, tokens.unsafe, tokens.newline, tokens.s]
    n = len(request.prompt)
    start = request.image_position if request.image_position is not None else model.max_seq
    logits = model.step(
        np.asarray([fed], dtype=np.int64),
        np.arange(len(fed), dtype=np.int64)[None],
        np.zeros(1, dtype=np.int64),
        np.asarray([start], dtype=np.int64),
        np.asarray([request.image.num_tiles if request.image else 0], dtype=np.int64),
        np.asarray([[n - 1, n, n + 3]], dtype=np.int64),
    )
    result: np.ndarray = logits[0]
    return result


@dataclass(frozen=True)
class Deviation:
    """How far one form of the model is from another over the probes."""

    max_relative_logit_error: float  # max over probes of max|Δlogit| / max|logit|
    max_abs_delta_p_unsafe: float  # max |ΔP(unsafe)| at the label row
    verdicts_agree: int  # probes whose argmax label (safe/unsafe) is the same
    probes: int

    def to_json(self) -> dict[str, float | int]:
        return asdict(self)


def deviation(
    reference: Iterable[np.ndarray],
    candidate: Iterable[np.ndarray],
    unsafe_id: int,
    safe_id: int,
    label_row: int = LABEL_ROW,
) -> Deviation:
    """Compare matching (rows, vocab) logits; `label_row` is the verdict row of each."""
    worst_logit, worst_p, agree, count = 0.0, 0.0, 0, 0
    for ref, cand in zip(reference, candidate, strict=True):
        if not np.isfinite(cand).all():
            raise ValueError("the candidate produced non-finite logits")
        scale = float(np.abs(ref).max())
        worst_logit = max(worst_logit, float(np.abs(cand - ref).max()) / max(scale, 1e-12))
        p_ref = float(softmax(ref[label_row])[unsafe_id])
        p_cand = float(softmax(cand[label_row])[unsafe_id])
        worst_p = max(worst_p, abs(p_cand - p_ref))
        pick = [unsafe_id, safe_id]
        agree += int(np.argmax(ref[label_row][pick]) == np.argmax(cand[label_row][pick]))
        count += 1
    return Deviation(worst_logit, worst_p, agree, count)
