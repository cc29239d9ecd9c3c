"""`GenerationStream`: a generation's text as it is decided, then its `Generation`."""

from __future__ import annotations

from collections.abc import AsyncGenerator
from types import TracebackType
from typing import TYPE_CHECKING

from costeer_sdk.results import Generation

if TYPE_CHECKING:
    from costeer_sdk.generation import Request

__all__ = ["GenerationStream"]


class GenerationStream:
    """The text pieces of one generation as they are decided (``async for``), and then
    the finished `Generation` in ``generation``.

    Use it as ``async with llm.stream(...) as stream:``: leaving the block (a
    ``break``, an exception) ends the generation and frees its remote session at once.
    Without ``async with``, call ``aclose()`` when stopping early; a stream merely
    abandoned is only closed when the garbage collector finds it."""

    def __init__(self, pieces: AsyncGenerator[str, None], request: Request) -> None:
        self._pieces = pieces
        self._request = request

    def __aiter__(self) -> GenerationStream:
        return self

    async def __anext__(self) -> str:
        return await anext(self._pieces)

    async def aclose(self) -> None:
        await self._pieces.aclose()

    async def __aenter__(self) -> GenerationStream:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    @property
    def generation(self) -> Generation | None:
        """The finished generation once the stream is exhausted; after an error or an
        early close, what was decided until then (``finish_reason="interrupted"``);
        None while it runs."""
        return self._request.result
