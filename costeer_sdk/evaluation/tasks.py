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
* ``longlamp-abstract`` / ``longlamp-topic`` (and their ``-loo`` forms): LongLaMP's other
  two generation tasks, abstract generation (past items: ``title`` + ``abstract``) and
  topic writing from Reddit (``summary`` + ``content``), same row format, laid out as the
  paper's released code lays them out (`LONGLAMP_FORMATS`).
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


@dataclass(frozen=True)
class LongLaMPFormat:
    """One LongLaMP generation task: which two fields of a past item the prompt shows,
    under which labels and heading, how a past item is asked for again, whose it is.

    The three tasks share one row format (``input``, ``output``, ``top_5``, ``profile``)
    and differ only in these, so one loader and one leave-one-out builder serve all three.
    """

    task: str  # the released form's task name; the leave-one-out form adds "-loo"
    labels: tuple[str, str]  # e.g. ("Title", "Abstract"): Title[i] / Abstract[i]
    fields: tuple[str, str]  # the past item's keys shown under those labels
    query: str  # a past item asked for again, LongLaMP's ``input`` wording (format fields)
    query_needs: tuple[str, ...]  # fields without which that query asks for nothing
    user_fields: tuple[str, ...]  # the row's user id, first present wins
    kind: str  # memory record kind of an imported past item
    template: ContextTemplate

    def record(self, index: int, item: dict[str, Any]) -> str:
        """A past item in the paper's layout, e.g. ``Title[i]: ...`` / ``Abstract[i]: ...``."""
        first, second = (str(item.get(key) or "").strip() for key in self.fields)
        return f"{self.labels[0]}[{index}]: {first}\n{self.labels[1]}[{index}]: {second}"

    def user(self, row: dict[str, Any]) -> str:
        """The row's user id: each task's release names it differently (reviewerId, the
        abstracts' author ``name``, the Reddit ``author``)."""
        return next((str(row[k]) for k in self.user_fields if row.get(k)), "")


class _Fields(dict[str, Any]):
    """A past item for `str.format_map`: strings stripped, a missing or null field empty."""

    def __init__(self, item: dict[str, Any]) -> None:
        super().__init__(
            {
                k: "" if v is None else v.strip() if isinstance(v, str) else v
                for k, v in item.items()
            }
        )

    def __missing__(self, key: str) -> str:
        return ""


def _release_template(heading: str) -> ContextTemplate:
    # The released code joins heading, "A[i]: ..\nB[i]: ..\n" per item, "Now it's your
    # turn\n" and the query with newlines; this renders the same characters.
    return ContextTemplate(
        heading=heading, record="{text}\n", closing="Now it's your turn\n\n{query}", separator="\n"
    )


LONGLAMP_FORMATS: dict[str, LongLaMPFormat] = {
    "review": LongLaMPFormat(
        task="longlamp",
        labels=("Product", "Review"),
        fields=("description", "reviewText"),
        query=LONGLAMP_QUERY,
        query_needs=(),  # rating and summary still ask for a review without a description
        user_fields=("reviewerId", "user_id"),
        kind="review",
        # The layout this repo's recorded review runs used (docs/benchmarks.md); it
        # differs from the release's in blank lines and a full stop only.
        template=ContextTemplate(
            heading=LONGLAMP_HEADING, record="{text}", closing="Now it's your turn.\n{query}"
        ),
    ),
    "abstract": LongLaMPFormat(
        task="longlamp-abstract",
        labels=("Title", "Abstract"),
        fields=("title", "abstract"),
        # LongLaMP's input also lists key items of the paper; a profile item has none.
        query='Generate an abstract for the title "{title}".',
        query_needs=("title",),
        user_fields=("name", "user_id"),
        kind="abstract",
        template=_release_template("The following are five titles with their abstracts."),
    ),
    "topic": LongLaMPFormat(
        task="longlamp-topic",
        labels=("Summary", "Content"),
        fields=("summary", "content"),
        query="Generate the content for a reddit post {summary}",
        query_needs=("summary",),
        user_fields=("author", "user_id"),
        kind="post",
        template=_release_template("The following are reddit post summaries with their content."),
    ),
}


def _longlamp_format(kind: str) -> LongLaMPFormat:
    if kind not in LONGLAMP_FORMATS:
        raise ConfigurationError(
            f"LongLaMP task must be one of {', '.join(LONGLAMP_FORMATS)}, got {kind!r}"
        )
    return LONGLAMP_FORMATS[kind]


