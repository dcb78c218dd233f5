"""Checkpoint loading: safetensors IO against the safetensors library, strict key checks, shards,
dtypes, round trips through transformers' loader and writer, and the generated tiny model."""

from __future__ import annotations

import json
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import safetensors
import torch
from safetensors.torch import load_file, save_file
from transformers import MllamaForConditionalGeneration

from guardrt.runtime.errors import ConfigError
from guardrt.runtime.model.checkpoint import (
    CheckpointError,
    canonical_name,
    checkpoint_files,
    load_model,
    read_entries,
)
from guardrt.runtime.model.config import ModelConfig
from guardrt.runtime.model.functional import rope_inv_freq
from guardrt.runtime.model.mllama import MllamaModel
from guardrt.runtime.model.resolve import cache_root, resolve_model
from guardrt.runtime.model.safetensors_io import (
    DTYPES,
    MappedFile,
    read_header,
    write_safetensors,
)
from guardrt.runtime.model.tiny import TINY_CONFIG, random_state, tiny_config, write_checkpoint

# A model small enough to build, write and load in milliseconds (82,567 parameters).
SMALL_CONFIG: dict[str, Any] = tiny_config(
    text_config={
        "hidden_size": 32,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "intermediate_size": 64,
        "num_hidden_layers": 3,
        "cross_attention_layers": [1],
        "vocab_size": 512,
        # Guard's special ids lie outside a 512-row vocabulary (transformers checks these).
        "bos_token_id": 1,
        "pad_token_id": None,
    },
    vision_config={
        "image_size": 28,
        "patch_size": 14,
        "hidden_size": 16,
        "attention_heads": 2,
        "intermediate_size": 32,
        "vision_output_dim": 48,
        "num_hidden_layers": 2,
        "num_global_layers": 1,
        "intermediate_layers_indices": [0, 1],
    },
) | {"image_token_index": 512}

PROJECTOR = "multi_modal_projector.weight"  # (32, 48)
NORM = "language_model.model.norm.weight"

DTYPE_CASES = [
    torch.float32,
    torch.float16,
    torch.bfloat16,
    torch.float64,
    torch.int64,
    torch.int32,
    torch.int16,
    torch.int8,
    torch.uint8,
    torch.bool,
]
DTYPE_IDS = [str(dtype).removeprefix("torch.") for dtype in DTYPE_CASES]
SHAPES: list[tuple[int, ...]] = [(1,), (0,), (3, 5), (), (2, 0, 3), (2, 3, 4)]


