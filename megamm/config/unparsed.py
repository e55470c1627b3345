"""The value of a config field that did not parse, and checks that step around it.

A wrong value (`--lr abc`, `--set training.train_iters=x`, a YAML string where an int belongs) is a
problem of its own; it must not hide the other problems of the run, nor cause false ones. Parsing
therefore builds the config with `UNPARSED` in that field and runs every semantic check: a check
that uses the value (compares, computes, formats, hashes it) raises `UnparsedFieldError`, and
`gather` skips that check alone. Which checks depend on which fields is thus what the checks read,
not a list kept beside them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NoReturn


class UnparsedFieldError(Exception):
    """A check used a field whose value did not parse (its problem is already reported)."""


class _Unparsed:
    """Any use but identity (`is`), `repr` and passing it around raises UnparsedFieldError."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "<unparsed>"

    def _used(self, *_: Any) -> NoReturn:
        raise UnparsedFieldError

    __bool__ = __eq__ = __ne__ = __lt__ = __le__ = __gt__ = __ge__ = __hash__ = _used
    __add__ = __radd__ = __sub__ = __rsub__ = __mul__ = __rmul__ = __truediv__ = __rtruediv__ = _used
    __floordiv__ = __rfloordiv__ = __mod__ = __rmod__ = __pow__ = __rpow__ = __neg__ = __abs__ = _used
    __int__ = __float__ = __index__ = __format__ = __str__ = __fspath__ = _used
    __len__ = __iter__ = __contains__ = __getitem__ = _used


UNPARSED: Any = _Unparsed()


def gather(*checks: Callable[[], list[str]]) -> list[str]:
    """The problems of every check, in order; a check that uses an UNPARSED field is skipped."""
    found: list[str] = []
    for check in checks:
        try:
            found += check()
        except UnparsedFieldError:
            continue
    return found
