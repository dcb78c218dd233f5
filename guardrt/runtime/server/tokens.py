"""The bearer tokens both servers accept, and who each belongs to; reloadable (SIGHUP).

Tokens come from `--auth-token-file` and $GUARDRT_AUTH_TOKENS (comma-separated). Each line of
the file is `TOKEN` or `NAME TOKEN`: the name (letters, digits, `_`, `.`, `-`; say the calling
service's) labels that caller's requests in the logs and on /metrics, never the token; lines
starting with `#` are comments (before, a comment line was itself an accepted token). A
rotation writes the new file and sends SIGHUP: calls are checked against the new set from then
on, with no restart (an 11B model takes minutes to load). A reload that cannot read the file,
or that would leave no token (and so let anyone call), keeps the tokens in use: auth fails
closed. Tokens never appear in a log line or a message.
"""

from __future__ import annotations

import hmac
import logging
import os
import re
from pathlib import Path

from guardrt.runtime.errors import ConfigError
from guardrt.runtime.server.config import AUTH_TOKENS_ENV

log = logging.getLogger("guardrt.auth")

_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")
ANYONE = "anyone"  # the caller when no token is required
UNNAMED = "unnamed"  # the caller of a token given without a name
NOT_AUTHENTICATED = "none"  # the caller of a call refused before its token was checked


def logged_caller(caller: str | None) -> str | None:
    """The caller a log line names: a token's (or UNNAMED); None when no token is required
    or the call was not authenticated (nothing to tell callers apart by)."""
    return None if caller in (None, "", ANYONE, NOT_AUTHENTICATED) else caller


def read_named_tokens(token_file: str | None) -> dict[str, str]:
    """Bearer tokens (each to its caller's name: UNNAMED when the line gives none) from a file
    and $GUARDRT_AUTH_TOKENS; empty = no auth. A file that holds no token, a line that is not
    `TOKEN` or `NAME TOKEN`, a token named twice otherwise, or a variable set to separators
    only, is a ConfigError naming the line (never its text): a misconfigured secret must not
    silently turn auth off."""
    variable = os.environ.get(AUTH_TOKENS_ENV, "")
    tokens = {t.strip(): UNNAMED for t in variable.split(",") if t.strip()}
    if variable.strip() and not tokens:
        raise ConfigError(f"${AUTH_TOKENS_ENV} is set but holds no token (only separators)")
    if token_file:
        try:
            lines = Path(token_file).read_text().splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
            raise ConfigError(f"cannot read token file {token_file}: {reason}") from exc
        from_file: dict[str, str] = {}
        for number, line in enumerate(lines, 1):
            fields = line.split()
            if not fields or fields[0].startswith("#"):
                continue
            where = f"token file {token_file} line {number}"
            if len(fields) > 2 or (len(fields) == 2 and not _NAME.fullmatch(fields[0])):
                raise ConfigError(
                    f"{where} is not TOKEN or NAME TOKEN (a name is 1 to 64 letters, digits, "
                    "'_', '.' or '-')"
                )
            name, token = (UNNAMED, fields[0]) if len(fields) == 1 else (fields[0], fields[1])
            if from_file.get(token, name) != name:
                raise ConfigError(f"{where} names a token an earlier line names otherwise")
            from_file[token] = name
        if not from_file:
            raise ConfigError(
                f"token file {token_file} holds no token: refusing to serve without auth "
                "(leave out --auth-token-file to serve without it)"
            )
        tokens |= from_file
    return tokens


def read_tokens(token_file: str | None) -> frozenset[str]:
    """The tokens of `read_named_tokens`."""
    return frozenset(read_named_tokens(token_file))


def bearer_caller(authorization: str, tokens: dict[str, str]) -> str | None:
    """The caller an `Authorization` value identifies among `tokens` (token → name): its name,
    ANYONE when no token is required, None when it carries no accepted token. Every token is
    compared, each in constant time."""
    if not tokens:
        return ANYONE
    scheme, _, token = authorization.strip().partition(" ")
    if scheme.lower() != "bearer":  # an auth scheme is case-insensitive (RFC 9110 §11.1)
        return None
    token = token.strip()
    caller = None
    for known, name in tokens.items():
        if hmac.compare_digest(token, known):
            caller = name
    return caller


class BearerTokens:
    """The accepted tokens (none: no auth), shared by the gRPC and HTTP servers."""

    def __init__(self, tokens: frozenset[str], token_file: str | None = None) -> None:
        """`tokens` as read at start (`read_tokens`); their callers' names from `token_file`."""
        self.token_file = token_file
        try:
            names = read_named_tokens(token_file) if token_file else {}
        except ConfigError:  # changed since it was read: the names come with the next reload
            names = {}
        self._tokens = {token: names.get(token, UNNAMED) for token in tokens}

    @property
    def required(self) -> bool:
        return bool(self._tokens)

    def __len__(self) -> int:
        return len(self._tokens)

    def callers(self) -> list[str]:
        """The callers named, sorted (for the start's access line: names are not secrets)."""
        return sorted(set(self._tokens.values()) - {UNNAMED})

    def sources(self) -> str:
        """Where the tokens come from, for the start's access line (never the tokens)."""
        named = [self.token_file] if self.token_file else []
        if os.environ.get(AUTH_TOKENS_ENV, "").strip():
            named.append(f"${AUTH_TOKENS_ENV}")
        return " and ".join(named) or "given"

    def caller(self, authorization: str) -> str | None:
        """Who an `Authorization` value identifies (`bearer_caller`); None: not allowed."""
        return bearer_caller(authorization, self._tokens)

    def allowed(self, authorization: str) -> bool:
        """Whether an `Authorization` value carries an accepted token (any, with none)."""
        return self.caller(authorization) is not None

    def refresh(self) -> str | None:
        """`reload`, saying nothing (None) when the sources hold the tokens in use."""
        try:
            if read_named_tokens(self.token_file) == self._tokens:
                return None
        except ConfigError:
            pass  # reload says why
        return self.reload()

    def reload(self) -> str:
        """Read the sources again and use the new tokens; a sentence saying what happened.
        On any problem the tokens in use are kept (and the sentence says why)."""
        before = len(self._tokens)
        try:
            tokens = read_named_tokens(self.token_file)
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
