"""Cache rows holding the K/V of a policy's fixed prompt head, shared by text-only requests.

A text-only prompt starts with ids that depend only on the policy: BOS, the user header and the
task with its category list (136 ids for the default policy). Their self-attention K/V are the same
for every request with that policy (causal attention: nothing later changes them), so they are
computed once into a reserved cache row and copied into each request's row, whose prefill then
starts after them. Image prompts cannot share it: `<|image|>` comes before the policy and the
cross layers make everything after it depend on the image. Engine thread only.
"""

from __future__ import annotations

from collections import OrderedDict


class PrefixTable:
    """`count` rows from `first_slot` on, each holding one prefix; least recently used goes."""

    def __init__(self, first_slot: int, count: int) -> None:
        self.first_slot, self.count = first_slot, count
        self._rows: OrderedDict[tuple[int, ...], int] = OrderedDict()

    def lookup(self, prefix: tuple[int, ...]) -> tuple[int, bool]:
        """The row for `prefix` and whether it already holds its K/V (else the caller fills
        it). Needs count ≥ 1."""
        if prefix in self._rows:
            self._rows.move_to_end(prefix)
            return self._rows[prefix], True
        if len(self._rows) < self.count:
            slot = self.first_slot + len(self._rows)
        else:
            _, slot = self._rows.popitem(last=False)
        self._rows[prefix] = slot
        return slot, False

    def forget(self, prefix: tuple[int, ...]) -> None:
        """Drop `prefix` (its row was not filled: a failed forward)."""
        self._rows.pop(prefix, None)
