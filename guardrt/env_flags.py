"""`guardrt serve`'s flags from the environment: $GUARDRT_<FLAG> for each `--flag`.

A container platform configures a server through its environment (a Kubernetes ConfigMap, a
systemd EnvironmentFile) as often as through its command line. Each flag of `serve` has a
variable named after it (`--max-queue` → GUARDRT_MAX_QUEUE, `--listen-while-loading` →
GUARDRT_LISTEN_WHILE_LOADING=true). The variables become flags placed before the command
line's own, so a flag given on the command line wins. A value the flag would refuse is refused
here, naming the variable. ($GUARDRT_AUTH_TOKENS is not a flag: it holds the tokens themselves.)
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping

from guardrt.runtime.errors import ConfigError

PREFIX = "GUARDRT_"
_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off", ""})


def variable(action: argparse.Action) -> str:
    """The variable of an option: GUARDRT_ and its destination in capitals."""
    return PREFIX + action.dest.upper()


def env_flags(parser: argparse.ArgumentParser, environ: Mapping[str, str]) -> list[str]:
    """The command-line flags the variables set in `environ` give for `parser`'s options; a
    ConfigError naming the variable for a value its flag would refuse."""
    flags: list[str] = []
    for action in parser._actions:
        if not action.option_strings or action.dest == "help":
            continue
        name = variable(action)
        raw = environ.get(name)
        if raw is None:
            continue
        flag = max(action.option_strings, key=len)  # the long form
        if action.nargs == 0:  # a switch (store_true)
            value = raw.strip().lower()
            if value not in _TRUE | _FALSE:
                raise ConfigError(
                    f"${name} must be true or false (1/0, yes/no, on/off), not {raw!r}"
                )
            if value in _TRUE:
                flags.append(flag)
            continue
        try:
            converted = action.type(raw) if callable(action.type) else raw
        except (TypeError, ValueError, argparse.ArgumentTypeError) as exc:
            raise ConfigError(f"${name}={raw!r} is not a value {flag} takes: {exc}") from exc
        if action.choices is not None and converted not in action.choices:
            known = ", ".join(str(choice) for choice in action.choices)
            raise ConfigError(f"${name}={raw!r}: {flag} takes one of {known}")
        flags.append(f"{flag}={raw}")  # `=`: a value starting with '-' stays a value
    return flags
