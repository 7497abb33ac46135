"""One registry pattern for everything a user picks by name (encoders, MIL heads, cell detectors).

Every stage builds its registries from :class:`Registry`, so a name behaves the same everywhere:
an unknown name is a ``ValueError`` listing the choices, a name registered twice is an error, and
an entry that needs an optional extra is listed with the install command instead of a stub that
fails later — asking for it before the extra is installed raises ``ImportError`` naming the
install.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Generic, TypeVar

T = TypeVar("T")


@dataclass(frozen=True)
class RegistryEntry(Generic[T]):
    """A registered value and what it needs.

    ``requires`` are importable module names; ``install`` is the command that provides them.
    """

    name: str
    value: T
    requires: tuple[str, ...] = ()
    install: str | None = None

    def missing(self) -> list[str]:
        """The required modules that cannot be imported here."""
        return [m for m in self.requires if importlib.util.find_spec(m) is None]


class Registry(Generic[T]):
    """Named entries of one kind (``kind`` is used in messages, e.g. ``"encoder"``).

    Examples
    --------
    >>> heads = Registry[type]("MIL head")
    >>> @heads.decorator("mean")
    ... class Mean: ...
    >>> heads.get("mean") is Mean
    True
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, RegistryEntry[T]] = {}

    def add(
        self,
        name: str,
        value: T,
        *,
        requires: tuple[str, ...] = (),
        install: str | None = None,
    ) -> T:
        """Register ``value`` under ``name``; registering the same value again is a no-op."""
        if not name or name != name.strip():
            raise ValueError(f"a {self.kind} name must be a non-empty word, got {name!r}.")
        old = self._entries.get(name)
        if old is not None and old.value is not value:
            raise ValueError(
                f"a {self.kind} named {name!r} is already registered ({old.value!r}); "
                "pick another name."
            )
        if requires and not install:
            raise ValueError(f"{self.kind} {name!r} requires {requires}: say how to install them.")
        self._entries[name] = RegistryEntry(name, value, tuple(requires), install)
        return value

    def decorator(
        self, name: str, *, requires: tuple[str, ...] = (), install: str | None = None
    ) -> Callable[[T], T]:
        """``@registry.decorator(name)`` registers the decorated object."""

        def wrap(value: T) -> T:
            return self.add(name, value, requires=requires, install=install)

        return wrap

    def remove(self, name: str) -> None:
        """Unregister ``name`` (a notebook re-registering a plugin, a test's temporary entry)."""
        self.entry(name)
        del self._entries[name]

    def entry(self, name: str) -> RegistryEntry[T]:
        """The entry for ``name``; unknown names list the choices."""
        try:
            return self._entries[name]
        except KeyError:
            raise ValueError(
                f"unknown {self.kind} {name!r}; choose one of {self.names()}."
            ) from None

    def get(self, name: str) -> T:
        """The value registered as ``name``, after checking that its extras are installed."""
        entry = self.entry(name)
        missing = entry.missing()
        if missing:
            raise ImportError(
                f"the {self.kind} {name!r} needs {', '.join(missing)}, which is not installed. "
                f"Fix: {entry.install}"
            )
        return entry.value

    def names(self, *, available_only: bool = False) -> list[str]:
        """Registered names, sorted; ``available_only`` drops entries whose extras are missing."""
        return sorted(n for n, e in self._entries.items() if not available_only or not e.missing())

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {self.names()})"
