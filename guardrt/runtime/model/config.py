"""The model configuration, read once from a checkpoint's `config.json` (reference §1).

Frozen and validated at load. Keys that change what the network computes are read and checked;
settings guardrt does not implement (another RoPE type, tied embeddings, a non-SiLU decoder) are
refused by name. Keys that are pure bookkeeping (generation defaults, labels, dtype hints that a
caller overrides anyway) are accepted and ignored; any other key is refused, so a config from a
different model family cannot load by accident.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from guardrt.runtime.errors import ConfigError
from guardrt.runtime.jsonfile import read_json_object
from guardrt.runtime.preprocess.canvas import supported_aspect_ratios

# Keys every transformers config may carry (4.x writes all of them out, 5.x fewer) that do not
# change inference here. Generation settings are ignored: the verdict is always greedy.
_BOOKKEEPING = frozenset(
    {
        "_name_or_path", "_attn_implementation_autoset", "add_cross_attention", "architectures",
        "bad_words_ids", "begin_suppress_tokens", "bos_token_id", "chunk_size_feed_forward",
        "cross_attention_hidden_size", "decoder_start_token_id", "diversity_penalty", "do_sample",
        "dropout", "attention_dropout", "dtype", "early_stopping", "encoder_no_repeat_ngram_size",
        "eos_token_id", "exponential_decay_length_penalty", "finetuning_task",
        "forced_bos_token_id", "forced_eos_token_id", "id2label", "initializer_range",
        "is_decoder", "label2id", "length_penalty", "max_length", "min_length",
        "no_repeat_ngram_size", "num_beam_groups", "num_beams", "num_return_sequences",
        "output_attentions", "output_hidden_states", "output_scores", "pad_token_id", "prefix",
        "problem_type", "projection_dim", "remove_invalid_values", "repetition_penalty",
        "return_dict", "return_dict_in_generate", "sep_token_id", "suppress_tokens",
        "task_specific_params", "temperature", "tf_legacy_loss", "tie_encoder_decoder",
        "tokenizer_class", "top_k", "top_p", "torch_dtype", "torchscript", "transformers_version",
        "typical_p", "use_bfloat16", "use_cache",
    }
)  # fmt: skip


def _check_base_keys(section: Mapping[str, Any], where: str) -> None:
    """Keys transformers 4.x writes into every (sub-)config from its base class: harmless at
    their defaults, refused where they would change the network."""
    _expect(section, "is_encoder_decoder", (False,), where)
    if section.get("pruned_heads"):
        raise ConfigError(f"{where}.pruned_heads is not empty; pruned heads are not implemented")


_BASE_KEYS = frozenset({"is_encoder_decoder", "pruned_heads"})


def _refuse_unknown(section: Mapping[str, Any], known: frozenset[str], where: str) -> None:
    unknown = sorted(set(section) - known - _BOOKKEEPING)
    if unknown:
        raise ConfigError(f"{where} has settings guardrt does not implement: {', '.join(unknown)}")


def _require(section: Mapping[str, Any], key: str, kind: type, where: str) -> Any:
    if key not in section:
        raise ConfigError(f"{where} lacks {key!r}")
    value = section[key]
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or isinstance(value, bool) is not (kind is bool):
        raise ConfigError(f"{where}.{key} is {value!r}, expected {kind.__name__}")
    if isinstance(value, int | float) and kind is not bool and value <= 0:
        raise ConfigError(f"{where}.{key} is {value!r}, expected a positive number")
    return value


def _indices(section: Mapping[str, Any], key: str, where: str) -> tuple[int, ...]:
    """A sorted list of distinct non-negative integers (layer indices)."""
    values: list[Any] = _require(section, key, list, where)
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values) or (
        sorted(set(values)) != values
    ):
        raise ConfigError(f"{where}.{key} {values!r} is not a sorted list of layer indices")
    return tuple(values)


def _same(value: Any, allowed: Any) -> bool:
    """Equal and of the same type: `0` is not `False`, `True` is not `1`."""
    return type(value) is type(allowed) and value == allowed


def _expect(section: Mapping[str, Any], key: str, allowed: tuple[Any, ...], where: str) -> None:
    if key in section and not any(_same(section[key], a) for a in allowed):
        raise ConfigError(
            f"{where}.{key} is {section[key]!r}; guardrt implements only {allowed[0]!r}"
        )


@dataclass(frozen=True)
class RopeConfig:
    theta: float
    llama3: bool  # llama3 frequency scaling (reference §5.3); else plain RoPE
    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position: int = 8192


def _rope(text: Mapping[str, Any], where: str) -> RopeConfig:
    """Both spellings: 4.x `rope_theta` + `rope_scaling`, 5.x `rope_parameters`."""
    params = text.get("rope_parameters") or text.get("rope_scaling") or {"rope_type": "default"}
    if not isinstance(params, Mapping):
        raise ConfigError(f"{where}.rope_parameters is not an object")
    kind = params.get("rope_type", params.get("type", "default"))
    theta = params.get("rope_theta", text.get("rope_theta"))
    if isinstance(theta, bool) or not isinstance(theta, int | float) or theta <= 0:
        raise ConfigError(f"{where} has no valid rope_theta ({theta!r})")
    known = {"rope_type", "type", "rope_theta", "factor", "low_freq_factor", "high_freq_factor"}
    known |= {"original_max_position_embeddings"}
    if kind == "default":
        _refuse_unknown(params, frozenset({"rope_type", "type", "rope_theta"}), f"{where}.rope")
        return RopeConfig(theta=float(theta), llama3=False)
    if kind != "llama3":
        raise ConfigError(f"{where} RoPE type {kind!r} is not implemented (default, llama3)")
    _refuse_unknown(params, frozenset(known), f"{where}.rope")
    needed = known - {"rope_type", "type", "rope_theta"}
    values = {k: params[k] for k in needed if k in params}
    if len(values) != len(needed):
        raise ConfigError(f"{where} llama3 RoPE lacks {sorted(needed - set(values))}")
    return RopeConfig(
        theta=float(theta),
        llama3=True,
        factor=float(values["factor"]),
        low_freq_factor=float(values["low_freq_factor"]),
        high_freq_factor=float(values["high_freq_factor"]),
        original_max_position=int(values["original_max_position_embeddings"]),
    )


@dataclass(frozen=True)
class TextConfig:
    vocab_size: int  # rows of lm_head; the embedding has 8 more (learnable image embeddings)
    hidden_size: int
    num_layers: int  # self + cross layers, interleaved
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    rms_norm_eps: float
    rope: RopeConfig
    max_position_embeddings: int
    cross_attention_layers: tuple[int, ...]

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def self_attention_layers(self) -> tuple[int, ...]:
        return tuple(i for i in range(self.num_layers) if i not in self.cross_attention_layers)


_TEXT_KEYS = frozenset(
    {
        "model_type", "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
        "num_key_value_heads", "intermediate_size", "rms_norm_eps", "rope_theta", "rope_scaling",
        "rope_parameters", "max_position_embeddings", "cross_attention_layers", "hidden_act",
        "tie_word_embeddings",
    }
) | _BASE_KEYS  # fmt: skip


def _text_config(text: Mapping[str, Any]) -> TextConfig:
    where = "text_config"
    _refuse_unknown(text, _TEXT_KEYS, where)
    _expect(text, "model_type", ("mllama_text_model",), where)
    _expect(text, "hidden_act", ("silu",), where)
    _expect(text, "tie_word_embeddings", (False,), where)
    _check_base_keys(text, where)
    layers = _indices(text, "cross_attention_layers", where)
    config = TextConfig(
        vocab_size=_require(text, "vocab_size", int, where),
        hidden_size=_require(text, "hidden_size", int, where),
        num_layers=_require(text, "num_hidden_layers", int, where),
        num_heads=_require(text, "num_attention_heads", int, where),
        num_kv_heads=_require(text, "num_key_value_heads", int, where),
        intermediate_size=_require(text, "intermediate_size", int, where),
        rms_norm_eps=_require(text, "rms_norm_eps", float, where),
        rope=_rope(text, where),
        max_position_embeddings=_require(text, "max_position_embeddings", int, where),
        cross_attention_layers=layers,
    )
    if config.hidden_size % config.num_heads or config.num_heads % config.num_kv_heads:
        raise ConfigError(
            f"{where}: hidden_size {config.hidden_size}, {config.num_heads} heads and "
            f"{config.num_kv_heads} kv heads do not divide evenly"
        )
    if config.head_dim % 2:
        raise ConfigError(f"{where}: head_dim {config.head_dim} is odd; RoPE needs pairs")
    if not all(i < config.num_layers for i in layers):
        raise ConfigError(
            f"{where}.cross_attention_layers {list(layers)} exceed {config.num_layers} layers"
        )
    return config


@dataclass(frozen=True)
class VisionConfig:
    hidden_size: int
    num_layers: int  # the local transformer
    num_global_layers: int
    num_heads: int
    intermediate_size: int
    output_dim: int  # hidden_size × (1 + len(intermediate_layers))
    image_size: int  # tile side
    patch_size: int
    norm_eps: float
    max_num_tiles: int
    intermediate_layers: tuple[int, ...]

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def num_patches(self) -> int:
        """Tokens per tile: the patch grid plus one CLS (1601 for 560/14)."""
        return (self.image_size // self.patch_size) ** 2 + 1

    @property
    def padded_patches(self) -> int:
        """Tokens per tile after padding to a multiple of 8 (1608)."""
        return math.ceil(self.num_patches / 8) * 8

    @property
    def num_aspect_ratios(self) -> int:
        return len(supported_aspect_ratios(self.max_num_tiles))


_VISION_KEYS = frozenset(
    {
        "model_type", "hidden_size", "num_hidden_layers", "num_global_layers", "attention_heads",
        "num_attention_heads", "intermediate_size", "vision_output_dim", "image_size",
        "patch_size", "norm_eps", "max_num_tiles", "intermediate_layers_indices",
        "supported_aspect_ratios", "num_channels", "hidden_act",
        # 4.x writes the base class's default (True) here; it means nothing for the tower.
        "tie_word_embeddings",
    }
) | _BASE_KEYS  # fmt: skip


def _vision_config(vision: Mapping[str, Any]) -> VisionConfig:
    where = "vision_config"
    _refuse_unknown(vision, _VISION_KEYS, where)
    _expect(vision, "model_type", ("mllama_vision_model",), where)
    _expect(vision, "hidden_act", ("gelu",), where)
    _expect(vision, "num_channels", (3,), where)
    _check_base_keys(vision, where)
    heads_key = "attention_heads" if "attention_heads" in vision else "num_attention_heads"
    config = VisionConfig(
        hidden_size=_require(vision, "hidden_size", int, where),
        num_layers=_require(vision, "num_hidden_layers", int, where),
        num_global_layers=_require(vision, "num_global_layers", int, where),
        num_heads=_require(vision, heads_key, int, where),
        intermediate_size=_require(vision, "intermediate_size", int, where),
        output_dim=_require(vision, "vision_output_dim", int, where),
        image_size=_require(vision, "image_size", int, where),
        patch_size=_require(vision, "patch_size", int, where),
        norm_eps=_require(vision, "norm_eps", float, where),
        max_num_tiles=_require(vision, "max_num_tiles", int, where),
        intermediate_layers=_indices(vision, "intermediate_layers_indices", where),
    )
    if config.hidden_size % config.num_heads:
        raise ConfigError(f"{where}: hidden_size {config.hidden_size} % heads != 0")
    if config.image_size % config.patch_size:
        raise ConfigError(
            f"{where}: image_size {config.image_size} is not a multiple of "
            f"patch_size {config.patch_size}"
        )
    if config.output_dim != config.hidden_size * (1 + len(config.intermediate_layers)):
        raise ConfigError(
            f"{where}.vision_output_dim {config.output_dim} != hidden_size × (1 + "
            f"{len(config.intermediate_layers)} intermediate layers)"
        )
    if config.max_num_tiles > 16:
        raise ConfigError(f"{where}.max_num_tiles {config.max_num_tiles} is beyond 16")
    if not all(i < config.num_layers for i in config.intermediate_layers):
        raise ConfigError(f"{where}.intermediate_layers_indices {config.intermediate_layers}")
    ratios = [list(r) for r in supported_aspect_ratios(config.max_num_tiles)]
    if vision.get("supported_aspect_ratios", ratios) != ratios:
        raise ConfigError(
            f"{where}.supported_aspect_ratios differ from the canvas arrangements for "
            f"{config.max_num_tiles} tiles ({ratios})"
        )
    return config


@dataclass(frozen=True)
class ModelConfig:
    text: TextConfig
    vision: VisionConfig
    image_token_id: int  # 128256: embedded from the 8 extra rows, never emitted

    @classmethod
    def from_dict(cls, document: Mapping[str, Any]) -> ModelConfig:
        where = "config.json"
        if document.get("model_type") != "mllama":
            raise ConfigError(f"{where}: model_type is {document.get('model_type')!r}, not mllama")
        known = frozenset(
            {"model_type", "text_config", "vision_config", "image_token_index", "image_token_id"}
        )
        _refuse_unknown(document, known | {"tie_word_embeddings"}, where)
        _expect(document, "tie_word_embeddings", (False,), where)
        text, vision = document.get("text_config"), document.get("vision_config")
        if not isinstance(text, Mapping) or not isinstance(vision, Mapping):
            raise ConfigError(f"{where} needs text_config and vision_config objects")
        image = document.get("image_token_index", document.get("image_token_id"))
        config = cls(text=_text_config(text), vision=_vision_config(vision), image_token_id=image)
        if not isinstance(image, int) or not (
            config.text.vocab_size <= image < config.text.vocab_size + 8
        ):
            raise ConfigError(
                f"{where}.image_token_index {image!r} is not one of the 8 embedding rows after "
                f"the vocabulary ({config.text.vocab_size})"
            )
        return config

    @classmethod
    def from_checkpoint(cls, path: str | Path) -> ModelConfig:
        """From a checkpoint directory or its `config.json`."""
        target = Path(path)
        if target.is_dir():
            target = target / "config.json"
        return cls.from_dict(read_json_object(target, "model config"))
