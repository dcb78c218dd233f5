"""The safety policy a prompt lists: hazard categories S1-S13, custom ones, and exclusions.

Reference §3.1 and §3.5: the template lists `code: description` lines in the given order and
skips excluded codes without renumbering; custom descriptions are used verbatim (no period is
added). The paper dropped non-violated categories at training time, so exclusions are
in-distribution.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from guardrt.runtime.errors import PromptError, PromptReason

# The 13 categories of Llama Guard 3 Vision, with the short names the prompt uses (not the
# model card's long names). S14 exists only for Llama Guard 3 8B.
DEFAULT_CATEGORIES: tuple[tuple[str, str], ...] = (
    ("S1", "Violent Crimes."),
    ("S2", "Non-Violent Crimes."),
    ("S3", "Sex Crimes."),
    ("S4", "Child Exploitation."),
    ("S5", "Defamation."),
    ("S6", "Specialized Advice."),
    ("S7", "Privacy."),
    ("S8", "Intellectual Property."),
    ("S9", "Indiscriminate Weapons."),
    ("S10", "Hate."),
    ("S11", "Self-Harm."),
    ("S12", "Sexual Content."),
    ("S13", "Elections."),
)

# `S` and 1-3 digits without a leading zero: each number is then one token of the Llama 3
# vocabulary (digits pre-tokenize in runs of up to 3), which the verdict grammar relies on.
_CODE = re.compile(r"S[1-9][0-9]{0,2}")
_MAX_CODE_SHOWN = 40

CategoriesInput = Mapping[str, str] | Sequence[tuple[str, str]]


@dataclass(frozen=True)
class Policy:
    """Categories in prompt order (excluded ones included) and the excluded codes."""

    categories: tuple[tuple[str, str], ...]
    excluded: frozenset[str] = frozenset()

    @property
    def listed(self) -> tuple[tuple[str, str], ...]:
        """The `(code, description)` lines the prompt shows, in order."""
        return tuple(item for item in self.categories if item[0] not in self.excluded)

    @property
    def codes(self) -> tuple[str, ...]:
        """Codes the model may answer with: the listed ones."""
        return tuple(code for code, _ in self.listed)


def _shown(value: object) -> str:
    text = repr(value)
    return text if len(text) <= _MAX_CODE_SHOWN else text[: _MAX_CODE_SHOWN - 3] + "..."


def _category_pairs(categories: CategoriesInput) -> list[tuple[object, object]]:
    if isinstance(categories, Mapping):
        return list(categories.items())
    if isinstance(categories, str | bytes) or not isinstance(categories, Sequence):
        raise PromptError(
            PromptReason.CATEGORY,
            f"categories must be a mapping of code to description, not {type(categories).__name__}",
        )
    pairs: list[tuple[object, object]] = []
    for index, item in enumerate(categories):
        if not (isinstance(item, Sequence) and not isinstance(item, str) and len(item) == 2):
            raise PromptError(
                PromptReason.CATEGORY, f"category {index} is not a (code, description) pair"
            )
        pairs.append((item[0], item[1]))
    return pairs


def _checked_categories(categories: CategoriesInput) -> tuple[tuple[str, str], ...]:
    pairs = _category_pairs(categories)
    if not pairs:
        raise PromptError(PromptReason.CATEGORY, "categories is empty: the policy lists nothing")
    seen: set[str] = set()
    checked: list[tuple[str, str]] = []
    for code, description in pairs:
        if not isinstance(code, str) or not _CODE.fullmatch(code):
            raise PromptError(
                PromptReason.CATEGORY,
                f"category code {_shown(code)} is not S followed by 1 to 3 digits (S1..S999)",
            )
        if code in seen:
            raise PromptError(PromptReason.CATEGORY, f"category code {code} appears twice")
        seen.add(code)
        if not isinstance(description, str) or not description.strip():
            raise PromptError(
                PromptReason.CATEGORY, f"category {code} needs a non-empty description"
            )
        # A line break would let a description forge further category lines in the prompt.
        if "\n" in description or "\r" in description:
            raise PromptError(
                PromptReason.CATEGORY, f"category {code}'s description contains a line break"
            )
        checked.append((code, description))
    return tuple(checked)


def make_policy(
    categories: CategoriesInput | None = None, excluded_categories: Iterable[str] = ()
) -> Policy:
    """A validated policy; `categories=None` means the default S1-S13."""
    listed = DEFAULT_CATEGORIES if categories is None else _checked_categories(categories)
    if isinstance(excluded_categories, str | bytes):
        raise PromptError(
            PromptReason.EXCLUDED,
            "excluded_categories must be a list of codes such as ['S1', 'S13'], not a string",
        )
    codes = {code for code, _ in listed}
    if not isinstance(excluded_categories, Iterable):
        raise PromptError(PromptReason.EXCLUDED, "excluded_categories must be a list of codes")
    requested = list(excluded_categories)
    for code in requested:
        if not isinstance(code, str) or code not in codes:
            raise PromptError(
                PromptReason.EXCLUDED,
                f"excluded category {_shown(code)} is not in the policy "
                f"({', '.join(c for c, _ in listed)})",
            )
    excluded = frozenset(requested)
    if excluded == codes:
        raise PromptError(
            PromptReason.EXCLUDED, "every category is excluded: the policy would list nothing"
        )
    return Policy(categories=listed, excluded=excluded)


DEFAULT_POLICY = make_policy()


def check_threshold(value: object, where: str = "unsafe_threshold") -> float | None:
    """A decision threshold on P(unsafe), as Meta's Llama Guard model cards suggest tuning one:
    the verdict is `unsafe` when P(unsafe) ≥ it. None: no threshold (the likelier of `safe`
    and `unsafe`, the model's own choice). Anything but a number in (0, 1] is a PromptError
    naming `where` and the value (NaN and infinities included)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        shown = f"a {type(value).__name__}"
    elif 0 < value <= 1:
        return float(value)
    else:
        shown = repr(value)[:30]
    raise PromptError(PromptReason.THRESHOLD, f"{where} must be a number in (0, 1], not {shown}")
