"""The bearer tokens both servers accept, reloadable while serving (SIGHUP).

Tokens come from `--auth-token-file` (one per line) and $GUARDRT_AUTH_TOKENS (comma-separated).
A rotation writes the new file and sends SIGHUP: calls are checked against the new set from
then on, with no restart (an 11B model takes minutes to load). A reload that cannot read the
file, or that would leave no token (and so let anyone call), keeps the tokens in use: auth
fails closed. Tokens never appear in a log line or a message.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from guardrt.runtime.errors import ConfigError
from guardrt.runtime.server.config import AUTH_TOKENS_ENV, bearer_allowed

log = logging.getLogger("guardrt.auth")


def read_tokens(token_file: str | None) -> frozenset[str]:
    """Bearer tokens from a file (one per line) and $GUARDRT_AUTH_TOKENS; empty = no auth.
    A file that holds no token, or a variable set to separators only, is a ConfigError: a
    misconfigured secret must not silently turn auth off."""
    variable = os.environ.get(AUTH_TOKENS_ENV, "")
    tokens = {t.strip() for t in variable.split(",") if t.strip()}
    if variable.strip() and not tokens:
        raise ConfigError(f"${AUTH_TOKENS_ENV} is set but holds no token (only separators)")
    if token_file:
        try:
            lines = Path(token_file).read_text().splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
            raise ConfigError(f"cannot read token file {token_file}: {reason}") from exc
        from_file = {line.strip() for line in lines if line.strip()}
        if not from_file:
            raise ConfigError(
                f"token file {token_file} holds no token: refusing to serve without auth "
                "(leave out --auth-token-file to serve without it)"
            )
        tokens |= from_file
    return frozenset(tokens)


class BearerTokens:
    """The accepted tokens (none: no auth), shared by the gRPC and HTTP servers."""

    def __init__(self, tokens: frozenset[str], token_file: str | None = None) -> None:
        self._tokens, self.token_file = tokens, token_file

    @property
    def required(self) -> bool:
        return bool(self._tokens)

    def __len__(self) -> int:
        return len(self._tokens)

    def sources(self) -> str:
        """Where the tokens come from, for the start's access line (never the tokens)."""
        named = [self.token_file] if self.token_file else []
        if os.environ.get(AUTH_TOKENS_ENV, "").strip():
            named.append(f"${AUTH_TOKENS_ENV}")
        return " and ".join(named) or "given"

    def allowed(self, authorization: str) -> bool:
        """Whether an `Authorization` value carries an accepted token (any, with none)."""
        return bearer_allowed(authorization, self._tokens)

    def refresh(self) -> str | None:
        """`reload`, saying nothing (None) when the sources hold the tokens in use."""
        try:
            if read_tokens(self.token_file) == self._tokens:
                return None
        except ConfigError:
            pass  # reload says why
        return self.reload()

    def reload(self) -> str:
        """Read the sources again and use the new tokens; a sentence saying what happened.
        On any problem the tokens in use are kept (and the sentence says why)."""
        before = len(self._tokens)
        try:
            tokens = read_tokens(self.token_file)
        except ConfigError as exc:
            log.error("bearer tokens not reloaded, the %d in use kept: %s", before, exc)
            return f"bearer tokens not reloaded, the {before} in use kept: {exc}"
        if self._tokens and not tokens:
            message = (
                f"bearer tokens not reloaded, the {before} in use kept: the sources now hold "
                "none, which would let anyone call"
            )
            log.error("%s", message)
            return message
        self._tokens = tokens  # one reference swap: each call sees the old set or the new
        log.info("bearer tokens reloaded: %d (were %d)", len(tokens), before)
        return f"bearer tokens reloaded: {len(tokens)} (were {before})"
