"""Canvas search against the reference table, the spec's examples and transformers itself."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from guardrt.runtime.preprocess.canvas import plan_canvas, supported_aspect_ratios

TABLE = json.loads((Path(__file__).parent / "data" / "image_reference_table.json").read_text())


def test_aspect_ratio_ids_follow_the_model_table() -> None:
    assert supported_aspect_ratios(4) == (
        (1, 1), (1, 2), (1, 3), (1, 4), (2, 1), (2, 2), (3, 1), (4, 1),
    )  # fmt: skip


@pytest.mark.parametrize("row", TABLE, ids=[row["input_WxH"] for row in TABLE])
def test_reference_table_canvases(row: dict[str, object]) -> None:
    width, height = map(int, str(row["input_WxH"]).split("x"))
    plan = plan_canvas(height, width, 4, 560)
    canvas_h, canvas_w = map(int, str(row["canvas_HxW"]).split("x"))
    resized_h, resized_w = map(int, str(row["resized_HxW"]).split("x"))
    assert (plan.tiles_high * 560, plan.tiles_wide * 560) == (canvas_h, canvas_w)
    assert (plan.resized_height, plan.resized_width) == (resized_h, resized_w)
    assert plan.aspect_ratio_id == row["aspect_ratio_id"]
    assert plan.num_tiles == row["num_tiles"]


@pytest.mark.parametrize(
    ("size_wh", "canvas_hw", "resized_hw"),
    [
        ((1920, 1080), (1120, 1120), (630, 1120)),
        ((1080, 1920), (1120, 1120), (1120, 630)),
        ((1280, 720), (1120, 1120), (630, 1120)),
        ((640, 480), (560, 1120), (480, 640)),
        ((1024, 1024), (1120, 1120), (1024, 1024)),
        ((2000, 1000), (560, 1120), (560, 1120)),
        ((600, 800), (1120, 1120), (800, 600)),
    ],
)
def test_more_canvas_choices_from_the_spec(
    size_wh: tuple[int, int], canvas_hw: tuple[int, int], resized_hw: tuple[int, int]
) -> None:
    plan = plan_canvas(size_wh[1], size_wh[0], 4, 560)
    assert (plan.tiles_high * 560, plan.tiles_wide * 560) == canvas_hw
    assert (plan.resized_height, plan.resized_width) == resized_hw


@settings(max_examples=400, deadline=None)
@given(
    width=st.integers(1, 9000),
    height=st.integers(1, 9000),
    max_tiles=st.sampled_from([1, 2, 4, 6]),
    tile=st.sampled_from([14, 224, 560]),
)
def test_matches_transformers_canvas_functions(
    width: int, height: int, max_tiles: int, tile: int
) -> None:
    from transformers.models.mllama import image_processing_pil_mllama as ref  # noqa: PLC0415

    plan = plan_canvas(height, width, max_tiles, tile)
    canvas = ref.get_optimal_tiled_canvas(height, width, max_tiles, tile)
    assert (plan.tiles_high * tile, plan.tiles_wide * tile) == tuple(int(v) for v in canvas)
    resized = ref.get_image_size_fit_to_canvas(height, width, canvas[0], canvas[1], tile)
    assert (plan.resized_height, plan.resized_width) == tuple(int(v) for v in resized)
    arrangement = (plan.tiles_high, plan.tiles_wide)
    assert (
        plan.aspect_ratio_id
        == ref.get_all_supported_aspect_ratios(max_tiles).index(arrangement) + 1
    )


def test_rejects_empty_sizes() -> None:
    with pytest.raises(ValueError, match="0x5"):
        plan_canvas(5, 0, 4, 560)
