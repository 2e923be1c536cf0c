"""Say it once: what the journal has said still holds, so that a condition lasting many passes
is said when it begins or changes (and, where the caller says so, when it ends), not at every
pass that meets it again."""

from __future__ import annotations

from collections.abc import Hashable, Iterator
from typing import Generic, TypeVar

__all__ = ["SaidOnce"]

K = TypeVar("K", bound=Hashable)


class SaidOnce(Generic[K]):
    """What has been said, by what it is about (a key), with how it was said (its value).

    ``if said.says(key, value): log(...)`` logs at the start of a streak and at each change;
    ``if said.ends(key): log(...)`` logs its end once. Not thread-safe: each holder is used
    by one thread at a time (a pool's state by its one reconcile, the loop's by the loop).
    """

    __slots__ = ("_said",)

    def __init__(self) -> None:
        self._said: dict[K, Hashable] = {}

    def says(self, key: K, value: Hashable = True) -> bool:
        """Record that ``value`` now holds for ``key``; return True if that is news (nothing
        was said of key, or something else was): the caller says it then."""
        if key in self._said and self._said[key] == value:
            return False
        self._said[key] = value
        return True

    def ends(self, key: K) -> bool:
        """Forget ``key``; return True if something had been said of it (its end is news)."""
        return self._said.pop(key, _NOTHING) is not _NOTHING

    def get(self, key: K) -> Hashable | None:
        """Return what was last said of ``key``, or None."""
        return self._said.get(key)

    def __contains__(self, key: object) -> bool:
        return key in self._said

    def __iter__(self) -> Iterator[K]:
        return iter(list(self._said))

    def __len__(self) -> int:
        return len(self._said)

    def __repr__(self) -> str:
        return f"SaidOnce({self._said!r})"


_NOTHING = object()
