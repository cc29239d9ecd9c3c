"""Turning a query and the user's history into the two prompts CoSteer needs.

The *public* prompt (query only) goes to the cloud and to the local model's
no-context branch; the *private* prompt (history records, then the query, in the
paper's layout) goes only to the local model's context branch. Both are wrapped in the
model's chat template when it has one.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

from costeer_sdk.errors import ConfigurationError, ContextTruncatedWarning
from costeer_sdk.logs import get_logger

log = get_logger(__name__)


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
    private_ids: list[int] | None
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

    def encode(self, user_text: str) -> list[int]:
        """Token ids of one user turn, in the chat format when the tokenizer has one."""
        if getattr(self.tokenizer, "chat_template", None):
            messages = [{"role": "user", "content": user_text}]
            if self.system_prompt is not None:
                messages.insert(0, {"role": "system", "content": self.system_prompt})
            text = self.tokenizer.apply_chat_template(
                messages, add_generation_prompt=True, tokenize=False
            )
            return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        text = user_text if self.system_prompt is None else f"{self.system_prompt}\n\n{user_text}"
        return list(self.tokenizer(text)["input_ids"])

    def build(self, query: str, records: Sequence[str] | None, budget: int) -> Prompts:
        """Both prompts for ``query``; records are dropped oldest-first (the list is taken
        as oldest first) until the private prompt fits in ``budget`` tokens."""
        if not isinstance(query, str) or not query.strip():
            raise ConfigurationError("prompt must be a non-empty string")
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
        kept = list(texts)
        private = self.encode(self.template.render(kept, query))
        while len(private) > budget and len(kept) > 1:
            kept.pop(0)
            private = self.encode(self.template.render(kept, query))
        if len(private) > budget:
            kept[0] = self._cut_head(kept[0], query, budget)
            private = self.encode(self.template.render(kept, query))
        if len(kept) < len(texts) or kept[-1] != texts[-1]:
            message = (
                f"personal context cut to fit the local model: kept {len(kept)} of "
                f"{len(texts)} records (oldest dropped first), {len(private)} tokens"
            )
            warnings.warn(message, ContextTruncatedWarning, stacklevel=4)
            log.warning("context.truncated", kept=len(kept), given=len(texts), tokens=len(private))
        return Prompts(public, private, len(kept), len(texts))

    def _cut_head(self, text: str, query: str, budget: int) -> str:
        """The longest tail of ``text`` whose private prompt fits ``budget`` tokens."""
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        lo, hi = 0, len(ids)  # number of tail tokens kept; 0 always fits (public fits)
        while lo < hi:
            mid = (lo + hi + 1) // 2
            tail = str(self.tokenizer.decode(ids[len(ids) - mid :]))
            if len(self.encode(self.template.render([tail], query))) <= budget:
                lo = mid
            else:
                hi = mid - 1
        return str(self.tokenizer.decode(ids[len(ids) - lo :])) if lo else ""
