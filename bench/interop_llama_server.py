"""Interop with an engine nobody here wrote: llama.cpp's ``llama-server`` as the cloud,
steered through its OpenAI-compatible ``/v1/completions`` by a device model of another
family (SmolLM2 135M by default, whose tokenizer is not Qwen's).

    python bench/interop_llama_server.py [--server PATH] [--gguf PATH] [--prompts 2]
        [--tokens 48] [--keys text auto] [--threads 1] [--without-cloud-tokenizer]

It assembles the builtin Qwen2.5-Coder-1.5B-Instruct GGUF (`loading.builtin_gguf`)
unless ``--gguf`` names one, starts ``llama-server`` on loopback (stopped however the
run ends), prints one raw string-prompt answer (how the server keys its top-k), then per
``keys`` mode what ``describe`` decides and, per prompt, the steered and the cloud-only
text with tokens/s. The client is given the Qwen tokenizer (``cloud_tokenizer``), so a
text session's prompt is laid out in Qwen's chat template. ``--without-cloud-tokenizer``
adds the pitfall: ``keys="auto"`` with no ``cloud_tokenizer``, where nothing can tell the
client that the server's ids are not the device's.
"""

from __future__ import annotations

import argparse
import asyncio
import glob
import json
import os
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import torch

from costeer_sdk import PersonalLLM
from costeer_sdk.data import demo_history
from costeer_sdk.demo import DEMO_PROMPT
from costeer_sdk.engine import loading
from costeer_sdk.engine.local import LocalModel
from costeer_sdk.memory.transfer import read_jsonl
from costeer_sdk.remotes.openai import OpenAICompatibleRemote

