"""One ``POST /v1/completions`` request, decoded the way the server's sessions are.

A completion is a session that the server drives itself: opened from the prompt's ids
on the same `InProcessRemote`, advanced by each token it chooses, closed when it ends.
So its steps are KV-cached and go through the same `engine.batcher.StepBatcher` as the
clients' sessions: they share forward passes with them and with other completions, and a
long completion takes one short pass per token rather than holding the model's worker,
so other clients' steps run between its tokens. It ends at one of the model's EOS ids or
at a ``stop`` string (finish reason "stop"), else at ``max_tokens`` ("length").
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from transformers import PreTrainedTokenizerBase

from costeer_sdk.decoding import SamplingParams, TokenChooser
from costeer_sdk.engine.runtime import LoadedModel
from costeer_sdk.remotes.in_process import InProcessRemote

Top = list[tuple[int, float]]
"""The top-k alternatives at one position: (token id, log-prob), best first."""


@dataclass(frozen=True)
class Request:
    """What decoding needs of a completion request (``logprobs``: top-k, None for none)."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    logprobs: int | None = None
    echo: bool = False


@dataclass
class Completion:
    """The returned text and, per token of it (echoed prompt first), the token, its
    log-prob (None for the first prompt token, which nothing predicts), its top-k and the
    character offset where it starts in ``text``."""

    text: str = ""
    finish_reason: str = "length"
    completion_tokens: int = 0
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float | None] = field(default_factory=list)
    tops: list[Top | None] = field(default_factory=list)
    text_offset: list[int] = field(default_factory=list)


class TextPieces:
    """Text built one token at a time, and the offset in it where each token starts.

    Decoding each token alone is wrong where a character spans tokens (byte-level BPE) or
    a token's leading space depends on the token before (SentencePiece); decoding the
    whole sequence at every token costs time quadratic in its length. So, as vLLM does,
    each token is decoded after the few tokens before it, and a piece that ends inside a
    character waits for the tokens that complete it.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, context: Sequence[int] = ()) -> None:
        self.tokenizer = tokenizer
        self.ids = list(context)  # ``context`` gives the first tokens their spacing only
        self._start = self._read = len(self.ids)  # tokens before ``_read`` are in ``text``
        self._prefix = max(self._read - 5, 0)  # tokens decoded before them, for context
        self.text = ""
        self.offsets: list[int] = []

    def push(self, token: int, *, skip_special: bool) -> str:
        """Add a token; return the text it completes (maybe empty, or more than its own)."""
        self.offsets.append(len(self.text))
        self.ids.append(token)
        return self._emit(skip_special, final=False)

    def flush(self, *, skip_special: bool) -> str:
        """The text of tokens still waiting for a character's end (it ends with U+FFFD)."""
        return self._emit(skip_special, final=True)

    def _emit(self, skip_special: bool, *, final: bool) -> str:
        def decode(ids: list[int]) -> str:
            return str(
                self.tokenizer.decode(
                    ids, skip_special_tokens=skip_special, clean_up_tokenization_spaces=False
                )
            )

        before = decode(self.ids[self._prefix : self._read])
        after = decode(self.ids[self._prefix :])
        if after == before:  # a special token skipped: nothing to wait for
            self._prefix, self._read = max(self._prefix, self._read - 5), len(self.ids)
            return ""
        if len(after) < len(before) or (after.endswith("\ufffd") and not final):
            return ""
        piece = after[len(before) :]
        # A token that waited starts where the text it follows is final: at the
        # character its first byte is in, or after the bytes that never made one.
        shift = len(self.text) - len(before)
        for later in range(self._read + 1, len(self.ids)):
            common = _common_length(decode(self.ids[self._prefix : later]), after)
            self.offsets[later - self._start] = shift + max(common, len(before))
        self.text += piece
        self._prefix, self._read = self._read, len(self.ids)
        return piece


def _common_length(a: str, b: str) -> int:
    """How many characters ``a`` and ``b`` start with alike."""
    pairs = enumerate(zip(a, b, strict=False))
    return next((i for i, (x, y) in pairs if x != y), min(len(a), len(b)))


async def complete(remote: InProcessRemote, ids: list[int], request: Request) -> Completion:
    """Decode ``request`` after the prompt ``ids`` on ``remote`` (whose sessions must
    answer full distributions)."""
    model = remote.model
    out = Completion()
    pieces = TextPieces(model.tokenizer, () if request.echo else ids)
    if request.echo:
        scored = await _prompt_logprobs(model, ids, request.logprobs)
        for token, (logprob, top) in zip(ids, scored, strict=True):
            pieces.push(token, skip_special=False)
            _record(out, token, logprob, top)
    start = len(pieces.text)  # stop strings are looked for in the completion only
    longest = max((len(s) for s in request.stop), default=0)
    cut = False
    if request.max_tokens:
        chooser = TokenChooser(SamplingParams(request.temperature, request.top_p, request.seed))
        session, first = await remote.open_session(ids, top_k=None)
        try:
            current = first.logprobs
            while True:
                token = chooser.choose(current)
                out.completion_tokens += 1
                _record(out, token, *_score(current, token, request.logprobs))
                seen = len(pieces.text)
                if pieces.push(token, skip_special=True) and request.stop:
                    text = pieces.text
                    where = max(start, seen - longest + 1)
                    found = [i for i in (text.find(s, where) for s in request.stop) if i >= 0]
                    if found:
                        pieces.text, cut = text[: min(found)], True
                        out.finish_reason = "stop"
                        break
                if token in model.eos_token_ids:
                    out.finish_reason = "stop"
                    break
                if out.completion_tokens == request.max_tokens:
                    break
                current = (await session.advance(token, session.length)).logprobs
        finally:
            await session.close()
    if not cut:
        pieces.flush(skip_special=True)
    out.text = pieces.text
    out.text_offset = [min(offset, len(out.text)) for offset in pieces.offsets]
    return out


def _record(out: Completion, token: int, logprob: float | None, top: Top | None) -> None:
    out.tokens.append(token)
    out.logprobs.append(logprob)
    out.tops.append(top)


def _score(logprobs: torch.Tensor, token: int, k: int | None) -> tuple[float, Top | None]:
    """``token``'s log-prob and the top ``k`` of ``logprobs`` (``[vocab]``)."""
    if not k:
        return float(logprobs[token]), None
    values, top = torch.topk(logprobs, k)
    return float(logprobs[token]), list(zip(top.tolist(), values.tolist(), strict=True))


async def _prompt_logprobs(
    model: LoadedModel, ids: list[int], k: int | None
) -> list[tuple[float | None, Top | None]]:
    """Each prompt token's log-prob and top-k given the tokens before it (None for the
    first): the one pass an echo with log-probs costs beyond the completion's own."""
    if k is None:
        return [(None, None)] * len(ids)

    def score() -> list[tuple[float | None, Top | None]]:
        logits = model.model(torch.tensor([ids], device=model.device)).logits[0, :-1]
        logprobs = torch.log_softmax(logits.float(), dim=-1)
        following = torch.tensor(ids[1:], device=logprobs.device)[:, None]
        chosen = logprobs.gather(-1, following)[:, 0].tolist()
        if not k:
            return [(None, None)] + [(value, None) for value in chosen]
        values, top = (t.tolist() for t in torch.topk(logprobs, k, dim=-1))
        return [(None, None)] + [
            (value, list(zip(i, v, strict=True)))
            for value, i, v in zip(chosen, top, values, strict=True)
        ]

    return await model.run(score)
