"""`fastresp data ...`: sources to triples, labelling, training-set build (issue 4).

Heavy or optional imports (openai, the profanity list) happen inside the commands.
"""

from __future__ import annotations

import typer

app = typer.Typer(
    help="Training data: real conversations to triples, fast-response labels and "
    "per-personality train/validation/test splits.",
    no_args_is_help=True,
)
