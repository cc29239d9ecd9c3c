"""The generated text in the device's own tokenization, kept as the text grows.

The cloud emits its own tokens; the device must read the same text through its own
tokenizer, and a tokenization is not a prefix code: after "personal" comes "ization",
the device's best tokens for the tail may merge across the boundary (" personal" +
"ization" becomes " personalization"). So, like Hugging Face's universal assisted
generation, each new piece re-tokenizes a short look-behind window of the text, finds
where the new tokens first differ from those already fed to the device, and the two KV
branches are cut back to that point and extended with the rest in one pass
(`LocalModel.crop` / `extend`). Tokens before the window are never revisited: a
look-behind of `LOOK_BEHIND` tokens covers any merge BPE makes inside a word.

Text is fed only up to its last complete UTF-8 character: a cloud token can end inside
one (byte-level BPE splits emoji and CJK characters), and tokenizers take strings.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from transformers import PreTrainedTokenizerBase

from costeer_sdk.alignment.vocabulary import Vocabulary

__all__ = ["LOOK_BEHIND", "DeviceText", "Edit", "common_prefix"]

LOOK_BEHIND = 8
"""Tokens re-tokenized before each new piece (Hugging Face's assisted generation looks
back about ten)."""


@dataclass(frozen=True)
class Edit:
    """How to bring the device's branches up to date: forget the last ``drop`` tokens,
    then append ``add``."""

    drop: int
    add: tuple[int, ...]


@dataclass
class DeviceText:
    """The generated text and the device tokens fed for it so far."""

    tokenizer: PreTrainedTokenizerBase
    vocabulary: Vocabulary
    look_behind: int = LOOK_BEHIND
    text: bytearray = field(default_factory=bytearray)
    tokens: list[int] = field(default_factory=list)
    ends: list[int] = field(default_factory=list)  # byte offset after each token

    def copy(self) -> DeviceText:
        """A copy to push text into speculatively (the tokenizer and vocabulary are
        shared: copying them would cost seconds for a large vocabulary)."""
        return DeviceText(
            self.tokenizer,
            self.vocabulary,
            self.look_behind,
            bytearray(self.text),
            list(self.tokens),
            list(self.ends),
        )

    @property
    def pending(self) -> bytes:
        """Text not fed to the device yet (the start of an incomplete character)."""
        return bytes(self.text[self.ends[-1] if self.ends else 0 :])

    def push(self, piece: bytes) -> Edit:
        """Add the cloud's ``piece``; return the edit that makes the device's tokens those
        of the (complete part of the) text. An empty edit: nothing new to feed yet."""
        self.text += piece
        complete = _complete_utf8(self.text)
        fed = self.ends[-1] if self.ends else 0
        if complete <= fed:
            return Edit(0, ())
        start_token = max(0, len(self.tokens) - self.look_behind)
        start = self.ends[start_token - 1] if start_token else 0
        tail = bytes(self.text[start:complete])
        new = self._tokenize(tail)
        same = common_prefix(self.tokens[start_token:], new)
        if same == len(new):  # the text grew but no token changed or was added: refeed
            same -= 1
        keep = start_token + same
        drop = len(self.tokens) - keep
        del self.tokens[keep:], self.ends[keep:]
        offset = self.ends[-1] if self.ends else 0
        for token in new[same:]:
            offset += len(self.vocabulary.pieces[token] or b"")
            self.tokens.append(token)
            self.ends.append(offset)
        return Edit(drop, tuple(new[same:]))

    def _tokenize(self, tail: bytes) -> list[int]:
        """The device's tokens for ``tail``; they must spell it back exactly (a
        tokenizer that normalises text, or adds a leading space, would feed the device
        a different text than the cloud wrote)."""
        try:
            ids = self.tokenizer.encode(tail.decode("utf-8"), add_special_tokens=False)
        except UnicodeDecodeError:  # stray bytes: only the vocabulary can spell them
            return self._spelled(tail)
        if self.vocabulary.spell(ids) != tail:
            ids = self._spelled(tail)
        return list(ids)

    def _spelled(self, tail: bytes) -> list[int]:
        """Greedy longest-match tokens for ``tail``: the fallback where the tokenizer's
        own output does not spell the text back (it normalises, or adds a prefix space)."""
        ids: list[int] = []
        at = 0
        while at < len(tail):
            token = self.vocabulary.first_token(tail[at:])
            if token is None:
                raise ValueError("the device's vocabulary cannot spell the text")
            ids.append(token)
            at += len(self.vocabulary.pieces[token] or b"")
        return ids


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """How many leading tokens ``a`` and ``b`` share."""
    same = 0
    while same < min(len(a), len(b)) and a[same] == b[same]:
        same += 1
    return same


def _complete_utf8(text: bytearray) -> int:
    """The length of the longest prefix of ``text`` that ends on a character boundary."""
    end = len(text)
    for back in range(1, min(4, end) + 1):
        byte = text[end - back]
        if byte < 0x80:  # ASCII (then stray continuation bytes, fed as they are)
            return end
        if byte >= 0xC0:  # a lead byte: complete if its sequence is all there
            need = 2 if byte < 0xE0 else 3 if byte < 0xF0 else 4
            return end if back >= need else end - back
    return end  # not UTF-8 at all: feed it and let the tokenizer decide
