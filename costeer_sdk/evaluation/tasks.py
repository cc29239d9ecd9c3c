"""The paper's evaluation tasks: examples, their private history, their references.

Each task turns rows of one dataset format into `Example`s and knows how to lay the
history out in the private prompt (its `ContextTemplate`). Loaders take any file of the
format, not only the subsets shipped in ``shared/data``.

* ``cogenesis``: rows with ``input`` (public prompt), ``personalized_input`` (the same
  prompt with the user's profile and history) and ``output`` (reference). The private
  prompt is exactly ``personalized_input``.
* ``longlamp``: LongLaMP rows (``input``, ``output``, ``top_5`` past items): the released
  benchmark form, history = the row's ``top_5``.
* ``longlamp-loo``: the leave-one-out form built from each user's ``profile``: every
  profile item becomes a query (its rating, description and summary, in the wording of
  LongLaMP's ``input``), its own review the reference, and the history is retrieved
  from the user's *other* items through a memory store.
* ``preference``: rows with ``input`` only; the private side adds "Your answer should be
  as <attribute> as possible" (concise, creative, uplifting, verbose). No reference.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from costeer_sdk.context import ContextTemplate
from costeer_sdk.errors import ConfigurationError
from costeer_sdk.memory.base import MemoryStore
from costeer_sdk.memory.transfer import read_jsonl

PREFERENCE_ATTRIBUTES = ("concise", "creative", "uplifting", "verbose")
LONGLAMP_HEADING = "The following are product descriptions with their user reviews."
LONGLAMP_QUERY = (
    "Generate the review text written by a reviewer who has a given an overall rating of "
    '"{overall}" for a product with description "{description}". '
    'The summary of the review text is "{summary}".'
)


@dataclass(frozen=True)
class Example:
    """One evaluation item.

    ``history`` holds the private records, already formatted, oldest first; it is empty
    for tasks whose history is retrieved at run time (`Task.history`).
    """

    id: str
    query: str
    reference: str | None = None
    history: Sequence[str] = ()
    user_id: str | None = None
    attribute: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)


class Task(Protocol):
    name: str
    template: ContextTemplate

    def examples(self) -> Iterator[Example]: ...

    async def history(self, example: Example) -> list[str]: ...


def _rows(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    for number, row in read_jsonl(path):
        if not isinstance(row, dict):
            raise ConfigurationError(f"{path}:{number}: expected a JSON object per line")
        yield number, row


def _text(path: Path, number: int, row: dict[str, Any], key: str) -> str:
    value = row.get(key)
    if not isinstance(value, str) or not value.strip():
        raise ConfigurationError(f"{path}:{number}: field {key!r} must be a non-empty string")
    return value


class CoGenesis:
    """CoGenesis: the private prompt is the row's ``personalized_input`` verbatim."""

    name = "cogenesis"
    # One record (everything before the query), then the query: renders the row's
    # personalized_input back exactly.
    template = ContextTemplate(heading="", record="{text}", closing="{query}", separator="")

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def examples(self) -> Iterator[Example]:
        for number, row in _rows(self.path):
            query = _text(self.path, number, row, "input").strip()
            personalized = _text(self.path, number, row, "personalized_input")
            cut = personalized.rfind(query)
            if cut < 0:
                raise ConfigurationError(
                    f"{self.path}:{number}: personalized_input does not contain input"
                )
            prefix = personalized[:cut]
            yield Example(
                id=str(row.get("id", number)),
                query=query,
                reference=_text(self.path, number, row, "output"),
                history=[prefix] if prefix.strip() else [],
            )

    async def history(self, example: Example) -> list[str]:
        return list(example.history)


def longlamp_record(index: int, item: dict[str, Any]) -> str:
    """A past review in the paper's layout: ``Product[i]: ...`` then ``Review[i]: ...``."""
    description = str(item.get("description") or "").strip()
    review = str(item.get("reviewText") or item.get("text") or "").strip()
    return f"Product[{index}]: {description}\nReview[{index}]: {review}"


def _longlamp_template() -> ContextTemplate:
    return ContextTemplate(
        heading=LONGLAMP_HEADING, record="{text}", closing="Now it's your turn.\n{query}"
    )


class LongLaMP:
    """LongLaMP review rows as released: history is each row's ``top_5``."""

    name = "longlamp"
    template = _longlamp_template()

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def examples(self) -> Iterator[Example]:
        for number, row in _rows(self.path):
            top = row.get("top_5") or []
            if not isinstance(top, list):
                raise ConfigurationError(f"{self.path}:{number}: top_5 must be a list")
            yield Example(
                id=str(row.get("id", number)),
                query=_text(self.path, number, row, "input"),
                reference=_text(self.path, number, row, "output"),
                history=[longlamp_record(i, item) for i, item in enumerate(top, 1)],
                user_id=str(row.get("reviewerId") or "") or None,
            )

    async def history(self, example: Example) -> list[str]:
        return list(example.history)


