"""`fastresp loadtest`: a headless Locust run with pass/fail thresholds (issue 7).

Locust runs as its own process (`python -m locust`): gevent monkey-patches the process
that imports Locust, so neither this CLI nor the gateway ever imports it. The
thresholds are checked inside Locust, by the locustfile's `quitting` listener
(`loadtest/fastresp_locust.py`), which sets Locust's `process_exit_code`; this command
passes them on and exits with Locust's exit code.
"""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Annotated
from urllib.parse import urlsplit

import typer

_REPO_ROOT = Path(__file__).resolve().parents[1]
_DURATION = re.compile(r"^(?:\d+h)?(?:\d+m)?(?:\d+s)?$")


def locust_duration(run_time: str) -> str:
    """`60` -> `60s`; Locust durations (`90s`, `2m`, `1h30m`) pass unchanged.

    Raises:
        ValueError: anything else (also an empty string or `0`).
    """
    text = run_time.strip()
    if text.isdigit():
        text += "s"
    if (
        not text
        or not _DURATION.fullmatch(text)
        or not any(ch.isdigit() and ch != "0" for ch in text)
    ):
        raise ValueError(f"not a positive number of seconds or a Locust duration: {run_time!r}")
    return text


def base_url(host: str) -> str:
    """`host` if it is an http(s) URL with a host name, without a trailing slash.

    Raises:
        ValueError: another scheme, no scheme (`127.0.0.1:8000`), or no host name.
    """
    try:
        parts = urlsplit(host.strip())
        port_ok = parts.port is None or parts.port > 0
    except ValueError as exc:  # a port that is not a number or out of range
        raise ValueError(f"not an http(s) base URL: {host!r} ({exc})") from None
    if parts.scheme not in ("http", "https") or not parts.hostname or not port_ok:
        raise ValueError(f"not an http(s) base URL such as http://127.0.0.1:8000: {host!r}")
    return host.strip().rstrip("/")


def _default_locustfile() -> Path:
    """`loadtest/locustfile.py` under the current directory, else beside this package."""
    local = Path("loadtest/locustfile.py")
    return local if local.is_file() else _REPO_ROOT / "loadtest" / "locustfile.py"


def locust_command(
    locustfile: Path,
    host: str,
    users: int,
    spawn_rate: float,
    run_time: str,
    out: Path,
    data: Path | None,
    personalities: list[str],
    user_rps: float,
    stop_timeout: float,
    min_rps: float | None,
    max_p95_ms: float | None,
    max_failure_ratio: float | None,
) -> list[str]:
    """The `python -m locust ... --headless` argv for one run (see `loadtest`)."""
    argv = [sys.executable, "-m", "locust", "-f", str(locustfile), "--headless"]
    argv += ["--host", host, "--users", str(users), "--spawn-rate", f"{spawn_rate:g}"]
    argv += ["--run-time", run_time, "--only-summary"]
    argv += ["--csv", str(out / "locust"), "--html", str(out / "report.html")]
    argv += ["--verdict-json", str(out / "verdict.json"), "--latency-log", str(out / "latency.csv")]
    argv += ["--user-rps", f"{user_rps:g}", "--stop-timeout", f"{stop_timeout:g}"]
    if data is not None:
        argv += ["--data", str(data)]
    if personalities:
        argv += ["--personalities", ",".join(personalities)]
    for flag, value in (
        ("--min-rps", min_rps),
        ("--max-p95-ms", max_p95_ms),
        ("--max-failure-ratio", max_failure_ratio),
    ):
        if value is not None:
            argv += [flag, f"{value:g}"]
    return argv


