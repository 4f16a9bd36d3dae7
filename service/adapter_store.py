"""The published-adapter store: immutable adapter versions per personality, and which
one is active.

`fastresp adapters publish` (adapters/publish.py) writes it; the gateway reads it at
startup, so a published version survives a restart without anyone editing the
personality manifest. Layout under the store folder (setting `adapter_store`, env
`FASTRESP_ADAPTER_STORE`, default `<cache_dir>/adapters`):

- `<personality>/<version>/`: a copy of the published adapter folder, never changed
  after it is renamed into place; its `fastresp_card.json` carries the version;
- `published.json`: ``{"format": 1, "personalities": {"calm": {"active": "v2",
  "versions": [{"version": "v1", "path": "calm/v1", "published_utc": ...,
  "source": ..., "card_sha256": ..., "load_error": null}, ...]}}}``;
- `.publish.lock`: the `fcntl.flock` lock every writer holds while it assigns a
  version and rewrites `published.json`.

Versions are `v1`, `v2`, ... per personality: the next one is one more than the
largest recorded or present on disk, so a number is never reused, not even after a
failed hot-load. `path` is relative to the store folder, so the store can be mounted
elsewhere (another container) and still be read. `published.json` is replaced
atomically (temporary file, fsync, rename: `service.atomic_files.write_atomic`), so a
reader never sees half of it.

How the gateway uses it (`apply_published`): the `active` version of each
personality replaces the manifest's `adapter` as the adapter loaded at startup. A
record in the shared registry (Redis), when one is configured, is the live state
of the running fleet and is applied after it, so it still wins. A missing store or
`published.json` means the manifest alone; an unreadable one fails startup.

Only the standard library, pydantic and `service.atomic_files` are imported here: the
gateway reads this.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path, PurePosixPath
from typing import Annotated, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    field_validator,
    model_validator,
)

from service.atomic_files import write_atomic
from service.personalities import Personality, PersonalityName

logger = logging.getLogger(__name__)

#: The registry file in the store folder.
PUBLISHED_FILE = "published.json"
#: The lock file writers hold (`fcntl.flock`, exclusive).
LOCK_FILE = ".publish.lock"
#: Version of `published.json`'s layout.
STORE_FORMAT: Literal[1] = 1

VersionLabel = Annotated[str, StringConstraints(pattern=r"^v[1-9][0-9]{0,8}$")]
"""A published version: `v` and a positive integer without leading zeros."""


class PublishedStoreError(ValueError):
    """`published.json` cannot be read or is invalid; the message names the file and field."""


class PublishedVersion(BaseModel):
    """One published version of a personality's adapter."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    version: VersionLabel
    path: str = Field(min_length=1)
    """The version's folder, relative to the store folder (`calm/v2`)."""
    published_utc: str = Field(min_length=1)
    """When it was recorded, ISO 8601 in UTC."""
    source: str
    """The adapter folder it was copied from (for the record only)."""
    card_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    """sha256 of the source's `fastresp_card.json` as published (before the version
    was written into the copy)."""
    load_error: str | None = None
    """Why the running service refused it when `publish` tried to hot-load it; such a
    version is kept for inspection but is not active."""

    @field_validator("path")
    @classmethod
    def _relative_inside(cls, value: str) -> str:
        path = PurePosixPath(value)
        if path.is_absolute() or ".." in path.parts or "\\" in value:
            raise ValueError(f"must be a relative path inside the store, not {value!r}")
        return value

    def number(self) -> int:
        """The version's integer (2 for `v2`)."""
        return int(self.version[1:])


