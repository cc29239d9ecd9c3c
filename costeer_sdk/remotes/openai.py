"""`OpenAICompatibleRemote`: steering over the top-k log-probs that serving engines return.

For vLLM, SGLang, llama.cpp's ``llama-server``, llama-cpp-python's server and anything
else that answers ``POST /v1/completions`` with top-k logprobs. The protocol is
stateless: every step sends the whole public prefix (engines with prefix caching keep
that cheap) with ``max_tokens=1``, and reads the next-token top-k.

Two ways a server keys its top-k (``keys``; `RemoteInfo.keys` reports which):

* by token id (``"ids"``): `open_session` sends token-id prompts with
  ``return_tokens_as_token_ids`` and reads ``"token_id:<id>"`` keys (vLLM, ``costeer
  serve``), or the ``id`` of llama.cpp's entries. The device and the cloud must share a
  tokenizer.
* by text (``"text"``): `open_text_session` sends the public prompt as text plus the
  pieces chosen so far, decoded, and reads each top-k entry's bytes (`TextSession`,
  answers carry ``pieces``): for servers that take string prompts only or never key by
  id (llama-cpp-python, OpenAI-style APIs, vLLM without the option). Entries are read as
  bytes where the server gives them (a ``bytes`` list, as OpenAI's chat log-probs and
  llama.cpp's entries carry: preferred over the text), else from the text key, where
  ``bytes:\\xNN...`` (the form some servers, ``costeer serve`` among them, write for a
  token that is not whole UTF-8 characters) stands for those raw bytes. A key holding
  U+FFFD is a server's lossy decoding of such a token: its bytes are unknown, and it is
  passed on as the replacement character's bytes. In a JSON object, two tokens that
  decode to the same text share one key, and only one of their log-probs survives:
  that is the format's limit; entry lists that repeat a piece are merged (their
  probabilities added). The text is sent as a string, so it must end on a whole UTF-8
  character: a piece after which it would not is refused with `PartialCharacterError`
  (nothing is sent or appended) and the caller chooses another.

``keys="auto"`` (default) asks the server once, in `describe`, with a one-token
completion that requests ``return_tokens_as_token_ids``: ``"ids"`` if it answers
``token_id:`` keys, else ``"text"``. ``"ids"`` or ``"text"`` skip the probe.

Request shapes (``dialect``):

* ``"completions"`` (default): ``/v1/completions``; top-k as a ``{key: logprob}``
  object per position (``logprobs.top_logprobs``, the legacy completions shape) or as
  lists of ``{token, logprob, bytes[, id]}`` entries (``logprobs.content[i].top_logprobs``,
  the chat shape, which llama.cpp's ``/v1/completions`` answers too).
* ``"llama.cpp"``: ``llama-server``'s native ``/completion`` with ``n_probs``, whose
  ``completion_probabilities`` entries carry ``id``, ``token``, ``bytes`` and
  ``logprob``: keyed by id always (``keys="auto"`` sends no probe), and a text session
  sends the string prompt and reads the entries' bytes.

Log-probs are raw (before temperature) on vLLM and llama.cpp by default; k is capped by
the server (vLLM: ``--max-logprobs``, 20 by default).
"""

from __future__ import annotations

import math
import re
from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import httpx
import torch

from costeer_sdk.errors import ConfigurationError, PartialCharacterError, RemoteProtocolError
from costeer_sdk.remotes.base import (
    DEFAULT_TOP_K,
    Drafted,
    DraftSampling,
    NextTokenLogprobs,
    RemoteInfo,
)
from costeer_sdk.remotes.http import HTTPRemote

Dialect = Literal["completions", "llama.cpp"]
Keys = Literal["auto", "ids", "text"]

PROBE_PROMPT = "Hi"
"""What `describe` completes (one token) to see how the server keys its log-probs."""


