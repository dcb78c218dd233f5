"""TLS for both servers (gRPC and the HTTP API) from one TlsConfig, reloadable while serving.

Certificates are rotated often (cert-manager issues day-long ones); restarting a server whose
11B model takes minutes to load for each rotation is not an option. SIGHUP reads the files
again: new connections get the new certificate, open ones keep theirs. A reload whose files
cannot be read, or whose key does not match its certificate, keeps the certificate in use.

The HTTP API's context is chosen per handshake (`sni_callback`, which OpenSSL calls with or
without SNI) from the current one; gRPC asks for its configuration before each handshake
(`dynamic_ssl_server_credentials`). A client CA bundle (mTLS) is read at start for both; a
reload takes its new certificates for gRPC and the HTTP API alike.
"""

from __future__ import annotations

import logging
import ssl
import threading
from typing import Any

import grpc

from guardrt.runtime.errors import ConfigError
from guardrt.runtime.server.config import TlsConfig

log = logging.getLogger("guardrt.tls")


def server_context(tls: TlsConfig) -> ssl.SSLContext:
    """A server context for `tls` (TLS ≥ 1.2), checked: the key matches the certificate, and
    with a client CA bundle, client certificates are required and verified against it alone
    (never the system's CAs)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(tls.cert, tls.key)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(
            f"TLS: cannot use certificate {tls.cert} with key {tls.key}: {_reason(exc)}"
        ) from exc
    if tls.client_ca is not None:
        try:
            context.load_verify_locations(cafile=tls.client_ca)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(
                f"TLS: cannot use client CA bundle {tls.client_ca}: {_reason(exc)}"
            ) from exc
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def _reason(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLError):
        return exc.reason or str(exc)
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc)


class ServerTls:
    """The certificate both servers present, swapped by `reload`."""

    def __init__(self, config: TlsConfig) -> None:
        self.config = config
        self._files, self._current = self._read()
        self._lock = threading.Lock()
        self._grpc_next: Any = None  # a configuration gRPC has not taken yet
        self._grpc_first = _grpc_configuration(self._files)
        # The HTTP API's context, the first one: each handshake switches from it to the
        # current one (same settings) once a reload has made another.
        self.context = self._current
        self.context.sni_callback = self._select

    def _read(self) -> tuple[tuple[bytes, bytes, bytes | None], ssl.SSLContext]:
        """The files' bytes and a context checked from them; ConfigError if they changed in
        between (a rotation caught half written: try again)."""
        files = self.config.credentials()
        context = server_context(self.config)
        if self.config.credentials() != files:
            raise ConfigError("TLS: the files changed while they were read (send SIGHUP again)")
        return files, context

    def _select(self, connection: ssl.SSLObject, name: str | None, front: ssl.SSLContext) -> None:
        current = self._current
        if current is not front:
            connection.context = current

    def grpc_credentials(self) -> grpc.ServerCredentials:
        return grpc.dynamic_ssl_server_credentials(
            self._grpc_first,
            self._grpc_fetch,
            require_client_authentication=self.config.client_ca is not None,
        )

    def _grpc_fetch(self) -> Any:
        """Called by gRPC before each handshake: a new configuration once, else None (keep)."""
        with self._lock:
            taken, self._grpc_next = self._grpc_next, None
        return taken

    def refresh(self) -> str | None:
        """`reload`, saying nothing (None) when the files hold the certificate in use."""
        try:
            if self.config.credentials() == self._files:
                return None
        except ConfigError:
            pass  # reload says why
        return self.reload()

    def reload(self) -> str:
        """Read the files again and present the new certificate to new connections; a
        sentence saying what happened (the certificate in use is kept on any problem)."""
        try:
            files, context = self._read()
        except ConfigError as exc:
            log.error("TLS certificate not reloaded, the one in use kept: %s", exc)
            return f"TLS certificate not reloaded, the one in use kept: {exc}"
        self._files = files
        with self._lock:
            self._grpc_next = _grpc_configuration(files)
        self._current = context
        log.info("TLS certificate reloaded from %s: new connections use it", self.config.cert)
        return f"TLS certificate reloaded from {self.config.cert}: new connections use it"


def _grpc_configuration(files: tuple[bytes, bytes, bytes | None]) -> Any:
    key, cert, client_ca = files
    return grpc.ssl_server_certificate_configuration([(key, cert)], root_certificates=client_ca)
