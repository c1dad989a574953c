"""The accepted API keys, compared in constant time."""

from __future__ import annotations

import hmac


class ApiKeys:
    """The accepted keys; `accepts` compares in constant time against every key."""

    def __init__(self, keys: frozenset[str]) -> None:
        self._keys = tuple(key.encode() for key in sorted(keys))

    @property
    def required(self) -> bool:
        return bool(self._keys)

    def accepts(self, given: str | None) -> bool:
        if given is None:
            return False
        candidate = given.encode()
        # No early exit: the time taken does not tell which key (or how much of one) matched.
        matched = False
        for key in self._keys:
            matched |= hmac.compare_digest(candidate, key)
        return matched

    def __repr__(self) -> str:  # never print the keys
        return f"ApiKeys({len(self._keys)} keys)"
