"""`Private`: how a personal value rides in a LangChain run's ``configurable``.

LangChain copies every plain string, number or boolean under ``configurable`` into the
metadata its LangSmith tracer uploads. A user id or a context record passed that way
would leave the device in a trace. Wrapped in `Private`, it is an object LangChain does
not copy, whose repr shows nothing, and that `ChatCoSteer` unwraps.
"""

from __future__ import annotations

from typing import Any

__all__ = ["Private"]


class Private:
    """A value that must not reach traces, logs or reprs: ``Private("alice")``."""

    __slots__ = ("_value",)

    def __init__(self, value: Any) -> None:
        self._value = value

    @property
    def value(self) -> Any:
        return self._value

    def __repr__(self) -> str:
        return "Private(<hidden>)"

    def __reduce__(self) -> Any:
        raise TypeError("a Private value is not to be pickled or serialized")


def unwrap(value: Any) -> Any:
    return value.value if isinstance(value, Private) else value
