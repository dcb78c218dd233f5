"""The reference test vectors (reference §4.4): exact hashes of tiles and canvases."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import PIL
import pytest
from PIL import Image

from guardrt.runtime.preprocess import pack_images, plan_canvas, preprocess_image
from guardrt.runtime.preprocess.resize import resize_into
from tests.images import synthetic

TABLE = json.loads((Path(__file__).parent / "data" / "image_reference_table.json").read_text())


def test_pillow_is_the_version_the_vectors_were_made_with() -> None:
    # Pillow 13 changed the resize pass order; the 1000x4000 vector is Pillow-13 specific.
    assert PIL.__version__.split(".")[0] == "13"


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("row", TABLE, ids=[row["input_WxH"] for row in TABLE])
def test_pixel_values_match_reference_hash(row: dict[str, object], threads: int) -> None:
    width, height = map(int, str(row["input_WxH"]).split("x"))
    tiled = preprocess_image(Image.fromarray(synthetic(width, height), "RGB"), threads=threads)
    packed = pack_images([tiled]).pixel_values  # (1, 1, 4, 3, 560, 560)
    assert packed.shape == (1, 1, 4, 3, 560, 560)
    assert packed.dtype == np.float32
    digest = hashlib.sha256(packed.astype("<f4").tobytes()).hexdigest()
    assert digest == row["pixel_values_sha256"]
    assert float(packed.sum(dtype=np.float64)) == pytest.approx(
        row["pixel_values_sum_f64"], abs=1e-6
    )
    assert tiled.aspect_ratio_id == row["aspect_ratio_id"]
    assert tiled.num_tiles == row["num_tiles"]


@pytest.mark.parametrize("row", TABLE, ids=[row["input_WxH"] for row in TABLE])
def test_uint8_canvas_matches_reference_hash(row: dict[str, object]) -> None:
    width, height = map(int, str(row["input_WxH"]).split("x"))
    plan = plan_canvas(height, width, 4, 560)
    canvas = np.zeros((plan.tiles_high * 560, plan.tiles_wide * 560, 3), dtype=np.uint8)
    image = Image.fromarray(synthetic(width, height), "RGB")
    resize_into(image, plan.resized_width, plan.resized_height, canvas, threads=2)
    assert hashlib.sha256(canvas.tobytes()).hexdigest() == row["uint8_canvas_sha256"]
