"""Token ids to text as they arrive, in time linear in the answer's length.

Decoding the whole answer again at every token costs time quadratic in its length (a
4000-token answer decodes 8 million token ids). Decoding each token alone is wrong: a
byte-level BPE character can span tokens, and a SentencePiece token's leading space
depends on the tokens before it. So, as vLLM's detokenizer and `tokenizers`'
``DecodeStream`` do, each new token is decoded in a short window after the tokens of the
last final text (its context), and the text past that context is the token's text.

``DecodeStream`` itself does not fit `TextAssembler`, which keeps today's behaviour:

- it returns nothing while the text ends inside a character, not even the text before
  it, but stop strings are looked for in the text decoded so far (a token holding the
  end of a word and the first byte of "é" must show the word, or the stop is seen a
  token, and a cloud step, late), and ``.text`` of an interrupted generation is the
  decode of every id so far;
- it cannot flush: the bytes of an answer that ends inside a character are lost;
- its window grows without bound while tokens keep ending inside characters or are
  special tokens that are skipped, which is quadratic again for a model stuck on them.

So `IncrementalDetokenizer` runs the same windowed algorithm over the Rust tokenizer's
own ``decode``, reports the text past the final part too, and moves the window on inside
a long unfinished stretch wherever splitting it there decodes the same. A fast tokenizer
costs one decode of a few ids per token: a Python call costs more than an id, so the
window restarts every dozen tokens rather than at each (``DecodeStream`` decodes twice
per token). A slow (Python) tokenizer goes through ``tokenizer.decode`` on the same
short windows.
"""

from __future__ import annotations

from collections.abc import Callable

from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

REPLACEMENT = "\ufffd"
"""What a decoder writes for bytes that do not (yet) make a character."""

WINDOW = 16
"""Tokens a window may grow to before it restarts at the last final tokens: a longer one
costs a longer decode per token, a shorter one more decodes of the context."""

LONG_PENDING = 8
"""Tokens not yet final past which the window is cut inside them if that is exact: a
UTF-8 character has at most 4 bytes, so only a stuck stream waits this long."""

DecodeFn = Callable[[list[int]], str]
"""Token ids to text, as one tokenizer decodes them with one setting."""

SPLIT_KEEP = (4, 5, 6, 7)
"""How many of the latest tokens a cut keeps after it: at least the 3 bytes that can end
inside a character, tried in turn until one cuts between whole characters."""


def decoder_for(tokenizer: PreTrainedTokenizerBase, *, skip_special_tokens: bool) -> DecodeFn:
    """The cheapest function that decodes ids exactly as ``tokenizer.decode(ids,
    skip_special_tokens=..., clean_up_tokenization_spaces=False)`` does.

    A fast tokenizer whose ``decode`` and ``_decode`` are transformers' own decodes
    through its Rust tokenizer and nothing else (clean-up is off), so that is called
    directly, without transformers' per-call conversions. Anything else (a slow
    tokenizer, a class or instance that overrides decoding) goes through ``decode``.
    """
    if (
        isinstance(tokenizer, PreTrainedTokenizerFast)
        and getattr(tokenizer.decode, "__func__", None) is PreTrainedTokenizerBase.decode
        and getattr(tokenizer._decode, "__func__", None) is PreTrainedTokenizerFast._decode
    ):
        backend = tokenizer.backend_tokenizer

        def fast(ids: list[int]) -> str:
            return str(backend.decode(ids, skip_special_tokens=skip_special_tokens))

        return fast

    def slow(ids: list[int]) -> str:
        return str(
            tokenizer.decode(
                ids,
                skip_special_tokens=skip_special_tokens,
                clean_up_tokenization_spaces=False,
            )
        )

    return slow


class IncrementalDetokenizer:
    """Text of a growing id sequence, a short decode per id.

    The text so far is ``final + pending``: ``final`` never changes again; ``pending``
    is the text of the latest tokens as decoded now, which may still change (it ends
    inside a character, or the tokens were skipped special tokens). Their concatenation
    equals decoding all ids at once for decoders whose output for a token depends only
    on the last few tokens before it (byte-level BPE, SentencePiece, WordPiece).

    State: ``_window`` holds the latest ids. Those before ``_read`` are final already
    and are the context (decoded alone they give ``_context_text``); the text of those
    after is what decoding the whole window adds past the context.
    """

    def __init__(
        self, tokenizer: PreTrainedTokenizerBase, *, skip_special_tokens: bool = True
    ) -> None:
        self.decode = decoder_for(tokenizer, skip_special_tokens=skip_special_tokens)
        self._window: list[int] = []
        self._read = 0
        self._context_text = ""
        self.pending = ""

    def push(self, token_id: int) -> str:
        """Add a token; return the text that became final with it (maybe empty).
        ``pending`` is then the text after all final text."""
        self._window.append(token_id)
        text = self.decode(self._window)
        context = self._context_text
        grown = len(text) > len(context) and text.startswith(context)
        if grown and not text.endswith(REPLACEMENT):
            self.pending = ""
            if len(self._window) > WINDOW:
                self._restart(self._read)
            else:  # the window's text is the next tokens' context: no decode needed
                self._read, self._context_text = len(self._window), text
            return text[len(context) :]
        self.pending = text[len(context) :] if grown else ""
        if len(self._window) - self._read > LONG_PENDING:
            return self._cut(text)
        return ""

    def _restart(self, at: int) -> None:
        """Make the window's ids from ``at`` on the context of the next tokens."""
        del self._window[:at]
        self._read = len(self._window)
        self._context_text = self.decode(self._window) if self._window else ""

    def _cut(self, text: str) -> str:
        """In a long stretch of tokens that are not final, make the text before a cut
        final if decoding either side of it gives ``text``: then no later token can
        change that text (the cut is between whole characters), and the window stays
        short. Returns the text made final ("" if no cut fits)."""
        context = self._context_text
        for keep in SPLIT_KEEP:
            at = len(self._window) - keep
            if at <= self._read:
                break
            before = self.decode(self._window[:at])
            if not before.startswith(context):
                continue
            after = self.decode(self._window[at:])
            if before + after == text:
                del self._window[:at]
                self._read, self._context_text = 0, ""
                self.pending = after
                return before[len(context) :]
        return ""
