"""The privacy-safe request log (issue 10, part 3): redaction, rotation, reading back.

The redaction cases are listed in `REDACTED` (must be replaced) and `KEPT` (ordinary
lesson talk that must survive: counting, years, ``my name is long``...). The end-to-end
tests write records with every raw personal detail of `PII` and then look for each of
them, byte for byte, in every file of the log folder.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from adapters.sources import (
    REQUEST_LOG_SOURCE,
    RequestLogTriple,
    Triple,
    load_triples,
    read_request_log,
    read_triples_jsonl,
)
from service.cli import app as cli_app
from service.engine import Engine
from service.redaction import redact, redact_record
from service.request_log import KEY_FILE, RequestLog, active_file, delete_expired
from service.schemas import FastResponseRequest, FastResponseResponse
from service.settings import Settings
from tests.conftest import engine_settings, serve

# --- redaction cases --------------------------------------------------------------------

REDACTED = [
    # names after a cue, a full name too, in lower-case speech transcripts as well
    ("My name is Tom.", "My name is [NAME]."),
    ("my name is tom", "my name is [NAME]"),
    ("My name is Anna Maria Lopez and I like cats", "My name is [NAME] and I like cats"),
    ("my name's Lily", "my name's [NAME]"),
    ("My name\u2019s Zo\u00eb-Ann", "My name\u2019s [NAME]"),
    ("I'm called Ravi", "I'm called [NAME]"),
    ("I am called Mei Lin", "I am called [NAME]"),
    ("You can call me Bobby", "You can call me [NAME]"),
    ("my sister's name is Emma", "my sister's name is [NAME]"),
    ("My name is Will and I will win", "My name is [NAME] and I [NAME] win"),
    # punctuation, fillers and spellings of a transcript between the cue and the name
    ("My name is: Tom", "My name is: [NAME]"),
    ("my name is, um, Tom Smith", "my name is, um, [NAME]"),
    ("my name is uh Tom", "my name is uh [NAME]"),
    ("my name is... Tom", "my name is... [NAME]"),
    ("My names Tom", "My names [NAME]"),
    ("my surname is Smith", "my surname is [NAME]"),
    # e-mails, written and spoken
    ("my email is tom.b+pika@example.co.uk ok", "my email is [EMAIL] ok"),
    ("mom's is jane_doe@mail.com", "mom's is [EMAIL]"),
    ("it's tommy at gmail dot com", "it's [EMAIL]"),
    ("tom dot smith at gmail dot com", "[EMAIL]"),
    # phone numbers in several formats
    ("call 555-123-4567 now", "call [PHONE] now"),
    ("my number is (415) 555-2671", "my number is [PHONE]"),
    ("415.555.2671", "[PHONE]"),
    ("dad's phone is +44 20 7946 0958", "dad's phone is [PHONE]"),
    ("ring 020 7946 0958 please", "ring [PHONE] please"),
    ("my mum's mobile is 07700 900123", "my mum's mobile is [PHONE]"),
    ("+49 30 901820", "[PHONE]"),
    ("it's 5 5 5 1 2 3 4", "it's [PHONE]"),
    ("home is 555 1234", "home is [PHONE]"),
    # one run ending in 000: a valid number of a region, or with a trunk 0, is a phone
    ("call 2125550000", "call [PHONE]"),
    ("07700900000", "[PHONE]"),
    # street addresses
    ("I live at 12 Oak Street", "I live at [ADDRESS]"),
    ("i live at 12 oak street", "i live at [ADDRESS]"),
    ("we live at 221b Baker St. in London", "we live at [ADDRESS] in London"),
    ("4 Elm Tree Ave is my house", "[ADDRESS] is my house"),
    ("1600 Pennsylvania Avenue", "[ADDRESS]"),
    ("Grandma lives on 7 Cherry Blossom Lane", "Grandma lives on [ADDRESS]"),
    ("10 Downing Road, London", "[ADDRESS], London"),
    # several at once
    (
        "My name is Sam Lee, I live at 3 Park Road and my phone is 555-987-6543",
        "My name is [NAME], I live at [ADDRESS] and my phone is [PHONE]",
    ),
]
"""(text, expected): personal details that must be replaced."""

KEPT = [
    "my name is long",
    "my name is not Tom",  # "not" ends the cue: nothing after it is taken as a name
    "my name is not important",
    "my name is, um, not telling",
    "the names of animals",
    "call me later",
    "call me when you are ready",
    "I'm called to dinner",
    "what is your name?",
    "1 2 3 4 5 6 7 8 9 10",
    "1, 2, 3, 4, 5, 6, 7",
    "10 20 30 40 50 60 70 80",
    "2021 2022 2023",
    "I can count to 1000000",
    "I was born in 2019",
    "I have 100 apples and 3 cats",
    "12 34 56",
    "10 + 20 = 30",
    "2 cats on the road",
    "5 miles down the road",
    "3 little pigs",
    "the cat is on the street",
    "I like the color blue",
    "my email is broken",
    "I am at school",
]
"""Texts that must come out unchanged."""


@pytest.mark.parametrize(("text", "expected"), REDACTED)
def test_redacts_personal_details(text: str, expected: str) -> None:
    assert redact(text) == expected


@pytest.mark.parametrize("text", KEPT)
def test_keeps_ordinary_lesson_talk(text: str) -> None:
    assert redact(text) == text


def test_a_name_is_removed_from_every_text_of_the_record() -> None:
    record = redact_record(
        {
            "pika_turn": "Hello! What's your name?",
            "user_turn": "It's Lily.",
            "main_response": "Lily is a lovely name.",
            "fast_response": "Hi lily!",
        }
    )
    assert record == {
        "pika_turn": "Hello! What's your name?",
        "user_turn": "It's [NAME].",
        "main_response": "[NAME] is a lovely name.",
        "fast_response": "Hi [NAME]!",
    }
    full = redact_record({"user_turn": "my name is Tom Baker", "fast_response": "Hi Tom!"})
    assert full == {"user_turn": "my name is [NAME]", "fast_response": "Hi [NAME]!"}
    # Not a name question: a short answer stays.
    assert redact_record({"pika_turn": "What colour?", "user_turn": "Red"})["user_turn"] == "Red"


# --- the log itself ---------------------------------------------------------------------

PII = [
    "Tom",
    "Baker",
    "tom.b+pika@example.co.uk",
    "tommy at gmail dot com",
    "555-123-4567",
    "5551234567",
    "(415) 555-2671",
    "4155552671",
    "+44 20 7946 0958",
    "12 Oak Street",
    "Oak Street",
    "221b Baker St",
    "Zo\u00eb",
    "jane_doe@mail.com",
    "session-with-child-42",
]
"""Raw personal strings written in `_pii_records`; none may reach the disk."""


def _request(i: int, **fields: str | None) -> FastResponseRequest:
    values: dict[str, str | None] = {
        "personality": "cheerful",
        "pika_turn": "What did you eat for breakfast?",
        "user_turn": f"I ate pho number {i}",
        "main_response": "Pho is a noodle soup. Can you say noodle soup?",
        "session_id": "lesson-a",
        "request_id": f"req-{i}",
    }
    values.update(fields)
    return FastResponseRequest.model_validate(values)


def _response(request: FastResponseRequest, text: str = "Yum, pho!") -> FastResponseResponse:
    return FastResponseResponse(
        fast_response=text,
        source="model",
        personality=request.personality,
        adapter_version="v2",
        latency_ms=42.5,
        request_id=request.request_id or "generated",
    )


def _pii_records(log: RequestLog) -> None:
    sid = "session-with-child-42"
    cases = [
        _request(
            0,
            pika_turn="Hi! What's your name?",
            user_turn="My name is Tom Baker and my email is tom.b+pika@example.co.uk",
            session_id=sid,
        ),
        _request(1, user_turn="call my mum on 555-123-4567 or 5551234567", session_id=sid),
        _request(2, user_turn="dad is (415) 555-2671 or 4155552671 or +44 20 7946 0958"),
        _request(3, user_turn="I live at 12 Oak Street", main_response="12 Oak Street, wow."),
        _request(4, user_turn="we moved to 221b Baker St last year"),
        _request(5, user_turn="I'm called Zo\u00eb", main_response="Hello Zo\u00eb!"),
        _request(6, user_turn="it's tommy at gmail dot com"),
    ]
    # Pika greets Tom by name: known from the child's turn of the same record only.
    log.record_served(cases[0], _response(cases[0], text="Nice to meet you, Tom!"))
    for request in cases[1:]:
        log.record_served(request, _response(request))
    log.record_rating("req-0", 5, "jane_doe@mail.com says: call 555-123-4567")
    log.record_rating("req-3", 2, "we live at 12 Oak Street")


def _all_bytes(directory: Path) -> bytes:
    return b"".join(p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file())


def test_no_personal_detail_reaches_the_disk(tmp_path: Path) -> None:
    log = RequestLog(tmp_path / "log", max_bytes=1024)  # several files, rotated too
    _pii_records(log)
    log.close()
    files = sorted((tmp_path / "log").glob("requests-*.jsonl"))
    assert len(files) >= 2, "rotation should have split the records"
    on_disk = _all_bytes(tmp_path / "log").lower()
    for raw in PII:
        assert raw.lower().encode("utf-8") not in on_disk, f"{raw!r} leaked to disk"
    triples = list(read_request_log(tmp_path / "log"))
    assert [t.id for t in triples] == [f"req-{i}" for i in range(7)]
    assert triples[0].user_turn == "My name is [NAME] and my email is [EMAIL]"
    assert triples[0].fast_response == "Nice to meet you, [NAME]!"
    assert triples[0].rating == 5
    assert triples[0].rating_comment == "[EMAIL] says: call [PHONE]"
    assert triples[3].main_response == "[ADDRESS], wow."
    assert triples[3].rating_comment == "we live at [ADDRESS]"
    # The session id is hashed: stable within a session, different across sessions.
    assert triples[0].lesson_id == triples[1].lesson_id
    assert triples[0].lesson_id != triples[2].lesson_id
    assert re.fullmatch(r"[0-9a-f]{32}", triples[0].lesson_id or "")


def test_files_are_private_to_the_owner(tmp_path: Path) -> None:
    log = RequestLog(tmp_path / "log")
    log.record_served(_request(0), _response(_request(0)))
    log.close()
    assert (tmp_path / "log").stat().st_mode & 0o777 == 0o700
    for path in (log.path, tmp_path / "log" / KEY_FILE):
        assert path.stat().st_mode & 0o777 == 0o600, path


def test_session_hash_uses_the_configured_key(tmp_path: Path) -> None:
    first = RequestLog(tmp_path / "a", hash_key=b"k1")
    same = RequestLog(tmp_path / "b", hash_key=b"k1")
    other = RequestLog(tmp_path / "c", hash_key=b"k2")
    default = RequestLog(tmp_path / "d")
    again = RequestLog(tmp_path / "d")  # a second worker on the same folder
    try:
        assert first.hash_session("s1") == same.hash_session("s1")
        assert first.hash_session("s1") != other.hash_session("s1")
        assert first.hash_session("s1") != first.hash_session("s2")
        assert default.hash_session("s1") == again.hash_session("s1")
        assert default.hash_session("s1") != first.hash_session("s1")
        assert first.hash_session(None) is None
    finally:
        for log in (first, same, other, default, again):
            log.close()


def test_off_by_default_and_on_with_a_folder(tmp_path: Path) -> None:
    assert RequestLog.from_settings(Settings()) is None
    settings = Settings(
        request_log_dir=tmp_path / "log",
        request_log_max_bytes=2048,
        request_log_retention_days=7,
        request_log_hash_key="secret",
        request_log_phone_regions="US",
    )
    log = RequestLog.from_settings(settings)
    assert log is not None
    try:
        assert log.path == active_file(tmp_path / "log")
        assert log.path.name == f"requests-{os.getpid()}.jsonl"
        assert not (tmp_path / "log" / KEY_FILE).exists(), "a configured key makes no key file"
        # US only: a UK national number is no longer looked for; "+44" still is.
        assert log.phone_regions == ("US",)
    finally:
        log.close()


def test_bad_settings_name_the_field(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="request_log_phone_regions"):
        Settings(request_log_phone_regions="us;gb")
    with pytest.raises(ValueError, match="request_log_max_bytes"):
        Settings(request_log_max_bytes=10)
    with pytest.raises(ValueError, match="rating"):
        RequestLog(tmp_path).record_rating("r", 6, None)


def _served(log: RequestLog, request_id: str, session: str | None, **turns: str) -> None:
    request = _request(0, session_id=session, request_id=request_id, **turns)
    log.record_served(request, _response(request, text=turns.get("fast_response", "Ok!")))


def test_a_name_is_removed_from_later_records_of_the_session(tmp_path: Path) -> None:
    log = RequestLog(tmp_path / "log")
    _served(log, "r1", "s1", user_turn="my name is Tom Smith")
    _served(log, "r2", "s1", pika_turn="Where do you live, Tom?", user_turn="near smith park")
    _served(log, "r3", "s2", pika_turn="Where do you live, Tom?", user_turn="hello")
    _served(log, "r4", None, pika_turn="Hi Tom!", user_turn="hi")
    log.record_rating("r2", 5, "Tom loved it, call 555-123-4567")
    log.record_rating("r3", 4, "Tom is a cat")
    log.close()
    triples = {t.id: t for t in read_request_log(tmp_path / "log")}
    assert triples["r2"].pika_turn == "Where do you live, [NAME]?"
    assert triples["r2"].user_turn == "near [NAME] park"
    assert triples["r2"].rating_comment == "[NAME] loved it, call [PHONE]"
    # Another session, or none, never had a "Tom": its texts stay.
    assert triples["r3"].pika_turn == "Where do you live, Tom?"
    assert triples["r3"].rating_comment == "Tom is a cat"
    assert triples["r4"].pika_turn == "Hi Tom!"


def test_the_session_memory_is_bounded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("service.request_log.SESSION_NAMES_MAX", 2)
    log = RequestLog(tmp_path / "log")
    _served(log, "a1", "a", user_turn="my name is Ann")
    _served(log, "b1", "b", user_turn="my name is Bea")
    _served(log, "a2", "a", pika_turn="Hi Ann")  # "a" used: "b" is now the oldest
    _served(log, "c1", "c", user_turn="my name is Cy")  # forgets "b"
    _served(log, "a3", "a", pika_turn="Bye Ann")
    _served(log, "b2", "b", pika_turn="Bye Bea")
    log.close()
    triples = {t.id: t for t in read_request_log(tmp_path / "log")}
    assert triples["a3"].pika_turn == "Bye [NAME]"
    assert triples["b2"].pika_turn == "Bye Bea"


def test_redaction_runs_in_the_writer_thread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import threading

    import service.request_log as request_log

    threads: list[str] = []
    real = request_log.redact_record

    def spy(*args: Any, **kwargs: Any) -> dict[str, str | None]:
        threads.append(threading.current_thread().name)
        return real(*args, **kwargs)

    monkeypatch.setattr(request_log, "redact_record", spy)
    log = RequestLog(tmp_path / "log")
    _served(log, "r1", "s1", user_turn="my name is Tom")
    log.close()
    assert threads, "redaction did not run"
    assert threading.main_thread().name not in threads
    assert read_request_log(tmp_path / "log").__next__().user_turn == "my name is [NAME]"


# --- rotation and retention -------------------------------------------------------------


def _age(path: Path, days: float) -> None:
    stamp = time.time() - days * 86400
    os.utime(path, (stamp, stamp))


def test_rotation_by_size_and_deletion_by_age(tmp_path: Path) -> None:
    directory = tmp_path / "log"
    log = RequestLog(directory, max_bytes=1024, retention_days=30)
    for i in range(20):
        log.record_served(_request(i), _response(_request(i)))
    log.flush()
    rotated = sorted(p for p in directory.glob("requests-*.jsonl") if p != log.path)
    assert len(rotated) >= 3, [p.name for p in rotated]
    for path in [*rotated, log.path]:
        assert path.stat().st_size <= 1024 + 600  # at most one line past the limit
        for line in path.read_text(encoding="utf-8").splitlines():
            assert json.loads(line)["type"] == "served"
    # A rotated file 31 days old goes at the next rotation; 29 days old stays.
    _age(rotated[0], 31)
    _age(rotated[1], 29)
    for i in range(20, 30):
        log.record_served(_request(i), _response(_request(i)))
    log.close()
    assert not rotated[0].exists()
    assert rotated[1].exists()
    # At startup too: another old file, an old active file of a worker that is gone
    # (a pid no process has), and an old active file of a live one (this test's parent).
    _age(rotated[1], 31)
    gone = active_file(directory, pid=_dead_pid())
    gone.write_text("{}\n", encoding="utf-8")
    _age(gone, 31)
    live = active_file(directory, pid=os.getppid())
    live.write_text("{}\n", encoding="utf-8")
    _age(live, 31)
    RequestLog(directory, retention_days=30).close()
    assert not rotated[1].exists()
    assert not gone.exists()
    assert live.exists()
    assert (directory / KEY_FILE).exists(), "the key file is no log file"


def test_a_quiet_file_is_rotated_by_age_so_retention_applies(tmp_path: Path) -> None:
    directory = tmp_path / "log"
    now = [time.time()]
    log = RequestLog(directory, retention_days=30, clock=lambda: now[0])
    _served(log, "old", "s", user_turn="hello")
    log.flush()
    assert delete_expired(directory, 30 * 86400, now=now[0] + 40 * 86400) == []
    now[0] += 86400 + 1  # a day later the next line starts a new file
    _served(log, "new", "s", user_turn="hello")
    log.flush()
    rotated = [p for p in directory.glob("requests-*.jsonl") if p != log.path]
    assert len(rotated) == 1
    assert '"id":"old"' in rotated[0].read_text(encoding="utf-8")
    assert '"id":"old"' not in log.path.read_text(encoding="utf-8")
    # 40 days on, the old line is gone; the active file stays.
    assert delete_expired(directory, 30 * 86400, now=now[0] + 40 * 86400) == rotated
    log.close()
    assert [t.id for t in read_request_log(directory)] == ["new"]
    # A shorter retention rotates sooner: at retention_days.
    now[0] = time.time()
    short = RequestLog(tmp_path / "short", retention_days=0.5, clock=lambda: now[0])
    _served(short, "x", "s", user_turn="hello")
    short.flush()  # the writer reads the clock when it opens the file
    now[0] += 0.25 * 86400
    _served(short, "y", "s", user_turn="hello")
    short.flush()
    assert len(list((tmp_path / "short").glob("requests-*.jsonl"))) == 1
    now[0] += 0.25 * 86400
    _served(short, "z", "s", user_turn="hello")
    short.close()
    assert len(list((tmp_path / "short").glob("requests-*.jsonl"))) == 2


def test_a_file_not_written_for_long_is_rotated_and_expires(tmp_path: Path) -> None:
    directory = tmp_path / "log"
    log = RequestLog(directory, retention_days=1)
    _served(log, "old", "s", user_turn="hello")
    log.flush()
    _age(log.path, 40)  # its only line is 40 days old
    assert delete_expired(directory, 86400) == [], "the active file is never deleted"
    _served(log, "new", "s", user_turn="hello")  # rotates it; the rotation deletes it
    log.close()
    assert [p.name for p in directory.glob("requests-*.jsonl")] == [log.path.name]
    assert [t.id for t in read_request_log(directory)] == ["new"]


def test_a_leftover_file_with_this_pid_is_rotated_at_startup(tmp_path: Path) -> None:
    directory = tmp_path / "log"
    first = RequestLog(directory)
    _served(first, "before", "s", user_turn="hello")
    first.close()
    second = RequestLog(directory)  # a new worker that got the same pid
    assert not second.path.exists()
    _served(second, "after", "s", user_turn="hello")
    second.close()
    assert '"id":"before"' not in second.path.read_text(encoding="utf-8")
    assert sorted(t.id for t in read_request_log(directory)) == ["after", "before"]


def _dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_delete_expired_ignores_other_files(tmp_path: Path) -> None:
    other = tmp_path / "notes.jsonl"
    other.write_text("x", encoding="utf-8")
    _age(other, 400)
    assert delete_expired(tmp_path, retention_s=1.0) == []
    assert other.exists()


# --- reading back -----------------------------------------------------------------------


def test_reading_back_gives_the_served_triples(tmp_path: Path) -> None:
    directory = tmp_path / "log"
    log = RequestLog(directory, max_bytes=1024)
    served: list[tuple[FastResponseRequest, FastResponseResponse]] = []
    for i in range(12):
        request = _request(i, session_id=None if i % 3 == 0 else f"lesson-{i % 2}")
        if i % 4 == 0:
            request = request.model_copy(update={"pika_turn": None, "main_response": None})
        response = _response(request, text=f"Yum {i}!")
        log.record_served(request, response)
        served.append((request, response))
    log.record_rating("req-1", 2, None)
    log.record_rating("req-1", 5, "  Loved it  ")  # a duplicate rating replaces the first
    log.record_rating("req-7", 3, None)
    log.record_rating("req-never-served", 4, None)
    # A second worker's file in the same folder, and a torn last line of a killed worker.
    other = active_file(directory, pid=_dead_pid())
    other.write_text(
        json.dumps({"type": "rating", "request_id": "req-2", "rating": 1, "comment": None})
        + '\n{"type": "served", "id": "torn',
        encoding="utf-8",
    )
    log.close()

    skipped: Counter[str] = Counter()
    triples = list(read_request_log(directory, skipped))
    assert skipped == Counter({"unmatched_rating": 1, "invalid_json": 1})
    assert all(isinstance(t, RequestLogTriple) for t in triples)
    assert sorted(t.id for t in triples) == sorted(f"req-{i}" for i in range(12))
    by_id = {t.id: t for t in triples}
    for request, response in served:
        triple = by_id[response.request_id]
        expected = Triple(
            id=response.request_id,
            source=REQUEST_LOG_SOURCE,
            lesson_id=log.hash_session(request.session_id),
            pika_turn=request.pika_turn,
            user_turn=request.user_turn,
            main_response=request.main_response,
        )
        assert Triple.model_validate(triple.model_dump()) == expected
        assert triple.fast_response == response.fast_response
        assert triple.served_from == response.source
        assert triple.personality == response.personality
        assert triple.adapter_version == response.adapter_version
        assert triple.latency_ms == response.latency_ms
    assert (by_id["req-1"].rating, by_id["req-1"].rating_comment) == (5, "Loved it")
    assert (by_id["req-2"].rating, by_id["req-7"].rating) == (1, 3)
    assert {t.id for t in triples if t.rating is not None} == {"req-1", "req-2", "req-7"}
    # load_triples knows the kind; one (rotated) file reads on its own.
    assert len(load_triples("request-log", directory)) == 12
    first = min(directory.glob(f"{log.path.stem}.*.jsonl"))  # its oldest rotated file
    assert next(t.id for t in load_triples("request-log", first)) == "req-0"


def test_bad_lines_are_counted(tmp_path: Path) -> None:
    path = tmp_path / "requests-1.jsonl"
    good = {"type": "served", "id": "a", "source": "request-log", "user_turn": "hi"}
    lines = [
        good,
        {**good, "id": "a"},  # duplicate
        {**good, "id": "b", "user_turn": "  "},
        {**good, "id": "c", "user_turn": 7},
        {"type": "what", "id": "d"},
        {"type": "rating", "request_id": "a", "rating": 9},
        {"type": "rating", "rating": 3},
        [1, 2],
    ]
    path.write_text("\n".join(json.dumps(line) for line in lines) + "\n", encoding="utf-8")
    skipped: Counter[str] = Counter()
    assert [t.id for t in read_request_log(path, skipped)] == ["a"]
    assert skipped == Counter(
        {
            "duplicate_id": 1,
            "empty_user_turn": 1,
            "wrong_type": 2,
            "unknown_type": 1,
            "missing_field": 1,
            "not_an_object": 1,
        }
    )
    with pytest.raises(FileNotFoundError):
        list(read_request_log(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no request-log files"):
        list(read_request_log(tmp_path / "empty"))


def test_a_reused_request_id_keeps_the_latest_served_line(tmp_path: Path) -> None:
    def served(ts: str, text: str) -> dict[str, Any]:
        return {"type": "served", "id": "r", "request_id": "r", "source": "request-log",
                "user_turn": "hi", "fast_response": text, "ts": ts}  # fmt: skip

    def rating(ts: str, value: int) -> dict[str, Any]:
        return {"type": "rating", "request_id": "r", "rating": value, "comment": None, "ts": ts}

    directory = tmp_path / "log"
    directory.mkdir()
    # Two workers' files; name order is not time order across them.
    (directory / "requests-1.jsonl").write_text(
        "\n".join(
            json.dumps(line)
            for line in (
                served("2026-01-02T00:00:00.000Z", "second"),
                rating("2026-01-02T00:00:01.000Z", 5),
            )
        ),
        encoding="utf-8",
    )
    (directory / "requests-2.jsonl").write_text(
        "\n".join(
            json.dumps(line)
            for line in (
                served("2026-01-01T00:00:00.000Z", "first"),
                rating("2026-01-01T00:00:01.000Z", 1),
            )
        ),
        encoding="utf-8",
    )
    skipped: Counter[str] = Counter()
    triples = list(read_request_log(directory, skipped))
    assert [(t.fast_response, t.rating) for t in triples] == [("second", 5)]
    assert skipped == Counter({"duplicate_id": 1})
    # Rated only before it was served again: that rating was the first answer's.
    (directory / "requests-1.jsonl").write_text(
        json.dumps(served("2026-01-02T00:00:00.000Z", "second")), encoding="utf-8"
    )
    skipped.clear()
    triples = list(read_request_log(directory, skipped))
    assert [(t.fast_response, t.rating) for t in triples] == [("second", None)]
    assert skipped == Counter({"duplicate_id": 1, "unmatched_rating": 1})


def test_cli_triples_reads_a_log_folder(tmp_path: Path) -> None:
    directory = tmp_path / "log"
    log = RequestLog(directory, max_bytes=1024)
    for i in range(6):
        log.record_served(_request(i), _response(_request(i)))
    log.record_rating("req-4", 4, None)
    log.close()
    out = tmp_path / "triples.jsonl"
    result = CliRunner().invoke(
        cli_app, ["data", "triples", "--source", "request-log", str(directory), "--out", str(out)]
    )
    assert result.exit_code == 0, result.output
    assert "6 triple(s); skipped: none" in result.output
    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert [row["id"] for row in rows] == [f"req-{i}" for i in range(6)]
    assert [row["rating"] for row in rows] == [None, None, None, None, 4, None]
    assert rows[0]["served_from"] == "model"
    # The output is a plain triples file for the next stages.
    assert [t.id for t in read_triples_jsonl(out)] == [row["id"] for row in rows]
    help_text = CliRunner().invoke(cli_app, ["data", "triples", "--help"]).output
    assert "request-log" in help_text


# --- through the real service -----------------------------------------------------------


@pytest.mark.engine
@pytest.mark.asyncio(loop_scope="session")
async def test_served_requests_are_logged_by_the_service(
    engine: Engine, tiny_model_dir: Path, tmp_path: Path
) -> None:
    directory = tmp_path / "log"
    settings = engine_settings(
        tiny_model_dir,
        feedback_db=tmp_path / "feedback.sqlite3",
        request_log_dir=directory,
        request_log_hash_key="test-key",
    )
    bodies = [
        {
            "personality": "cheerful",
            "pika_turn": "What did you eat for breakfast?",
            "user_turn": "I ate pho with my dad",
            "main_response": "Pho is a noodle soup. Can you say noodle soup?",
            "session_id": "lesson-1",
            "request_id": "svc-0",
        },
        {"personality": "cheerful", "user_turn": "I like red", "request_id": "svc-1"},
        {
            "personality": "cheerful",
            "pika_turn": "What's your name?",
            "user_turn": "My name is Tom Baker, call 555-123-4567",
            "session_id": "session-with-child-42",
        },
    ]
    served = []
    async with serve(settings, engine) as client:
        for body in bodies:
            response = await client.post("/fast-response", json=body)
            assert response.status_code == 200, response.text
            served.append(response.json())
        rated = await client.post(
            "/feedback", json={"request_id": "svc-0", "rating": 4, "comment": "tom@x.org"}
        )
        assert rated.status_code == 200, rated.text
    # The lifespan has closed the log: everything is on disk.
    triples = {t.id: t for t in read_request_log(directory)}
    assert set(triples) == {answer["request_id"] for answer in served}
    check = RequestLog(tmp_path / "check", hash_key=b"test-key")
    try:
        for body, answer in zip(bodies[:2], served[:2], strict=True):
            triple = triples[answer["request_id"]]
            assert triple.user_turn == body["user_turn"]
            assert triple.pika_turn == body.get("pika_turn")
            assert triple.main_response == body.get("main_response")
            assert triple.lesson_id == check.hash_session(body.get("session_id"))
            assert triple.fast_response == answer["fast_response"]
            assert triple.served_from == answer["source"]
            assert triple.personality == answer["personality"]
            assert triple.adapter_version == answer["adapter_version"]
    finally:
        check.close()
    assert triples["svc-0"].rating == 4
    assert triples["svc-0"].rating_comment == "[EMAIL]"
    private = triples[served[2]["request_id"]]
    assert private.user_turn == "My name is [NAME], call [PHONE]"
    on_disk = _all_bytes(directory)
    for raw in ("Tom", "Baker", "555-123-4567", "tom@x.org", "session-with-child-42"):
        assert raw.encode() not in on_disk, raw
