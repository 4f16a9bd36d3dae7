"""Unit tests of the load test's pieces that need no server: the threshold rules and the
`fastresp loadtest` command line (Locust itself runs in tests/test_loadtest.py)."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from loadtest.thresholds import Limits, Measured, Miss, evaluate
from service.cli import app
from service.cli_loadtest import locust_command, locust_duration


def measured(requests: int = 100, failures: int = 0, rps: float = 50.0, p95: float = 80.0):
    return Measured(requests=requests, failures=failures, rps=rps, p95_ms=p95)


def test_no_limits_never_miss() -> None:
    assert evaluate(measured(requests=0, p95=None), Limits()) == []  # type: ignore[arg-type]
    assert evaluate(measured(failures=100), Limits()) == []


@pytest.mark.parametrize(
    ("limits", "names"),
    [
        (Limits(min_rps=50.0), []),  # equal to the limit passes
        (Limits(min_rps=50.1), ["min_rps"]),
        (Limits(max_p95_ms=80.0), []),
        (Limits(max_p95_ms=79.9), ["max_p95_ms"]),
        (Limits(max_failure_ratio=0.0), []),
        (Limits(min_rps=60, max_p95_ms=10, max_failure_ratio=0), ["min_rps", "max_p95_ms"]),
    ],
)
def test_each_threshold(limits: Limits, names: list[str]) -> None:
    assert [m.name for m in evaluate(measured(), limits)] == names


def test_failure_ratio() -> None:
    misses = evaluate(measured(failures=2), Limits(max_failure_ratio=0.01))
    assert misses == [Miss("max_failure_ratio", 0.02, 0.01)]
    assert evaluate(measured(failures=1), Limits(max_failure_ratio=0.01)) == []


def test_a_run_without_requests_misses() -> None:
    nothing = Measured(requests=0, failures=0, rps=0.0, p95_ms=None)
    names = [m.name for m in evaluate(nothing, Limits(max_p95_ms=100))]
    assert names == ["requests"]
    names = [m.name for m in evaluate(nothing, Limits(min_rps=1, max_failure_ratio=0.5))]
    assert names == ["requests", "min_rps", "max_failure_ratio"]


def test_miss_names_measured_and_limit() -> None:
    text = Miss("min_rps", 12.345, 100000.0).describe()
    assert text == "threshold missed: min_rps: measured 12.35, limit 100000"


@pytest.mark.parametrize(
    ("given", "expected"), [("60", "60s"), ("90s", "90s"), ("2m", "2m"), ("1h30m", "1h30m")]
)
def test_durations(given: str, expected: str) -> None:
    assert locust_duration(given) == expected


@pytest.mark.parametrize("given", ["", "0", "0s", "-5", "1.5", "soon", "5 s", "10d"])
def test_bad_durations(given: str) -> None:
    with pytest.raises(ValueError, match="Locust duration"):
        locust_duration(given)


def test_locust_command(tmp_path: Path) -> None:
    argv = locust_command(
        Path("/x/locustfile.py"),
        "http://gw:8000",
        20,
        5.0,
        "60s",
        tmp_path,
        Path("/data/bridge.json"),
        ["cheerful", "calm"],
        1.0,
        10.0,
        50.0,
        None,
        0.01,
    )
    assert argv[:5] == [sys.executable, "-m", "locust", "-f", "/x/locustfile.py"]
    pairs = dict(zip(argv[5:], [*argv[6:], ""], strict=False))
    assert "--headless" in argv and "--only-summary" in argv
    assert pairs["--host"] == "http://gw:8000"
    assert pairs["--users"] == "20" and pairs["--spawn-rate"] == "5"
    assert pairs["--run-time"] == "60s"
    assert pairs["--csv"] == str(tmp_path / "locust")
    assert pairs["--html"] == str(tmp_path / "report.html")
    assert pairs["--personalities"] == "cheerful,calm"
    assert pairs["--min-rps"] == "50" and pairs["--max-failure-ratio"] == "0.01"
    assert "--max-p95-ms" not in argv  # unset: not checked


def test_cli_refuses_bad_arguments(tmp_path: Path) -> None:
    runner = CliRunner()
    result = runner.invoke(app, ["loadtest", "--run-time", "soon", "--out", str(tmp_path)])
    assert result.exit_code == 2
    assert "--run-time" in result.output
    missing = tmp_path / "missing.json"
    result = runner.invoke(app, ["loadtest", "--data", str(missing), "--out", str(tmp_path)])
    assert result.exit_code == 2
    assert "no such file" in result.output


@pytest.mark.parametrize(
    "host",
    [
        "127.0.0.1:8000",
        "ftp://127.0.0.1:8000",
        "notaurl",
        "http://",
        "http://host:99999",
        "http://h:x",
    ],
)
def test_cli_refuses_a_host_that_is_not_an_http_url(tmp_path: Path, host: str) -> None:
    """A scheme-less or non-http host used to reach Locust and end in a traceback (or an
    FTP connection) with exit code 1; it is a bad argument: exit 2, nothing started."""
    result = CliRunner().invoke(app, ["loadtest", "--host", host, "--out", str(tmp_path / "o")])
    assert result.exit_code == 2, result.output
    assert "--host" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "o").exists()


def test_cli_refuses_an_out_that_is_a_file(tmp_path: Path) -> None:
    """`--out` naming a file used to end in a FileExistsError traceback."""
    taken = tmp_path / "taken"
    taken.write_text("x")
    result = CliRunner().invoke(app, ["loadtest", "--out", str(taken)])
    assert result.exit_code == 2, result.output
    assert "--out" in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)


#: One Bridge conversation (Pika's question, the child's answer, Pika's main response).
BRIDGE_CONVERSATION = {
    "c_id": "1_1",
    "lesson_topic": "t",
    "c_h": [
        {"id": 1, "text": "What is your final answer?", "time": "1:00", "user": "tutor"},
        {"id": 2, "text": "30", "time": "1:05", "user": "student"},
    ],
    "c_r": [{"id": 3, "text": "That was a good try.", "time": "1:10", "user": "tutor"}],
}


@pytest.fixture
def hung_server() -> Iterator[str]:
    """A TCP server that accepts connections and never answers (a hung gateway)."""
    listener = socket.create_server(("127.0.0.1", 0))
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(listener.accept()[0])
            except TimeoutError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    finally:
        stop.set()
        thread.join(timeout=5)
        for conn in held:
            conn.close()
        listener.close()


def test_requests_unanswered_when_the_run_ends_are_failures(
    hung_server: str, tmp_path: Path
) -> None:
    """A gateway that stops answering: Locust kills the users after --stop-timeout, and
    their unanswered requests used to vanish from the stats, so the run passed (exit 0,
    no failure). They are failures now, and the run exits 1."""
    data = tmp_path / "bridge.json"
    data.write_text(json.dumps([BRIDGE_CONVERSATION]))
    out = tmp_path / "report"
    fastresp = str(Path(sys.executable).parent / "fastresp")
    command = [fastresp, "loadtest", "--host", hung_server]
    command += ["--personality", "cheerful", "--users", "2", "--spawn-rate", "2"]
    command += ["--run-time", "2", "--stop-timeout", "1", "--data", str(data), "--out", str(out)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 1, done.stdout + done.stderr
    verdict = json.loads((out / "verdict.json").read_text())
    assert verdict["total"]["requests"] == 2, verdict
    assert verdict["total"]["failures"] == 2, verdict
    assert "no answer before the run ended" in done.stdout + done.stderr  # the error report


#: Run in a child interpreter: importing Locust monkey-patches the process with gevent.
RUN_END_CHECK = """
import sys, time
sys.path.insert(0, "loadtest")
from locust.env import Environment
from locust.exception import StopUser
from locust.runners import STATE_CLEANUP
from locustfile import FastResponseUser, RunEnd

