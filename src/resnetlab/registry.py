"""Name -> builder registries shared by models and recipes (timm-style `create`/`list`)."""
from __future__ import annotations

import fnmatch
import re
from typing import Callable, Generic, TypeVar

from resnetlab.errors import ResnetlabError

T = TypeVar("T")


class Registry(Generic[T]):
    """Maps names to builders; patterns (regexes with one named builder each) resolve open families
    such as "any CIFAR depth 6n+2"."""

    def __init__(self, kind: str):
        self.kind = kind
        self._builders: dict[str, Callable[..., T]] = {}
        self._patterns: list[tuple[re.Pattern[str], Callable[[re.Match[str]], Callable[..., T]]]] = []

    def register(self, name: str | None = None) -> Callable[[Callable[..., T]], Callable[..., T]]:
        def decorator(builder: Callable[..., T]) -> Callable[..., T]:
            key = name or builder.__name__
            if key in self._builders:
                raise ValueError(f"{self.kind} {key!r} is registered twice")
            self._builders[key] = builder
            return builder

        return decorator

    def register_pattern(self, regex: str, factory: Callable[[re.Match[str]], Callable[..., T]]) -> None:
        """`factory(match)` returns a builder for names that match `regex` but are not registered."""
        self._patterns.append((re.compile(regex), factory))

    def get(self, name: str) -> Callable[..., T]:
        if name in self._builders:
            return self._builders[name]
        for regex, factory in self._patterns:
            match = regex.fullmatch(name)
            if match:
                return factory(match)
        close = ", ".join(self.names(f"{name[:3]}*")[:8]) or ", ".join(self.names()[:8])
        raise ResnetlabError(f"unknown {self.kind} {name!r}; known: {close} ...")

    def create(self, name: str, **kwargs) -> T:
        return self.get(name)(**kwargs)

    def names(self, pattern: str = "*") -> list[str]:
        return [n for n in self._builders if fnmatch.fnmatchcase(n, pattern)]

    def __contains__(self, name: str) -> bool:
        try:
            self.get(name)
        except ResnetlabError:
            return False
        return True
