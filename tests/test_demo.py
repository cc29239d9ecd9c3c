"""`costeer demo` on tiny models: each answer is printed as it is decided (a new user
reads text seconds after loading, not after both generations end), the stats of both
close it, and its default history ships inside the package (it works from a wheel)."""

from __future__ import annotations

import fnmatch
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path
from types import TracebackType
from typing import Any

import pytest

import costeer_sdk
from costeer_sdk.cli import main
from costeer_sdk.client import PersonalLLM
from costeer_sdk.results import Generation
from costeer_sdk.stream import GenerationStream

ROOT = Path(__file__).resolve().parent.parent
PACKAGED_HISTORY = Path(costeer_sdk.__file__).parent / "data" / "alice_reviews.jsonl"
STAT_ROWS = ("tokens", "time to first token (s)", "tokens/s", "cloud round trips",
             "waiting on the cloud (s)", "local model (s)", "fusion (s)")  # fmt: skip


class SpyStream:
    """A `GenerationStream` that notes, each time the demo asks for the next piece, which
    pieces it had been given and what had been printed by then."""

    def __init__(self, stream: GenerationStream, printed: Any) -> None:
        self.stream = stream
        self.printed = printed
        self.pieces: list[str] = []
        self.asked: list[tuple[str, str]] = []  # (pieces given so far, output so far)

    async def __aenter__(self) -> SpyStream:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stream.aclose()

    def __aiter__(self) -> SpyStream:
        return self

    async def __anext__(self) -> str:
        self.asked.append(("".join(self.pieces), self.printed()))
        piece = await anext(self.stream)
        self.pieces.append(piece)
        return piece

    @property
    def generation(self) -> Generation | None:
        return self.stream.generation


@pytest.mark.filterwarnings("ignore::costeer_sdk.errors.ContextTruncatedWarning")
def test_demo_prints_each_piece_before_the_next_is_decided(
    model_dirs: list[str], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    output: list[str] = []

    def printed() -> str:
        output.append(capsys.readouterr().out)
        return "".join(output)

    spies: list[SpyStream] = []
    real_stream = PersonalLLM.stream

    def spy(self: PersonalLLM, *args: Any, **kwargs: Any) -> SpyStream:
        spies.append(SpyStream(real_stream(self, *args, **kwargs), printed))
        return spies[-1]

    monkeypatch.setattr(PersonalLLM, "stream", spy)
    cloud, local = model_dirs
    args = ["demo", "--cloud", cloud, "--local", local, "--max-new-tokens", "10"]
    main.main(args, standalone_mode=False)
    out = printed()

    plain, steered = spies
    for stream in spies:
        assert len(stream.pieces) >= 2  # else "printed before the next" proves nothing
        for given, shown in stream.asked:
            assert shown.endswith(given)  # every piece given is on screen before the next
    # the CoSteer part is announced before its first token is waited for ...
    assert "4 private records" in steered.asked[0][1]
    assert "== Stats ==" not in steered.asked[-1][1]  # ... and the stats come after both
    assert out.index("".join(plain.pieces)) < out.index("== CoSteer") < out.index("== Stats ==")


def test_demo_from_another_directory_reads_the_packaged_history(
    model_dirs: list[str], tmp_path: Path
) -> None:
    cloud, local = model_dirs
    command = ["demo", "--cloud", cloud, "--local", local, "--max-new-tokens", "8"]
    done = subprocess.run(
        [sys.executable, "-m", "costeer_sdk.cli", *command],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"},
    )
    assert done.returncode == 0, done.stderr[-2000:]
    out = done.stdout
    assert f"Private history: 4 records from {PACKAGED_HISTORY}" in out
    headings = [out.index(h) for h in ("== Cloud only", "== CoSteer", "== Stats ==")]
    assert headings == sorted(headings)

    stats = out[headings[-1] :].splitlines()
    assert re.fullmatch(r"\s+cloud only\s+CoSteer", stats[1])
    rows = {name: values for name, *values in (re.split(r"\s{2,}", r) for r in stats[2:])}
    for row in STAT_ROWS:
        assert len(rows[row]) == 2, row
    for tokens, trips in zip(rows["tokens"], rows["cloud round trips"], strict=True):
        assert int(tokens) <= int(trips) <= int(tokens) + 1  # one round per token (+ EOS)
    assert rows["history records used"][0] == "0" and int(rows["history records used"][1]) >= 1


def test_every_packaged_data_file_goes_into_the_wheel() -> None:
    """setuptools leaves non-Python files out of a wheel unless package-data names them."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    patterns = config["tool"]["setuptools"]["package-data"]["costeer_sdk.data"]
    data = [p.name for p in PACKAGED_HISTORY.parent.iterdir() if p.suffix not in {".py", ".pyc"}]
    assert "alice_reviews.jsonl" in data
    for name in data:
        if name != "__pycache__":
            assert any(fnmatch.fnmatch(name, pattern) for pattern in patterns), name
