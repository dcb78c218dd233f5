"""`guardrt prompt` (what the model reads) and `guardrt export tiny-random`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from guardrt.cli import main
from guardrt.runtime.prompt import encode_prompt, render_prompt
from guardrt.runtime.server.config import ServerConfig
from guardrt.runtime.tokenizer import Tokenizer

EXAMPLE = Path(__file__).parent.parent / "examples" / "conversation.json"


def _messages() -> list[dict[str, object]]:
    messages: list[dict[str, object]] = json.loads(EXAMPLE.read_text())["messages"]
    return messages


def test_text(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["prompt", "--messages", str(EXAMPLE)]) == 0
    assert capsys.readouterr().out == render_prompt(_messages()) + "\n"


def test_exclusions_and_custom_categories(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    assert main(["prompt", "--messages", str(EXAMPLE), "--exclude", "S1, S13"]) == 0
    expected = render_prompt(_messages(), excluded_categories=["S1", "S13"])
    assert capsys.readouterr().out == expected + "\n"
    categories = tmp_path / "categories.json"
    categories.write_text(json.dumps({"S1": "Spam.", "S2": "Scams."}))
    plain = tmp_path / "messages.json"  # a bare list of messages works too
    plain.write_text(json.dumps(_messages()))
    assert main(["prompt", "--messages", str(plain), "--categories", str(categories)]) == 0
    out = capsys.readouterr().out
    assert "S1: Spam.\nS2: Scams.\n<END UNSAFE CONTENT CATEGORIES>" in out


def test_ids_name_special_tokens(capsys: pytest.CaptureFixture[str], tok: Tokenizer) -> None:
    assert main(["prompt", "--messages", str(EXAMPLE), "--ids"]) == 0
    lines = capsys.readouterr().out.splitlines()
    rows = [line.split(maxsplit=2) for line in lines[1:]]
    assert [int(row[1]) for row in rows] == encode_prompt(_messages(), tokenizer=tok)
    assert rows[0] == ["0", "128000", "<|begin_of_text|>  (special)"]
    assert rows[5] == ["5", "128256", "<|image|>  (special)"]
    assert rows[6] == ["6", "5546", '" Task"']
    assert lines[0].startswith(f"# {len(rows)} tokens")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--exclude", "S14"], "excluded category 'S14' is not in the policy"),
        (["--categories", "/nonexistent.json"], "cannot read categories file"),
    ],
)
def test_errors_exit_2(capsys: pytest.CaptureFixture[str], args: list[str], message: str) -> None:
    assert main(["prompt", "--messages", str(EXAMPLE), *args]) == 2
    assert message in capsys.readouterr().err


def test_bad_messages_file(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"role": "system", "content": "You are a bot."}]))
    assert main(["prompt", "--messages", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "message 0 has role 'system'" in err
    assert "You are a bot." not in err
    bad.write_text("{not json")
    assert main(["prompt", "--messages", str(bad)]) == 2
    assert "is not valid JSON" in capsys.readouterr().err


def test_export_tiny_random(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    target = tmp_path / "tiny"
    assert main(["export", "tiny-random", "-o", str(target), "--seed", "1"]) == 0
    assert "meaningless" in capsys.readouterr().out
    names = {p.name for p in target.iterdir()}
    assert names == {
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "preprocessor_config.json",
        "generation_config.json",
    }
    assert main(["export", "tiny-random", "-o", str(target)]) == 2
    assert "is not empty" in capsys.readouterr().err


def test_serve_flags_reach_the_engine_options(monkeypatch: pytest.MonkeyPatch) -> None:
    """`guardrt serve --quantize fp8 --no-cuda-graphs`: the config the server is built from
    carries them into the engine's options (nothing is served here)."""
    seen: list[ServerConfig] = []

    async def fake_serve(config: ServerConfig) -> int:
        seen.append(config)
        return 0

    monkeypatch.setattr("guardrt.runtime.server.main.serve", fake_serve)
    flags = ["--quantize", "fp8", "--no-cuda-graphs", "--batching", "fifo"]
    flags += ["--warmup-max-batch", "2"]
    assert main(["serve", *flags, "--log-level", "ERROR"]) == 0
    options = seen[0].engine_options(Path("ckpt"))
    assert options.quantize == "fp8"
    assert options.cuda_graphs is False
    assert seen[0].batching == "fifo"
    assert options.warmup_max_batch == 2
    assert main(["serve", "--log-level", "ERROR"]) == 0
    defaults = seen[1].engine_options(Path("ckpt"))
    assert defaults.quantize is None
    assert defaults.cuda_graphs is True
    assert seen[1].batching == "cost"
    assert defaults.warmup_max_batch == 4
    for bad in (["--quantize", "int4"], ["--batching", "shortest-first"]):
        with pytest.raises(SystemExit):
            main(["serve", *bad])


def test_a_file_nesting_json_too_deeply_is_named(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 100_000 + "]" * 100_000)
    assert main(["prompt", "--messages", str(deep)]) == 2
    assert f"{deep} nests JSON too deeply to read" in capsys.readouterr().err
