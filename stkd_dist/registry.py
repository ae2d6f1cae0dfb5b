"""Small registries: a key names a factory, kwargs configure it.

Models, students, losses and label codecs are built from ``(key, kwargs)`` pairs, which is also what
checkpoints store, so any rank, Ray actor or Tune trial can rebuild an object from a checkpoint alone.
Unknown kwargs and duplicate keys raise.
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Callable
from typing import Any, Generic, TypeVar

from stkd_dist.errors import ConfigError

T = TypeVar("T")


class Registry(Generic[T]):
    """A named mapping from keys to factories.

    Args:
        kind: what the registry holds (``"model"``, ``"loss"``, ...), used in error messages.
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._factories: dict[str, Callable[..., T]] = {}

    def register(self, key: str) -> Callable[[Callable[..., T]], Callable[..., T]]:
        """Decorator registering a class or function under ``key``; a duplicate key raises."""

        def deco(factory: Callable[..., T]) -> Callable[..., T]:
            if key in self._factories:
                raise ValueError(f"duplicate {self.kind} key {key!r}")
            self._factories[key] = factory
            return factory

        return deco

    def keys(self) -> list[str]:
        return sorted(self._factories)

    def __contains__(self, key: str) -> bool:
        return key in self._factories

    def get(self, key: str) -> Callable[..., T]:
        """The factory for ``key``; an unknown key raises :class:`ConfigError` with suggestions."""
        if key not in self._factories:
            close = difflib.get_close_matches(key, self._factories, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(
                f"unknown {self.kind} {key!r}{hint}; known: {', '.join(self.keys())}",
                where=self.kind,
            )
        return self._factories[key]

    def build(self, key: str, **kwargs: Any) -> T:
        """Build ``key`` with ``kwargs``; kwargs the factory does not accept raise ``ConfigError``."""
        factory = self.get(key)
        params = inspect.signature(factory).parameters
        takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
        if not takes_any:
            unknown = sorted(set(kwargs) - set(params))
            if unknown:
                allowed = [
                    n for n, p in params.items() if p.kind is not inspect.Parameter.VAR_POSITIONAL
                ]
                raise ConfigError(
                    f"unknown argument(s) {', '.join(unknown)} for {self.kind} {key!r}; "
                    f"it accepts: {', '.join(allowed) or 'none'}",
                    where=f"{self.kind}.{key}",
                )
        return factory(**kwargs)
