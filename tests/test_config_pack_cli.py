"""Preprocessor config loading, batch packing and the command line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from guardrt.cli import main
from guardrt.runtime.errors import ConfigError
from guardrt.runtime.preprocess import (
    DEFAULT_IMAGE_CONFIG,
    ImageConfig,
    pack_images,
    preprocess_image,
)
from tests.images import encode, noise

# The Llama-3.2-11B-Vision preprocessor_config.json (reference §1.5), as the checkpoint ships it.
CHECKPOINT_PREPROCESSOR = {
    "do_convert_rgb": True,
    "do_normalize": True,
    "do_pad": True,
    "do_rescale": True,
    "do_resize": True,
    "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_processor_type": "MllamaImageProcessor",
    "image_std": [0.26862954, 0.26130258, 0.27577711],
    "max_image_tiles": 4,
    "resample": 2,
    "rescale_factor": 0.00392156862745098,
    "size": {"height": 560, "width": 560},
}


def test_checkpoint_file_gives_the_default_config(tmp_path: Path) -> None:
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(CHECKPOINT_PREPROCESSOR))
    assert ImageConfig.from_preprocessor_config(tmp_path) == DEFAULT_IMAGE_CONFIG
    assert ImageConfig.from_preprocessor_config(tmp_path / "preprocessor_config.json") == (
        DEFAULT_IMAGE_CONFIG
    )


def test_settings_are_read_from_the_file() -> None:
    raw = dict(CHECKPOINT_PREPROCESSOR, max_image_tiles=6, size={"height": 224, "width": 224})
    config = ImageConfig.from_preprocessor_config(raw)
    assert (config.max_tiles, config.tile_size) == (6, 224)


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({"do_resize": False}, "do_resize"),
        ({"resample": 3}, "resample"),
        ({"do_pad": 1}, "do_pad"),
        ({"size": {"height": 560, "width": 448}}, "square"),
        ({"size": {"shortest_edge": 560}}, "size"),
        ({"max_image_tiles": 0}, "max_image_tiles"),
        ({"image_mean": [0.5, 0.5]}, "image_mean"),
        ({"image_std": [0.5, 0.0, 0.5]}, "image_std"),
        ({"crop_size": 224}, "crop_size"),
        ({"image_processor_type": "CLIPImageProcessor"}, "CLIPImageProcessor"),
    ],
)
def test_unsupported_settings_are_refused_by_name(change: dict[str, Any], named: str) -> None:
    with pytest.raises(ConfigError, match=named):
        ImageConfig.from_preprocessor_config(dict(CHECKPOINT_PREPROCESSOR, **change))


def test_missing_and_broken_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        ImageConfig.from_preprocessor_config(tmp_path)
    (tmp_path / "preprocessor_config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        ImageConfig.from_preprocessor_config(tmp_path)


def test_pack_images_rows_without_image() -> None:
    first = preprocess_image(Image.fromarray(noise(1000, 300)))
    second = preprocess_image(Image.fromarray(noise(100, 100)))
    packed = pack_images([first, None, second])
    assert packed.pixel_values.shape == (3, 1, 4, 3, 560, 560)
    np.testing.assert_array_equal(packed.pixel_values[0, 0], first.pixel_values)
    assert (packed.pixel_values[1] == 0).all()
    np.testing.assert_array_equal(packed.aspect_ratio_ids, [[2], [0], [1]])
    np.testing.assert_array_equal(
        packed.aspect_ratio_mask[:, 0], [[1, 1, 0, 0], [1, 0, 0, 0], [1, 0, 0, 0]]
    )
    assert packed.num_tiles == (2, 0, 1)


def test_pack_images_refuses_mixed_layouts_and_empty_batches() -> None:
    image = Image.fromarray(noise(50, 50))
    with pytest.raises(ValueError, match="different layouts"):
        pack_images([preprocess_image(image), preprocess_image(image, dtype="float16")])
    with pytest.raises(ValueError, match="at least one image"):
        pack_images([None])


def test_cli_preprocess(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "photo.png"
    path.write_bytes(encode(Image.fromarray(noise(1920, 1080)), "PNG"))
    assert main(["preprocess", str(path)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["tiles_hw"] == [2, 2]
    assert report["resized_size_wh"] == [1120, 630]
    assert main(["preprocess", str(tmp_path / "missing.png")]) == 2
    assert "not found" in capsys.readouterr().err


def test_python_dash_m_entry_point() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "guardrt", "--version"], capture_output=True, text=True, check=True
    )
    assert result.stdout.startswith("guardrt ")
