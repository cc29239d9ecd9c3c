"""Turning a query and the user's history into the two prompts CoSteer needs.

The *public* prompt (query only) goes to the cloud and to the local model's
no-context branch; the *private* prompt (history records, then the query, in the
paper's layout) goes only to the local model's context branch. Both are wrapped in the
model's chat template when it has one.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from transformers import PreTrainedTokenizerBase

from costeer_sdk.errors import ConfigurationError, ContextTruncatedWarning
from costeer_sdk.logs import get_logger

log = get_logger(__name__)


ChatMessage = Mapping[str, str]
Prompt = str | Sequence[ChatMessage]
"""A user turn, or a conversation: ``{"role": "system"|"user"|"assistant", "content": ...}``
messages ending with a user turn."""

_ROLES = ("system", "user", "assistant")


def check_chat(messages: Sequence[ChatMessage]) -> list[dict[str, str]]:
    """The conversation as plain dicts, or a ConfigurationError saying what is wrong."""
    if isinstance(messages, str | bytes) or not isinstance(messages, Sequence) or not messages:
        raise ConfigurationError("a prompt must be a non-empty string or a list of messages")
    checked = []
    for i, message in enumerate(messages):
        role = message.get("role") if isinstance(message, Mapping) else None
        content = message.get("content") if isinstance(message, Mapping) else None
        if role not in _ROLES or not isinstance(content, str):
            raise ConfigurationError(
                f"message {i} must be {{'role': one of {_ROLES}, 'content': str}}, got {message!r}"
            )
        checked.append({"role": role, "content": content})
    if checked[-1]["role"] != "user" or not checked[-1]["content"].strip():
        raise ConfigurationError("a conversation must end with a non-empty user message")
    return checked


def query_text(prompt: Prompt) -> str:
    """The text the reply answers: the prompt, or the conversation's last user turn."""
    if isinstance(prompt, str):
        if not prompt.strip():
            raise ConfigurationError("prompt must be a non-empty string")
        return prompt
    return check_chat(prompt)[-1]["content"]


@dataclass(frozen=True)
class ContextTemplate:
    """How history records and the query are laid out in the private prompt.

    The default follows the paper: a heading, numbered records, then "Now it's your
    turn" and the query. ``record`` is formatted with ``index`` (1-based) and ``text``;
    ``closing`` with ``query``.
    """

    heading: str = "The following are records from my own history."
    record: str = "Record[{index}]: {text}"
    closing: str = "Now it's your turn.\n{query}"
    separator: str = "\n\n"

    def render(self, records: Sequence[str], query: str) -> str:
        parts = [self.heading] if self.heading else []
        parts += [self.record.format(index=i, text=text) for i, text in enumerate(records, 1)]
        parts.append(self.closing.format(query=query))
        return self.separator.join(parts)


@dataclass(frozen=True)
class Prompts:
    """Token ids of both prompts; ``private_ids`` is None when there is no context."""

    public_ids: list[int]
    private_ids: list[int] | None = field(repr=False)  # kept out of reprs and tracebacks
    records_used: int
    records_given: int


class PromptBuilder:
    """Builds `Prompts` for one tokenizer, fitting the history into a token budget."""

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        template: ContextTemplate | None = None,
        system_prompt: str | None = None,
    ) -> None:
        self.tokenizer = tokenizer
        self.template = template or ContextTemplate()
        self.system_prompt = system_prompt

    def encode(self, turn: Prompt) -> list[int]:
        """Token ids of a user turn or a whole conversation, in the chat format when the
        tokenizer has one (plain text joined by blank lines when it has none)."""
        messages = self.messages(turn)
        if getattr(self.tokenizer, "chat_template", None):
            text = self.tokenizer.apply_chat_template(
                messages, add_generation_prompt=True, tokenize=False
            )
            return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        return list(self.tokenizer("\n\n".join(m["content"] for m in messages))["input_ids"])

    def messages(self, turn: Prompt) -> list[dict[str, str]]:
        """``turn`` as chat messages, with the builder's system prompt first unless the
        conversation brings its own."""
        messages = (
            [{"role": "user", "content": turn}] if isinstance(turn, str) else check_chat(turn)
        )
        if self.system_prompt is not None and messages[0]["role"] != "system":
            messages.insert(0, {"role": "system", "content": self.system_prompt})
        return messages

    def build(self, query: Prompt, records: Sequence[str] | None, budget: int) -> Prompts:
        """Both prompts for ``query`` (a user turn, or a conversation ending with one);
        records are dropped oldest-first (the list is taken as oldest first) until the
        private prompt fits in ``budget`` tokens. In a conversation only the last user
        turn carries the records."""
        last = query_text(query)  # validates the prompt
        public = self.encode(query)
        if len(public) > budget:
            raise ConfigurationError(
                f"the prompt alone is {len(public)} tokens, over the {budget} tokens the models "
                "leave for it after max_new_tokens; shorten it or lower max_new_tokens"
            )
        texts = [r for r in (records or []) if isinstance(r, str) and r.strip()]
        if records is not None and any(not isinstance(r, str) for r in records):
            raise ConfigurationError("context must be a sequence of strings")
        if not texts:
            return Prompts(public, None, 0, 0)
        earlier = [] if isinstance(query, str) else self.messages(query)[:-1]

        def private_ids(kept: Sequence[str], last_text: str = last) -> list[int]:
            turn = self.template.render(kept, last_text)
            return self.encode([*earlier, {"role": "user", "content": turn}] if earlier else turn)

        kept = list(texts)
        private = private_ids(kept)
        while len(private) > budget and len(kept) > 1:
            kept.pop(0)
            private = private_ids(kept)
        if len(private) > budget:
            kept[0] = self._cut_head(kept[0], private_ids, budget)
            private = private_ids(kept)
        if len(kept) < len(texts) or kept[-1] != texts[-1]:
            message = (
                f"personal context cut to fit the local model: kept {len(kept)} of "
                f"{len(texts)} records (oldest dropped first), {len(private)} tokens"
            )
            warnings.warn(message, ContextTruncatedWarning, stacklevel=4)
            log.warning("context.truncated", kept=len(kept), given=len(texts), tokens=len(private))
        return Prompts(public, private, len(kept), len(texts))

    def _cut_head(
        self, text: str, private_ids: Callable[[Sequence[str]], list[int]], budget: int
    ) -> str:
        """The longest tail of ``text`` whose private prompt fits ``budget`` tokens."""
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        lo, hi = 0, len(ids)  # number of tail tokens kept; 0 always fits (public fits)
        while lo < hi:
            mid = (lo + hi + 1) // 2
            tail = str(self.tokenizer.decode(ids[len(ids) - mid :]))
            if len(private_ids([tail])) <= budget:
                lo = mid
            else:
                hi = mid - 1
        return str(self.tokenizer.decode(ids[len(ids) - lo :])) if lo else ""
