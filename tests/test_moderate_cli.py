"""`guardrt moderate`, the shell's gRPC client (the README's first call): each flag reaches the
server as it says, the exit status tells a verdict from a failure, and TLS and mutual TLS work
with the server's own certificate."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from guardrt.cli import main
from guardrt.runtime.prepare import Preparer
from guardrt.runtime.server.config import TlsConfig
from tests.server_harness import UNSAFE_S1, FakeEngine, serving
from tests.test_server import jpeg
from tests.test_tls import authority, issued

needs_openssl = pytest.mark.skipif(
    shutil.which("openssl") is None, reason="needs the openssl command to make test certificates"
)


def test_text_image_response_and_exclusions_reach_the_server(
    preparer: Preparer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    picture = tmp_path / "photo.jpg"
    picture.write_bytes(jpeg())
    engine = FakeEngine(UNSAFE_S1)  # it keeps the requests it judged
    with serving(engine, preparer) as server:
        address = f"localhost:{server.port}"
        assert main(["moderate", "--server", address, "--text", "How do I pick a lock?"]) == 0
        assert capsys.readouterr().out == "UNSAFE S1  P(unsafe)=0.25\n"
        flags = ["--image", str(picture), "--response", "Like this.", "--exclude", "S2, S13"]
        assert main(["moderate", "--server", address, "--text", "And this?", *flags]) == 0
        capsys.readouterr()
        assert main(["moderate", "--server", address, "--text", "Hi.", "--json"]) == 0
        answer = json.loads(capsys.readouterr().out)
    assert answer["verdict"]["label"] == "UNSAFE"
    assert answer["verdict"]["categories"] == ["S1"]
    plain, full, _ = (batch[0] for batch in engine.batches)
    assert plain.image is None
    assert full.image is not None  # the photo went with the user's message
    assert "S2" not in full.grammar.codes
    assert "S13" not in full.grammar.codes
    assert "S2" in plain.grammar.codes
    rendered = preparer.tokenizer.decode(list(full.prompt))
    assert "Agent: Like this." in rendered  # judged as the assistant's answer


def test_failures_exit_1_with_the_servers_reason(
    preparer: Preparer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with serving(FakeEngine(), preparer, auth_tokens=frozenset({"s3cret"})) as server:
        address = f"localhost:{server.port}"
        assert main(["moderate", "--server", address, "--text", "Hi."]) == 1
        assert "guardrt: UNAUTHENTICATED: a valid 'authorization: Bearer <token>'" in (
            capsys.readouterr().err
        )
        token = ["--token", "s3cret"]
        assert main(["moderate", "--server", address, "--text", "Hi.", *token]) == 0
        assert capsys.readouterr().out.startswith("SAFE  P(unsafe)=")
        missing = str(tmp_path / "missing.jpg")
        assert main(["moderate", "--server", address, "--image", missing, *token]) == 2
        assert f"cannot read image {missing}: No such file or directory" in (
            capsys.readouterr().err
        )
        assert main(["moderate", "--server", address]) == 2
        assert "nothing to judge" in capsys.readouterr().err
        both = ["--image", missing, "--image-url", "https://images.example.com/a.jpg"]
        assert main(["moderate", "--server", address, *both]) == 2
        assert "--image and --image-url both give the image" in capsys.readouterr().err
        url = ["--image-url", "https://images.example.com/a.jpg", *token]
        assert main(["moderate", "--server", address, *url]) == 1  # no origins: refused
        assert "INVALID_ARGUMENT: message 0 part 0: this server fetches no image URLs" in (
            capsys.readouterr().err
        )


@needs_openssl
def test_tls_and_mutual_tls(
    preparer: Preparer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    server_cert, server_key = authority(tmp_path, "server")
    ca = authority(tmp_path, "clients-ca")
    client_cert, client_key = issued(tmp_path, "client", ca)
    tls = TlsConfig(server_cert, server_key, ca[0])
    with serving(FakeEngine(), preparer, tls=tls) as server:
        call = ["moderate", "--server", f"localhost:{server.port}", "--text", "Hi."]
        call += ["--tls-ca", str(server_cert), "--timeout", "10"]
        assert main(call) == 1  # no client certificate
        assert "UNAVAILABLE" in capsys.readouterr().err
        assert main([*call, "--tls-cert", str(client_cert), "--tls-key", str(client_key)]) == 0
        assert capsys.readouterr().out.startswith("SAFE  P(unsafe)=")
        assert main([*call, "--tls-cert", str(client_cert)]) == 2
        assert "--tls-cert and --tls-key go together" in capsys.readouterr().err