assert RunEnd.unanswered_in_time(10.0)  # no stop yet: a killed request was hung
RunEnd.stopping_at = time.time()
assert not RunEnd.unanswered_in_time(10.0)  # killed at the stop: cut off, not hung
assert RunEnd.unanswered_in_time(0.0)  # no stop timeout: every kill counts
RunEnd.stopping_at = time.time() - 10.0
assert RunEnd.unanswered_in_time(10.0)  # killed after the stop timeout: hung

env = Environment(user_classes=[FastResponseUser], host="http://127.0.0.1:9")
env.create_local_runner().state = STATE_CLEANUP
FastResponseUser.turns = [{"pika_turn": "Colour?", "user_turn": "Red", "main_response": ""}]
FastResponseUser.personalities = ["calm"]
FastResponseUser.host = "http://127.0.0.1:9"
user = FastResponseUser(env)
user.conversation = None  # a request would need it: the ending run must stop first
try:
    user.fast_response()
except StopUser:
    print("stopped")
"""


def test_an_ending_run_sends_no_request_and_counts_only_hung_ones() -> None:
    """Locust kills a user it finds waiting when the run stops; gevent delivers the kill
    at the user's next switch, which can be inside a request it had just started. That
    request is not a gateway failure (it was one CI failure: 6 "unanswered" requests cut
    off 4 ms in). A user sends nothing once the run is ending, and only a request killed
    after --stop-timeout counts as unanswered."""
    done = subprocess.run(
        [sys.executable, "-c", RUN_END_CHECK],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=Path(__file__).resolve().parent.parent,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.strip().splitlines()[-1] == "stopped", done.stdout
