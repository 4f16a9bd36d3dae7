"""Crash-safe file writes: a file or folder is either the old one or the complete new one.

The pieces every writer of durable output shares (model preparation, the
published-adapter store, the data files of `fastresp data`, the adapter folders of
`fastresp train`):

- `write_atomic`: write to a temporary file beside the target, fsync, rename over it
  (`os.replace`); on any failure the temporary file is removed and the target is as
  it was.
- `write_synced`: write a file and fsync it, for a file inside a folder that is itself
  renamed into place afterwards (so no temporary file is needed).
- `swap_into_place`: rename a finished folder to its target, moving a previous one
  out of the way first, so the target is always the old folder, absent, or the new one.
- `fsync_file`, `fsync_dir`: flush a file, or a folder's entries (a rename or a new
  file in it), to disk.

Locks stay with the callers (each has its own: `service.model_prep`'s target lock,
`service.adapter_store.store_lock`). Only the standard library is imported: the
gateway reads through modules that use this one.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path


def file_sha256(path: Path) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB blocks; raises OSError."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def umask() -> int:
    """The process's umask (reading it means setting it; it is put back at once)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def fsync_file(path: Path) -> None:
    """fsync one file's data (or a folder's entries) to disk, opened read-only (which
    fsync allows)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(folder: Path) -> None:
    """fsync a folder, so a rename or a new entry in it survives a crash."""
    fsync_file(folder)  # a folder opens read-only and fsyncs like a file


def write_synced(path: Path, data: bytes) -> None:
    """Write `data` to `path` and fsync it.

    Not atomic by itself: for files in a work folder that is renamed into place
    afterwards (`swap_into_place`), or written before a marker that says "complete".
    """
    with path.open("wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


def write_atomic(
    path: Path,
    parts: Iterable[str] | bytes,
    *,
    mode: int | None = None,
    sync_dir: bool = False,
) -> None:
    """Replace `path` with the concatenation of `parts` (UTF-8), or with `parts` itself
    when it is bytes (a PNG), atomically.

    The data goes to a temporary file beside `path` (``.<name>.<random>.tmp``), which
    gets its mode, is fsynced and is then renamed over `path` (`os.replace`). `parts`
    is consumed lazily, so a generator that raises leaves `path` untouched too.

    Args:
        path: The file to write; its folder must exist.
        parts: The text, in pieces (a one-element list for a whole string), or bytes.
        mode: The file's permission bits; None: what a plain ``open()`` would give
            (0666 less the umask), not the 0600 of a temporary file.
        sync_dir: Also fsync the folder after the rename, so the new entry itself
            survives a crash (not only the file's bytes).

    Raises:
        OSError: The folder is missing or not writable; `path` is then untouched.
    """
    handle = tempfile.NamedTemporaryFile(  # noqa: SIM115 - closed below, then renamed
        "wb",
        dir=path.parent,
        prefix=f".{path.name}.",
        suffix=".tmp",
        delete=False,
    )
    try:
        with handle:
            if isinstance(parts, bytes):
                handle.write(parts)
            else:
                for part in parts:
                    handle.write(part.encode("utf-8"))
            handle.flush()
            os.fchmod(handle.fileno(), 0o666 & ~umask() if mode is None else mode)
            os.fsync(handle.fileno())
        os.replace(handle.name, path)
    except BaseException:
        Path(handle.name).unlink(missing_ok=True)
        raise
    if sync_dir:
        fsync_dir(path.parent)


def swap_into_place(built: Path, target: Path, workdir: Path) -> None:
    """Move the finished folder `built` to `target`.

    An existing `target` (or a link there, even a dangling one) is first renamed into
    `workdir` as ``workdir/replaced`` (the caller deletes `workdir` afterwards), so at
    every moment `target` is either the old entry, absent, or the complete new one.
    The parent folder is fsynced after the rename.
    """
    if target.exists() or target.is_symlink():
        os.replace(target, workdir / "replaced")
    os.replace(built, target)
    fsync_dir(target.parent)
