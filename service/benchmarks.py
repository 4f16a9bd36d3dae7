"""Shared by the benchmark scripts: where a figure was measured, and BENCHMARKS.md."""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import statistics
from pathlib import Path
from typing import Any

#: Bridge validation triples in shared/data next to the repository (shared/data/README.md),
#: the benchmarks' default input.
BRIDGE_VALIDATION = Path(__file__).resolve().parents[2] / "shared/data/bridge/validation.json"


def machine() -> str:
    """`x86_64, 2 cores, <hostname>`: the machine line every figure carries."""
    return f"{platform.machine()}, {os.cpu_count()} cores, {platform.node()}"


def today() -> str:
    """The date in ISO format, for the provenance line."""
    return dt.date.today().isoformat()


def print_and_write(report: dict[str, Any], out: Path | None) -> None:
    """Print `report` as indented JSON and, when `out` is given, write it there too
    (parent folders created)."""
    text = json.dumps(report, indent=2)
    print(text)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text + "\n")


def percentile(values: list[float], q: int) -> float:
    """The q-th percentile (1..99) of `values`, by `statistics.quantiles` (inclusive)."""
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


def write_section(out: Path, section: str) -> None:
    """Put the Markdown `section` (starting with its `## ` heading line) into `out`,
    replacing the section with the same heading, or appending it."""
    heading = section.splitlines()[0]
    text = out.read_text() if out.exists() else "# Benchmarks\n\n"
    start = text.find(heading + "\n")
    if start >= 0:
        end = text.find("\n## ", start + 1)
        text = text[:start] + section + (text[end + 1 :] if end >= 0 else "")
    else:
        text = text.rstrip("\n") + "\n\n" + section
    out.write_text(text)
