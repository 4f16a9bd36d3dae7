"""Helpers every `fastresp` sub-command module shares: one-line errors, progress lines
and settings from the environment.

A module of its own so that `service.cli` (which imports the sub-command modules) and
the sub-command modules (`service.cli_adapters`, `service.cli_train`, ...) can all use
it without importing each other.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import typer

if TYPE_CHECKING:
    from adapters.sources import Triple


def fail(message: str, code: int = 2) -> NoReturn:
    """Print ``error: message`` on stderr and exit (2: refused input, 1: no result)."""
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code=code)


def progress(message: str) -> None:
    """One progress line on stderr (stdout keeps the command's result)."""
    typer.echo(message, err=True)


def load_settings(**overrides: Any) -> Any:
    """Settings from the FASTRESP_* env vars plus the non-None CLI overrides.

    Exits with code 2 and ``error: bad settings: field: message; ...`` on a bad value.
    """
    from pydantic import ValidationError

    from service.settings import Settings

    try:
        return Settings(**{k: v for k, v in overrides.items() if v is not None})
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or 'settings'}: {err['msg']}"
            for err in exc.errors()
        )
        fail(f"bad settings: {problems}")


def load_source_triples(
    source: str, path: Path | None, limit: int
) -> tuple[list[Triple], Path, Counter[str]]:
    """The triples of a ``--source``/``--path``/``--limit`` trio (`fastresp replay`,
    `fastresp eval run`): the file read, and the skipped source rows by reason.

    `path` None means the source's default file (`adapters.sources.DEFAULT_SOURCE_PATHS`,
    relative to the current directory); `limit` 0 means every triple. Exits with code 2
    and a message naming the option on an unknown source, a missing or unusable file.
    """
    from typing import cast

    from adapters.sources import (
        DEFAULT_SOURCE_PATHS,
        SOURCE_KINDS,
        SourceFormatError,
        SourceKind,
        load_triples,
    )

    if source not in SOURCE_KINDS:
        fail(f"--source: unknown source {source!r}; choose one of {', '.join(SOURCE_KINDS)}")
    if path is None:
        if source not in DEFAULT_SOURCE_PATHS:
            fail(f"--path is required with --source {source}")
        path = DEFAULT_SOURCE_PATHS[source]
    path = path.resolve()
    if not path.is_file():
        fail(f"--path: no such file: {path}")
    skipped: Counter[str] = Counter()
    try:
        kind = cast("SourceKind", source)  # checked against SOURCE_KINDS above
        triples = load_triples(kind, path, limit=limit or None, skipped=skipped)
    except (SourceFormatError, UnicodeDecodeError) as exc:
        fail(f"--path: not a usable {source} file: {exc}")
    return triples, path, skipped


@contextmanager
def progress_bar(label: str) -> Iterator[Callable[[str, int, int], None]]:
    """A transient progress bar on stderr (nothing on a pipe); yields
    ``update(step, done, total)``, one bar per step, shown as ``label: step``."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

    with Progress(
        "{task.description}",
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=Console(stderr=True),
        transient=True,
    ) as bar:
        tasks: dict[str, Any] = {}

        def update(step: str, done: int, total: int) -> None:
            if step not in tasks:
                tasks[step] = bar.add_task(f"{label}: {step}" if step != label else label)
            bar.update(tasks[step], completed=done, total=total)

        yield update
