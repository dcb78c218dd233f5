"""TLS on both servers from one certificate: HTTPS for the HTTP API, bad files named at start,
mutual TLS, and rotation while serving (a reload presents the new certificate to new
connections, and keeps the one in use when the new files are bad)."""

from __future__ import annotations

import asyncio
import http.client
import json
import shutil
import ssl
import subprocess
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from guardrt.runtime.errors import ConfigError
from guardrt.runtime.prepare import Preparer
from guardrt.runtime.server import main as server_main
from guardrt.runtime.server.config import ServerConfig, TlsConfig
from guardrt.runtime.server.loading import LoadingPorts
from guardrt.runtime.server.main import access_line
from guardrt.runtime.server.tls import ServerTls, server_context
from guardrt.runtime.server.tokens import BearerTokens
from guardrt.v1 import moderation_pb2 as pb
from guardrt.v1 import moderation_pb2_grpc as pb_grpc
from tests.server_harness import FakeEngine, ServerThread, serving

pytestmark = pytest.mark.skipif(
    shutil.which("openssl") is None, reason="needs the openssl command to make test certificates"
)
_EC = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True)


def authority(directory: Path, name: str) -> tuple[Path, Path]:
    """A self-signed CA (or server certificate for localhost): its certificate and key."""
    cert, key = directory / f"{name}.pem", directory / f"{name}.key"
    _openssl(
        "req", "-x509", *_EC, "-days", "1", "-subj", f"/CN={name}",
        "-addext", "subjectAltName=DNS:localhost", "-keyout", str(key), "-out", str(cert),
    )  # fmt: skip
    return cert, key


def issued(directory: Path, name: str, ca: tuple[Path, Path]) -> tuple[Path, Path]:
    """A client certificate signed by `ca`."""
    cert, key, request = (directory / f"{name}.{ext}" for ext in ("pem", "key", "csr"))
    _openssl("req", *_EC, "-subj", f"/CN={name}", "-keyout", str(key), "-out", str(request))
    _openssl(
        "x509", "-req", "-in", str(request), "-CA", str(ca[0]), "-CAkey", str(ca[1]),
        "-CAcreateserial", "-days", "1", "-out", str(cert),
    )  # fmt: skip
    return cert, key


def grpc_call(
    server: ServerThread, root: Path, client: tuple[Path, Path] | None = None
) -> grpc.StatusCode:
    """One Moderate over a new connection that trusts `root` only."""
    key, chain = (client[1].read_bytes(), client[0].read_bytes()) if client else (None, None)
    credentials = grpc.ssl_channel_credentials(root.read_bytes(), key, chain)
    with grpc.secure_channel(f"localhost:{server.port}", credentials) as channel:
        message = pb.Message(role=pb.USER, content=[pb.Content(text="Hi.")])
        try:
            stub = pb_grpc.ModerationStub(channel)
            stub.Moderate(pb.ModerateRequest(messages=[message]), timeout=10)
        except grpc.RpcError as exc:
            return exc.code()
    return grpc.StatusCode.OK


def https_call(
    server: ServerThread, root: Path, client: tuple[Path, Path] | None = None
) -> tuple[int, str]:
    """One chat completion over a new HTTPS connection that trusts `root` only: its status
    and the certificate's common name."""
    context = ssl.create_default_context(cafile=root)
    if client:
        context.load_cert_chain(client[0], client[1])
    connection = http.client.HTTPSConnection("localhost", server.http_port, context=context)
    body = {"model": "tiny-random", "messages": [{"role": "user", "content": "Hi."}]}
    try:
        connection.request("POST", "/v1/chat/completions", json.dumps(body))
        response = connection.getresponse()
        response.read()
        peer: Any = connection.sock.getpeercert()
        subject = dict(pair[0] for pair in peer["subject"])
        return response.status, subject["commonName"]
    finally:
        connection.close()


def plain_get(server: ServerThread, path: str) -> int:
    connection = http.client.HTTPConnection("localhost", server.http_port, timeout=10)
    try:
        connection.request("GET", path)
        return connection.getresponse().status
    finally:
        connection.close()


def test_bad_files_are_named_before_serving(tmp_path: Path) -> None:
    cert, key = authority(tmp_path, "server")
    _, other_key = authority(tmp_path, "other")
    with pytest.raises(ConfigError, match=f"cannot use certificate {cert} with key {other_key}"):
        server_context(TlsConfig(cert, other_key))  # the key of another certificate
    with pytest.raises(ConfigError, match="No such file or directory"):
        server_context(TlsConfig(tmp_path / "missing.pem", key))
    (tmp_path / "junk.pem").write_text("not a certificate\n")
    with pytest.raises(ConfigError, match=f"cannot use client CA bundle {tmp_path / 'junk.pem'}"):
        server_context(TlsConfig(cert, key, tmp_path / "junk.pem"))


def test_the_http_api_is_https_with_the_same_certificate(
    preparer: Preparer, tmp_path: Path
) -> None:
    """With --tls-cert the HTTP API was plaintext, bearer tokens and all: now it is HTTPS."""
    cert, key = authority(tmp_path, "server")
    with serving(FakeEngine(), preparer, tls=TlsConfig(cert, key)) as server:
        assert https_call(server, cert) == (200, "server")
        assert grpc_call(server, cert) == grpc.StatusCode.OK
        with pytest.raises((ConnectionError, http.client.HTTPException)):
            plain_get(server, "/healthz")  # no plaintext beside it
    config = ServerConfig(tls=TlsConfig(cert, key, cert))
    assert access_line(config, BearerTokens(frozenset())).startswith("access: mutual TLS; ")