class LongLaMP:
    """LongLaMP rows as released (``kind``: review, abstract or topic): history is each
    row's ``top_5``, the past items a bge reranker ranked highest for its ``input``."""

    def __init__(self, path: str | Path, kind: str = "review") -> None:
        self.path = Path(path)
        self.format = _longlamp_format(kind)
        self.name = self.format.task
        self.template = self.format.template

    def examples(self) -> Iterator[Example]:
        for number, row in _rows(self.path):
            yield Example(
                id=str(row.get("id", number)),
                query=_text(self.path, number, row, "input"),
                reference=_text(self.path, number, row, "output"),
                history=self._top(number, row),
                user_id=self.format.user(row) or None,
            )

    def _top(self, number: int, row: dict[str, Any]) -> list[str]:
        """The row's ``top_5`` as records; like the released code, an item lacking one of
        the two fields is an error, not a blank line in the prompt."""
        top = row.get("top_5")
        if not isinstance(top, list):
            raise ConfigurationError(
                f"{self.path}:{number}: top_5 must be a list of the user's past items"
            )
        first, second = self.format.fields
        for j, item in enumerate(top):
            if not (
                isinstance(item, dict)
                and all(isinstance(item.get(f), str) for f in (first, second))
            ):
                raise ConfigurationError(
                    f"{self.path}:{number}: top_5[{j}] must be an object with string fields "
                    f"{first!r} and {second!r}"
                )
        return [self.format.record(i, item) for i, item in enumerate(top, 1)]

    async def history(self, example: Example) -> list[str]:
        return list(example.history)


class LongLaMPLeaveOneOut:
    """LongLaMP's leave-one-out form: each profile item a query, the rest its history.

    The released rows' ``top_5`` is one retrieval for one query per user; this form gives
    every past item of every user as an example, so a run is not limited to a file's rows.
    Call `load` once before `history`: it imports every user's profile into ``store``
    (under ``<task>-loo:<user>``) so each query's history is retrieved by the store's
    search, exactly as `PersonalLLM` retrieves for ``user_id``, minus the held-out item.
    """

    def __init__(
        self, path: str | Path, store: MemoryStore, *, k: int = 5, kind: str = "review"
    ) -> None:
        self.path = Path(path)
        self.store = store
        self.k = k
        self.format = _longlamp_format(kind)
        self.name = f"{self.format.task}-loo"
        self.template = self.format.template
        self.prefix = f"{self.name}:"

    def _users(self) -> Iterator[tuple[int, str, list[dict[str, Any]]]]:
        for number, row in _rows(self.path):
            user = self.format.user(row)
            profile = row.get("profile")
            if not user or not isinstance(profile, list):
                raise ConfigurationError(
                    f"{self.path}:{number}: leave-one-out needs a user id "
                    f"({' or '.join(self.format.user_fields)}) and a profile list"
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

    def _text(self, item: dict[str, Any]) -> str:
        return str(item.get(self.format.fields[1]) or "").strip()

    def _example(self, user: str, index: int, item: dict[str, Any]) -> Example | None:
        """None for an item that cannot be a query: no text to be its reference, or none
        of what the query asks about (a title, a post summary)."""
        reference = self._text(item)
        fields = _Fields(item)
        if not reference or any(fields[f] == "" for f in self.format.query_needs):
            return None
        return Example(
            id=f"{user}/{index}",
            query=self.format.query.format_map(fields),
            reference=reference,
            user_id=self.prefix + user,
            meta={"profile_index": index},
        )

    async def load(self) -> int:
        """Import the profiles (once: a user already in the store is left as is)."""
        added = 0
        label_field = self.format.fields[0]
        for _, user, profile in self._users():
            owner = self.prefix + user
            if await self.store.count(owner):
                continue
            records = [
                {
                    "text": self._text(item),
                    "kind": self.format.kind,
                    "meta": {"profile_index": i, label_field: item.get(label_field, "")},
                }
                for i, item in enumerate(profile)
                if self._text(item)
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
        first, second = self.format.fields
        return [
            self.format.record(i, {first: r.meta.get(first, ""), second: r.text})
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


TASK_NAMES = (
    "cogenesis",
    "longlamp",
    "longlamp-loo",
    "longlamp-abstract",
    "longlamp-abstract-loo",
    "longlamp-topic",
    "longlamp-topic-loo",
    "preference",
)


def make_task(
    name: str, path: str | Path, *, store: MemoryStore | None = None, attribute: str = "concise"
) -> Task:
    """The task ``name`` over the file ``path``."""
    if name == "cogenesis":
        return CoGenesis(path)
    if name == "preference":
        return Preference(path, attribute)
    kind = next(
        (k for k, f in LONGLAMP_FORMATS.items() if name.removesuffix("-loo") == f.task), None
    )
    if kind is not None and name.endswith("-loo"):
        if store is None:
            raise ConfigurationError(f"{name} needs a memory store to retrieve from")
        return LongLaMPLeaveOneOut(path, store, kind=kind)
    if kind is not None:
        return LongLaMP(path, kind)
    raise ConfigurationError(f"unknown task {name!r}; choose from {', '.join(TASK_NAMES)}")