def _sample(dtype: torch.dtype, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    if dtype == torch.bool:
        return torch.rand(shape, generator=generator) > 0.5
    if dtype.is_floating_point:
        return (torch.randn(shape, generator=generator) * 1000).to(dtype)
    info = torch.iinfo(dtype)
    return torch.randint(info.min, info.max, shape, generator=generator, dtype=dtype)


def _samples(dtype: torch.dtype) -> dict[str, torch.Tensor]:
    return {f"t{i}": _sample(dtype, shape, i) for i, shape in enumerate(SHAPES)}


def _write_dir(
    directory: Path, state: dict[str, torch.Tensor], config: dict[str, Any] | None = None
) -> Path:
    """config.json and model.safetensors only (no tokenizer files)."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config or SMALL_CONFIG))
    write_safetensors(directory / "model.safetensors", state)
    return directory


def _write_shards(
    directory: Path, shards: dict[str, dict[str, torch.Tensor]], weight_map: dict[str, str]
) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(SMALL_CONFIG))
    for file_name, tensors in shards.items():
        write_safetensors(directory / file_name, tensors)
    index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index))
    return directory


def _assert_same_state(a: torch.nn.Module, b: torch.nn.Module) -> None:
    state_a, state_b = a.state_dict(), b.state_dict()
    assert state_a.keys() == state_b.keys()
    for name, tensor in state_a.items():
        assert tensor.dtype == state_b[name].dtype, name
        assert torch.equal(tensor, state_b[name]), name


@pytest.fixture(scope="module")
def small_state() -> dict[str, torch.Tensor]:
    return random_state(ModelConfig.from_dict(SMALL_CONFIG), seed=0)


@pytest.fixture(scope="module")
def small_dir(
    tmp_path_factory: pytest.TempPathFactory, small_state: dict[str, torch.Tensor]
) -> Path:
    return _write_dir(tmp_path_factory.mktemp("small"), small_state)


@pytest.fixture(scope="module")
def small_model(small_dir: Path) -> MllamaModel:
    return load_model(small_dir)


# --- safetensors IO ---------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPE_CASES, ids=DTYPE_IDS)
def test_written_files_read_by_safetensors(tmp_path: Path, dtype: torch.dtype) -> None:
    tensors = _samples(dtype)
    tensors["transposed"] = _sample(dtype, (4, 3), 99).t()  # not contiguous
    path = tmp_path / "out.safetensors"
    write_safetensors(path, tensors, metadata={"format": "pt", "note": "guardrt"})
    loaded = load_file(path)
    assert loaded.keys() == tensors.keys()
    for name, tensor in tensors.items():
        assert loaded[name].dtype == dtype, name
        assert loaded[name].shape == tensor.shape, name
        assert torch.equal(loaded[name], tensor), name
    with safetensors.safe_open(str(path), "pt") as handle:
        assert handle.metadata() == {"format": "pt", "note": "guardrt"}
    # The header is padded so the data starts 8-byte aligned, as the format recommends.
    assert struct.unpack("<Q", path.read_bytes()[:8])[0] % 8 == 0


@pytest.mark.parametrize("dtype", DTYPE_CASES, ids=DTYPE_IDS)
def test_library_files_read_by_mapped_file(tmp_path: Path, dtype: torch.dtype) -> None:
    tensors = _samples(dtype)
    path = tmp_path / "lib.safetensors"
    save_file(tensors, str(path), metadata={"format": "pt"})
    entries = read_header(path)
    assert entries.keys() == tensors.keys()
    mapped = MappedFile(path)
    for name, tensor in tensors.items():
        entry = entries[name]
        assert (entry.name, entry.path, entry.shape) == (name, path, tuple(tensor.shape))
        assert DTYPES[entry.dtype] == dtype
        assert entry.end - entry.begin == tensor.numel() * tensor.element_size()
        read = mapped.tensor(entry)
        assert read.dtype == dtype, name
        assert read.shape == tensor.shape, name
        assert torch.equal(read, tensor), name


def test_round_trip_through_both_writers(tmp_path: Path) -> None:
    tensors = {str(dtype): _sample(dtype, (7, 3), 5) for dtype in DTYPE_CASES}
    ours, theirs = tmp_path / "ours.safetensors", tmp_path / "theirs.safetensors"
    write_safetensors(ours, tensors)
    save_file(load_file(ours), str(theirs))
    entries, mapped = read_header(theirs), MappedFile(theirs)
    for name, tensor in tensors.items():
        assert torch.equal(mapped.tensor(entries[name]), tensor), name


def test_mapped_tensors_are_copy_on_write_views(tmp_path: Path) -> None:
    path = tmp_path / "views.safetensors"
    first, second = torch.arange(6, dtype=torch.float32), torch.full((4,), 7.0)
    write_safetensors(path, {"first": first, "second": second})
    original = path.read_bytes()
    entries = read_header(path)
    mapped = MappedFile(path)
    a, b = mapped.tensor(entries["first"]), mapped.tensor(entries["second"])
    # Both views sit in one buffer, exactly as far apart as in the file: nothing was copied.
    assert b.data_ptr() - a.data_ptr() == entries["second"].begin - entries["first"].begin
    again = mapped.tensor(entries["first"])
    assert again.data_ptr() == a.data_ptr()
    a.add_(100.0)
    assert torch.equal(again, first + 100.0)  # the same memory
    # The map is private: the file on disk is untouched, and a new map reads the old values.
    assert path.read_bytes() == original
    fresh = MappedFile(path).tensor(read_header(path)["first"])
    assert torch.equal(fresh, first)
    assert torch.equal(load_file(path)["first"], first)


def test_loaded_weights_share_the_map(small_dir: Path, small_model: MllamaModel) -> None:
    """On the CPU in the stored dtype, parameters are the mapped file's memory (no copy)."""
    entries = read_entries(small_dir)
    params = dict(small_model.named_parameters())
    base = params[PROJECTOR].data_ptr() - entries[PROJECTOR].begin
    for name in (NORM, "vision_model.class_embedding", "language_model.lm_head.weight"):
        assert params[name].data_ptr() - entries[name].begin == base, name


def _header_file(header: Any, data: bytes = b"") -> bytes:
    encoded = json.dumps(header).encode()
    return struct.pack("<Q", len(encoded)) + encoded + data


_F32_3x5 = {"dtype": "F32", "shape": [3, 5], "data_offsets": [0, 60]}
MALFORMED: list[Any] = [
    pytest.param(b"", "too short", id="empty"),
    pytest.param(b"\x10\x00\x00", "too short", id="truncated-prefix"),
    pytest.param(
        struct.pack("<Q", 4096) + b'{"t": {"dtype"', "byte header in a", id="header-past-end"
    ),
    pytest.param(struct.pack("<Q", 1 << 40) + b"{}", "-byte header", id="huge-header-length"),
    pytest.param(struct.pack("<Q", 10) + b"{not json}", "unreadable", id="bad-json"),
    pytest.param(struct.pack("<Q", 4) + b'"\xff\xfe"', "unreadable", id="not-utf8"),
    pytest.param(
        _header_file({"t": _F32_3x5 | {"dtype": "F8_E4M3"}}, bytes(60)),
        "unsupported dtype F8_E4M3",
        id="unsupported-dtype",
    ),
    pytest.param(
        _header_file({"t": _F32_3x5 | {"data_offsets": [0, 56]}}, bytes(56)),
        "'t' has a byte range that does not fit",
        id="range-vs-shape",
    ),
    pytest.param(
        _header_file({"t": _F32_3x5}, bytes(40)),
        "'t' has a byte range that does not fit",
        id="range-past-end",
    ),
    pytest.param(
        _header_file({"t": {"dtype": "F32", "data_offsets": [0, 4]}}, bytes(4)),
        "'t' has a malformed header entry",
        id="no-shape",
    ),
    pytest.param(
        _header_file({"t": {"dtype": "F32", "shape": [1], "data_offsets": "0-4"}}, bytes(4)),
        "'t' has a malformed header entry",
        id="bad-offsets",
    ),
    pytest.param(
        struct.pack("<Q", 64) + b"{}",
        "",
        id="header-past-end-valid-json",
    ),
    pytest.param(
        _header_file([], bytes(4)),
        "",
        id="header-is-list",
    ),
    pytest.param(
        _header_file({"t": {"dtype": "F32", "shape": [1], "data_offsets": [-4, 0]}}, bytes(4)),
        "",
        id="negative-offsets",
    ),
    pytest.param(
        _header_file({"t": {"dtype": "F32", "shape": [-1, -1], "data_offsets": [0, 4]}}, bytes(4)),
        "",
        id="negative-dims",
    ),
]


@pytest.mark.parametrize(("content", "message"), MALFORMED)
def test_malformed_files_are_refused_by_name(tmp_path: Path, content: bytes, message: str) -> None:
    path = tmp_path / "bad.safetensors"
    path.write_bytes(content)
    with pytest.raises(ConfigError) as caught:
        read_header(path)
    assert message in str(caught.value)
    assert str(path) in str(caught.value)


def test_missing_file_is_refused_by_name(tmp_path: Path) -> None:
    path = tmp_path / "absent.safetensors"
    with pytest.raises(ConfigError, match="cannot read") as caught:
        read_header(path)
    assert str(path) in str(caught.value)


# --- names ------------------------------------------------------------------------------------

NAMES = [
    # hub layout: unchanged
    ("language_model.model.layers.0.self_attn.q_proj.weight",) * 2,
    ("language_model.model.embed_tokens.weight",) * 2,
    ("language_model.lm_head.weight",) * 2,
    ("vision_model.class_embedding",) * 2,
    ("vision_model.transformer.layers.3.mlp.fc1.bias",) * 2,
    ("multi_modal_projector.bias",) * 2,
    # transformers 5.x in-memory layout
    (
        "model.language_model.layers.0.self_attn.q_proj.weight",
        "language_model.model.layers.0.self_attn.q_proj.weight",
    ),
    ("model.language_model.norm.weight", "language_model.model.norm.weight"),
    ("lm_head.weight", "language_model.lm_head.weight"),
    ("model.vision_model.class_embedding", "vision_model.class_embedding"),
    (
        "model.vision_model.global_transformer.layers.0.gate_attn",
        "vision_model.global_transformer.layers.0.gate_attn",
    ),
    ("model.multi_modal_projector.bias", "multi_modal_projector.bias"),
    ("model.multi_modal_projector.weight", "multi_modal_projector.weight"),
]


@pytest.mark.parametrize(
    ("name", "canonical"),
    NAMES,
    ids=[f"{'hub' if a == b else '5x'}-{a}" for a, b in NAMES],
)
def test_canonical_name(name: str, canonical: str) -> None:
    assert canonical_name(name) == canonical
    assert canonical_name(canonical) == canonical


# --- strict loading ---------------------------------------------------------------------------

StateEdit = Callable[[dict[str, torch.Tensor]], None]


def _drop_layer_two(state: dict[str, torch.Tensor]) -> None:
    for name in [n for n in state if n.startswith("language_model.model.layers.2.")]:
        del state[name]


def _add(name: str, tensor: torch.Tensor) -> StateEdit:
    def edit(state: dict[str, torch.Tensor]) -> None:
        state[name] = tensor

    return edit


def _drop(name: str) -> StateEdit:
    def edit(state: dict[str, torch.Tensor]) -> None:
        del state[name]

    return edit


def _transpose(name: str) -> StateEdit:
    def edit(state: dict[str, torch.Tensor]) -> None:
        state[name] = state[name].t().contiguous()

    return edit


def _cast(name: str, dtype: torch.dtype) -> StateEdit:
    def edit(state: dict[str, torch.Tensor]) -> None:
        state[name] = state[name].to(dtype)

    return edit


def _rename(old: str, new: str) -> StateEdit:
    def edit(state: dict[str, torch.Tensor]) -> None:
        state[new] = state[old]

    return edit


REFUSED_STATES: list[Any] = [
    pytest.param(_drop(NORM), [f"missing 1 tensors: {NORM}"], id="missing"),
    pytest.param(
        _drop_layer_two,
        ["missing 9 tensors", "language_model.model.layers.2.input_layernorm.weight", "4 more"],
        id="missing-many",
    ),
    pytest.param(
        _add("language_model.model.layers.0.self_attn.q_proj.bias", torch.zeros(32)),
        ["1 unexpected tensors: language_model.model.layers.0.self_attn.q_proj.bias"],
        id="extra",
    ),
    pytest.param(
        _transpose(PROJECTOR),
        [f"1 misshaped: {PROJECTOR} is [48, 32], expected [32, 48]"],
        id="misshaped",
    ),
    pytest.param(
        _cast("multi_modal_projector.bias", torch.int64),
        ["non-float weights: multi_modal_projector.bias"],
        id="int-weight",
    ),
    pytest.param(
        _cast(NORM, torch.bool),
        [f"non-float weights: {NORM}"],
        id="bool-weight",
    ),
    pytest.param(
        _rename("language_model.lm_head.weight", "lm_head.weight"),
        ["tensor language_model.lm_head.weight is stored twice"],
        id="both-spellings",
    ),
]


@pytest.mark.parametrize(("edit", "messages"), REFUSED_STATES)
def test_mismatched_checkpoints_are_refused_by_key(
    tmp_path: Path, small_state: dict[str, torch.Tensor], edit: StateEdit, messages: list[str]
) -> None:
    state = dict(small_state)
    edit(state)
    directory = _write_dir(tmp_path / "bad", state)
    with pytest.raises(CheckpointError) as caught:
        load_model(directory)
    for message in messages:
        assert message in str(caught.value)


def test_several_problems_are_reported_together(
    tmp_path: Path, small_state: dict[str, torch.Tensor]
) -> None:
    state = dict(small_state)
    for edit in (_drop(NORM), _transpose(PROJECTOR), _add("extra.weight", torch.zeros(1))):
        edit(state)
    with pytest.raises(CheckpointError) as caught:
        load_model(_write_dir(tmp_path / "bad", state))
    message = str(caught.value)
    assert NORM in message
    assert PROJECTOR in message
    assert "extra.weight" in message


def test_tensor_stored_in_two_shards_is_refused(
    tmp_path: Path, small_state: dict[str, torch.Tensor]
) -> None:
    names = sorted(small_state)
    half = len(names) // 2
    shards = {
        "a.safetensors": {n: small_state[n] for n in names[:half]},
        "b.safetensors": {n: small_state[n] for n in [*names[half:], names[0]]},
    }
    weight_map = dict.fromkeys(names[:half], "a.safetensors")
    weight_map |= dict.fromkeys(names[half:], "b.safetensors")
    directory = _write_shards(tmp_path / "twice", shards, weight_map)
    with pytest.raises(CheckpointError, match="stored twice") as caught:
        load_model(directory)
    assert names[0] in str(caught.value)


def test_directory_without_weights_is_refused(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps(SMALL_CONFIG))
    with pytest.raises(CheckpointError, match=r"neither model\.safetensors nor an index") as caught:
        load_model(tmp_path)
    assert str(tmp_path) in str(caught.value)


def test_index_naming_a_missing_shard_is_refused(
    tmp_path: Path, small_state: dict[str, torch.Tensor]
) -> None:
    weight_map = dict.fromkeys(small_state, "model-00001-of-00002.safetensors")
    weight_map[NORM] = "model-00002-of-00002.safetensors"
    directory = _write_shards(
        tmp_path / "partial", {"model-00001-of-00002.safetensors": small_state}, weight_map
    )
    with pytest.raises(CheckpointError, match="missing") as caught:
        load_model(directory)
    assert "model-00002-of-00002.safetensors" in str(caught.value)
    assert "model-00001-of-00002.safetensors" not in str(caught.value)


@pytest.mark.parametrize(
    "index",
    [
        "{not json",
        '{"metadata": {}}',
        "[]",
        pytest.param(
            '{"weight_map": ["a.safetensors"]}',
            id="weight-map-list",
        ),
    ],
    ids=["bad-json", "no-weight-map", "list", "weight-map-list"],
)
def test_malformed_index_is_refused(tmp_path: Path, index: str) -> None:
    (tmp_path / "model.safetensors.index.json").write_text(index)
    with pytest.raises(CheckpointError, match="is not a safetensors index"):
        checkpoint_files(tmp_path)


def test_sharded_checkpoint_loads_like_a_single_file(
    tmp_path: Path, small_state: dict[str, torch.Tensor], small_model: MllamaModel
) -> None:
    names = list(small_state)
    files = {n: f"model-0000{1 + i % 2}-of-00002.safetensors" for i, n in enumerate(names)}
    shards = {
        file_name: {n: small_state[n] for n in names if files[n] == file_name}
        for file_name in sorted(set(files.values()))
    }
    directory = _write_shards(tmp_path / "sharded", shards, files)
    assert [p.name for p in checkpoint_files(directory)] == sorted(shards)
    _assert_same_state(load_model(directory), small_model)


def test_transformers_5_names_load(
    tmp_path: Path, small_state: dict[str, torch.Tensor], small_model: MllamaModel
) -> None:
    renamed = {}
    for name, tensor in small_state.items():
        for hub, in_memory in (
            ("language_model.model.", "model.language_model."),
            ("language_model.lm_head.", "lm_head."),
            ("vision_model.", "model.vision_model."),
            ("multi_modal_projector.", "model.multi_modal_projector."),
        ):
            if name.startswith(hub):
                renamed[in_memory + name.removeprefix(hub)] = tensor
    assert len(renamed) == len(small_state)
    _assert_same_state(load_model(_write_dir(tmp_path / "5x", renamed)), small_model)


# --- dtypes and devices -----------------------------------------------------------------------


def _assert_materialised(model: MllamaModel) -> None:
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        assert not tensor.is_meta, name
        assert tensor.device.type == "cpu", name


def test_stored_dtype_is_kept(
    small_dir: Path, small_state: dict[str, torch.Tensor], small_model: MllamaModel
) -> None:
    _assert_materialised(small_model)
    assert not small_model.training
    state = small_model.state_dict()
    assert state.keys() == small_state.keys()
    for name, tensor in small_state.items():
        assert state[name].dtype == torch.float32, name
        assert torch.equal(state[name], tensor), name


def test_load_casts_to_requested_dtype(
    small_dir: Path, small_state: dict[str, torch.Tensor]
) -> None:
    model = load_model(small_dir, dtype=torch.bfloat16)
    _assert_materialised(model)
    for name, tensor in model.named_parameters():
        assert tensor.dtype == torch.bfloat16, name
        assert torch.equal(tensor, small_state[name].to(torch.bfloat16)), name
    config = ModelConfig.from_dict(SMALL_CONFIG)
    # The RoPE table stays fp32 whatever the weights' dtype.
    assert torch.equal(model.inv_freq, rope_inv_freq(config.text.rope, config.text.head_dim))


def test_bf16_checkpoint_stays_bf16(tmp_path: Path, small_state: dict[str, torch.Tensor]) -> None:
    stored = {name: tensor.to(torch.bfloat16) for name, tensor in small_state.items()}
    model = load_model(_write_dir(tmp_path / "bf16", stored), dtype=None)
    _assert_materialised(model)
    for name, tensor in model.named_parameters():
        assert tensor.dtype == torch.bfloat16, name
        assert torch.equal(tensor, stored[name]), name


def test_mixed_checkpoint_takes_the_majority_dtype(
    tmp_path: Path, small_state: dict[str, torch.Tensor]
) -> None:
    stored = dict(small_state)
    stored[PROJECTOR] = stored[PROJECTOR].to(torch.float16)
    model = load_model(_write_dir(tmp_path / "mixed", stored))
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert torch.equal(model.multi_modal_projector.weight, stored[PROJECTOR].float())


def test_inv_freq_is_computed_not_meta(small_model: MllamaModel) -> None:
    config = ModelConfig.from_dict(SMALL_CONFIG)
    assert not small_model.inv_freq.is_meta
    assert small_model.inv_freq.dtype == torch.float32
    assert small_model.inv_freq.shape == (config.text.head_dim // 2,)
    assert torch.equal(small_model.inv_freq, rope_inv_freq(config.text.rope, config.text.head_dim))
    assert "inv_freq" not in small_model.state_dict()  # computed, never stored


def test_semantics_passes_through(small_dir: Path) -> None:
    assert load_model(small_dir, semantics="transformers").semantics == "transformers"
    assert load_model(small_dir).semantics == "meta"


# --- transformers interop ---------------------------------------------------------------------


def test_transformers_loads_and_writes_our_checkpoints(
    tmp_path: Path, small_state: dict[str, torch.Tensor]
) -> None:
    ours = tmp_path / "ours"
    write_checkpoint(ours, SMALL_CONFIG, small_state)
    loaded: Any = MllamaForConditionalGeneration.from_pretrained(
        ours, dtype=torch.float32, output_loading_info=True
    )
    hf, info = loaded
    assert not info["missing_keys"]
    assert not info["unexpected_keys"]
    assert not info["mismatched_keys"]
    assert not info["error_msgs"]
    # transformers holds exactly our weights (its 5.x names mapped by canonical_name).
    hf_state = hf.state_dict()
    assert {canonical_name(n) for n in hf_state} == set(small_state)
    for name, tensor in hf_state.items():
        assert torch.equal(tensor, small_state[canonical_name(name)]), name

    reference = load_model(ours)
    # Its writer: hub names in one file, and 5.x names in shards with an index.
    hub_layout, sharded = tmp_path / "hf-hub", tmp_path / "hf-sharded"
    hf.save_pretrained(hub_layout)
    hf.save_pretrained(sharded, max_shard_size="100KB", save_original_format=False)
    assert (sharded / "model.safetensors.index.json").is_file()
    assert len(checkpoint_files(sharded)) > 1
    assert any(
        name.startswith("model.") for f in checkpoint_files(sharded) for name in read_header(f)
    )
    for directory in (hub_layout, sharded):
        assert ModelConfig.from_checkpoint(directory) == ModelConfig.from_dict(SMALL_CONFIG)
        reloaded = load_model(directory)
        params = dict(reloaded.named_parameters())
        for name, tensor in reference.named_parameters():
            assert torch.equal(params[name], tensor), f"{directory.name}: {name}"


# --- the generated tiny model -----------------------------------------------------------------


def test_resolve_model_passes_paths_through(tmp_path: Path) -> None:
    assert resolve_model(tmp_path) == tmp_path
    assert resolve_model(str(tmp_path)) == tmp_path
    assert resolve_model("some/relative/dir") == Path("some/relative/dir")
    assert not any(tmp_path.iterdir())


def test_cache_root(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("GUARDRT_CACHE", str(tmp_path))
    assert cache_root() == tmp_path
    monkeypatch.delenv("GUARDRT_CACHE")
    assert cache_root() == Path.home() / ".cache" / "guardrt"


def test_tiny_random_is_generated_once(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("GUARDRT_CACHE", str(tmp_path))
    target = resolve_model("tiny-random")
    assert target == tmp_path / "tiny-random-v2"
    assert [p.name for p in tmp_path.iterdir()] == ["tiny-random-v2"]  # no scratch left over
    expected = {
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "preprocessor_config.json",
        "generation_config.json",
    }
    assert expected <= {p.name for p in target.iterdir()}
    assert "chat_template" in json.loads((target / "tokenizer_config.json").read_text())
    preprocessor = json.loads((target / "preprocessor_config.json").read_text())
    assert preprocessor["size"] == {"height": 560, "width": 560}
    assert preprocessor["max_image_tiles"] == 4
    assert ModelConfig.from_checkpoint(target) == ModelConfig.from_dict(TINY_CONFIG)
    state = load_model(target).state_dict()
    for name, tensor in random_state(ModelConfig.from_dict(TINY_CONFIG), seed=0).items():
        assert torch.equal(state[name], tensor), name

    mtimes = {p.name: p.stat().st_mtime_ns for p in target.iterdir()}
    assert resolve_model("tiny-random") == target
    assert {p.name: p.stat().st_mtime_ns for p in target.iterdir()} == mtimes
    assert [p.name for p in tmp_path.iterdir()] == ["tiny-random-v2"]


# --- random weights ---------------------------------------------------------------------------


def _is_gate(name: str) -> bool:
    last = name.rsplit(".", 1)[-1]
    return last in {"gate", "gate_attn", "gate_ffn"} or last.endswith("_gate")


def test_random_state_is_reproducible(small_state: dict[str, torch.Tensor]) -> None:
    config = ModelConfig.from_dict(SMALL_CONFIG)
    with torch.device("meta"):
        shapes = {n: t.shape for n, t in MllamaModel(config).state_dict().items()}
    assert {n: t.shape for n, t in small_state.items()} == shapes
    assert all(t.dtype == torch.float32 for t in small_state.values())
    same, other = random_state(config, seed=0), random_state(config, seed=1)
    for name, tensor in small_state.items():
        assert torch.equal(same[name], tensor), name
        assert not torch.equal(other[name], tensor), name


def test_random_state_norms_and_gates(small_state: dict[str, torch.Tensor]) -> None:
    norms = [n for n in small_state if "norm" in n and n.endswith(".weight")]
    gates = [n for n in small_state if _is_gate(n)]
    assert len(norms) == 17
    assert len(gates) == 7  # 3 positional, 2 per global layer, 2 per cross layer
    for name in norms:
        weight = small_state[name]
        assert (weight - 1).abs().max() < 0.6, name
        assert abs(float(weight.mean()) - 1) < 0.1, name
    for name in gates:
        assert ((small_state[name] >= 0.3) & (small_state[name] <= 0.7)).all(), name
    others = [n for n in small_state if n not in norms and n not in gates]
    assert all(float(small_state[n].abs().max()) > 0 for n in others)


def test_random_state_scale(small_state: dict[str, torch.Tensor]) -> None:
    config = ModelConfig.from_dict(SMALL_CONFIG)
    doubled = random_state(config, seed=0, scale=0.16)
    name = "language_model.model.layers.0.self_attn.q_proj.weight"
    assert torch.allclose(doubled[name], 2 * small_state[name])
    assert torch.equal(doubled[NORM], small_state[NORM])
