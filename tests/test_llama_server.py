"""Interop with a server nobody here wrote: llama.cpp's `llama-server` serving the cloud
model (Qwen2.5-Coder-1.5B-Instruct GGUF), the local 0.5B in transformers.

Skipped unless ``COSTEER_LLAMA_SERVER`` points to a `llama-server` binary (see
docs/benchmarks.md for how to build one here).
"""

from __future__ import annotations

import os
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest
import pytest_asyncio

from costeer_sdk import PersonalLLM
from costeer_sdk.engine.loading import builtin_gguf, cache_root
from costeer_sdk.remotes.openai import OpenAICompatibleRemote

BINARY = os.environ.get("COSTEER_LLAMA_SERVER", "")
pytestmark = [
    pytest.mark.real_models,
    pytest.mark.skipif(
        not (BINARY and Path(BINARY).is_file()), reason="set COSTEER_LLAMA_SERVER to llama-server"
    ),
]
PROMPT = "Write a short review of my new running shoes, the Nike Pegasus 40, after 50 miles."
HISTORY = [
    "Brooks Ghost 14, after my first 50 miles: cushy, but the toe box pinches my wide feet. 4/5.",
    "Saucony Ride 15: a wide toe box at last! No blisters on my 18-mile Sunday long run. 5/5.",
]


@pytest.fixture(scope="module")
def llama_server() -> Iterator[str]:
    gguf = builtin_gguf("qwen2.5-coder-1.5b-instruct", cache_root() / "qwen2.5-coder-1.5b.gguf")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = subprocess.Popen(
        [BINARY, "-m", str(gguf), "--host", "127.0.0.1", "--port", str(port), "-c", "4096"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "llama-server did not start"
            time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        proc.wait(30)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def llm(llama_server: str) -> AsyncIterator[PersonalLLM]:
    remote = OpenAICompatibleRemote(llama_server, "qwen", top_k=20, dialect="llama.cpp")
    client = PersonalLLM(remote, "builtin:qwen2.5-coder-0.5b-instruct")
    yield client
    await client.aclose()


@pytest.mark.asyncio(loop_scope="module")
async def test_costeer_over_llama_server(llm: PersonalLLM) -> None:
    plain = await llm.generate(PROMPT, max_new_tokens=24)
    steered = await llm.generate(PROMPT, context=HISTORY, max_new_tokens=24)
    print(f"\nllama-server cloud only: {plain.text!r}\n  {plain.stats}")
    print(f"llama-server + CoSteer:  {steered.text!r}\n  {steered.stats}")
    assert plain.token_ids and steered.token_ids
    assert steered.steered and steered.token_ids != plain.token_ids
