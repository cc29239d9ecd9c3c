"""Data files that ship inside the package.

The demo's default history lives here, not in the repository's ``examples/``, so that
``costeer demo`` works from an installed wheel, with no checkout and from any directory.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from importlib.resources import as_file, files
from pathlib import Path

__all__ = ["demo_history"]


def demo_history() -> AbstractContextManager[Path]:
    """The example user's (Alice's) four past shoe reviews as a records JSONL file, for
    ``costeer demo`` and the examples: ``with demo_history() as path: ...``.

    A context manager because `importlib.resources.as_file` only guarantees a real file
    for the duration of the block (a zipped install extracts it to a temporary file);
    from an ordinary install it is the packaged file itself."""
    return as_file(files(__name__).joinpath("alice_reviews.jsonl"))
