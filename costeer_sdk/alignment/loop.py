"""The per-token loop across two tokenizers.

Like `scheduler.steer`'s own loop, each step sends the chosen token to the cloud and
runs the device's pass while the request is in flight; here the device's pass is an
`Edit` of its two branches (cut back where the tail's tokenization changed, then one
pass over the new tokens) rather than one token, and the cloud is told the chosen token
by id, or by its text for a cloud that keys log-probs by text.

The loop yields output ids: the cloud's ids, or for a text-keyed cloud, ids that a
`PieceTable` assigns to the pieces it emits (the cloud's own ids are never known).
"""

from __future__ import annotations

import functools
import time
from collections.abc import AsyncGenerator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from costeer_sdk.alignment.aligner import Aligner, CloudCandidates
from costeer_sdk.alignment.device_text import DeviceText, Edit
from costeer_sdk.decoding import TokenChooser
from costeer_sdk.engine.local import BranchPair, LocalModel
from costeer_sdk.engine.readout import NextTokenScores
from costeer_sdk.fusion import SteeringConfig
from costeer_sdk.remotes.base import NextTokenLogprobs, RemoteSession, TextSession
from costeer_sdk.scheduler import StepClock, alongside

__all__ = ["PieceTable", "aligned"]


@dataclass
class PieceTable:
    """Output ids for a text-keyed cloud's pieces, with the ``decode`` that
    `decoding.TextAssembler` needs (id 0 is the end of turn)."""

    pieces: list[bytes] = field(default_factory=lambda: [b""])
    _ids: dict[bytes, int] = field(default_factory=dict)

    END = 0

    def id_for(self, piece: bytes) -> int:
        if piece not in self._ids:
            self._ids[piece] = len(self.pieces)
            self.pieces.append(piece)
        return self._ids[piece]

    def decode(self, ids: list[int], **_: Any) -> str:
        return b"".join(self.pieces[i] for i in ids).decode("utf-8", errors="replace")


async def aligned(
    session: RemoteSession | TextSession,
    local: LocalModel | None,
    branches: BranchPair | None,
    first: tuple[NextTokenLogprobs, NextTokenScores | None],
    device_text: DeviceText,
    aligner: Aligner,
    table: PieceTable | None,
    steering: SteeringConfig,
    chooser: TokenChooser,
    max_new_tokens: int,
    clock: StepClock,
    before_request: Callable[[], Awaitable[None]],
    start: int,
) -> AsyncGenerator[int, None]:
    """Yield output ids (module docstring), one per step, up to ``max_new_tokens``.
    ``start``: the cloud prompt's length in tokens (0 for a text session)."""
    cloud, scores = first
    steered = local is not None and branches is not None and scores is not None
    for step in range(max_new_tokens):
        started = time.perf_counter()
        options = aligner.candidates(cloud)
        if steered:
            assert scores is not None
            fused = aligner.fuse(options, scores, steering, device_text.pending)
        else:
            fused = options.logprobs
        if table is not None:
            fused = _sendable(options, fused)
        index = chooser.choose(fused)
        clock.fuse_s += time.perf_counter() - started
        piece = options.pieces[index] or b""
        yield _output_id(options, index, table)
        if step == max_new_tokens - 1 or options.eos[index]:
            return
        await before_request()
        clock.round_trips += 1
        remote_step = clock.remote(_tell(session, options, index, start + step))
        if not steered:
            cloud = await remote_step
            continue
        assert local is not None and branches is not None
        edit = device_text.push(piece)
        apply = functools.partial(_apply, local, branches, edit) if edit.add else None
        cloud, fresh = await alongside(clock, remote_step, apply)
        if fresh is not None:
            scores = fresh


def _output_id(options: CloudCandidates, index: int, table: PieceTable | None) -> int:
    if table is None:
        assert options.ids is not None
        return options.ids[index]
    if options.eos[index]:
        return PieceTable.END
    return table.id_for(options.pieces[index] or b"")


def _sendable(options: CloudCandidates, fused: torch.Tensor) -> torch.Tensor:
    """A text-keyed cloud is sent text: a piece that is not whole UTF-8 cannot be sent,
    nor one holding U+FFFD (a server's stand-in for part of a character, which would be
    sent back as a literal U+FFFD), unless nothing else can be."""
    ok = torch.tensor([e or _is_utf8(p) for p, e in zip(options.pieces, options.eos, strict=True)])
    if not bool(ok.any()) or bool(ok.all()):
        return fused
    return fused.masked_fill(~ok, float("-inf"))


def _is_utf8(piece: bytes | None) -> bool:
    """Whole UTF-8, and not a server's lossy U+FFFD stand-in for part of a character."""
    try:
        text = (piece or b"").decode("utf-8")
    except UnicodeDecodeError:
        return False
    return "\ufffd" not in text


async def _tell(
    session: RemoteSession | TextSession, options: CloudCandidates, index: int, position: int
) -> NextTokenLogprobs:
    """Send the chosen token: by id (``position`` counts the prompt), or by text
    (``position`` counts emitted pieces)."""
    if options.ids is not None:
        assert isinstance(session, RemoteSession)
        return await session.advance(options.ids[index], position)
    assert isinstance(session, TextSession)
    return await session.append(options.pieces[index] or b"", position)


async def _apply(local: LocalModel, branches: BranchPair, edit: Edit) -> NextTokenScores:
    """Cut both branches back and extend them: the device's pass for one step."""
    if edit.drop:
        await local.crop(branches, edit.drop)
    return (await local.extend(branches, list(edit.add), all_logits=False))[-1]
