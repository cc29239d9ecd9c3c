"""Run by scripts/core_check.sh with a venv holding costeer-sdk's core alone: steer a
`costeer serve` (started with the full venv's python, given as argv[1]) through
`SessionRemote` with a local model, and check that no extra was needed."""

from __future__ import annotations

import asyncio
import importlib.util
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).parent))
from tiny import make_model, make_tokenizer

from costeer_sdk import PersonalLLM, SessionRemote
from costeer_sdk.extras import MissingExtraError


def main() -> None:
    for extra_module in ("fastapi", "uvicorn", "gguf", "rouge_score"):
        assert importlib.util.find_spec(extra_module) is None, f"{extra_module} in the core"
    try:
        import costeer_sdk.server  # noqa: F401
    except MissingExtraError as exc:
        assert "[serve]" in str(exc), exc
    else:
        raise AssertionError("costeer_sdk.server imported without the serve extra")

    tokenizer = make_tokenizer()
    cloud, local = make_model(tokenizer, seed=1), make_model(tokenizer, seed=2)
    with tempfile.TemporaryDirectory() as directory:
        cloud.model.save_pretrained(directory)
        tokenizer.save_pretrained(directory)
        port = 8765
        server = subprocess.Popen(
            [sys.argv[1], "-m", "costeer_sdk.cli", "serve", "--model", directory,
             "--port", str(port)],
        )  # fmt: skip
        try:
            url = f"http://127.0.0.1:{port}"
            for _ in range(300):
                try:
                    if httpx.get(url + "/health", timeout=1).status_code == 200:
                        break
                except httpx.TransportError:
                    time.sleep(0.2)
            out = asyncio.run(generate(url, local))
        finally:
            server.terminate()
            server.wait(10)
    assert out.steered and out.token_ids, out
    print(f"core install: steered {len(out.token_ids)} tokens over SessionRemote")


async def generate(url: str, local: object) -> object:
    async with SessionRemote(url) as remote, PersonalLLM(remote, local) as llm:  # type: ignore[arg-type]
        return await llm.generate(
            "Write a short review of my new shoes.",
            context=["I ran ten miles in my new shoes."],
            max_new_tokens=8,
        )


if __name__ == "__main__":
    main()
