"""The one `PersonalLLM` a proxy answers every request with, built from the command
line: a cloud over the network (``costeer serve``, a vLLM-style ``/v1/completions``
server, llama.cpp's ``llama-server``) or loaded in process from a model spec (demos and
tests), steered by a local model and the memory store."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch

from costeer_sdk.client import PersonalLLM
from costeer_sdk.fusion import DEFAULT_TOP_K
from costeer_sdk.memory.base import MemoryStore
from costeer_sdk.remotes.base import Remote

CloudAPI = Literal["costeer", "openai", "llama.cpp"]


def is_url(cloud: str) -> bool:
    return cloud.startswith(("http://", "https://"))


def remote_of(
    url: str, api: CloudAPI, model: str | None, api_key: str | None, top_k: int
) -> Remote:
    """The network remote speaking ``api`` at ``url``."""
    if api == "costeer":
        from costeer_sdk.remotes.session_http import SessionRemote

        return SessionRemote(url, api_key=api_key, top_k=top_k)
    from costeer_sdk.remotes.openai import OpenAICompatibleRemote

    return OpenAICompatibleRemote(
        url,
        model or "default",
        api_key=api_key,
        top_k=top_k,
        dialect="llama.cpp" if api == "llama.cpp" else "completions",
    )


@dataclass
class Cloud:
    """Where the cloud is and how to reach it."""

    cloud: str  # a URL, or a model spec loaded in process
    local: str
    api: CloudAPI = "costeer"
    model: str | None = None  # the served model's name (OpenAI-compatible servers)
    api_key: str | None = field(default=None, repr=False)
    top_k: int = DEFAULT_TOP_K
    dtype: torch.dtype | str = "auto"
    lookahead: int = 0  # multi-token rounds (`PersonalLLM`'s option)

    def build(
        self, memory: MemoryStore, *, memory_k: int = 5, prefill_bucket_s: float = 0.0
    ) -> tuple[PersonalLLM, Remote | None]:
        """The `PersonalLLM`, and the network remote it was given (the caller closes
        it after the `PersonalLLM`; None when the cloud runs in process)."""
        options = {
            "memory": memory,
            "memory_k": memory_k,
            "prefill_bucket_s": prefill_bucket_s,
            "lookahead": self.lookahead,
        }
        if not is_url(self.cloud):
            llm = PersonalLLM.from_models(
                self.cloud,
                self.local,
                top_k=self.top_k,
                dtype=self.dtype,
                **options,  # type: ignore[arg-type]
            )
            return llm, None
        from costeer_sdk.engine.local import LocalModel

        remote = remote_of(self.cloud, self.api, self.model, self.api_key, self.top_k)
        local = LocalModel.from_spec(self.local, dtype=self.dtype)
        return PersonalLLM(remote, local, **options), remote  # type: ignore[arg-type]
