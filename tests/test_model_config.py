"""The model configuration: real and tiny configs parse, RoPE matches transformers, and every
setting guardrt does not implement is refused by name."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import MllamaConfig, MllamaTextConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.models.mllama.modeling_mllama import MllamaRotaryEmbedding

from guardrt.runtime.errors import ConfigError
from guardrt.runtime.model.config import ModelConfig, RopeConfig
from guardrt.runtime.model.functional import rope_inv_freq
from guardrt.runtime.model.tiny import TINY_CONFIG

LLAMA3_SCALING: dict[str, Any] = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}
CANVAS_RATIOS = [[1, 1], [1, 2], [1, 3], [1, 4], [2, 1], [2, 2], [3, 1], [4, 1]]

# What transformers 4.x writes into every sub-config: none of it changes inference.
_LEGACY_KEYS: dict[str, Any] = {
    "_name_or_path": "",
    "add_cross_attention": False,
    "architectures": None,
    "bad_words_ids": None,
    "begin_suppress_tokens": None,
    "chunk_size_feed_forward": 0,
    "cross_attention_hidden_size": None,
    "decoder_start_token_id": None,
    "diversity_penalty": 0.0,
    "do_sample": False,
    "early_stopping": False,
    "encoder_no_repeat_ngram_size": 0,
    "exponential_decay_length_penalty": None,
    "finetuning_task": None,
    "forced_bos_token_id": None,
    "forced_eos_token_id": None,
    "id2label": {"0": "LABEL_0", "1": "LABEL_1"},
    "initializer_range": 0.02,
    "is_decoder": False,
    "label2id": {"LABEL_0": 0, "LABEL_1": 1},
    "length_penalty": 1.0,
    "max_length": 20,
    "min_length": 0,
    "no_repeat_ngram_size": 0,
    "num_beam_groups": 1,
    "num_beams": 1,
    "num_return_sequences": 1,
    "output_attentions": False,
    "output_hidden_states": False,
    "output_scores": False,
    "prefix": None,
    "problem_type": None,
    "remove_invalid_values": False,
    "repetition_penalty": 1.0,
    "return_dict": True,
    "return_dict_in_generate": False,
    "sep_token_id": None,
    "suppress_tokens": None,
    "task_specific_params": None,
    "temperature": 1.0,
    "tf_legacy_loss": False,
    "tie_encoder_decoder": False,
    "tokenizer_class": None,
    "top_k": 50,
    "top_p": 1.0,
    "torch_dtype": "bfloat16",
    "torchscript": False,
    "typical_p": 1.0,
    "use_bfloat16": False,
}

# Llama Guard 3 11B Vision's config.json as transformers 4.45 wrote it: every sub-config carries
# PretrainedConfig's attributes, the vision one with the base class's tie_word_embeddings=True.
HUB_CONFIG: dict[str, Any] = {
    "architectures": ["MllamaForConditionalGeneration"],
    "image_token_index": 128256,
    "model_type": "mllama",
    "torch_dtype": "bfloat16",
    "transformers_version": "4.45.0.dev0",
    "text_config": _LEGACY_KEYS
    | {
        "model_type": "mllama_text_model",
        "is_encoder_decoder": False,
        "pruned_heads": {},
        "tie_word_embeddings": False,
        "bos_token_id": 128000,
        "eos_token_id": [128001, 128008, 128009],
        "pad_token_id": 128004,
        "cross_attention_layers": [3, 8, 13, 18, 23, 28, 33, 38],
        "dropout": 0,
        "hidden_act": "silu",
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "max_position_embeddings": 131072,
        "num_attention_heads": 32,
        "num_hidden_layers": 40,
        "num_key_value_heads": 8,
        "rms_norm_eps": 1e-05,
        "rope_scaling": dict(LLAMA3_SCALING),
        "rope_theta": 500000.0,
        "use_cache": True,
        "vocab_size": 128256,
    },
    "vision_config": _LEGACY_KEYS
    | {
        "model_type": "mllama_vision_model",
        "is_encoder_decoder": False,
        "pruned_heads": {},
        "tie_word_embeddings": True,
        "bos_token_id": None,
        "eos_token_id": None,
        "pad_token_id": None,
        "attention_heads": 16,
        "hidden_act": "gelu",
        "hidden_size": 1280,
        "image_size": 560,
        "intermediate_layers_indices": [3, 7, 15, 23, 30],
        "intermediate_size": 5120,
        "max_num_tiles": 4,
        "norm_eps": 1e-05,
        "num_channels": 3,
        "num_global_layers": 8,
        "num_hidden_layers": 32,
        "patch_size": 14,
        "supported_aspect_ratios": CANVAS_RATIOS,
        "vision_output_dim": 7680,
    },
}

# The same without the three vision keys guardrt refuses today (see test_hub_config_parses).
FULL_CONFIG: dict[str, Any] = HUB_CONFIG | {
    "vision_config": {
        key: value
        for key, value in HUB_CONFIG["vision_config"].items()
        if key not in {"is_encoder_decoder", "pruned_heads", "tie_word_embeddings"}
    }
}

LLAMA3_ROPE = RopeConfig(
    theta=500000.0,
    llama3=True,
    factor=8.0,
    low_freq_factor=1.0,
    high_freq_factor=4.0,
    original_max_position=8192,
)

_DELETE = object()


def _edited(
    edits: dict[tuple[str, ...], Any], base: dict[str, Any] | None = None
) -> dict[str, Any]:
    """A deep copy of `base` (TINY_CONFIG) with each key path set to its value (or deleted)."""
    document = copy.deepcopy(TINY_CONFIG if base is None else base)
    for path, value in edits.items():
        section = document
        for key in path[:-1]:
            section = section[key]
        if value is _DELETE:
            del section[path[-1]]
        else:
            section[path[-1]] = copy.deepcopy(value)
    return document


def test_tiny_config_parses_with_derived_values() -> None:
    config = ModelConfig.from_dict(TINY_CONFIG)
    text, vision = config.text, config.vision
    assert config.image_token_id == 128256
    assert (text.vocab_size, text.hidden_size, text.num_layers) == (128256, 64, 5)
    assert (text.num_heads, text.num_kv_heads, text.head_dim) == (4, 2, 16)
    assert text.cross_attention_layers == (1, 3)
    assert text.self_attention_layers == (0, 2, 4)
    assert text.rope == LLAMA3_ROPE
    assert text.rms_norm_eps == 1e-5
    assert (vision.hidden_size, vision.num_heads, vision.head_dim) == (32, 2, 16)
    assert (vision.num_layers, vision.num_global_layers) == (4, 2)
    assert vision.intermediate_layers == (1, 3)
    assert vision.num_patches == (560 // 56) ** 2 + 1 == 101
    assert vision.padded_patches == 104
    assert vision.num_aspect_ratios == 8
    assert vision.output_dim == 96


def test_full_size_config_parses() -> None:
    config = ModelConfig.from_dict(FULL_CONFIG)
    text, vision = config.text, config.vision
    assert config.image_token_id == 128256
    assert (text.vocab_size, text.hidden_size, text.num_layers) == (128256, 4096, 40)
    assert (text.num_heads, text.num_kv_heads, text.head_dim) == (32, 8, 128)
    assert text.intermediate_size == 14336
    assert text.max_position_embeddings == 131072
    assert text.cross_attention_layers == (3, 8, 13, 18, 23, 28, 33, 38)
    assert len(text.self_attention_layers) == 32
    assert not set(text.self_attention_layers) & set(text.cross_attention_layers)
    assert text.rope == LLAMA3_ROPE
    assert (vision.hidden_size, vision.num_heads, vision.head_dim) == (1280, 16, 80)
    assert (vision.num_layers, vision.num_global_layers) == (32, 8)
    assert vision.intermediate_size == 5120
    assert vision.output_dim == 7680
    assert vision.intermediate_layers == (3, 7, 15, 23, 30)
    assert (vision.num_patches, vision.padded_patches) == (1601, 1608)
    assert vision.num_aspect_ratios == 8


def test_hub_config_parses() -> None:
    assert ModelConfig.from_dict(HUB_CONFIG) == ModelConfig.from_dict(FULL_CONFIG)


def test_full_size_config_agrees_with_transformers() -> None:
    ours = ModelConfig.from_dict(FULL_CONFIG)
    hf = MllamaConfig.from_dict(HUB_CONFIG)
    text: Any = hf.text_config
    vision: Any = hf.vision_config
    assert ours.image_token_id == hf.image_token_id
    assert (ours.text.vocab_size, ours.text.hidden_size) == (text.vocab_size, text.hidden_size)
    assert (ours.text.num_heads, ours.text.num_kv_heads) == (
        text.num_attention_heads,
        text.num_key_value_heads,
    )
    assert ours.text.num_layers == text.num_hidden_layers
    assert list(ours.text.cross_attention_layers) == text.cross_attention_layers
    assert ours.text.rope.theta == text.rope_parameters["rope_theta"]
    assert ours.vision.num_heads == vision.num_attention_heads
    assert ours.vision.num_global_layers == vision.num_global_layers
    assert list(ours.vision.intermediate_layers) == vision.intermediate_layers_indices
    assert ours.vision.output_dim == vision.vision_output_dim
    assert ours.vision.num_aspect_ratios == len(vision.supported_aspect_ratios)


def test_full_size_config_from_checkpoint(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps(FULL_CONFIG, indent=2))
    expected = ModelConfig.from_dict(FULL_CONFIG)
    assert ModelConfig.from_checkpoint(tmp_path) == expected
    assert ModelConfig.from_checkpoint(tmp_path / "config.json") == expected
    assert ModelConfig.from_checkpoint(str(tmp_path)) == expected


def test_num_attention_heads_spelling_is_accepted() -> None:
    renamed = copy.deepcopy(TINY_CONFIG)
    renamed["vision_config"]["num_attention_heads"] = renamed["vision_config"].pop(
        "attention_heads"
    )
    assert ModelConfig.from_dict(renamed) == ModelConfig.from_dict(TINY_CONFIG)


def test_image_token_id_spelling_is_accepted() -> None:
    renamed = copy.deepcopy(TINY_CONFIG)
    renamed["image_token_id"] = renamed.pop("image_token_index")
    assert ModelConfig.from_dict(renamed) == ModelConfig.from_dict(TINY_CONFIG)


_LEGACY_TYPE = {("type" if k == "rope_type" else k): v for k, v in LLAMA3_SCALING.items()}


@pytest.mark.parametrize(
    "rope_keys",
    [
        {"rope_theta": 500000.0, "rope_scaling": dict(LLAMA3_SCALING)},
        {"rope_theta": 500000.0, "rope_scaling": _LEGACY_TYPE},
        {"rope_theta": 500000, "rope_scaling": dict(LLAMA3_SCALING)},
        {"rope_parameters": LLAMA3_SCALING | {"rope_theta": 500000.0}},
        {"rope_parameters": _LEGACY_TYPE | {"rope_theta": 500000.0}},
        {"rope_theta": 500000.0, "rope_parameters": dict(LLAMA3_SCALING)},
    ],
    ids=[
        "4x-rope-type",
        "4x-legacy-type",
        "4x-int-theta",
        "5x-rope-parameters",
        "5x-legacy-type",
        "5x-theta-outside",
    ],
)
def test_rope_spellings_agree(rope_keys: dict[str, Any]) -> None:
    document = copy.deepcopy(TINY_CONFIG)
    for key in ("rope_theta", "rope_scaling"):
        del document["text_config"][key]
    document["text_config"].update(copy.deepcopy(rope_keys))
    config = ModelConfig.from_dict(document)
    assert config.text.rope == LLAMA3_ROPE
    assert config == ModelConfig.from_dict(TINY_CONFIG)


@pytest.mark.parametrize(
    ("rope_keys", "theta"),
    [
        ({"rope_theta": 500000.0}, 500000.0),
        ({"rope_theta": 10000.0, "rope_scaling": None}, 10000.0),
        ({"rope_theta": 10000.0, "rope_scaling": {"rope_type": "default"}}, 10000.0),
        ({"rope_theta": 10000.0, "rope_scaling": {"type": "default"}}, 10000.0),
        ({"rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}}, 10000.0),
    ],
    ids=["theta-only", "scaling-null", "4x-default", "4x-legacy-default", "5x-default"],
)
def test_default_rope(rope_keys: dict[str, Any], theta: float) -> None:
    document = copy.deepcopy(TINY_CONFIG)
    for key in ("rope_theta", "rope_scaling"):
        del document["text_config"][key]
    document["text_config"].update(rope_keys)
    rope = ModelConfig.from_dict(document).text.rope
    assert rope == RopeConfig(theta=theta, llama3=False)
    reference = MllamaRotaryEmbedding(
        MllamaTextConfig(
            hidden_size=64,
            num_attention_heads=4,
            rope_parameters={"rope_type": "default", "rope_theta": theta},
        )
    )
    assert torch.equal(rope_inv_freq(rope, 16), reference.inv_freq)


def test_llama3_inv_freq_matches_transformers() -> None:
    text = FULL_CONFIG["text_config"]
    rope = ModelConfig.from_dict(FULL_CONFIG).text.rope
    ours = rope_inv_freq(rope, 128)
    assert ours.dtype == torch.float32
    assert ours.shape == (64,)
    # transformers 5.x spelling, through the init function and through the module.
    hf_config = MllamaTextConfig(
        hidden_size=text["hidden_size"],
        num_attention_heads=text["num_attention_heads"],
        num_key_value_heads=text["num_key_value_heads"],
        rope_parameters=LLAMA3_SCALING | {"rope_theta": text["rope_theta"]},
    )
    assert torch.equal(ours, ROPE_INIT_FUNCTIONS["llama3"](hf_config, "cpu")[0])
    assert torch.equal(ours, MllamaRotaryEmbedding(hf_config).inv_freq)
    # transformers 4.x spelling, converted by transformers itself.
    legacy_keys = ("hidden_size", "num_attention_heads", "rope_theta", "rope_scaling")
    legacy = MllamaTextConfig(**{key: copy.deepcopy(text[key]) for key in legacy_keys})
    assert torch.equal(ours, MllamaRotaryEmbedding(legacy).inv_freq)
    torch.testing.assert_close(
        ours[:3], torch.tensor([1.0, 0.8146172, 0.6636013]), rtol=1e-6, atol=0
    )
    torch.testing.assert_close(
        ours[61:64], torch.tensor([4.6247e-7, 3.7673e-7, 3.0689e-7]), rtol=1e-4, atol=0
    )


def test_tiny_inv_freq_matches_transformers() -> None:
    rope = ModelConfig.from_dict(TINY_CONFIG).text.rope
    reference = MllamaRotaryEmbedding(
        MllamaTextConfig(
            hidden_size=64,
            num_attention_heads=4,
            rope_parameters=LLAMA3_SCALING | {"rope_theta": 500000.0},
        )
    )
    assert torch.equal(rope_inv_freq(rope, 16), reference.inv_freq)


# (edits to TINY_CONFIG, text the message must contain)
REFUSALS: list[tuple[str, dict[tuple[str, ...], Any], str]] = [
    ("unknown-top-level", {("vision_feature_layer",): -1}, "vision_feature_layer"),
    ("unknown-text", {("text_config", "attention_bias"): False}, "attention_bias"),
    ("unknown-vision", {("vision_config", "patch_bias"): True}, "patch_bias"),
    ("model-type", {("model_type",): "llava"}, "'llava'"),
    ("model-type-missing", {("model_type",): _DELETE}, "None"),
    ("text-model-type", {("text_config", "model_type"): "llama"}, "'llama'"),
    ("vision-model-type", {("vision_config", "model_type"): "clip"}, "'clip'"),
    ("no-text-config", {("text_config",): _DELETE}, "text_config"),
    ("vision-config-list", {("vision_config",): []}, "vision_config"),
    ("text-gelu", {("text_config", "hidden_act"): "gelu"}, "'gelu'"),
    (
        "vision-gelu-tanh",
        {("vision_config", "hidden_act"): "gelu_pytorch_tanh"},
        "gelu_pytorch_tanh",
    ),
    ("tied-top-level", {("tie_word_embeddings",): True}, "tie_word_embeddings"),
    ("tied-text", {("text_config", "tie_word_embeddings"): True}, "tie_word_embeddings"),
    ("encoder-decoder", {("text_config", "is_encoder_decoder"): True}, "is_encoder_decoder"),
    ("rope-yarn", {("text_config", "rope_scaling", "rope_type"): "yarn"}, "'yarn'"),
    ("rope-legacy-linear", {("text_config", "rope_scaling"): {"type": "linear"}}, "'linear'"),
    ("rope-no-factor", {("text_config", "rope_scaling", "factor"): _DELETE}, "factor"),
    (
        "rope-no-original-max",
        {("text_config", "rope_scaling", "original_max_position_embeddings"): _DELETE},
        "original_max_position_embeddings",
    ),
    ("rope-unknown-key", {("text_config", "rope_scaling", "beta_fast"): 32}, "beta_fast"),
    (
        "rope-default-with-factor",
        {("text_config", "rope_scaling"): {"rope_type": "default", "factor": 2.0}},
        "factor",
    ),
    ("rope-not-object", {("text_config", "rope_scaling"): "llama3"}, "not an object"),
    ("rope-no-theta", {("text_config", "rope_theta"): _DELETE}, "rope_theta"),
    ("rope-zero-theta", {("text_config", "rope_theta"): 0.0}, "rope_theta"),
    ("hidden-vs-heads", {("text_config", "hidden_size"): 66}, "hidden_size 66"),
    ("heads-vs-kv-heads", {("text_config", "num_key_value_heads"): 3}, "3 kv heads"),
    (
        "odd-head-dim",
        {("text_config", "hidden_size"): 12},  # 4 heads of 3
        "head_dim 3",
    ),
    ("vision-hidden-vs-heads", {("vision_config", "attention_heads"): 3}, "hidden_size 32"),
    ("cross-unsorted", {("text_config", "cross_attention_layers"): [3, 1]}, "[3, 1]"),
    ("cross-repeated", {("text_config", "cross_attention_layers"): [1, 1]}, "[1, 1]"),
    ("cross-out-of-range", {("text_config", "cross_attention_layers"): [1, 5]}, "[1, 5]"),
    ("cross-negative", {("text_config", "cross_attention_layers"): [-1, 3]}, "[-1, 3]"),
    ("cross-not-list", {("text_config", "cross_attention_layers"): 3}, "cross_attention_layers"),
    ("missing-intermediate", {("text_config", "intermediate_size"): _DELETE}, "intermediate_size"),
    ("missing-vocab", {("text_config", "vocab_size"): _DELETE}, "vocab_size"),
    ("missing-vision-eps", {("vision_config", "norm_eps"): _DELETE}, "norm_eps"),
    ("string-hidden-size", {("text_config", "hidden_size"): "64"}, "hidden_size is '64'"),
    ("bool-layers", {("text_config", "num_hidden_layers"): True}, "num_hidden_layers is True"),
    ("float-heads", {("text_config", "num_attention_heads"): 4.0}, "num_attention_heads is 4.0"),
    ("bool-eps", {("text_config", "rms_norm_eps"): False}, "rms_norm_eps is False"),
    ("string-eps", {("vision_config", "norm_eps"): "1e-5"}, "norm_eps is '1e-5'"),
    ("image-vs-patch", {("vision_config", "image_size"): 561}, "image_size 561"),
    ("vision-output-dim", {("vision_config", "vision_output_dim"): 64}, "vision_output_dim 64"),
    (
        "intermediate-out-of-range",
        {("vision_config", "intermediate_layers_indices"): [1, 4]},
        "intermediate_layers_indices",
    ),
    (
        "aspect-ratios",
        {("vision_config", "supported_aspect_ratios"): [[1, 1], [1, 2], [2, 1], [2, 2]]},
        "supported_aspect_ratios",
    ),
    ("image-token-below", {("image_token_index",): 128255}, "128255"),
    ("image-token-above", {("image_token_index",): 128264}, "128264"),
    ("image-token-missing", {("image_token_index",): _DELETE}, "image_token_index None"),
    ("image-token-string", {("image_token_index",): "128256"}, "'128256'"),
    ("pruned-heads", {("text_config", "pruned_heads"): {"0": [1]}}, "pruned_heads"),
    ("four-channels", {("vision_config", "num_channels"): 4}, "num_channels"),
]


@pytest.mark.parametrize(
    ("edits", "message"),
    [(edits, message) for _, edits, message in REFUSALS],
    ids=[name for name, _, _ in REFUSALS],
)
def test_refused_by_name(edits: dict[tuple[str, ...], Any], message: str) -> None:
    document = _edited(edits)
    with pytest.raises(ConfigError) as caught:
        ModelConfig.from_dict(document)
    assert message in str(caught.value)


def test_bookkeeping_keys_are_ignored() -> None:
    document = _edited(
        {
            ("text_config", "use_cache"): False,
            ("text_config", "pruned_heads"): {},
            ("text_config", "pad_token_id"): None,
            ("vision_config", "torch_dtype"): "float16",
            ("transformers_version",): "5.17.0",
            ("dtype",): "bfloat16",
            ("tie_word_embeddings",): False,
        }
    )
    assert ModelConfig.from_dict(document) == ModelConfig.from_dict(TINY_CONFIG)


# Values that are wrong without being misspelled: each must still be a ConfigError.
INVALID_VALUES: list[Any] = [
    pytest.param({("text_config", "num_attention_heads"): 0}, id="zero-heads"),
    pytest.param({("text_config", "num_key_value_heads"): 0}, id="zero-kv-heads"),
    pytest.param({("vision_config", "attention_heads"): 0}, id="zero-vision-heads"),
    pytest.param({("vision_config", "patch_size"): 0}, id="zero-patch"),
    pytest.param({("text_config", "hidden_size"): -64}, id="negative-hidden"),
    pytest.param({("vision_config", "max_num_tiles"): 0}, id="zero-tiles"),
    pytest.param({("text_config", "cross_attention_layers"): ["1", "3"]}, id="string-layers"),
    pytest.param(
        {("vision_config", "intermediate_layers_indices"): ["1", "3"]},
        id="string-indices",
    ),
]


@pytest.mark.parametrize("edits", INVALID_VALUES)
def test_invalid_values_are_config_errors(edits: dict[tuple[str, ...], Any]) -> None:
    with pytest.raises(ConfigError):
        ModelConfig.from_dict(_edited(edits))


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("absent", None, "cannot read"),
        ("garbage", "{not json", "is not valid JSON"),
        ("list", "[1, 2]", "is not a JSON object"),
        ("string", '"mllama"', "is not a JSON object"),
    ],
    ids=["missing-dir", "not-json", "json-list", "json-string"],
)
def test_from_checkpoint_refuses_unreadable(
    tmp_path: Path, name: str, content: str | None, message: str
) -> None:
    directory = tmp_path / name
    if content is not None:
        directory.mkdir()
        (directory / "config.json").write_text(content)
    with pytest.raises(ConfigError) as caught:
        ModelConfig.from_checkpoint(directory)
    assert message in str(caught.value)
    assert str(directory) in str(caught.value)


def test_from_checkpoint_refuses_directory_without_config(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read") as caught:
        ModelConfig.from_checkpoint(tmp_path)
    assert str(tmp_path / "config.json") in str(caught.value)
