"""What each token of a vocabulary spells, as bytes: the common ground of two tokenizers.

Two tokenizers agree on text, not on ids or token strings: a byte-level BPE (Qwen,
SmolLM2, Llama 3) writes a leading space as ``Ġ`` and stores bytes as printable stand-in
characters; a SentencePiece-style one (Gemma, Llama 2) writes it as ``▁`` and spells
bytes it has no token for as ``<0xNN>``. `Vocabulary` normalises every token to the bytes
it stands for, so that "the same token" means "the same bytes" across families. Special
tokens (chat markers, EOS) spell no text: they map to None and are matched by role.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from functools import cached_property

from transformers import PreTrainedTokenizerBase

__all__ = ["BYTE_FALLBACK", "BYTE_LEVEL", "Vocabulary"]

BYTE_FALLBACK = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")
"""SentencePiece's byte-fallback tokens."""


def _byte_level_alphabet() -> dict[str, int]:
    """The printable stand-in character of each byte in byte-level BPE vocabularies (the
    table GPT-2 introduced: printable Latin-1 bytes stand for themselves, the others are
    shifted to code points from 256 up, in byte order)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    stand_in = {b: b for b in printable}
    shifted = 0
    for b in range(256):
        if b not in stand_in:
            stand_in[b] = 256 + shifted
            shifted += 1
    return {chr(code): b for b, code in stand_in.items()}


BYTE_LEVEL = _byte_level_alphabet()
"""Byte-level BPE's stand-in character -> the byte it stands for."""


def _is_byte_level(tokenizer: PreTrainedTokenizerBase) -> bool:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return False
    decoder = json.loads(backend.to_str()).get("decoder") or {}
    return '"ByteLevel"' in json.dumps(decoder)


@dataclass(frozen=True, eq=False)
class Vocabulary:
    """One tokenizer's tokens as bytes.

    Attributes:
        pieces: per id, the bytes the token spells (None: a special token).
        eos_ids: the ids that end a turn.
        width: the model's logits width, which may exceed the tokenizer's size (Qwen pads
            151,665 tokens to 151,936 logits); ids past the tokenizer spell nothing.
    """

    pieces: tuple[bytes | None, ...] = field(repr=False)
    eos_ids: frozenset[int]
    width: int
    _by_piece: dict[bytes, int] = field(default_factory=dict, repr=False)

    @classmethod
    def of(
        cls, tokenizer: PreTrainedTokenizerBase, eos_ids: frozenset[int], width: int | None = None
    ) -> Vocabulary:
        """Read ``tokenizer``'s tokens (``width``: the model's logits width)."""
        size = len(tokenizer)
        specials = set(tokenizer.all_special_ids)
        added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
        specials |= {i for i, token in added.items() if getattr(token, "special", False)}
        byte_level = _is_byte_level(tokenizer)
        strings = tokenizer.convert_ids_to_tokens(list(range(size)))
        pieces: list[bytes | None] = []
        for i, token in enumerate(strings):
            if i in specials or token is None:
                pieces.append(None)
            elif i in added:  # an added, non-special token is stored as plain text
                pieces.append(token.encode("utf-8"))
            else:
                pieces.append(_spell(token, byte_level))
        by_piece: dict[bytes, int] = {}
        for i, piece in enumerate(pieces):
            if piece:
                by_piece.setdefault(piece, i)  # the first id of a duplicate spelling
        return cls(tuple(pieces), eos_ids, max(width or size, size), by_piece)

    def id_of(self, piece: bytes) -> int | None:
        """The token that spells exactly ``piece`` (None: no single token does)."""
        return self._by_piece.get(piece)

    def first_token(self, text: bytes) -> int | None:
        """The longest token that ``text`` starts with: the first token of a greedy
        tokenization, an approximation of the tokenizer's own first token (exact where
        the tokenizer would keep the longest match, as BPE usually does at a word start)."""
        for end in range(min(len(text), self._longest), 0, -1):
            token = self._by_piece.get(text[:end])
            if token is not None:
                return token
        return None

    def spell(self, ids: list[int]) -> bytes:
        """The bytes of a sequence of (non-special) ids."""
        return b"".join(self.pieces[i] or b"" for i in ids)

    def shared_with(self, other: Vocabulary) -> dict[int, int]:
        """The paper's vocabulary intersection: our id -> ``other``'s id for every token
        whose spelling ``other`` has as one token too (plus end-of-turn ids, matched by
        role rather than spelling)."""
        shared = {
            i: j
            for i, piece in enumerate(self.pieces)
            if piece and (j := other.id_of(piece)) is not None
        }
        if other.eos_ids:
            for i in self.eos_ids:
                shared[i] = min(other.eos_ids)
        return shared

    @cached_property
    def _longest(self) -> int:
        return max((len(p) for p in self._by_piece), default=0)


def _spell(token: str, byte_level: bool) -> bytes:
    if byte_level:
        try:
            return bytes(BYTE_LEVEL[c] for c in token)
        except KeyError:  # not in the byte alphabet: stored as plain text
            return token.encode("utf-8")
    byte = BYTE_FALLBACK.match(token)
    if byte:
        return bytes([int(byte.group(1), 16)])
    return token.replace("▁", " ").encode("utf-8")
