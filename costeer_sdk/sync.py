"""`SyncPersonalLLM`: `PersonalLLM` for scripts and notebooks, as openai-python pairs
`OpenAI` with `AsyncOpenAI`.

One `PersonalLLM` runs on the shared background loop (`background`); every method here
hands its call to that loop and waits. So the object is safe to use from several
threads at once, and concurrent calls still share forward passes and requests, as they
would in one asyncio program.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
from types import TracebackType
from typing import Any, Unpack

from costeer_sdk import background
from costeer_sdk.client import PersonalLLM
from costeer_sdk.context import Prompt
from costeer_sdk.generation import GenerateOptions
from costeer_sdk.results import Generation
from costeer_sdk.stream import GenerationStream

__all__ = ["SyncGenerationStream", "SyncPersonalLLM"]


class SyncGenerationStream:
    """The text pieces of one generation (``for piece in stream``), then its `Generation`
    in ``generation``. ``with llm.stream(...) as stream:`` ends the generation and frees
    its remote session as soon as the block is left; ``close()`` may also come from
    another thread (a stop button) while one iterates."""

    def __init__(self, stream: GenerationStream) -> None:
        self._stream = stream
        self._pending: concurrent.futures.Future[str] | None = None
        self._step: asyncio.Task[str] | None = None  # the step running on the loop
        self._closed = False

    def __iter__(self) -> SyncGenerationStream:
        return self

    def __next__(self) -> str:
        if self._closed:
            raise StopIteration
        self._pending = background.submit(self._next_piece())
        try:
            return self._pending.result()
        except StopAsyncIteration:
            raise StopIteration from None
        except concurrent.futures.CancelledError:
            if self._closed:  # closed from another thread meanwhile
                raise StopIteration from None
            raise
        except BaseException:
            self._pending.cancel()  # interrupted (Ctrl-C): the step stops too
            raise

    async def _next_piece(self) -> str:
        self._step = asyncio.current_task()
        return await anext(self._stream)

    def close(self) -> None:
        """End the generation now (its session freed); safe from any thread."""
        self._closed = True
        background.run(self._shutdown())

    async def _shutdown(self) -> None:
        """On the loop: stop a step another thread waits for, then close the stream
        (closing a stream while its step runs would fail)."""
        step = self._step
        if step is not None and not step.done():
            step.cancel()
            with contextlib.suppress(BaseException):
                await step
        await self._stream.aclose()

    def __enter__(self) -> SyncGenerationStream:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    @property
    def generation(self) -> Generation | None:
        """As `GenerationStream.generation`: the finished generation, the partial one
        after an error or early close, None while it runs."""
        return self._stream.generation


class SyncPersonalLLM:
    """The synchronous twin of `PersonalLLM`: the same constructor arguments, methods
    that block until their answer.

    ```python
    with SyncPersonalLLM.from_defaults() as llm:
        print(llm.generate("Review my new shoes", context=history).text)
        with llm.stream("...", context=history) as stream:
            for piece in stream:
                print(piece, end="")
    ```
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.async_client = kwargs.pop("async_client", None) or PersonalLLM(*args, **kwargs)

    @classmethod
    def from_async(cls, llm: PersonalLLM) -> SyncPersonalLLM:
        """Wrap an existing `PersonalLLM`; it then runs on the background loop, so do not
        also use it from another event loop."""
        return cls(async_client=llm)

    @classmethod
    def from_models(cls, *args: Any, **kwargs: Any) -> SyncPersonalLLM:
        """`PersonalLLM.from_models`: both models loaded into this process."""
        return cls(async_client=PersonalLLM.from_models(*args, **kwargs))

    @classmethod
    def from_defaults(cls, **options: Any) -> SyncPersonalLLM:
        """`PersonalLLM.from_defaults`: the embedded default pair."""
        return cls(async_client=PersonalLLM.from_defaults(**options))

    def generate(self, prompt: Prompt, **options: Unpack[GenerateOptions]) -> Generation:
        """`PersonalLLM.generate`, blocking (the same keyword arguments)."""
        return background.run(self.async_client.generate(prompt, **options))

    def stream(self, prompt: Prompt, **options: Unpack[GenerateOptions]) -> SyncGenerationStream:
        """`PersonalLLM.stream`, as a plain iterator (the same keyword arguments)."""
        return SyncGenerationStream(self.async_client.stream(prompt, **options))

    def close(self) -> None:
        """`PersonalLLM.aclose`: ends running generations, closes what it created."""
        background.run(self.async_client.aclose())

    def __enter__(self) -> SyncPersonalLLM:
        background.run(self.async_client.__aenter__())
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
