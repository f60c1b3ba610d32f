"""Where this project relies on a dependency's undocumented internals, and the version each was
checked against.

Each such use sits behind one function or class, marked with `@relies_on_internals(...)`: the
dependency, the version it was written against, and what it relies on. The version is the one
requirements.txt (or cog.yaml, for Cog and Python) pins; tests/test_pinned_internals.py fails,
naming the function to re-check, when an installed version or a pin moves away from it, and probes
each internal itself. At setup a mismatch is logged (`log_unchecked_internals`), so that a
container built with other versions says so before a request finds out.
"""

from __future__ import annotations

import importlib.metadata
import logging
import platform
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

log = logging.getLogger(__name__)

Marked = TypeVar("Marked", bound=Callable)


@dataclass(frozen=True)
class PinnedInternal:
    distribution: str
    """The package (its distribution name), or "python" for the standard library."""
    version: str
    """The version the use was written and checked against."""
    user: str
    """The function or class that relies on it (module.qualname)."""
    relies_on: str
    """What of the dependency it relies on."""

    def installed(self) -> str | None:
        """The installed version (for Python: major.minor); None when the package is absent."""
        if self.distribution == "python":
            return ".".join(platform.python_version_tuple()[:2])
        try:
            return importlib.metadata.version(self.distribution)
        except importlib.metadata.PackageNotFoundError:
            return None


PINNED: list[PinnedInternal] = []
"""Every marked use, in import order."""


def relies_on_internals(distribution: str, version: str, relies_on: str) -> Callable[[Marked], Marked]:
    """Mark a function or class as the one place that uses `distribution`'s internals."""

    def mark(user: Marked) -> Marked:
        PINNED.append(
            PinnedInternal(distribution, version, f"{user.__module__}.{user.__qualname__}", relies_on)
        )
        return user

    return mark


def unchecked_internals() -> list[str]:
    """One line per marked use whose dependency is installed at another version than checked."""
    return [
        f"{pin.user} relies on {pin.relies_on} of {pin.distribution} {pin.version}, "
        f"but {pin.distribution} {pin.installed()} is installed: re-check it"
        for pin in PINNED
        if pin.installed() not in (None, pin.version)
    ]


def log_unchecked_internals() -> None:
    for line in unchecked_internals():
        log.warning("setup: %s", line)
