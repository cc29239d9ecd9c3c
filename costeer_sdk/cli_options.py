"""Command-line options that several ``costeer`` commands share, defined once.

Kept apart from `cli` because `evaluation.command` needs them too, and `cli` imports
that module, so it cannot import them back from `cli`.
"""

from __future__ import annotations

import click

DTYPE = click.option(
    "--dtype",
    type=click.Choice(["auto", "float32", "bfloat16"]),
    default="auto",
    show_default=True,
    help="Model weights and activations; auto is bfloat16 on CPUs with AMX (and GPUs "
    "that support it), float32 elsewhere.",
)
