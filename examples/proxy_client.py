"""`costeer proxy` and the official `openai` client: the user's notes go into the
on-device memory store, the proxy starts on loopback, and an unchanged OpenAI client
gets answers steered by those notes (a whole one, then a streamed one with usage). The
cloud sees the conversation only; the notes stay on this machine.

    python examples/proxy_client.py [--cloud SPEC_OR_URL] [--local SPEC] [--max-new-tokens 48]
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import openai

from costeer_sdk.builtins import DEFAULT_CLOUD, DEFAULT_LOCAL
from costeer_sdk.memory import SQLiteMemoryStore

NOTES = [
    "I am training for my first marathon in April; my long run is 18 miles on Sundays.",
    "I have wide feet and a narrow toe box gives me blisters after mile 8.",
    "I prefer shoes with a lot of cushioning; my last pair was too firm.",
]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_until_up(url: str, proxy: subprocess.Popen[bytes]) -> None:
    for _ in range(2400):  # converting a builtin model the first time takes minutes
        if proxy.poll() is not None:
            raise SystemExit(f"the proxy exited with {proxy.returncode}")
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            time.sleep(0.25)
    raise SystemExit("the proxy did not start")


async def remember(db: Path) -> None:
    async with SQLiteMemoryStore(db) as store:
        await store.add("me", [{"text": note, "kind": "note"} for note in NOTES])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cloud", default=DEFAULT_CLOUD, help="a model spec, or a cloud URL")
    parser.add_argument("--local", default=DEFAULT_LOCAL)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        db = Path(tmp) / "memory.db"
        asyncio.run(remember(db))
        port = free_port()
        command = [sys.executable, "-m", "costeer_sdk.cli", "proxy", "--cloud", args.cloud,
                   "--local", args.local, "--memory", str(db), "--user", "me",
                   "--port", str(port)]  # fmt: skip
        proxy = subprocess.Popen(command)
        url = f"http://127.0.0.1:{port}"
        try:
            wait_until_up(url, proxy)
            print(f"costeer proxy on {url}/v1, steering with {len(NOTES)} notes of 'me'\n")
            # Any OpenAI client: only the base URL changes. One user, so any key will do.
            client = openai.OpenAI(base_url=url + "/v1", api_key="unused")
            question: list[Any] = [
                {"role": "user", "content": "Which running shoes should I buy next?"}
            ]
            whole = client.chat.completions.create(
                model="costeer",
                messages=question,
                max_tokens=args.max_new_tokens,
            )
            print(f"answer: {whole.choices[0].message.content}")
            print(f"  finish_reason={whole.choices[0].finish_reason} usage={whole.usage}\n")

            print("streamed: ", end="", flush=True)
            pieces = 0
            for chunk in client.chat.completions.create(
                model="costeer",
                messages=question,
                max_tokens=args.max_new_tokens,
                stream=True,
                stream_options={"include_usage": True},
                # an explicit private context for this request, on top of the memory
                extra_body={"costeer": {"context": ["I run mostly on muddy trails."]}},
            ):
                if chunk.choices and chunk.choices[0].delta.content:
                    pieces += 1
                    print(chunk.choices[0].delta.content, end="", flush=True)
                if chunk.usage is not None:
                    print(f"\n  ({pieces} streamed pieces, usage={chunk.usage})")
        finally:
            proxy.terminate()
            proxy.wait(10)


if __name__ == "__main__":
    main()
