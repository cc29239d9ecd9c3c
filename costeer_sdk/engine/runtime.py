"""A loaded causal LM plus the one worker thread that runs it.

Every forward pass of a model goes through its own single-thread executor: torch
modules are not safe to call from several threads at once, and running them off the
event loop is what lets remote requests and other generations progress meanwhile.
"""

from __future__ import annotations

import asyncio
import hashlib
import inspect
import json
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, TypeVar

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

T = TypeVar("T")

# End-of-turn markers of common chat formats; a generation ends on any that exists.
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>", "<|endoftext|>")


def tokenizer_eos_ids(tokenizer: PreTrainedTokenizerBase) -> frozenset[int]:
    """A tokenizer's end-of-turn ids: its EOS and its chat format's end marker (a model
    adds its generation config's, `LoadedModel.eos_token_ids`)."""
    ids = {int(tokenizer.eos_token_id)} if tokenizer.eos_token_id is not None else set()
    vocab = tokenizer.get_vocab()
    ids.update(vocab[token] for token in END_OF_TURN_TOKENS if token in vocab)
    return frozenset(ids)


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    """A hash of what every token id means; equal fingerprints mean interchangeable ids."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda item: item[1])
    digest = hashlib.sha256(json.dumps(vocab, ensure_ascii=False).encode("utf-8"))
    return digest.hexdigest()


def cache_argument(module: torch.nn.Module) -> str:
    """Name of the forward() argument that takes the KV cache (``cache`` in newer
    transformers, ``past_key_values`` before)."""
    cls = type(module)
    if cls not in _CACHE_ARGUMENTS:
        params = inspect.signature(cls.forward).parameters
        _CACHE_ARGUMENTS[cls] = "cache" if "cache" in params else "past_key_values"
    return _CACHE_ARGUMENTS[cls]


_CACHE_ARGUMENTS: dict[type, str] = {}


@dataclass(eq=False)
class LoadedModel:
    """A transformers causal LM, its tokenizer, and the worker thread that runs it."""

    name: str
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    _worker: ThreadPoolExecutor = field(
        default_factory=lambda: ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="costeer-model"
        ),
        repr=False,
    )

    def __post_init__(self) -> None:
        self.model.eval()

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def vocab_size(self) -> int:
        """Width of the logits this model produces."""
        return int(self.model.get_output_embeddings().weight.shape[0])

    @property
    def window(self) -> int:
        """Longest sequence (prompt plus generated tokens) the model was trained for."""
        config = self.model.config
        return int(getattr(config, "max_position_embeddings", None) or 2048)

    @cached_property
    def fingerprint(self) -> str:
        return tokenizer_fingerprint(self.tokenizer)

    @cached_property
    def eos_token_ids(self) -> frozenset[int]:
        """Ids that end a generation: the tokenizer's and generation config's EOS, and
        the end-of-turn marker of the model's chat format."""
        ids = set(tokenizer_eos_ids(self.tokenizer))
        configured = getattr(self.model.generation_config, "eos_token_id", None)
        if isinstance(configured, int):
            ids.add(configured)
        elif configured:
            ids.update(int(i) for i in configured)
        return frozenset(ids)

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn(*args)`` on this model's worker thread, without grad tracking."""

        def call() -> T:
            with torch.inference_mode():
                return fn(*args)

        return await asyncio.get_running_loop().run_in_executor(self._worker, call)

    def close(self) -> None:
        self._worker.shutdown(wait=False, cancel_futures=True)
