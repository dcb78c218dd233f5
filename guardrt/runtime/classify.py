"""guardrt's torch model as a `StepModel`, and the `Classifier` that decodes with it.

The decoding loop (`decoding.py`) is torch-free and shared with the ONNX back end; this file is
only the adapter: numpy ids in, the model's cache-backed forward under inference mode, fp32
logits (or log-probabilities) back as numpy.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from guardrt.runtime.decoding import Decode, Decoder
from guardrt.runtime.device_pixels import DevicePixels
from guardrt.runtime.model.mllama import MllamaModel
from guardrt.runtime.preprocess import TiledImage


class TorchSteps:
    """`StepModel` over an `MllamaModel` whose caches are set up (`setup_caches`)."""

    def __init__(self, model: MllamaModel) -> None:
        self.model = model
        self.max_batch, self.max_seq = model.max_batch, model.max_seq
        self.device = model.device
        self._pixels = DevicePixels(self.device)  # uint8 canvases normalized on the device

    def _tensor(self, values: np.ndarray | Sequence[int]) -> torch.Tensor:
        return torch.as_tensor(np.asarray(values, dtype=np.int64), device=self.device)

    def _image_rows(self, slots: Sequence[int]) -> torch.Tensor:
        """`slots` as a tensor, refused when one holds no image K/V (a device-side index
        error would poison the CUDA context instead)."""
        rows = self.model.cache.image_rows
        outside = [slot for slot in slots if not 0 <= slot < rows]
        if outside:
            raise ValueError(f"cache rows {outside} hold no image K/V (rows 0..{rows - 1} do)")
        return self._tensor(slots)

    @torch.inference_mode()
    def write_images(self, slots: Sequence[int], images: Sequence[TiledImage]) -> None:
        rows = self._image_rows(slots)
        masks = np.stack([image.aspect_ratio_mask for image in images])  # (N, T)
        states = self.model.encode_images(
            self._pixels.pixels(images),  # (N, T, 3, H, W)
            self._tensor([image.aspect_ratio_id for image in images]),
            self._tensor(masks),
        )
        self.model.write_images(rows, states)

    @torch.inference_mode()
    def clear_images(self, slots: Sequence[int]) -> None:
        self.model.clear_images(self._image_rows(slots))

    @torch.inference_mode()
    def copy_kv(self, source: int, target: int, length: int) -> None:
        self.model.cache.copy_kv(source, target, length)

    @torch.inference_mode()
    def step(
        self,
        tokens: np.ndarray,
        positions: np.ndarray,
        slots: np.ndarray,
        image_start: np.ndarray,
        num_tiles: np.ndarray,
        logit_index: np.ndarray,
        vocab: np.ndarray | None = None,
        log_probs: bool = False,
    ) -> np.ndarray:
        inputs = (tokens, positions, slots, image_start, num_tiles, logit_index)
        kv_len = int(positions.max()) + 1  # from the host arrays: no wait for the GPU
        scores = self.model(
            *(self._tensor(x) for x in inputs),
            kv_len=kv_len,
            use_cross=bool(num_tiles.any()),
            vocab=None if vocab is None else self._tensor(vocab),
            log_probs=log_probs,
        )  # (B, R, vocab size or V')
        result: np.ndarray = scores.cpu().numpy()
        return result


class Classifier(Decoder):
    """Decodes prepared requests with guardrt's torch model (caches for the batch rows, then
    `sessions` session rows, then `prefixes` shared-prefix rows)."""

    def __init__(
        self,
        model: MllamaModel,
        decode: Decode = "constrained",
        sessions: int = 0,
        prefixes: int = 0,
        steps: TorchSteps | None = None,
    ) -> None:
        """`steps`: how forwards run (default eager `TorchSteps`; `static_steps.StaticSteps`
        pads them to captured shapes)."""
        self.steps = steps or TorchSteps(model)
        super().__init__(self.steps, decode, sessions, prefixes)
