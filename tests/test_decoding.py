"""`TextAssembler` and its incremental detokenizer: the same text, pieces and stops as
decoding the whole answer at every token (the reference below, the code it replaced),
for fast and slow tokenizers, with characters split over byte-level tokens, special
tokens and stop strings across token boundaries; and work linear in the answer."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tiny import CORPUS, make_tokenizer
from transformers import ByT5Tokenizer, PreTrainedTokenizerBase

from costeer_sdk.decoding import TextAssembler
from costeer_sdk.detokenize import LONG_PENDING, WINDOW, IncrementalDetokenizer, decoder_for


def _byte_alphabet() -> dict[int, str]:
    """GPT-2's byte-to-character map, which the tiny tokenizer's byte-level BPE uses."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    bs += range(ord("®"), ord("ÿ") + 1)
    cs = list(bs)
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + len(cs) - 188)  # the next code point above the byte range
    return dict(zip(bs, map(chr, cs), strict=True))


FAST = make_tokenizer()
BYTE_ID = {b: FAST.backend_tokenizer.token_to_id(c) or 0 for b, c in _byte_alphabet().items()}
assert sorted(BYTE_ID.values()) == list(range(3, 259))  # every byte is a token
SPECIALS = [0, 1, 2]  # <|endoftext|>, <|im_start|>, <|im_end|>
WORDS = ["a", "b", "n", " ", "ran", " ten", "\n", "é", "ü", "日本", "日", "😀", "👍🏽", "ß", "ab"]

SLOW_BYTES = ByT5Tokenizer()  # a slow (Python) tokenizer: one token per byte, +3


