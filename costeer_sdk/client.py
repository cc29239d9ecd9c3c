"""`PersonalLLM`: the one entry point applications use.

Longer than most modules for its docstrings: the entry class documents every argument
where users read it. The work itself lives elsewhere: the run loop in `generation`,
closing in `lifecycle`, the per-token schedule in `scheduler`.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Sequence
from types import TracebackType
from typing import Literal

import torch
from transformers import PreTrainedTokenizerBase

from costeer_sdk.alignment.aligner import METHODS, AlignmentMethod
from costeer_sdk.alignment.crossing import CloudSide
from costeer_sdk.alignment.loop import PieceTable
from costeer_sdk.builtins import DEFAULT_CLOUD, DEFAULT_LOCAL
from costeer_sdk.context import ContextTemplate, Prompt, PromptBuilder, query_text
from costeer_sdk.decoding import SamplingParams, TextAssembler, TokenChooser
from costeer_sdk.engine.local import LocalModel
from costeer_sdk.engine.prefixes import DEFAULT_PREFIX_CACHE_BYTES
from costeer_sdk.engine.runtime import LoadedModel, tokenizer_fingerprint
from costeer_sdk.errors import (
    ConfigurationError,
    TokenizerMismatchError,
)
from costeer_sdk.fusion import DEFAULT_TOP_K, SteeringConfig
from costeer_sdk.generation import Progress, Request, emit
from costeer_sdk.lifecycle import Lifecycle
from costeer_sdk.logs import get_logger
from costeer_sdk.memory.base import MemoryStore
from costeer_sdk.memory.personal import personal_context
from costeer_sdk.memory.retrieval import BM25Retriever, Retriever
from costeer_sdk.remotes.base import Remote, RemoteInfo
from costeer_sdk.remotes.in_process import InProcessRemote
from costeer_sdk.results import Generation
from costeer_sdk.scheduler import steer
from costeer_sdk.stream import GenerationStream

DEFAULT_LOOKAHEAD = 0
"""Per-token rounds until the bench picks a default (docs/benchmarks.md)."""

log = get_logger(__name__)

PrefixScope = Literal["user", "shared"]


class PersonalLLM:
    """A cloud LLM steered token by token by a small local model that sees the user's
    private context. Only the public prompt and the chosen tokens (as ids, or as text for a
    cloud that keys its log-probs by text) ever reach the cloud.

    Args:
        remote: the cloud side (`InProcessRemote`, or a network remote).
        local: the local model: a `LocalModel`, a `LoadedModel`, or a model spec string
            (Hub id, directory, ``.gguf`` path or ``builtin:`` name).
        steering: CoSteer hyperparameters (the paper's by default).
        context_template: layout of the private prompt.
        system_prompt: system message for both prompts, when the chat format has one.
        max_context_tokens: cap on the private prompt plus generated tokens (defaults to
            the local model's window); longer contexts are cut oldest-first.
        memory: the user-history store that ``generate(user_id=...)`` retrieves from.
        memory_k: how many records to retrieve per generation (the paper uses 5).
        retriever: how records are chosen (`BM25Retriever` by default).
        prefix_scope: whose kept local prefixes a generation may reuse (`prefixes`):
            ``"user"`` (default) only those of generations with the same ``user_id``
            (a generation without one reuses nothing kept by others), so that how fast
            a prefill runs cannot tell one user what another's private prompt starts
            with; ``"shared"`` lets every generation reuse every other's, for a device
            that serves one person.
        lookahead: multi-token rounds (`rounds`): the cloud drafts up to this many
            tokens per request and the device verifies them, so a generation needs far
            fewer round trips; the output is the same (greedy) or distributed the same
            (sampling). 0: one request per token. Remotes that cannot draft step per
            token whatever this says.
        prefill_bucket_s: round the time from opening the cloud session to the first
            step up to a whole multiple of this (0: off), so the cloud cannot time the
            private prefill (its length, a prefix-cache hit) to finer than the bucket;
            costs about half a bucket of latency per generation on average.
        cloud_tokenizer: the cloud model's tokenizer, where it differs from the local
            model's and the remote cannot say so itself (an `InProcessRemote` can): the
            client then steers across tokenizers (`alignment`), building the cloud's
            prompt in the cloud's chat format. Not needed for a cloud that keys its
            log-probs by text, which is sent text (laid out in this tokenizer's chat
            format if given, else the local model's).
        alignment: how the local model scores a foreign cloud's tokens: ``"text"``
            (ours, default: every cloud candidate stays reachable) or ``"intersection"``
            (the paper's: only tokens both vocabularies spell alike).
    """

    def __init__(
        self,
        remote: Remote,
        local: LocalModel | LoadedModel | str,
        steering: SteeringConfig | None = None,
        *,
        context_template: ContextTemplate | None = None,
        system_prompt: str | None = None,
        max_context_tokens: int | None = None,
        memory: MemoryStore | None = None,
        memory_k: int = 5,
        retriever: Retriever | None = None,
        prefix_scope: PrefixScope = "user",
        prefill_bucket_s: float = 0.0,
        lookahead: int = DEFAULT_LOOKAHEAD,
        cloud_tokenizer: PreTrainedTokenizerBase | None = None,
        alignment: AlignmentMethod = "text",
    ) -> None:
        if alignment not in METHODS:
            raise ConfigurationError(f"alignment must be one of {METHODS}, got {alignment!r}")
        if isinstance(local, str):
            local = LocalModel.from_spec(local)
        elif isinstance(local, LoadedModel):
            local = LocalModel(local)
        if not isinstance(local, LocalModel):
            raise ConfigurationError(
                f"local must be a LocalModel, a LoadedModel or a model spec, got {type(local)}"
            )
        if not isinstance(remote, Remote):
            raise ConfigurationError(f"remote does not implement the Remote protocol: {remote!r}")
        if max_context_tokens is not None and max_context_tokens < 2:
            raise ConfigurationError("max_context_tokens must be at least 2")
        if memory_k < 1:
            raise ConfigurationError(f"memory_k must be >= 1, got {memory_k}")
        if prefix_scope not in ("user", "shared"):
            raise ConfigurationError(
                f"prefix_scope must be 'user' or 'shared', got {prefix_scope!r}"
            )
        if not prefill_bucket_s >= 0:
            raise ConfigurationError(f"prefill_bucket_s must be >= 0, got {prefill_bucket_s}")
        if isinstance(lookahead, bool) or not isinstance(lookahead, int) or lookahead < 0:
            raise ConfigurationError(f"lookahead must be an int >= 0, got {lookahead!r}")
        self.lookahead = lookahead
        self.prefix_scope = prefix_scope
        self.prefill_bucket_s = prefill_bucket_s
        self._lifecycle = Lifecycle()
        self.remote = remote
        self.local = local
        self.memory = memory
        self.memory_k = memory_k
        self.retriever = retriever or BM25Retriever()
        self._pipelined = True  # False: remote then local, the baseline bench/pipeline.py times
        self._owns_remote = False  # True where this object created its remote
        self.steering = steering or SteeringConfig()
        self.max_context_tokens = max_context_tokens
        self.prompts = PromptBuilder(local.tokenizer, context_template, system_prompt)
        self._remote_info: RemoteInfo | None = None
        self._owned: list[LoadedModel] = []
        self.alignment: AlignmentMethod = alignment
        if cloud_tokenizer is None and isinstance(remote, InProcessRemote):
            cloud_tokenizer = remote.model.tokenizer
        self.cloud_tokenizer = cloud_tokenizer
        self._cloud: CloudSide | None = None  # set by `_info` where the tokens differ

    @classmethod
    def from_models(
        cls,
        cloud: str = DEFAULT_CLOUD,
        local: str = DEFAULT_LOCAL,
        steering: SteeringConfig | None = None,
        *,
        top_k: int | None = DEFAULT_TOP_K,
        device: str = "cpu",
        dtype: torch.dtype | str = "auto",
        progress: bool = True,
        **options: object,
    ) -> PersonalLLM:
        """Load both models into this process (blocking: loading takes seconds, or a
        minute or two the first time a GGUF model is converted).

        ``dtype`` is the models' weights and activations; fusion always runs in float32.
        ``"auto"`` (the default) is bfloat16 where the hardware computes it natively
        (CPUs with AMX: Intel Xeon 4th generation and later; CUDA GPUs that support it)
        and float32 elsewhere (`loading.resolve_dtype`). With AMX, bfloat16 runs the
        0.5B local model's prefill 3.5x faster and makes batching concurrent generations
        nearly free; the evaluation measures no change in quality, though CoSteer's
        greedy outputs differ from float32's (docs/benchmarks.md). Pass ``"float32"``
        (or ``torch.float32``) for float32 everywhere.

        ``top_k`` (default 20, what vLLM serves by default) restricts steering to the
        cloud's top-k tokens, renormalised: the local delta can reorder what the cloud
        finds plausible but cannot promote a token the cloud rules out. Measured on the
        default pair, full-vocabulary fusion (``top_k=None``, the paper's literal form)
        tends to copy the history verbatim; see docs/benchmarks.md.
        """
        from costeer_sdk.engine.loading import load_model

        cloud_model = load_model(cloud, device=device, dtype=dtype, progress=progress)
        local_model = (
            cloud_model
            if local == cloud
            else load_model(local, device=device, dtype=dtype, progress=progress)
        )
        # The cloud's kept prefixes are public prompts, but reusing them across users
        # would still time one user's conversation for another (`ChatCoSteer` shares an
        # engine): kept only where prefixes are shared anyway.
        shared = options.get("prefix_scope") == "shared"
        llm = cls(
            InProcessRemote(
                cloud_model,
                top_k=top_k,
                prefix_cache_bytes=DEFAULT_PREFIX_CACHE_BYTES if shared else 0,
            ),
            LocalModel(local_model),
            steering,
            **options,  # type: ignore[arg-type]
        )
        llm._owned = [cloud_model, local_model]
        llm._owns_remote = True
        return llm

    @classmethod
    def from_defaults(cls, **options: object) -> PersonalLLM:
        """The embedded default pair: Qwen2.5-Coder 1.5B (cloud) and 0.5B (local) Instruct."""
        return cls.from_models(DEFAULT_CLOUD, DEFAULT_LOCAL, **options)  # type: ignore[arg-type]

    def _cloud_side(self, info: RemoteInfo) -> CloudSide | None:
        """How this client reaches the cloud's tokens: None where they are the local
        model's; else across tokenizers (`alignment`)."""
        local = self.local.model
        system = self.prompts.system_prompt
        if info.keys == "text":
            return CloudSide.build(
                local, self.cloud_tokenizer, self.alignment, text_keys=True, system_prompt=system
            )
        reported = info.tokenizer_fingerprint
        if reported == local.fingerprint:  # one tokenizer: no need to hash the cloud's
            return None
        given = (
            None if self.cloud_tokenizer is None else tokenizer_fingerprint(self.cloud_tokenizer)
        )
        remote_fingerprint = reported or given
        if remote_fingerprint is None or remote_fingerprint == local.fingerprint:
            return None
        if given != remote_fingerprint:
            raise TokenizerMismatchError(
                f"the cloud model {info.model!r} and the local model {local.name!r} use "
                f"different tokenizers (vocabulary hashes {remote_fingerprint[:12]} vs "
                f"{local.fingerprint[:12]}), and the client has not been given the cloud's "
                "tokenizer: pass PersonalLLM(..., cloud_tokenizer=...) to steer across "
                "tokenizers, or pick a local model from the cloud model's family."
            )
        return CloudSide.build(
            local,
            self.cloud_tokenizer,
            self.alignment,
            text_keys=False,
            cloud_width=info.vocab_size,
            system_prompt=system,
        )

    async def _info(self) -> RemoteInfo:
        if self._remote_info is None:
            info = await self.remote.describe()
            self._cloud = self._cloud_side(info)
            self._remote_info = info
        return self._remote_info

    async def generate(
        self,
        prompt: Prompt,
        *,
        context: Sequence[str] | None = None,
        user_id: str | None = None,
        max_new_tokens: int = 128,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int | None = None,
        stop: Sequence[str] | str = (),
        steering: SteeringConfig | None = None,
    ) -> Generation:
        """Generate a reply to ``prompt`` (a user turn, or a conversation as
        ``[{"role": ..., "content": ...}, ...]`` ending with a user turn) personalized by
        ``context`` (history records, oldest first), or, when ``user_id`` is given and
        ``context`` is not, by the user's profile and the ``memory_k`` records of
        ``memory`` most relevant to the prompt. Without either this is the cloud model's own answer.

        Raises:
            ConfigurationError: bad arguments (a ValueError).
            GenerationInterrupted: the generation failed part-way; it carries the
                partial text and token ids.
        """
        stream = self.stream(
            prompt,
            context=context,
            user_id=user_id,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            seed=seed,
            stop=stop,
            steering=steering,
        )
        async for _ in stream:
            pass
        assert stream.generation is not None
        return stream.generation

    def stream(
        self,
        prompt: Prompt,
        *,
        context: Sequence[str] | None = None,
        user_id: str | None = None,
        max_new_tokens: int = 128,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int | None = None,
        stop: Sequence[str] | str = (),
        steering: SteeringConfig | None = None,
    ) -> GenerationStream:
        """Like `generate`, yielding text as it is decided; the pieces join to its text.
        Once the stream is exhausted, its ``generation`` holds the finished `Generation`
        (token ids, finish reason, stats)."""
        request = self._request(
            prompt, context, max_new_tokens, temperature, top_p, seed, stop, steering
        )
        if self.prefix_scope == "shared":
            request.scope = None
        elif user_id is not None:
            request.scope = ("user", user_id)
        else:
            request.scope = object()  # reuses nothing another generation kept
        return GenerationStream(self._stream(request, user_id), request)

    async def _stream(self, request: Request, user_id: str | None) -> AsyncGenerator[str, None]:
        with self._lifecycle.running():
            request.context = await self._context(request.prompt, request.context, user_id)
            run = self._run(request)
            try:
                async for piece in run:
                    yield piece
            finally:
                await run.aclose()  # at once, not when the garbage collector finds it

    async def _context(
        self, prompt: Prompt, context: Sequence[str] | None, user_id: str | None
    ) -> Sequence[str] | None:
        """Explicit context wins; else the user's records from the memory store."""
        if context is not None or user_id is None:
            return context
        if self.memory is None:
            raise ConfigurationError(
                "user_id needs a memory store: PersonalLLM(..., memory=SQLiteMemoryStore(path))"
            )
        return await personal_context(
            self.memory, self.retriever, user_id, query_text(prompt), self.memory_k
        )

    def _request(
        self,
        prompt: Prompt,
        context: Sequence[str] | None,
        max_new_tokens: int,
        temperature: float,
        top_p: float,
        seed: int | None,
        stop: Sequence[str] | str,
        steering: SteeringConfig | None,
    ) -> Request:
        query_text(prompt)  # a non-empty string, or a conversation ending with a user turn
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int):
            raise ConfigurationError(f"max_new_tokens must be an int, got {max_new_tokens!r}")
        if max_new_tokens <= 0:
            raise ConfigurationError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if isinstance(context, str):
            context = [context]
        return Request(
            prompt=prompt,
            context=context,
            max_new_tokens=max_new_tokens,
            sampling=SamplingParams(temperature, top_p, seed),
            stop=[stop] if isinstance(stop, str) else list(stop),
            steering=steering or self.steering,
        )

    async def _run(self, request: Request) -> AsyncGenerator[str, None]:
        info = await self._info()
        local = self.local.model
        window = min(info.max_sequence_length, local.window, self.max_context_tokens or 1 << 62)
        if request.max_new_tokens >= window:
            raise ConfigurationError(
                f"max_new_tokens={request.max_new_tokens} leaves no room for the prompt in "
                f"a {window}-token window"
            )
        prompts = self.prompts.build(
            request.prompt, request.context, window - request.max_new_tokens
        )
        crossing = self._cloud.start(request.prompt, local) if self._cloud else None
        output: PreTrainedTokenizerBase | PieceTable = local.tokenizer
        eos_ids = local.eos_token_ids
        if crossing is not None:
            output = crossing.table or crossing.side.tokenizer or output
            eos_ids = frozenset({PieceTable.END}) if crossing.table else crossing.side.eos_ids
        run = Progress(prompts, request, TextAssembler(output, request.stop))  # type: ignore[arg-type]
        log.info(
            "generate.start",
            prompt_tokens=len(prompts.public_ids),
            private_prompt_tokens=len(prompts.private_ids or ()),
            records=prompts.records_used,
            steered=run.steered,
            max_new_tokens=request.max_new_tokens,
        )
        tokens = steer(
            self.remote,
            self.local if run.steered else None,
            prompts,
            request.steering,
            TokenChooser(request.sampling),
            request.max_new_tokens,
            run.clock,
            pipelined=self._pipelined,
            scope=request.scope,
            prefill_bucket_s=self.prefill_bucket_s,
            lookahead=self.lookahead,
            crossing=crossing,
        )
        pieces = emit(tokens, run, eos_ids, self._lifecycle.next_token)
        try:
            async for piece in pieces:
                yield piece
        finally:
            await pieces.aclose()  # an early close reaches the session at once

    async def aclose(self, *, timeout_s: float = 10.0) -> None:
        """End the generations still running (each raises `ClientClosedError`, keeping
        its partial text, once its remote session is closed), refuse new ones, then close
        what this object created: the remote and models of `from_models`. A remote or
        model passed in stays open, as openai-python leaves an ``http_client`` it was
        given open: close it yourself (``await remote.aclose()``).

        ``timeout_s`` bounds the wait for the running generations to wind down."""
        await self._lifecycle.close(timeout_s)
        if self._owns_remote:
            await self.remote.aclose()
        for model in self._owned:
            model.close()

    async def __aenter__(self) -> PersonalLLM:
        await self._info()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()
