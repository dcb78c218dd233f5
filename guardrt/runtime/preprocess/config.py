"""Image preprocessing settings: one frozen config, from a checkpoint or the model's defaults.

The defaults are Llama Guard 3 11B Vision's `preprocessor_config.json` (reference §1.5): tiles of
560, at most 4, CLIP mean/std, PIL bilinear, rescale 1/255. A checkpoint's file is read strictly:
settings guardrt does not implement (no resize, no padding, another filter, non-square tiles) are
refused by name instead of silently ignored.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from guardrt.runtime.errors import ConfigError
from guardrt.runtime.jsonfile import read_json_object

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
PIL_BILINEAR = 2

# Keys of an HF `preprocessor_config.json` that carry no setting for us (bookkeeping only).
_IGNORED_KEYS = frozenset({"processor_class", "_processor_class"})
_PROCESSOR_TYPES = frozenset({"MllamaImageProcessor", "MllamaImageProcessorPil"})
# Keys whose value must be exactly this, because guardrt implements only that behaviour.
_REQUIRED_VALUES: Mapping[str, object] = {
    "do_convert_rgb": True,
    "do_normalize": True,
    "do_pad": True,
    "do_rescale": True,
    "do_resize": True,
    "resample": PIL_BILINEAR,
}


@dataclass(frozen=True)
class ImageLimits:
    """What an untrusted image may cost before guardrt refuses it."""

    max_bytes: int = 32 * 1024 * 1024  # encoded size
    max_pixels: int = 25_000_000  # width·height, checked from the header before decoding

    def __post_init__(self) -> None:
        if self.max_bytes < 1 or self.max_pixels < 1:
            raise ConfigError(
                f"image limits must be positive, got max_bytes={self.max_bytes}, "
                f"max_pixels={self.max_pixels}"
            )


@dataclass(frozen=True)
class ImageConfig:
    """How images become tiles. Built once, validated once, never mutated."""

    tile_size: int = 560  # tile side in pixels (square tiles)
    max_tiles: int = 4  # tiles per image at most
    image_mean: tuple[float, float, float] = CLIP_MEAN  # per RGB channel, after rescale
    image_std: tuple[float, float, float] = CLIP_STD
    rescale_factor: float = 1 / 255  # uint8 → [0, 1]
    limits: ImageLimits = dataclasses.field(default_factory=ImageLimits)

    def __post_init__(self) -> None:
        if self.tile_size < 1 or self.max_tiles < 1:
            raise ConfigError(
                f"tile_size and max_tiles must be >= 1, got tile_size={self.tile_size}, "
                f"max_tiles={self.max_tiles}"
            )
        if len(self.image_mean) != 3 or len(self.image_std) != 3:
            raise ConfigError(
                f"image_mean and image_std need 3 values, got {list(self.image_mean)} "
                f"and {list(self.image_std)}"
            )
        if any(s <= 0 for s in self.image_std):
            raise ConfigError(f"image_std must be positive, got {list(self.image_std)}")
        if self.rescale_factor <= 0:
            raise ConfigError(f"rescale_factor must be positive, got {self.rescale_factor}")

    def replace(self, **changes: Any) -> ImageConfig:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_preprocessor_config(
        cls,
        source: str | os.PathLike[str] | Mapping[str, Any],
        *,
        limits: ImageLimits | None = None,
    ) -> ImageConfig:
        """Read an HF `preprocessor_config.json` (a path, a checkpoint directory or a dict)."""
        raw = _load_json(source)
        return cls(**_translate(raw), limits=limits or ImageLimits())


def _load_json(source: str | os.PathLike[str] | Mapping[str, Any]) -> Mapping[str, Any]:
    if isinstance(source, Mapping):
        return source
    path = Path(source)
    if path.is_dir():
        path = path / "preprocessor_config.json"
    return read_json_object(path, "preprocessor config")


def _translate(raw: Mapping[str, Any]) -> dict[str, Any]:
    """HF keys → ImageConfig fields, refusing unknown keys and unsupported values by name."""
    fields: dict[str, Any] = {}
    for key, value in raw.items():
        if key in _IGNORED_KEYS:
            continue
        if key == "image_processor_type":
            if value not in _PROCESSOR_TYPES:
                raise ConfigError(f"image_processor_type {value!r} is not an mllama processor")
            continue
        if key in _REQUIRED_VALUES:
            expected = _REQUIRED_VALUES[key]
            if type(value) is not type(expected) or value != expected:
                raise ConfigError(
                    f"preprocessor setting {key}={value!r} is not supported "
                    f"(guardrt implements only {key}={expected!r})"
                )
        elif key == "size":
            fields["tile_size"] = _square_size(value)
        elif key == "max_image_tiles":
            fields["max_tiles"] = _positive_int(key, value)
        elif key in ("image_mean", "image_std"):
            fields[key] = _triple(key, value)
        elif key == "rescale_factor":
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                raise ConfigError(f"rescale_factor must be a number, got {value!r}")
            fields["rescale_factor"] = float(value)
        else:
            raise ConfigError(f"unknown preprocessor setting {key!r}")
    return fields


def _square_size(value: object) -> int:
    if not isinstance(value, Mapping) or set(value) != {"height", "width"}:
        raise ConfigError(f"size must be {{'height': N, 'width': N}}, got {value!r}")
    if value["height"] != value["width"]:
        raise ConfigError(f"tiles must be square, got size={dict(value)!r}")
    return _positive_int("size", value["height"])


def _positive_int(key: str, value: object) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigError(f"{key} must be a positive integer, got {value!r}")
    return value


def _triple(key: str, value: object) -> tuple[float, float, float]:
    if (
        not isinstance(value, (list, tuple))
        or len(value) != 3
        or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
    ):
        raise ConfigError(f"{key} must be a list of 3 numbers, got {value!r}")
    return (float(value[0]), float(value[1]), float(value[2]))


DEFAULT_IMAGE_CONFIG = ImageConfig()