def test_a_reload_presents_the_new_certificate_to_new_connections(
    preparer: Preparer, tmp_path: Path
) -> None:
    live = TlsConfig(tmp_path / "live.pem", tmp_path / "live.key")
    first, second, other = (authority(tmp_path, name) for name in ("first", "second", "other"))
    shutil.copy(first[0], live.cert)
    shutil.copy(first[1], live.key)
    with serving(FakeEngine(), preparer, tls=live) as server:
        tls = server.stack.tls
        assert tls is not None
        assert grpc_call(server, first[0]) == grpc.StatusCode.OK
        assert https_call(server, first[0]) == (200, "first")
        shutil.copy(second[0], live.cert)
        shutil.copy(second[1], live.key)
        assert tls.refresh() == f"TLS certificate reloaded from {live.cert}: new connections use it"
        assert tls.refresh() is None  # the files hold the certificate in use
        assert grpc_call(server, second[0]) == grpc.StatusCode.OK
        assert grpc_call(server, first[0]) == grpc.StatusCode.UNAVAILABLE  # not trusted: gone
        assert https_call(server, second[0]) == (200, "second")
        with pytest.raises(ssl.SSLCertVerificationError):
            https_call(server, first[0])
        shutil.copy(other[1], live.key)  # a half-done rotation: the key of another certificate
        said = tls.reload()
        assert said.startswith("TLS certificate not reloaded, the one in use kept: TLS: cannot")
        assert grpc_call(server, second[0]) == grpc.StatusCode.OK
        assert https_call(server, second[0]) == (200, "second")


def test_mutual_tls_on_both_servers_and_a_rotated_client_ca(
    preparer: Preparer, tmp_path: Path
) -> None:
    server_cert, server_key = authority(tmp_path, "server")
    old_ca, new_ca = authority(tmp_path, "old-ca"), authority(tmp_path, "new-ca")
    old_client, new_client = issued(tmp_path, "old", old_ca), issued(tmp_path, "new", new_ca)
    bundle = tmp_path / "clients.pem"
    shutil.copy(old_ca[0], bundle)
    tls = TlsConfig(server_cert, server_key, bundle)
    with serving(FakeEngine(), preparer, tls=tls) as server:
        assert grpc_call(server, server_cert, old_client) == grpc.StatusCode.OK
        assert https_call(server, server_cert, old_client)[0] == 200
        assert grpc_call(server, server_cert) == grpc.StatusCode.UNAVAILABLE  # no client cert
        with pytest.raises((ssl.SSLError, ConnectionError)):
            https_call(server, server_cert)
        assert grpc_call(server, server_cert, new_client) == grpc.StatusCode.UNAVAILABLE
        bundle.write_bytes(new_ca[0].read_bytes())  # the clients' CA rotated
        assert server.stack.tls is not None
        assert server.stack.tls.reload().startswith("TLS certificate reloaded")
        assert grpc_call(server, server_cert, new_client) == grpc.StatusCode.OK
        assert https_call(server, server_cert, new_client)[0] == 200
        assert grpc_call(server, server_cert, old_client) == grpc.StatusCode.UNAVAILABLE
        with pytest.raises((ssl.SSLError, ConnectionError)):
            https_call(server, server_cert, old_client)


def test_tls_files_that_cannot_serve_stop_serve_before_the_model_loads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The model's minutes of loading are not spent before a mismatched key is found."""

    def load(config: ServerConfig) -> None:
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(server_main, "build_stack", load)
    cert, _ = authority(tmp_path, "server")
    _, other_key = authority(tmp_path, "other")
    config = ServerConfig(
        host="localhost", grpc_port=0, http_port=0, tls=TlsConfig(cert, other_key)
    )
    with pytest.raises(ConfigError, match=f"cannot use certificate {cert} with key {other_key}"):
        asyncio.run(server_main.serve(config))


def test_the_loading_listeners_present_the_certificate(tmp_path: Path) -> None:
    """--listen-while-loading with TLS: probes and clients meet the certificate they will meet
    once the model is in, and no plaintext."""
    cert, key = authority(tmp_path, "server")
    tls = TlsConfig(cert, key)
    config = ServerConfig(host="localhost", grpc_port=0, http_port=0, tls=tls)

    async def run() -> tuple[Any, int, bool]:
        ports = await LoadingPorts.open(config, ServerTls(tls))
        try:
            credentials = grpc.ssl_channel_credentials(cert.read_bytes())
            target = f"localhost:{ports.grpc_port}"
            async with grpc.aio.secure_channel(target, credentials) as channel:
                check = health_pb2_grpc.HealthStub(channel).Check
                health = (await check(health_pb2.HealthCheckRequest(), timeout=10)).status
            context = ssl.create_default_context(cafile=cert)
            url = f"https://localhost:{ports.http_port}/healthz"
            async with aiohttp.ClientSession() as session, session.get(url, ssl=context) as got:
                status = got.status
            try:
                async with aiohttp.ClientSession() as session:
                    await session.get(f"http://localhost:{ports.http_port}/healthz")
                plaintext = True
            except aiohttp.ClientError:
                plaintext = False
            return health, status, plaintext
        finally:
            await ports.close()

    health, status, plaintext = asyncio.run(run())
    assert health == health_pb2.HealthCheckResponse.NOT_SERVING
    assert status == 200
    assert not plaintext
