"""`guardrt serve`'s flags from $GUARDRT_<FLAG> variables: the command line wins, and a value
the flag would refuse is refused naming the variable."""

from __future__ import annotations

from typing import Any

import pytest

from guardrt.cli import _parsers, main
from guardrt.env_flags import env_flags
from guardrt.runtime.errors import ConfigError


def _serve_args(environ: dict[str, str], *given: str) -> Any:
    parser, serve = _parsers()
    return parser.parse_args(["serve", *env_flags(serve, environ), *given])


def test_variables_give_flags_and_the_command_line_wins() -> None:
    environ = {
        "GUARDRT_MAX_QUEUE": "512",
        "GUARDRT_BATCHING": "fifo",
        "GUARDRT_LISTEN_WHILE_LOADING": "true",
        "GUARDRT_HTTP_PORT": "-1",  # a value that starts with '-' stays a value
        "GUARDRT_IMAGE_URL_ORIGINS": "https://images.example.com",
        "GUARDRT_AUTH_TOKENS": "not-a-flag",  # the tokens themselves: left to tokens.py
        "GUARDRT_UNKNOWN": "x",
    }
    args = _serve_args(environ)
    assert (args.max_queue, args.batching, args.listen_while_loading) == (512, "fifo", True)
    assert args.http_port == -1
    assert args.image_url_origins == "https://images.example.com"
    given = _serve_args(environ, "--max-queue", "64", "--batching", "cost")
    assert (given.max_queue, given.batching) == (64, "cost")
    defaults = _serve_args({"GUARDRT_LISTEN_WHILE_LOADING": "off"})
    assert defaults.listen_while_loading is False
    assert defaults.max_queue == 256


@pytest.mark.parametrize(
    ("environ", "message"),
    [
        (
            {"GUARDRT_MAX_QUEUE": "lots"},
            "$GUARDRT_MAX_QUEUE='lots' is not a value --max-queue takes",
        ),
        (
            {"GUARDRT_BATCHING": "lifo"},
            "$GUARDRT_BATCHING='lifo': --batching takes one of cost, fifo",
        ),
        (
            {"GUARDRT_LISTEN_WHILE_LOADING": "maybe"},
            "$GUARDRT_LISTEN_WHILE_LOADING must be true or false",
        ),
    ],
    ids=["not-a-number", "not-a-choice", "not-a-switch"],
)
def test_a_bad_value_is_refused_naming_its_variable(
    environ: dict[str, str],
    message: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    _, serve = _parsers()
    with pytest.raises(ConfigError) as refused:
        env_flags(serve, environ)
    assert message in str(refused.value)
    for name, value in environ.items():
        monkeypatch.setenv(name, value)
    assert main(["serve"]) == 2  # before anything loads
    assert message in capsys.readouterr().err
    with pytest.raises(SystemExit) as shown:  # help still shows
        main(["serve", "--help"])
    assert shown.value.code == 0


def test_other_commands_ignore_the_variables(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("GUARDRT_MAX_QUEUE", "lots")
    with pytest.raises(SystemExit) as shown:
        main(["moderate", "--help"])
    assert shown.value.code == 0
    assert "--server" in capsys.readouterr().out