class LongLaMPLeaveOneOut:
    """LongLaMP's leave-one-out form: each profile item a query, the rest its history.

    Call `load` once before `history`: it imports every user's profile into ``store``
    (under ``<prefix><reviewerId>``) so each query's history is retrieved by the store's
    search, exactly as `PersonalLLM` retrieves for ``user_id``, minus the held-out item.
    """

    name = "longlamp-loo"
    template = _longlamp_template()

    def __init__(self, path: str | Path, store: MemoryStore, *, k: int = 5) -> None:
        self.path = Path(path)
        self.store = store
        self.k = k
        self.prefix = "longlamp-loo:"

    def _users(self) -> Iterator[tuple[int, str, list[dict[str, Any]]]]:
        for number, row in _rows(self.path):
            user = str(row.get("reviewerId") or row.get("user_id") or "")
            profile = row.get("profile")
            if not user or not isinstance(profile, list):
                raise ConfigurationError(
                    f"{self.path}:{number}: leave-one-out needs reviewerId and a profile list"
                )
            yield number, user, [p for p in profile if isinstance(p, dict)]

    def examples(self) -> Iterator[Example]:
        """Users taken in turn (first item of each, then second, ...), so a ``--limit``
        covers every user rather than the first one's whole profile."""
        per_user = [
            [self._example(user, index, item) for index, item in enumerate(profile)]
            for _, user, profile in self._users()
        ]
        for round_ in itertools.zip_longest(*per_user):
            yield from (example for example in round_ if example is not None)

    def _example(self, user: str, index: int, item: dict[str, Any]) -> Example | None:
        review = str(item.get("reviewText") or "").strip()
        if not review:
            return None
        query = LONGLAMP_QUERY.format(
            overall=item.get("overall", ""),
            description=str(item.get("description") or "").strip(),
            summary=str(item.get("summary") or "").strip(),
        )
        return Example(
            id=f"{user}/{index}",
            query=query,
            reference=review,
            user_id=self.prefix + user,
            meta={"profile_index": index},
        )

    async def load(self) -> int:
        """Import the profiles (once: a user already in the store is left as is)."""
        added = 0
        for _, user, profile in self._users():
            owner = self.prefix + user
            if await self.store.count(owner):
                continue
            records = [
                {
                    "text": str(item.get("reviewText") or ""),
                    "kind": "review",
                    "meta": {"profile_index": i, "description": item.get("description", "")},
                }
                for i, item in enumerate(profile)
                if str(item.get("reviewText") or "").strip()
            ]
            added += len(await self.store.add(owner, records))
        return added

    async def history(self, example: Example) -> list[str]:
        assert example.user_id is not None
        held_out = example.meta["profile_index"]
        hits = await self.store.search(example.user_id, example.query, k=self.k + 1)
        items = [h.record for h in hits if h.record.meta.get("profile_index") != held_out]
        items = items[: self.k]
        # Most relevant last: truncation drops from the front, keeping the best records.
        items.reverse()
        return [
            longlamp_record(i, {"description": r.meta.get("description", ""), "reviewText": r.text})
            for i, r in enumerate(items, 1)
        ]


class Preference:
    """Preference-alignment prompts; the private side asks for one attribute."""

    name = "preference"
    template = ContextTemplate(heading="", record="{text}", closing="{query}", separator="\n\n")

    def __init__(self, path: str | Path, attribute: str = "concise") -> None:
        if attribute not in PREFERENCE_ATTRIBUTES:
            raise ConfigurationError(
                f"attribute must be one of {', '.join(PREFERENCE_ATTRIBUTES)}, got {attribute!r}"
            )
        self.path = Path(path)
        self.attribute = attribute

    def examples(self) -> Iterator[Example]:
        for number, row in _rows(self.path):
            yield Example(
                id=str(row.get("id", number)),
                query=_text(self.path, number, row, "input").strip(),
                history=[f"Your answer should be as {self.attribute} as possible."],
                attribute=self.attribute,
            )

    async def history(self, example: Example) -> list[str]:
        return list(example.history)


TASK_NAMES = ("cogenesis", "longlamp", "longlamp-loo", "preference")


def make_task(
    name: str, path: str | Path, *, store: MemoryStore | None = None, attribute: str = "concise"
) -> Task:
    """The task ``name`` over the file ``path``."""
    if name == "cogenesis":
        return CoGenesis(path)
    if name == "longlamp":
        return LongLaMP(path)
    if name == "longlamp-loo":
        if store is None:
            raise ConfigurationError("longlamp-loo needs a memory store to retrieve from")
        return LongLaMPLeaveOneOut(path, store)
    if name == "preference":
        return Preference(path, attribute)
    raise ConfigurationError(f"unknown task {name!r}; choose from {', '.join(TASK_NAMES)}")