def _python_decoded(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """``tokenizer`` with an instance-level ``decode``: the detokenizer must then go
    through it (the slow path) rather than the Rust tokenizer."""
    cls_decode = type(tokenizer).decode
    tokenizer.decode = lambda ids, **kw: cls_decode(tokenizer, ids, **kw)  # type: ignore[method-assign]
    return tokenizer


SLOW_BPE = _python_decoded(make_tokenizer())


class OldAssembler:
    """The `TextAssembler` this replaced, verbatim but for names: the reference."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, stop: Sequence[str] = ()) -> None:
        self.tokenizer = tokenizer
        self.stop = tuple(stop)
        self.token_ids: list[int] = []
        self.text = ""
        self.stopped = False
        self._released = 0

    def push(self, token_id: int) -> str:
        self.token_ids.append(token_id)
        full = str(
            self.tokenizer.decode(
                self.token_ids, skip_special_tokens=True, clean_up_tokenization_spaces=False
            )
        )
        cut = min((i for i in (full.find(s) for s in self.stop) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped = True
            self.text = full[:cut]
            return self._release(len(self.text))
        self.text = full
        safe = len(full.rstrip("\ufffd"))
        held = max(
            (k for s in self.stop for k in range(1, len(s)) if full[:safe].endswith(s[:k])),
            default=0,
        )
        return self._release(safe - held)

    def flush(self) -> str:
        return self._release(len(self.text))

    def _release(self, end: int) -> str:
        if end <= self._released:
            return ""
        piece = self.text[self._released : end]
        self._released = end
        return piece


def full_decode(tokenizer: PreTrainedTokenizerBase, ids: list[int]) -> str:
    return str(tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False))


def assert_same_as_old(
    tokenizer: PreTrainedTokenizerBase, ids: list[int], stop: Sequence[str] = ()
) -> list[str]:
    """Feed ``ids`` to both assemblers as the client does (stop at a stop string, flush
    at the end); every piece, ``.text`` and ``stopped`` must agree at every token."""
    new, old = TextAssembler(tokenizer, stop), OldAssembler(tokenizer, stop)
    pieces = []
    for i, token in enumerate(ids):
        piece = new.push(token)
        assert piece == old.push(token), (i, ids[: i + 1])
        assert new.text == old.text, (i, ids[: i + 1])
        assert new.stopped == old.stopped
        pieces.append(piece)
        if new.stopped:
            break
    else:
        rest = old.flush()
        assert new.flush() == rest
        pieces.append(rest)
    assert new.token_ids == old.token_ids
    assert "".join(pieces) == new.text
    if not new.stopped:
        assert new.text == full_decode(tokenizer, ids)
    return pieces


# Id sequences: encoded text (merged tokens, whole characters), raw bytes (characters
# split over tokens, truncated or stray continuation bytes) and special tokens.
encoded = st.lists(st.sampled_from(WORDS), max_size=6).map(lambda w: FAST.encode("".join(w)))
raw_bytes = st.binary(min_size=1, max_size=5).map(lambda b: [BYTE_ID[x] for x in b])
utf8_split = st.lists(st.sampled_from(WORDS), min_size=1, max_size=4).map(
    lambda w: [BYTE_ID[x] for x in "".join(w).encode()]
)
special = st.sampled_from(SPECIALS).map(lambda i: [i])
# Long stretches of bytes that end inside characters or make none, never a whole one.
STUCK_BYTES = [0x80, 0xBF, 0xE6, 0x97, 0xF0, 0x9F, 0xC3]
stuck = st.lists(st.sampled_from(STUCK_BYTES), min_size=8, max_size=24).map(
    lambda b: [BYTE_ID[x] for x in b]
)
any_id = st.integers(0, len(FAST) - 1).map(lambda i: [i])
chunks = st.one_of(encoded, raw_bytes, utf8_split, special, stuck, any_id)
id_sequences = st.lists(chunks, max_size=12).map(lambda cs: [i for c in cs for i in c])
byt5_ids = st.lists(
    st.one_of(
        st.integers(3, 258),
        st.sampled_from(list("é日本😀 ab".encode())).map(lambda b: b + 3),
        st.sampled_from([0, 1, 2, 300]),
    ),
    max_size=40,
)
stop_words = st.lists(st.sampled_from(["a", "n", " t", "é", "日本", "本", "😀", "\ufffd", "ab"]))
SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@SETTINGS
@given(ids=id_sequences)
def test_pieces_join_to_the_full_decode(ids: list[int]) -> None:
    assert_same_as_old(FAST, ids)


@SETTINGS
@given(ids=id_sequences)
def test_slow_path_gives_the_same_text(ids: list[int]) -> None:
    assert decoder_for(SLOW_BPE, skip_special_tokens=True).__name__ == "slow"
    assert_same_as_old(SLOW_BPE, ids)


@SETTINGS
@given(ids=byt5_ids, data=st.data())
def test_a_slow_byte_tokenizer_gives_the_same_text(ids: list[int], data: Any) -> None:
    stop = data.draw(st.lists(st.sampled_from(["a", "é", "日本", "b a"]), max_size=2))
    assert_same_as_old(SLOW_BYTES, ids, stop)


@SETTINGS
@given(ids=id_sequences, data=st.data())
def test_stop_strings_cut_where_they_did(ids: list[int], data: Any) -> None:
    text = full_decode(FAST, ids)
    inside = st.tuples(st.integers(0, len(text)), st.integers(1, 6)).map(
        lambda at: text[at[0] : at[0] + at[1]]
    )
    stop = data.draw(st.lists(st.one_of(inside, st.sampled_from(WORDS)), max_size=3))
    assert_same_as_old(FAST, ids, [s for s in stop if s])


@SETTINGS
@given(ids=id_sequences, data=st.data())
def test_stop_strings_on_the_slow_path(ids: list[int], data: Any) -> None:
    assert_same_as_old(SLOW_BPE, ids, data.draw(stop_words))


def test_a_character_split_over_tokens_is_never_shown_half() -> None:
    text = "café 日本 😀!"
    ids = [BYTE_ID[b] for b in text.encode()]  # every byte its own token
    pieces = assert_same_as_old(FAST, ids)
    assert "".join(pieces) == text
    assert not any("\ufffd" in p for p in pieces)
    assert "日本" in pieces or "日" in pieces  # released whole, when its last byte came


def test_a_stop_string_across_token_boundaries() -> None:
    text = "I ran ten miles 日本語"
    ids = FAST.encode(text)
    assert len(ids) < len(text)  # "n mi" spans merged tokens, "本語" six byte tokens
    cases = [("n mi", "I ran te"), ("本語", "I ran ten miles 日"), ("s 日", "I ran ten mile")]
    for stop, before in cases:
        assembler = TextAssembler(FAST, [stop])
        pieces = []
        for token in ids:
            pieces.append(assembler.push(token))
            if assembler.stopped:
                break
        assert assembler.stopped and assembler.text == before == "".join(pieces)
        assert_same_as_old(FAST, ids, [stop])


def test_an_answer_ending_inside_a_character_flushes_what_decode_gives() -> None:
    ids = [*FAST.encode("ok "), BYTE_ID[0xE6], BYTE_ID[0x97]]  # the first 2 bytes of 日
    assembler = TextAssembler(FAST)
    assert "".join(assembler.push(t) for t in ids) == "ok "
    assert assembler.flush() == "\ufffd" == full_decode(FAST, ids)[3:]


def test_the_fast_path_calls_the_rust_tokenizer() -> None:
    assert decoder_for(FAST, skip_special_tokens=True).__name__ == "fast"
    assert decoder_for(SLOW_BYTES, skip_special_tokens=True).__name__ == "slow"


class CountingBackend:
    """Stands in for a fast tokenizer's Rust tokenizer, counting the ids it decodes."""

    def __init__(self, inner: Any) -> None:
        self.inner, self.ids = inner, 0

    def decode(self, ids: list[int], *args: Any, **kwargs: Any) -> str:
        self.ids += len(ids)
        return str(self.inner.decode(ids, *args, **kwargs))

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def long_answer(n: int) -> list[int]:
    ids: list[int] = []
    text = " ".join(CORPUS) + " café 日本 😀 "
    while len(ids) < n:
        ids += FAST.encode(text)
    return ids[:n]


N = 2000
LINEAR = 20  # ids decoded per token, at most: a few short windows, never the answer


@pytest.mark.parametrize(
    "ids",
    [
        pytest.param(long_answer(N), id="text"),
        pytest.param([BYTE_ID[0x80]] * N, id="stray-continuation-bytes"),
        pytest.param([BYTE_ID[0xF0]] * N, id="unfinished-characters"),
        pytest.param([SPECIALS[1]] * N, id="skipped-specials"),
        pytest.param([BYTE_ID[0xE6], BYTE_ID[0x97]] * (N // 2), id="broken-characters"),
        pytest.param([BYTE_ID[b] for b in ("日本" * N).encode()][:N], id="split-characters"),
    ],
)
def test_decoding_work_is_linear_in_the_answer(ids: list[int]) -> None:
    tokenizer = make_tokenizer()
    counter = CountingBackend(tokenizer.backend_tokenizer)
    tokenizer._tokenizer = counter
    assembler = TextAssembler(tokenizer, ["no such stop"])
    text = "".join(assembler.push(t) for t in ids) + assembler.flush()
    assert counter.ids < LINEAR * N, f"{counter.ids / N:.0f} ids decoded per token"
    tokenizer._tokenizer = counter.inner
    assert text == full_decode(tokenizer, ids)


def test_slow_path_work_is_linear_in_the_answer() -> None:
    decoded = 0
    byte_decode = type(SLOW_BYTES).decode

    def counting(ids: list[int], **kwargs: Any) -> str:
        nonlocal decoded
        decoded += len(ids)
        return str(byte_decode(SLOW_BYTES, ids, **kwargs))

    tokenizer = ByT5Tokenizer()
    tokenizer.decode = counting  # type: ignore[method-assign, assignment]
    ids = [b + 3 for b in ("café 日本 😀 " * N).encode()][:N]
    assembler = TextAssembler(tokenizer)
    text = "".join(assembler.push(t) for t in ids) + assembler.flush()
    assert decoded < LINEAR * N, f"{decoded / N:.0f} ids decoded per token"
    assert text == full_decode(SLOW_BYTES, ids)


def test_the_detokenizer_keeps_a_short_window() -> None:
    detokenizer = IncrementalDetokenizer(FAST)
    for token in [BYTE_ID[0x80]] * 100 + long_answer(100):
        detokenizer.push(token)
        assert len(detokenizer._window) <= WINDOW + LONG_PENDING + 1
