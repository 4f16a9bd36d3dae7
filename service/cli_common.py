"""Helpers every `fastresp` sub-command module shares: one-line errors, progress lines
and settings from the environment.

A module of its own so that `service.cli` (which imports the sub-command modules) and
the sub-command modules (`service.cli_adapters`, `service.cli_train`, ...) can all use
it without importing each other.
"""

from __future__ import annotations

from typing import Any, NoReturn

import typer


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
