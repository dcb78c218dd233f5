"""Whether the server's ports can be bound, asked before the model loads.

Loading Llama Guard 3 11B takes minutes; a port that another process holds should stop
`guardrt serve` before that, not after. The real binds still report what this cannot foresee
(a port taken in between). gRPC's own listener is made without SO_REUSEPORT (`grpc_server.py`),
so a second server on a port fails here instead of silently sharing its traffic.
"""

from __future__ import annotations

import errno
import socket

from guardrt.runtime.errors import ConfigError


def check_bindable(host: str, port: int, what: str) -> None:
    """Bind and release host:port as the servers will (SO_REUSEADDR, so a port in TIME_WAIT
    passes as it does for them); a ConfigError naming `what`, the address and why when one of
    the host's addresses cannot be bound. Port 0 (any free port) always can."""
    if port == 0:
        return
    try:
        addresses = socket.getaddrinfo(
            host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
    except socket.gaierror as exc:
        raise ConfigError(f"{what}: cannot resolve host {host!r}: {exc.strerror}") from exc
    for family, kind, proto, _, address in addresses:
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:  # as its own address, not also IPv4's
                probe.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                probe.bind(address)
            except OSError as exc:
                raise ConfigError(
                    f"{what}: cannot listen on {host}:{port}: {exc.strerror}"
                    + (" (another server holds it?)" if exc.errno == errno.EADDRINUSE else "")
                ) from exc