def loadtest(
    host: Annotated[
        str, typer.Option(help="Base URL of the running gateway.")
    ] = "http://127.0.0.1:8000",
    users: Annotated[int, typer.Option(min=1, help="Concurrent Locust users (children).")] = 10,
    spawn_rate: Annotated[float, typer.Option(min=0.001, help="Users started per second.")] = 5.0,
    run_time: Annotated[
        str, typer.Option(help="Duration: seconds (60) or a Locust duration (90s, 2m, 1h30m).")
    ] = "60s",
    user_rps: Annotated[
        float,
        typer.Option(
            min=0.0,
            help="Requests per second per user (Locust constant_throughput); 0: each user "
            "sends its next request as soon as the last one is answered.",
        ),
    ] = 0.0,
    stop_timeout: Annotated[
        float,
        typer.Option(
            min=0.0,
            help="Seconds Locust lets users finish the request in flight when the run time "
            "is up, so the client and the gateway count the same requests.",
        ),
    ] = 10.0,
    personality: Annotated[
        list[str] | None,
        typer.Option(
            help="Personality to send; repeat for a mix. Default: every one from "
            "GET /personalities."
        ),
    ] = None,
    min_rps: Annotated[
        float | None,
        typer.Option(min=0.0, help="Threshold: lowest acceptable requests per second."),
    ] = None,
    max_p95_ms: Annotated[
        float | None,
        typer.Option(min=0.0, help="Threshold: highest acceptable P95 response time, in ms."),
    ] = None,
    max_failure_ratio: Annotated[
        float | None,
        typer.Option(
            min=0.0,
            max=1.0,
            help="Threshold: highest acceptable share of failed (non-200) requests. "
            "Unset: any failure fails the run (Locust's own exit code).",
        ),
    ] = None,
    out: Annotated[
        Path,
        typer.Option(
            help="Folder for Locust's CSV (locust_*.csv) and HTML report (report.html), "
            "verdict.json (figures and missed thresholds) and latency.csv (each request's "
            "client and gateway time); created if missing."
        ),
    ] = Path("loadtest-report"),
    locustfile: Annotated[
        Path | None,
        typer.Option(help="Locustfile (default: loadtest/locustfile.py of this checkout)."),
    ] = None,
    data: Annotated[
        Path | None,
        typer.Option(
            help="Bridge JSON file to replay (default: ../shared/data/bridge/validation.json "
            "beside the checkout)."
        ),
    ] = None,
) -> None:
    """Run Locust headless against a running gateway and check pass/fail thresholds.

    The Locust users replay real Bridge conversations (a mix of personalities, one
    session id per simulated child) against POST /fast-response; a non-200 answer is a
    failure. Thresholds are checked by Locust itself when the run ends (its `quitting`
    event); each miss is printed with its name, the measured value and the limit.

    Exit code: 0 when every threshold is met, 1 when one is missed (or, without
    --max-failure-ratio, when any request failed), 2 for bad arguments or no Locust.
    """
    if importlib.util.find_spec("locust") is None:
        typer.secho(
            "error: locust is not installed; pip install -e '.[loadtest]'",
            fg=typer.colors.RED,
            err=True,
        )
        raise typer.Exit(code=2)
    try:
        duration = locust_duration(run_time)
    except ValueError as exc:
        typer.secho(f"error: --run-time: {exc}", fg=typer.colors.RED, err=True)
        raise typer.Exit(code=2) from None
    try:
        host = base_url(host)
    except ValueError as exc:
        typer.secho(f"error: --host: {exc}", fg=typer.colors.RED, err=True)
        raise typer.Exit(code=2) from None
    script = locustfile if locustfile is not None else _default_locustfile()
    if not script.is_file():
        typer.secho(f"error: --locustfile: no such file: {script}", fg=typer.colors.RED, err=True)
        raise typer.Exit(code=2)
    if data is not None and not data.is_file():
        typer.secho(f"error: --data: no such file: {data}", fg=typer.colors.RED, err=True)
        raise typer.Exit(code=2)
    verdict_file = out / "verdict.json"
    try:
        out.mkdir(parents=True, exist_ok=True)
        for stale in (verdict_file, out / "report.html"):  # an earlier run's
            stale.unlink(missing_ok=True)
    except OSError as exc:
        typer.secho(f"error: --out: cannot use {out}: {exc}", fg=typer.colors.RED, err=True)
        raise typer.Exit(code=2) from None
    argv = locust_command(
        script.resolve(),
        host,
        users,
        spawn_rate,
        duration,
        out.resolve(),
        data.resolve() if data is not None else None,
        list(personality or []),
        user_rps,
        stop_timeout,
        min_rps,
        max_p95_ms,
        max_failure_ratio,
    )
    typer.echo(" ".join(argv), err=True)
    code = subprocess.run(argv, check=False).returncode
    if (out / "report.html").is_file():
        typer.echo(f"report: {out / 'report.html'}; CSV: {out / 'locust_stats.csv'}")
    else:
        typer.echo("no report: Locust stopped before the run (see its message above)", err=True)
    if verdict_file.is_file():
        verdict = json.loads(verdict_file.read_text())
        for miss in verdict["misses"]:
            typer.secho(
                f"FAILED {miss['name']}: measured {miss['measured']:.2f}, limit {miss['limit']:g}",
                fg=typer.colors.RED,
                err=True,
            )
    typer.echo(f"locust exit code {code}")
    raise typer.Exit(code=code)
