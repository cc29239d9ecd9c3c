"""Smoke tests: the examples run end to end (on tiny models, so they take seconds)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run(script: str, *args: str) -> str:
    done = subprocess.run(
        [sys.executable, str(ROOT / "examples" / script), *args],
        capture_output=True,
        text=True,
        timeout=300,
        env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"},
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def test_review_writer(model_dirs: list[str]) -> None:
    cloud, local = model_dirs
    out = run("review_writer.py", "--cloud", cloud, "--local", local, "--max-new-tokens", "6")
    assert "imported 4 past reviews" in out and "CoSteer for alice" in out
    used = int(re.search(r"records used: (\d+)", out).group(1))  # type: ignore[union-attr]
    assert 1 <= used <= 4  # the tiny model's 512-token window may cut the oldest


def test_edge_client(model_dirs: list[str]) -> None:
    cloud, local = model_dirs
    out = run("edge_client.py", "--cloud", cloud, "--local", local, "--max-new-tokens", "6")
    assert "POST /v1/sessions" in out
    assert "privacy audit: every id sent is public or output" in out


def test_email_reply_chain(model_dirs: list[str]) -> None:
    cloud, local = model_dirs
    out = run("email_reply_chain.py", "--cloud", cloud, "--local", local, "--max-new-tokens", "6")
    assert "steered by 3 past emails" in out
    assert int(re.search(r"\((\d+) streamed pieces\)", out).group(1)) >= 1  # type: ignore[union-attr]


def test_assistant_remembers_across_sessions(model_dirs: list[str], tmp_path: Path) -> None:
    cloud, local = model_dirs
    common = ["--db", str(tmp_path / "memory.db"), "--cloud", cloud, "--local", local,
              "--max-new-tokens", "4"]  # fmt: skip
    first = run("assistant.py", *common, "--say", "My dog is called Pixel.", "--say", "Hi!")
    assert "0 memories of 'me'" in first and "2 memories of 'me' saved" in first
    assert "[memories used: 0]" in first  # the first turn had nothing to recall
    second = run("assistant.py", *common, "--say", "Write a birthday note for my dog.")
    assert "2 memories of 'me' in" in second
    used = int(re.search(r"\[memories used: (\d+)\]", second).group(1))  # type: ignore[union-attr]
    assert used >= 1  # the dog's name, remembered from the earlier session


def test_proxy_client(model_dirs: list[str]) -> None:
    cloud, local = model_dirs
    out = run("proxy_client.py", "--cloud", cloud, "--local", local, "--max-new-tokens", "6")
    assert "steering with 3 notes of 'me'" in out and "answer: " in out
    assert "completion_tokens=" in out and "streamed pieces" in out