class OpenAICompatibleRemote(HTTPRemote):
    """A `Remote` and `TextRemote` over an OpenAI-compatible completions endpoint (top-k
    support); ``keys`` says how the server keys its log-probs (see the module)."""

    def __init__(
        self,
        base_url: str,
        model: str,
        *,
        api_key: str | None = None,
        top_k: int = DEFAULT_TOP_K,
        dialect: Dialect = "completions",
        keys: Keys = "auto",
        timeout_s: float = 60.0,
        retries: int = 3,
        backoff_s: float = 0.05,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        if top_k < 1:
            raise ConfigurationError(f"top_k must be >= 1, got {top_k}")
        if dialect not in ("completions", "llama.cpp"):
            raise ConfigurationError(
                f"dialect must be 'completions' or 'llama.cpp', not {dialect!r}"
            )
        if keys not in ("auto", "ids", "text"):
            raise ConfigurationError(f"keys must be 'auto', 'ids' or 'text', not {keys!r}")
        super().__init__(
            base_url,
            api_key=api_key,
            timeout_s=timeout_s,
            retries=retries,
            backoff_s=backoff_s,
            transport=transport,
        )
        self.model = model
        self.top_k = top_k
        self.dialect = dialect
        self.keys = keys
        self._detected: Literal["ids", "text"] | None = None

    async def describe(self) -> RemoteInfo:
        """Name and limits from ``/v1/models``, and how log-probs are keyed (with
        ``keys="auto"``, one probe completion the first time); no tokenizer fingerprint
        is available, so matching tokenizers is the caller's responsibility (see the
        docs)."""
        payload = await self._request("GET", "/v1/models")
        try:
            entry = next(m for m in payload["data"] if m.get("id") == self.model)
        except (KeyError, TypeError, StopIteration):
            entry = {}
        meta = entry.get("meta") or {}
        return RemoteInfo(
            model=self.model,
            vocab_size=int(meta.get("n_vocab") or 0),
            max_sequence_length=int(  # llama-server: n_ctx is the window it serves
                entry.get("max_model_len")
                or meta.get("n_ctx")
                or meta.get("n_ctx_train")
                or 1 << 20
            ),
            tokenizer_fingerprint=None,
            keys=await self.detect_keys(),
        )

    async def detect_keys(self) -> Literal["ids", "text"]:
        """``keys`` if given; else whether the server keys log-probs by id when asked to
        (``return_tokens_as_token_ids``), found by one probe completion and remembered."""
        if self.keys != "auto":
            return self.keys
        if self.dialect == "llama.cpp":
            return "ids"  # its native entries always carry ids
        if self._detected is None:
            body = {
                "model": self.model,
                "prompt": PROBE_PROMPT,
                "max_tokens": 1,
                "logprobs": 1,
                "temperature": 0,
                "return_tokens_as_token_ids": True,
            }
            top = _positions(await self._request("POST", "/v1/completions", body))[0][1]
            if not top:
                raise RemoteProtocolError("the server returned no top-k log-probs")
            self._detected = "ids" if all(e.token_id is not None for e in top) else "text"
        return self._detected

    async def next_token(self, ids: Sequence[int]) -> NextTokenLogprobs:
        if self.dialect == "llama.cpp":
            body: dict[str, Any] = {
                "prompt": list(ids),
                "n_predict": 1,
                "n_probs": self.top_k,
                "temperature": 0,
                "cache_prompt": True,
            }
            return _parse_llama_cpp(await self._request("POST", "/completion", body))
        body = {
            "model": self.model,
            "prompt": list(ids),
            "max_tokens": 1,
            "logprobs": self.top_k,
            "temperature": 0,
            "return_tokens_as_token_ids": True,
        }
        return _parse_completions(await self._request("POST", "/v1/completions", body))

    async def next_piece(self, text: str) -> NextTokenLogprobs:
        """The top-k after the string prompt ``text``, keyed by the pieces' bytes."""
        if self.dialect == "llama.cpp":
            body: dict[str, Any] = {
                "prompt": text,
                "n_predict": 1,
                "n_probs": self.top_k,
                "temperature": 0,
                "cache_prompt": True,
            }
            return _parse_llama_cpp_text(await self._request("POST", "/completion", body))
        body = {
            "model": self.model,
            "prompt": text,
            "max_tokens": 1,
            "logprobs": self.top_k,
            "temperature": 0,
        }
        return _parse_completions_text(await self._request("POST", "/v1/completions", body))

    async def continuation(
        self, ids: Sequence[int], n: int, temperature: float
    ) -> list[tuple[NextTokenLogprobs, int]]:
        """Up to ``n`` tokens the engine generates after ``ids``, each with the top-k
        log-probs at its position: one request (a fixed-size draft; fewer if the engine
        ends its turn)."""
        if self.dialect == "llama.cpp":
            body: dict[str, Any] = {
                "prompt": list(ids),
                "n_predict": n,
                "n_probs": self.top_k,
                "temperature": temperature,
                "cache_prompt": True,
            }
            return _parse_llama_cpp_all(await self._request("POST", "/completion", body))
        body = {
            "model": self.model,
            "prompt": list(ids),
            "max_tokens": n,
            "logprobs": self.top_k,
            "temperature": temperature,
            "return_tokens_as_token_ids": True,
        }
        return _parse_completions_all(await self._request("POST", "/v1/completions", body))

    async def open_session(
        self, prompt_ids: Sequence[int]
    ) -> tuple[StatelessSession, NextTokenLogprobs]:
        session = StatelessSession(self, list(prompt_ids))
        return session, await self.next_token(session.ids)

    async def open_text_session(
        self, prompt: str
    ) -> tuple[StatelessTextSession, NextTokenLogprobs]:
        """A `TextSession` after ``prompt`` (the public prompt as text, chat template
        applied), and the first distribution, keyed by pieces."""
        session = StatelessTextSession(self, prompt)
        return session, await self.next_piece(session.text)


class StatelessSession:
    """A generation on a stateless server: the client keeps the token prefix."""

    def __init__(self, remote: OpenAICompatibleRemote, ids: list[int]) -> None:
        self.remote = remote
        self.ids = ids

    async def advance(self, token_id: int, position: int) -> NextTokenLogprobs:
        if not (position == len(self.ids) - 1 and self.ids[-1] == token_id):
            if position != len(self.ids):
                raise RemoteProtocolError(
                    f"position {position} does not extend the prefix of {len(self.ids)} tokens"
                )
            self.ids.append(token_id)
        return await self.remote.next_token(self.ids)

    async def draft(
        self, position: int, append: Sequence[int], max_tokens: int, sampling: DraftSampling
    ) -> AsyncGenerator[Drafted, None]:
        """`DraftingSession.draft` as one completion request of ``max_tokens + 1``
        tokens (the last position's distribution is what a fully kept draft needs). Not
        streamed: OpenAI-compatible engines stream text chunks, and a fixed-size draft
        costs one round trip all the same. The sampling rule must match `draw`'s: greedy
        exactly; with a temperature, engines sample over their whole vocabulary, so q is
        approximated by the top-k the engine returns."""
        if not 1 <= position <= len(self.ids):
            raise RemoteProtocolError(f"cannot draft from position {position}")
        self.ids = self.ids[:position] + list(append)
        positions = await self.remote.continuation(self.ids, max_tokens + 1, sampling.temperature)
        drafted = [token for _, token in positions[:max_tokens]]
        self.ids = self.ids + drafted  # the next round cuts back to what was kept
        for i, (dist, token) in enumerate(positions):
            yield Drafted(dist, token if i < max_tokens else None)
            if i >= max_tokens:
                return

    async def close(self) -> None:
        """Nothing is held on the server."""


class StatelessTextSession:
    """A `TextSession` on a stateless server: the client keeps the prompt text and the
    generated bytes, and sends ``prompt + generated`` (decoded) as a string prompt at
    every step; the server tokenizes that text its own way.

    Attributes:
        prompt: the public prompt.
        pieces: the pieces appended so far.
        text: ``prompt`` plus the pieces, decoded: what the next step sends.
    """

    def __init__(self, remote: OpenAICompatibleRemote, prompt: str) -> None:
        self.remote = remote
        self.prompt = prompt
        self.pieces: list[bytes] = []
        self.text = prompt
        self._generated = b""

    async def append(self, piece: bytes, position: int) -> NextTokenLogprobs:
        """`TextSession.append`. Raises `PartialCharacterError` (appending nothing) if
        the generated bytes would end inside a UTF-8 character or not be UTF-8."""
        if not (position == len(self.pieces) - 1 and self.pieces[-1] == piece):
            if position != len(self.pieces):
                raise RemoteProtocolError(
                    f"position {position} does not extend the text of {len(self.pieces)} pieces"
                )
            generated = self._generated + bytes(piece)
            try:
                decoded = generated.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise PartialCharacterError(
                    f"after piece {bytes(piece)!r} the generated text "
                    + (
                        "ends inside a UTF-8 character"
                        if exc.reason == "unexpected end of data"
                        else "is not UTF-8"
                    )
                    + ", which a server that takes text cannot be sent; choose a piece "
                    "that ends on a whole character",
                    piece=bytes(piece),
                ) from exc
            self.pieces.append(bytes(piece))
            self._generated = generated
            self.text = self.prompt + decoded
        return await self.remote.next_piece(self.text)

    async def close(self) -> None:
        """Nothing is held on the server."""


@dataclass(frozen=True)
class _Entry:
    """One top-k entry as a server wrote it: its id (``token_id:`` key or ``id`` field)
    and/or its bytes, and its log-prob."""

    token_id: int | None
    piece: bytes | None
    logprob: float


_BYTES_FORM = re.compile(r"bytes:((?:\\x[0-9a-fA-F]{2})+)")


def _text_piece(text: str) -> bytes:
    """The bytes a text key stands for: ``bytes:\\xNN...`` gives those bytes."""
    form = _BYTES_FORM.fullmatch(text)
    if form:
        return bytes(int(h, 16) for h in form.group(1).split("\\x")[1:])
    return text.encode("utf-8")


def _entry_of_key(key: Any, value: Any) -> _Entry:
    if not isinstance(key, str):
        raise TypeError(f"key {key!r} is not a string")
    if key.startswith("token_id:"):
        return _Entry(int(key.removeprefix("token_id:")), None, float(value))
    return _Entry(None, _text_piece(key), float(value))


def _entry_of_item(item: Any) -> _Entry:
    token, raw = item.get("token"), item.get("bytes")
    token_id = item.get("id")
    if isinstance(token, str) and token.startswith("token_id:"):
        token_id = int(token.removeprefix("token_id:"))
    piece = None
    if isinstance(raw, list):
        piece = bytes(raw)
    elif isinstance(token, str) and not token.startswith("token_id:"):
        piece = _text_piece(token)
    if isinstance(token_id, bool) or not isinstance(token_id, int | None):
        raise TypeError(f"id {token_id!r} is not an integer")
    return _Entry(token_id, piece, float(item["logprob"]))


def _entries(top: Any) -> list[_Entry]:
    """One position's top-k: a ``{key: logprob}`` object or a list of entry objects."""
    if isinstance(top, dict):
        return [_entry_of_key(key, value) for key, value in top.items()]
    if isinstance(top, list):
        return [_entry_of_item(item) for item in top]
    raise TypeError(f"top-k {top!r} is neither an object nor a list")


def _chosen(tokens: Any, logprobs: Any, i: int) -> _Entry | None:
    """The ``i``-th generated token of the legacy shape (None if unreadable)."""
    try:
        value = logprobs[i] if i < len(logprobs) and logprobs[i] is not None else math.nan
        return _entry_of_key(tokens[i], value)
    except (IndexError, TypeError, ValueError):
        return None


def _positions(payload: Any) -> list[tuple[_Entry | None, list[_Entry]]]:
    """Per generated position of ``choices[0]``: the chosen token (None where the
    answer does not say) and the top-k entries."""
    try:
        logprobs = payload["choices"][0]["logprobs"]
        if logprobs.get("top_logprobs") is not None:  # the legacy completions shape
            tokens = logprobs.get("tokens") or []
            chosen = logprobs.get("token_logprobs") or []
            out = []
            for i, top in enumerate(logprobs["top_logprobs"]):
                out.append((_chosen(tokens, chosen, i), _entries(top)))
        else:  # the chat shape: a list of entries, each with its top_logprobs
            out = [
                (_entry_of_item(item), _entries(item["top_logprobs"]))
                for item in logprobs["content"]
            ]
    except (KeyError, IndexError, TypeError, ValueError, AttributeError) as exc:
        raise RemoteProtocolError(
            f"no choices[0].logprobs.top_logprobs[0] in the answer ({exc!r})"
        ) from exc
    if not out:
        raise RemoteProtocolError("no choices[0].logprobs.top_logprobs[0] in the answer")
    return out


def _top(pairs: list[tuple[int, float]]) -> NextTokenLogprobs:
    if not pairs:
        raise RemoteProtocolError("the server returned no top-k log-probs")
    ids, values = zip(*pairs, strict=True)
    return NextTokenLogprobs(
        torch.tensor(values, dtype=torch.float32), torch.tensor(ids, dtype=torch.long)
    )


def _by_id(entries: list[_Entry]) -> NextTokenLogprobs:
    if any(e.token_id is None for e in entries):
        shown = [e.piece for e in entries[:3]]
        raise RemoteProtocolError(
            f"top_logprobs are keyed by text ({shown!r}...), not by token id: this server "
            "does not honour return_tokens_as_token_ids. Steer it by text with keys='text' "
            "(open_text_session), or use dialect='llama.cpp' for llama-server"
        )
    return _top([(e.token_id, e.logprob) for e in entries if e.token_id is not None])


def _by_piece(entries: list[_Entry]) -> NextTokenLogprobs:
    """The top-k keyed by bytes; entries spelling the same bytes are merged."""
    merged: dict[bytes, float] = {}
    for e in entries:
        if e.piece is None:
            raise RemoteProtocolError(
                f"top_logprobs entry for token id {e.token_id} carries no text; "
                "this server keys by id: use keys='ids' (open_session)"
            )
        before = merged.get(e.piece)
        merged[e.piece] = e.logprob if before is None else _logaddexp(before, e.logprob)
    if not merged:
        raise RemoteProtocolError("the server returned no top-k log-probs")
    return NextTokenLogprobs(
        torch.tensor(list(merged.values()), dtype=torch.float32), None, tuple(merged)
    )


def _logaddexp(a: float, b: float) -> float:
    high = max(a, b)
    if high == -math.inf:
        return high
    return high + math.log(math.exp(a - high) + math.exp(b - high))


def _parse_completions(payload: Any) -> NextTokenLogprobs:
    """The first position's top-k of a completions answer, keyed by token id."""
    return _by_id(_positions(payload)[0][1])


def _parse_completions_text(payload: Any) -> NextTokenLogprobs:
    """The first position's top-k of a completions answer, keyed by the pieces' bytes."""
    return _by_piece(_positions(payload)[0][1])


def _parse_completions_all(payload: Any) -> list[tuple[NextTokenLogprobs, int]]:
    out = []
    for token, top in _positions(payload):
        if token is None or token.token_id is None:
            raise RemoteProtocolError(
                f"generated token {token and token.piece!r} is not keyed by id"
            )
        out.append((_by_id(top), token.token_id))
    return out


def _parse_llama_cpp_all(payload: Any) -> list[tuple[NextTokenLogprobs, int]]:
    try:
        positions = payload["completion_probabilities"]
        return [
            (_parse_llama_cpp({"completion_probabilities": [p]}), int(p["id"])) for p in positions
        ]
    except (KeyError, IndexError, TypeError, ValueError) as exc:
        raise RemoteProtocolError(f"malformed completion_probabilities ({exc!r})") from exc


def _parse_llama_cpp(payload: Any) -> NextTokenLogprobs:
    try:
        top = payload["completion_probabilities"][0]["top_logprobs"]
        pairs = [(int(item["id"]), float(item["logprob"])) for item in top]
    except (KeyError, IndexError, TypeError, ValueError) as exc:
        raise RemoteProtocolError(
            f"no completion_probabilities[0].top_logprobs with id/logprob in the answer ({exc!r})"
        ) from exc
    return _top(pairs)


def _parse_llama_cpp_text(payload: Any) -> NextTokenLogprobs:
    try:
        entries = _entries(payload["completion_probabilities"][0]["top_logprobs"])
    except (KeyError, IndexError, TypeError, ValueError, AttributeError) as exc:
        raise RemoteProtocolError(
            "no completion_probabilities[0].top_logprobs with bytes or token and logprob in "
            f"the answer ({exc!r})"
        ) from exc
    return _by_piece(entries)