CLOUD = "builtin:qwen2.5-coder-1.5b-instruct"
PROMPTS = [
    DEMO_PROMPT,
    "Recommend a running shoe for my next marathon and say why.",
    "Write a two-sentence review of the Asics Gel-Nimbus 25 after a week of easy runs.",
    "What should I look for in a trail running shoe?",
]
SERVER_GLOB = "/work/llama/llama_cpp_python-*/vendor/llama.cpp/build/bin/llama-server"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_server(
    binary: Path, gguf: Path, port: int, threads: int, log: Path
) -> subprocess.Popen[bytes]:
    env = dict(os.environ, LD_LIBRARY_PATH=str(binary.parent))
    command = [
        str(binary), "-m", str(gguf), "--host", "127.0.0.1", "--port", str(port),
        "-c", "4096", "-t", str(threads), "-tb", str(threads), "-np", "1", "--alias", "qwen",
    ]  # fmt: skip
    print("$", " ".join(command))
    server = subprocess.Popen(command, env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(
                f"llama-server exited ({server.returncode}):\n{log.read_text()[-2000:]}"
            )
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    server.terminate()
    raise RuntimeError("llama-server did not become healthy in 120 s")


def stop_server(server: subprocess.Popen[bytes]) -> None:
    server.terminate()
    try:
        server.wait(timeout=20)
    except subprocess.TimeoutExpired:
        server.kill()
        server.wait()


def cloud_tokenizer() -> Any:
    """The Qwen 1.5B tokenizer, without loading its weights."""
    load_tokenizer = getattr(loading, "load_tokenizer", None)
    if load_tokenizer is not None:
        return load_tokenizer(CLOUD, progress=False)
    from transformers import AutoTokenizer

    directory = loading._converted_builtin(CLOUD.removeprefix("builtin:"), progress=False)
    return AutoTokenizer.from_pretrained(str(directory))


def show_raw(url: str, prompt: str) -> None:
    """One string-prompt completion with ``logprobs=20``, as the server answers it."""
    body = {"model": "qwen", "prompt": prompt, "max_tokens": 1, "logprobs": 20, "temperature": 0}
    answer = httpx.post(f"{url}/v1/completions", json=body, timeout=120).json()
    logprobs = answer["choices"][0]["logprobs"]
    print("raw /v1/completions, string prompt, logprobs=20:")
    print("  logprobs keys:", sorted(logprobs))
    content = logprobs.get("content") or []
    if content:
        top = content[0]["top_logprobs"]
        print(f"  content[0].top_logprobs: {len(top)} entries, e.g.")
        for entry in top[:3]:
            print("   ", json.dumps(entry, ensure_ascii=False))
    else:
        print("  ", json.dumps(logprobs)[:600])
    probe = dict(body, prompt="Hi", logprobs=1, return_tokens_as_token_ids=True)
    answer = httpx.post(f"{url}/v1/completions", json=probe, timeout=120).json()
    entry = answer["choices"][0]["logprobs"]["content"][0]["top_logprobs"][0]
    print("  with return_tokens_as_token_ids:", json.dumps(entry, ensure_ascii=False))


class FirstPrompts(httpx.AsyncBaseTransport):
    """Loopback HTTP, keeping each completion's prompt (to show what the cloud is sent)."""

    def __init__(self) -> None:
        self.inner = httpx.AsyncHTTPTransport()
        self.prompts: list[Any] = []

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        raw = await request.aread()
        if raw and request.url.path.endswith("/completions"):
            self.prompts.append(json.loads(raw).get("prompt"))
        return await self.inner.handle_async_request(request)

    async def aclose(self) -> None:
        await self.inner.aclose()


def rate(g: Any) -> str:
    s = g.stats
    decode = (s.steps - 1) / max(s.elapsed_s - s.time_to_first_token_s, 1e-9)
    return (
        f"{s.steps} tokens in {s.elapsed_s:.2f} s ({s.steps / s.elapsed_s:.1f} tok/s; "
        f"first token {s.time_to_first_token_s:.2f} s, then {decode:.1f} tok/s)"
    )


async def run_mode(
    url: str, keys: str, device: LocalModel, tokenizer: Any, prompts: list[str], history: list[str],
    tokens: int,
) -> None:  # fmt: skip
    transport = FirstPrompts()
    remote = OpenAICompatibleRemote(url, "qwen", top_k=20, keys=keys, transport=transport)
    try:
        info = await remote.describe()
        given = "the Qwen tokenizer" if tokenizer is not None else "no cloud_tokenizer"
        print(
            f"\n=== keys={keys!r}, {given}: describe() -> keys={info.keys!r}, "
            f"vocab_size={info.vocab_size}, max_sequence_length={info.max_sequence_length}"
        )
        llm = PersonalLLM(remote, device, cloud_tokenizer=tokenizer)
        await llm.generate("Hello", max_new_tokens=2)  # warm-up: loads, first requests
        for i, prompt in enumerate(prompts):
            before = len(transport.prompts)
            steered = await llm.generate(prompt, context=history, max_new_tokens=tokens)
            sent = transport.prompts[before]
            alone = await llm.generate(prompt, max_new_tokens=tokens)
            shown = (
                repr(sent[:70]) if isinstance(sent, str) else f"{len(sent)} token ids {sent[:6]}..."
            )
            print(f"\n[{i}] {prompt}\n  first prompt sent: {shown}")
            print(f"  steered ({rate(steered)}):\n    {steered.text!r}")
            print(f"  cloud only ({rate(alone)}):\n    {alone.text!r}")
        await llm.aclose()
    finally:
        await remote.aclose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--server", default=os.environ.get("LLAMA_SERVER"))
    parser.add_argument("--gguf", default="/work/llama/qwen2.5-coder-1.5b-instruct.gguf")
    parser.add_argument("--device", default="builtin:smollm2-135m-instruct")
    parser.add_argument("--prompts", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=48)
    parser.add_argument(
        "--keys", nargs="+", default=["text", "auto"], choices=["text", "auto", "ids"]
    )
    parser.add_argument("--threads", type=int, default=1, help="llama-server's threads")
    parser.add_argument("--torch-threads", type=int, default=1)
    parser.add_argument("--without-cloud-tokenizer", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.torch_threads)
    binary = Path(args.server or next(iter(sorted(glob.glob(SERVER_GLOB))), "llama-server"))
    gguf = loading.builtin_gguf(CLOUD, args.gguf)  # checked against its SHA-256 once
    with demo_history() as path:
        history = [item["text"] for _, item in read_jsonl(path)]
    tokenizer = cloud_tokenizer()
    device = LocalModel.from_spec(args.device)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryDirectory() as scratch:
        log = Path(scratch) / "llama-server.log"
        server = start_server(binary, gguf, port, args.threads, log)
        try:
            version = subprocess.run(
                [str(binary), "--version"], capture_output=True, text=True,
                env=dict(os.environ, LD_LIBRARY_PATH=str(binary.parent)),
            )  # fmt: skip
            lines = (version.stdout + version.stderr).splitlines()
            print(next((line for line in lines if line.startswith("version")), "version: ?"))
            chat = [{"role": "user", "content": PROMPTS[0]}]
            show_raw(
                url, tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
            )
            prompts = PROMPTS[: args.prompts]
            for keys in args.keys:
                asyncio.run(run_mode(url, keys, device, tokenizer, prompts, history, args.tokens))
            if args.without_cloud_tokenizer:
                asyncio.run(run_mode(url, "auto", device, None, prompts[:1], history, args.tokens))
        finally:
            stop_server(server)
            print(f"\nllama-server stopped (exit {server.returncode})")


if __name__ == "__main__":
    main()
