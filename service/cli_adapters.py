"""`fastresp adapters ...`: publish trained adapters and list the published versions.

The work happens in adapters/publish.py (publishing) and service/adapter_store.py
(the store's format); this module parses options and prints. Defaults come from the
same `FASTRESP_*` settings the gateway reads, so a publish on the serving machine
needs no options besides the adapter and the personality.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer

from service.cli_common import fail, load_settings, progress

app = typer.Typer(
    rich_markup_mode=None,
    help="Published adapters: give a trained adapter its next version, record it in the "
    "published-adapter store the gateway reads at startup, and hot-load it into a "
    "running gateway.",
    no_args_is_help=True,
)

#: CLI spelling of the fields `PublishError` names (card fields are printed as they are).
_OPTION_OF_FIELD = {
    "path": "PATH",
    "personality": "--personality",
    "personalities_file": "--personalities-file",
    "model": "--model",
    "url": "--url",
    "admin_token": "--token-env",
}


StoreOption = Annotated[
    Path | None,
    typer.Option(
        help="Published-adapter store folder. Default: $FASTRESP_ADAPTER_STORE, else "
        "<cache dir>/adapters (~/.cache/pika-fastresp/adapters)."
    ),
]


@app.command()
def publish(
    path: Annotated[
        Path,
        typer.Argument(
            metavar="PATH",
            help="The trained PEFT adapter folder, with its fastresp_card.json.",
            show_default=False,
        ),
    ],
    personality: Annotated[
        str, typer.Option(help="The manifest personality the adapter serves.", show_default=False)
    ],
    url: Annotated[
        str | None,
        typer.Option(
            help="Base URL of a running gateway (e.g. http://127.0.0.1:8000): hot-load the "
            "new version through its admin API. Without it the version is only recorded, "
            "and the gateway serves it from its next start."
        ),
    ] = None,
    token_env: Annotated[
        str,
        typer.Option(
            help="Environment variable holding the gateway's admin token (used with --url; "
            "the token itself is never a command-line value)."
        ),
    ] = "FASTRESP_ADMIN_TOKEN",
    store: StoreOption = None,
    model: Annotated[
        Path | None,
        typer.Option(
            help="The base model the gateway serves. Default: $FASTRESP_MODEL, else the "
            "prepared gemma-3-270m."
        ),
    ] = None,
    personalities_file: Annotated[
        Path | None,
        typer.Option(
            help="Personality manifest. Default: $FASTRESP_PERSONALITIES_FILE, else "
            "adapters/personalities.yaml."
        ),
    ] = None,
    timeout: Annotated[
        float, typer.Option(min=0.1, help="Seconds one hot-load attempt may take.")
    ] = 120.0,
) -> None:
    """Publish an adapter as the personality's next version (v1, v2, ...).

    Checks first, writing nothing when one fails: the card's base model (name, and the
    sha256 of config.json when the card has one) is the served base model, the card's
    personality (if any) is --personality, the personality is in the manifest, and the
    adapter passes the gateway's own checks (rank up to FASTRESP_MAX_LORA_RANK, target
    modules, shapes, finite weights). Then the adapter is copied into the store under
    its version and recorded in the store's published.json.

    Without --url the new version is made active in the store: the gateway loads it
    at its next start. (With a shared registry, FASTRESP_REDIS_URL, a version swapped
    in through the admin API since is the fleet's live choice and still wins at a
    restart: publish with --url to change a running fleet.) With --url it is
    hot-loaded first and made active only when the gateway accepted it; a refused
    version stays recorded with the gateway's error, not active, and the gateway keeps
    serving its current version.

    Exit codes: 0 published (and hot-loaded with --url); 1 the gateway did not load it,
    or the store could not be written; 2 refused (the message names the field).
    """
    from adapters.publish import HotLoadError, PublishError, publish_adapter
    from service.adapter_store import PublishedStoreError

    settings = load_settings(
        model=model, adapter_store=store, personalities_file=personalities_file
    )
    token: str | None = None
    if url is not None:
        token = os.environ.get(token_env) or None
        if token is None:
            fail(f"--token-env: ${token_env} is not set; --url needs the gateway's admin token")
    try:
        result = publish_adapter(
            path,
            personality,
            store=settings.resolved_adapter_store(),
            base_model_dir=settings.resolved_model(),
            personalities_file=settings.personalities_file,
            max_lora_rank=settings.max_lora_rank,
            service_url=url,
            admin_token=token,
            timeout_s=timeout,
            progress=progress,
        )
    except PublishError as exc:
        where = _OPTION_OF_FIELD.get(exc.field, exc.field)
        fail(f"{where}: {exc.message}; nothing was published")
        raise  # unreachable; keeps type checkers happy
    except HotLoadError as exc:
        fail(
            f"the gateway at {url} did not load {personality} {exc.version}: "
            f"{exc.message.rstrip('.')}. "
            f"{exc.version} is recorded in the store but not active; the gateway keeps "
            "serving its current version",
            code=1,
        )
        raise
    except PublishedStoreError as exc:
        fail(f"{exc}; nothing was published")
        raise
    except OSError as exc:
        fail(f"cannot write the store {settings.resolved_adapter_store()}: {exc}", code=1)
        raise
    before = f" (was {result.previous_version})" if result.previous_version else ""
    if result.hot_loaded:
        typer.echo(
            f"published {personality} {result.version} at {result.path}; "
            f"the gateway at {url} serves it now{before}"
        )
    else:
        typer.echo(
            f"published {personality} {result.version} at {result.path}; active in the "
            f"store{before}: the gateway serves it from its next start (or publish with "
            "--url to hot-load it now)"
        )


@app.command(name="list")
def list_versions(
    store: StoreOption = None,
    personality: Annotated[
        str | None, typer.Option(help="Only this personality. Default: all.")
    ] = None,
) -> None:
    """List the published versions: one line each, with the active one marked and
    the gateway's error for a version it refused.

    Columns: personality, version, state (active, -, or load failed), published (UTC),
    source folder. Exit code 2 when the store's published.json is invalid.
    """
    from service.adapter_store import PUBLISHED_FILE, PublishedStoreError, read_published

    root = (store if store is not None else load_settings().resolved_adapter_store()).absolute()
    try:
        published = read_published(root)
    except PublishedStoreError as exc:
        fail(f"--store: {exc}")
        raise
    names = [personality] if personality else list(published.personalities)
    lines = []
    for name in names:
        entry = published.personalities.get(name)
        if entry is None:
            continue
        for version in entry.versions:
            state = "active" if version.version == entry.active else "-"
            if version.load_error:
                state = f"load failed ({version.load_error})"
            lines.append(
                f"{name}\t{version.version}\t{state}\t{version.published_utc}\t{version.source}"
            )
    if not lines:
        which = f" for {personality!r}" if personality else ""
        typer.echo(f"no published adapters{which} in {root / PUBLISHED_FILE}")
        return
    typer.echo("personality\tversion\tstate\tpublished\tsource")
    for line in lines:
        typer.echo(line)