class PublishedPersonality(BaseModel):
    """The published versions of one personality and the one the service should serve."""

    model_config = ConfigDict(extra="forbid")

    active: VersionLabel | None = None
    """The version the service loads at startup; None: the manifest's adapter."""
    versions: list[PublishedVersion] = Field(default_factory=list)
    """Every version ever recorded, in publishing order."""

    @model_validator(mode="after")
    def _consistent(self) -> PublishedPersonality:
        labels = [v.version for v in self.versions]
        if len(set(labels)) != len(labels):
            raise ValueError(f"versions: a version is listed twice: {labels}")
        if self.active is not None and self.active not in labels:
            raise ValueError(f"active: {self.active} is not one of the versions {labels}")
        return self

    def get(self, version: str) -> PublishedVersion | None:
        """The entry of `version`, or None."""
        return next((v for v in self.versions if v.version == version), None)

    def active_entry(self) -> PublishedVersion | None:
        """The entry of the active version, or None."""
        return self.get(self.active) if self.active is not None else None


class PublishedFile(BaseModel):
    """`published.json`."""

    model_config = ConfigDict(extra="forbid")

    format: Literal[1] = STORE_FORMAT
    personalities: dict[PersonalityName, PublishedPersonality] = Field(default_factory=dict)


def read_published(store: Path) -> PublishedFile:
    """`store/published.json`; an empty registry when the folder or the file is missing.

    Raises:
        PublishedStoreError: the file exists but cannot be read, is not JSON, or does
            not have the layout above (the message names the file and the field).
    """
    file = store / PUBLISHED_FILE
    try:
        raw = file.read_bytes()
    except FileNotFoundError:
        return PublishedFile()
    except OSError as exc:
        raise PublishedStoreError(f"cannot read {file}: {exc.strerror or exc}") from exc
    try:
        return PublishedFile.model_validate_json(raw)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or 'json'}: {err['msg']}"
            for err in exc.errors()
        )
        raise PublishedStoreError(
            f"{file} is not a valid published-adapter file: {problems}"
        ) from None


def write_published(store: Path, published: PublishedFile) -> None:
    """Replace `store/published.json` atomically (temporary file, fsync, rename, fsync
    of the folder). Call it while holding `store_lock(store)`.

    Raises:
        OSError: the folder is missing or not writable; the old file is then untouched.
    """
    file = store / PUBLISHED_FILE
    text = json.dumps(published.model_dump(mode="json"), indent=2) + "\n"
    # 0644: readable by the gateway's user.
    write_atomic(file, [text], mode=0o644, sync_dir=True)


@contextmanager
def store_lock(store: Path) -> Iterator[None]:
    """Hold the store's exclusive lock (creates the store folder if needed).

    `fcntl.flock` locks an open file description, so two threads of one process
    exclude each other as two processes do. Blocks until the lock is free.

    Raises:
        OSError: the folder cannot be created or the lock file opened.
    """
    store.mkdir(parents=True, exist_ok=True)
    fd = os.open(store / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def apply_published(
    personalities: Mapping[str, Personality], store: Path
) -> tuple[dict[str, Personality], dict[str, str]]:
    """The manifest with each personality's active published version as its adapter.

    Args:
        personalities: the manifest (`load_personalities`).
        store: the store folder; made absolute (the registry needs absolute paths).

    Returns:
        (personalities, origins): the personalities, where each one with an active
        published version has `adapter` set to that version's folder; and, for those,
        a description of where the adapter comes from, for error messages
        (`published version v2 in /store/published.json`). A personality published in
        the store but not in the manifest is logged and skipped.

    Raises:
        PublishedStoreError: `published.json` is unreadable or invalid.
    """
    root = Path(os.path.abspath(store))
    published = read_published(root)
    result = dict(personalities)
    origins: dict[str, str] = {}
    for name, entry in published.personalities.items():
        active = entry.active_entry()
        if active is None:
            continue
        if name not in result:
            logger.warning(
                "%s: personality %r is not in the manifest; its %s is not served",
                root / PUBLISHED_FILE,
                name,
                active.version,
            )
            continue
        result[name] = result[name].model_copy(update={"adapter": root / active.path})
        origins[name] = f"published version {active.version} in {root / PUBLISHED_FILE}"
        logger.info("personality %s: published adapter %s (%s)", name, active.version, root)
    return result, origins
