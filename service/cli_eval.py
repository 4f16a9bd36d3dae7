"""`fastresp eval ...`: measure served fast responses.

`metrics` reads `fastresp replay --out` files and prints the automatic metrics of
`adapters.auto_metrics` side by side, one column per run (e.g. the few-shot base model
against an SFT adapter on the same triples).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(
    rich_markup_mode=None,
    help="Evaluate fast responses: automatic metrics of replayed runs.",
    no_args_is_help=True,
)


@app.command()
def metrics(
    runs: Annotated[
        list[Path],
        typer.Argument(help="Replay files (`fastresp replay --out`), one column each."),
    ],
    name: Annotated[
        list[str] | None,
        typer.Option(help="Column name of each run, in order (default: the file names)."),
    ] = None,
    json_out: Annotated[
        Path | None, typer.Option("--json", help="Also write the figures to this JSON file.")
    ] = None,
) -> None:
    """Print the automatic metrics of each run as a Markdown table.

    Metrics (defined in adapters/auto_metrics.py): fallback rate, share passing the guard
    and filters, leak rate, praise-before-correction rate, distinct-1/2, mean length, the
    most common opener and failures per filter. Exit 2 on an unreadable file.
    """
    from adapters.auto_metrics import ReplayFileError, compute_metrics, markdown_table, read_replay

    names = list(name or [])
    if names and len(names) != len(runs):
        typer.echo(f"--name: got {len(names)} name(s) for {len(runs)} run(s)", err=True)
        raise typer.Exit(2)
    results = []
    for index, path in enumerate(runs):
        try:
            responses, rows = read_replay(path)
        except ReplayFileError as exc:
            typer.echo(str(exc), err=True)
            raise typer.Exit(2) from None
        results.append((names[index] if names else path.stem, compute_metrics(responses, rows)))
    typer.echo(markdown_table(results))
    if json_out is not None:
        from adapters.dataset import write_text_atomic

        write_text_atomic(
            json_out,
            json.dumps({label: m.as_dict() for label, m in results}, indent=2) + "\n",
        )
        typer.echo(f"wrote {json_out}", err=True)
