"""A cloud server and an edge client on loopback: `costeer serve` hosts the cloud model,
the client steers it with a local model and private notes, and every byte sent to the
server is audited afterwards: token ids and positions only, each id the public prompt's
or the answer's, none that only the private notes hold.

    python examples/edge_client.py [--max-new-tokens 48]
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import subprocess
import sys
import time

import httpx

from costeer_sdk import PersonalLLM
from costeer_sdk.builtins import DEFAULT_CLOUD, DEFAULT_LOCAL
from costeer_sdk.privacy import check_sent_ids, sent_token_ids
from costeer_sdk.remotes.session_http import SessionRemote

NOTES = [
    "I am training for my first marathon in April; my long run is 18 miles on Sundays.",
    "I have wide feet and a narrow toe box gives me blisters after mile 8.",
]


class Recorder(httpx.AsyncBaseTransport):
    """Keeps a copy of every request body on its way to the server."""

    def __init__(self) -> None:
        self.inner = httpx.AsyncHTTPTransport()
        self.sent: list[tuple[str, str, bytes]] = []

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        self.sent.append((request.method, request.url.path, await request.aread()))
        return await self.inner.handle_async_request(request)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cloud", default=DEFAULT_CLOUD)
    parser.add_argument("--local", default=DEFAULT_LOCAL)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    args = parser.parse_args()

    port = free_port()
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "costeer_sdk.cli",
            "serve",
            "--model",
            args.cloud,
            "--port",
            str(port),
        ]
    )
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(1200):  # converting a builtin model the first time takes minutes
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.5)
        recorder = Recorder()
        remote = SessionRemote(url, transport=recorder)
        async with remote, PersonalLLM(remote, args.local) as llm:  # each closes its own
            prompt = "Which running shoes should I buy next?"
            out = await llm.generate(prompt, context=NOTES, max_new_tokens=args.max_new_tokens)
            prompts = llm.prompts.build(prompt, NOTES, 1 << 30)
        print(f"CoSteer answer:\n{out.text}\n")
        total = sum(len(body) for _, _, body in recorder.sent)
        print(f"{len(recorder.sent)} requests, {total} bytes of bodies sent to the cloud:")
        for method, path, body in recorder.sent[:4]:
            print(f"  {method} {path} {body[:120].decode() or '-'}")
        print("  ...")
        # The bodies hold token ids, never text: audit the ids. Every id sent must be
        # the public prompt's or the output's; none only the private prompt holds.
        sent = sent_token_ids(recorder.sent)
        assert prompts.private_ids is not None
        private_only = set(prompts.private_ids) - set(prompts.public_ids) - set(out.token_ids)
        print(
            f"{len(sent)} token ids sent; {len(private_only)} ids only the private prompt "
            "holds, none of which may appear"
        )
        check_sent_ids(
            sent,
            public_ids=prompts.public_ids,
            output_ids=out.token_ids,
            private_ids=prompts.private_ids,
        )  # raises PrivacyViolation otherwise
        print("privacy audit: every id sent is public or output")
    finally:
        server.terminate()
        server.wait(10)


if __name__ == "__main__":
    asyncio.run(main())
