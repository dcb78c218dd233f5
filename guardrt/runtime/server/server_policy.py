"""`--policy FILE`: the server's own safety policy, for the requests that send none.

An organisation decides its moderation policy once (categories that do not apply to its
product left out, or categories of its own) rather than in every client. The file is what the
HTTP API's `guardrt` extension field takes:

    {"categories": [{"code": "S1", "description": "Violent Crimes."}, ...],
     "exclude": ["S6"], "unsafe_threshold": 0.3}

every key optional (no `categories`: the model's S1-S13; no `unsafe_threshold`: `unsafe` when
the model finds it likelier than `safe`), checked at start as a request's policy is (a code, a
description, an exclusion the policy lacks, nothing left, a threshold outside (0, 1]: named,
with the file). SIGHUP reads it again (`PolicyFile`); a file that has become bad keeps the
policy in use.

How a request's own policy meets it: a request that sends categories is judged against its own
policy only (the server's is not its business); one that sends only exclusions is judged against
the server's categories, without the server's exclusions and its own (a client can leave more
out, never bring back what the operator left out). A request's own threshold replaces the
server's.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from guardrt.runtime.errors import ConfigError, GuardrtError
from guardrt.runtime.jsonfile import read_json_object
from guardrt.runtime.policy import DEFAULT_CATEGORIES, check_threshold, make_policy
from guardrt.runtime.requests import GREEDY_THRESHOLD

log = logging.getLogger("guardrt.serve")

_KEYS = ("categories", "exclude", "unsafe_threshold")
_CATEGORY_KEYS = ("code", "description")


@dataclass(frozen=True)
class ServerPolicy:
    """The categories and exclusions of requests without their own categories."""

    categories: tuple[tuple[str, str], ...] | None = None  # None: the model's S1-S13
    exclude: tuple[str, ...] = ()
    source: str = ""  # the file it came from, for the start line
    unsafe_threshold: float | None = None  # `policy.check_threshold`; None: none

    @property
    def custom(self) -> bool:
        """Whether its categories are others than the model's (moderation keys are codes)."""
        return self.categories is not None

    def listed(self) -> tuple[tuple[str, str], ...]:
        return DEFAULT_CATEGORIES if self.categories is None else self.categories

    def apply(
        self, categories: Sequence[tuple[str, str]] | None, excluded: Sequence[str]
    ) -> tuple[Sequence[tuple[str, str]] | None, tuple[str, ...]]:
        """A request's (categories, exclusions) with the server's policy applied."""
        if categories:
            return categories, tuple(excluded)
        return self.categories, tuple(dict.fromkeys((*self.exclude, *excluded)))

    def threshold(self, requested: float | None) -> float | None:
        """A request's decision threshold: its own, else the server's."""
        return self.unsafe_threshold if requested is None else requested

    def describe(self) -> str:
        """The start line's account of it."""
        if self.categories is None:
            which = f"the model's {len(DEFAULT_CATEGORIES)} categories"
        else:
            which = f"{len(self.categories)} categories of its own"
        left_out = f", leaving out {', '.join(self.exclude)}" if self.exclude else ""
        threshold = self.unsafe_threshold
        decided = (
            ""
            if threshold is None
            else f"; unsafe when P(unsafe) ≥ {threshold:g} for requests that send no threshold"
        )
        return (
            f"policy: {which}{left_out} ({self.source}; SIGHUP reloads) for requests that send "
            f"no categories{decided}"
        )


def read_policy(path: str | Path) -> ServerPolicy:
    """The policy file at `path`; a ConfigError naming the file and what is wrong with it."""
    path = Path(path)
    document = read_json_object(path, "policy file")
    unknown = sorted(key for key in document if key not in _KEYS)
    if unknown:
        raise ConfigError(
            f"policy file {path}: unknown key {unknown[0]!r}; known: {', '.join(_KEYS)}"
        )
    categories = _categories(document.get("categories"), path)
    exclude = document.get("exclude", [])
    if not isinstance(exclude, list) or not all(isinstance(code, str) for code in exclude):
        raise ConfigError(f"policy file {path}: exclude must be a list of codes such as ['S6']")
    try:  # a request's policy's checks, at start
        policy = make_policy(categories, exclude)
        threshold = check_threshold(document.get("unsafe_threshold"))
    except GuardrtError as exc:
        raise ConfigError(f"policy file {path}: {exc}") from exc
    return ServerPolicy(
        None if categories is None else policy.categories,
        tuple(dict.fromkeys(exclude)),
        str(path),
        threshold,
    )


def _categories(raw: object, path: Path) -> list[tuple[Any, Any]] | None:
    """[{code, description}, ...] or {code: description, ...} as pairs; None when absent."""
    if raw is None:
        return None
    if isinstance(raw, Mapping):
        return [(str(code), description) for code, description in raw.items()]
    shape = "categories must be a list of {code, description} or an object of code: description"
    if not isinstance(raw, list) or not all(isinstance(entry, Mapping) for entry in raw):
        raise ConfigError(f"policy file {path}: {shape}")
    for index, entry in enumerate(raw):
        unknown = sorted(str(key) for key in entry if key not in _CATEGORY_KEYS)
        if unknown:
            raise ConfigError(
                f"policy file {path}: categories[{index}] has unknown key {unknown[0]!r}"
            )
    return [(entry.get("code"), entry.get("description")) for entry in raw]


def check_decode(policy: ServerPolicy | None, decode: str) -> None:
    """A ConfigError when `decode` cannot apply the policy's threshold (greedy decoding)."""
    if decode == "greedy" and policy is not None and policy.unsafe_threshold is not None:
        raise ConfigError(f"policy file {policy.source}: {GREEDY_THRESHOLD}")


class PolicyFile:
    """The `--policy` file, read again on SIGHUP: `use` is given each new policy (requests
    prepared after it are judged against it; those already prepared keep theirs). A file
    that cannot serve keeps the policy in use, and the sentence returned says why."""

    def __init__(
        self, policy: ServerPolicy, use: Callable[[ServerPolicy], None], decode: str = "constrained"
    ) -> None:
        """`decode`: the engine's (a greedy one takes no threshold, `check_decode`)."""
        self.policy, self._use, self._decode = policy, use, decode

    def refresh(self) -> str | None:
        """`reload`, saying nothing (None) when the file holds the policy in use."""
        try:
            if read_policy(self.policy.source) == self.policy:
                return None
        except ConfigError:
            pass  # reload says why
        return self.reload()

    def reload(self) -> str:
        try:
            policy = read_policy(self.policy.source)
            check_decode(policy, self._decode)
        except ConfigError as exc:
            log.error("policy not reloaded, the one in use kept: %s", exc)
            return f"policy not reloaded, the one in use kept: {exc}"
        self.policy = policy
        self._use(policy)
        log.info("policy reloaded from %s", policy.source)
        return f"policy reloaded: {policy.describe().removeprefix('policy: ')}"
