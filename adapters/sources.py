"""Conversation sources turned into triples.

A *triple* is the project's unit of conversation data (JSON Lines, one object a line)::

    {"id": str, "source": str, "lesson_id": str | null,
     "pika_turn": str | null, "user_turn": str, "main_response": str | null}

Readers (one per source kind, see `shared/data/README.md` for the raw formats):

- `read_bridge`: the Bridge JSON list (rosewang2008/bridge, `dataset/*.json`).
- `read_uptake`: the uptake CSV (ddemszky/conversational-uptake, `uptake_data.csv`).
- `read_export`: the product's own conversation export (JSON Lines, one conversation a
  line; the format is in `read_export`'s docstring, an example in
  `tests/data/conversations.jsonl`).
- `read_triples_jsonl`: JSON Lines of triples, e.g. written by an earlier stage.
- `read_request_log`: the gateway's privacy-safe request log (`service/request_log.py`),
  a file or a folder of them; it yields `RequestLogTriple`s, triples that also carry the
  served fast response and its rating.

Every reader yields `Triple`s lazily, strips surrounding whitespace from every text,
turns empty optional texts into None, and skips bad rows instead of failing. Each
skipped row is counted in the optional `skipped` counter under one of these reasons:

- ``invalid_json``: a JSON Lines line that is not JSON.
- ``not_an_object``: a row that is not a JSON object.
- ``missing_field``: a required field (an id, ``source``, ``c_h``...) is absent or empty.
- ``wrong_type``: a field has the wrong type (e.g. a number where text belongs).
- ``missing_user_turn``: no user turn at all (no ``user_turn`` key, no ``student_text``
  cell, or a Bridge history that does not end with a student line).
- ``empty_user_turn``: the user turn is empty or whitespace-only.
- ``duplicate_id``: a triple id already yielded by the same read.

The export reader counts single turns as well as whole lines (see `read_export`):

- ``missing_text``: a turn without ``text`` (absent or null).
- ``empty_turn``: a turn whose text is empty or whitespace-only.
- ``unknown_role``: a turn whose ``role`` is neither ``pika`` nor ``user``.
- ``wrong_role_order``: a child's turn that has no Pika turn right before it or right
  after it (the conversation opens or ends with the child).

The request-log reader counts two more (see `read_request_log`):

- ``unknown_type``: a line whose ``type`` is neither ``served`` nor ``rating``.
- ``unmatched_rating``: a rating whose served line is not in the files read (rotated
  away, or written to a folder not read).

A problem with the whole file (not found, not JSON, a Bridge file that is not a list,
a CSV without the needed columns) raises instead: `FileNotFoundError` or
`SourceFormatError`.

Only the standard library and pydantic are used: the gateway-side CLI imports this
module, so it must never pull in the training stack.
"""

from __future__ import annotations

import csv
import hashlib
import json
import re
from collections import Counter
from collections.abc import Generator, Iterator, Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, ValidationError, field_validator
from pydantic_core import PydanticCustomError

SourceKind = Literal["bridge", "uptake", "export", "jsonl", "request-log"]
"""The source formats `load_triples` understands."""

SOURCE_KINDS: tuple[str, ...] = get_args(SourceKind)

SkipCounts = Counter[str]
"""Skipped rows by reason (see the module docstring for the reasons)."""

SkipReason = Literal[
    "invalid_json",
    "not_an_object",
    "missing_field",
    "wrong_type",
    "missing_user_turn",
    "empty_user_turn",
    "duplicate_id",
    "missing_text",
    "empty_turn",
    "unknown_role",
    "wrong_role_order",
    "unknown_type",
    "unmatched_rating",
]

DEFAULT_SOURCE_PATHS: Mapping[str, Path] = MappingProxyType(
    {
        "bridge": Path("../shared/data/bridge/validation.json"),
        "uptake": Path("../shared/data/uptake/uptake_data.csv"),
    }
)
"""Default file per source kind, relative to the current directory (the project root
when run from there, where the shared data sits at `../shared/data`). `export` and
`jsonl` and `request-log` have none."""

UPTAKE_COLUMNS = ("obs_id", "exchange_idx", "student_text", "teacher_text")
"""Columns of the uptake CSV that `read_uptake` needs."""


class SourceFormatError(ValueError):
    """The whole source file is unusable (wrong top-level shape or missing columns)."""


class _Skip(Exception):  # internal control flow, never seen by callers
    """Raised inside a reader to skip one row for `reason`."""

    def __init__(self, reason: SkipReason) -> None:
        super().__init__(reason)
        self.reason: SkipReason = reason


class Triple(BaseModel):
    """One conversation moment: Pika's turn, the child's answer and Pika's main reply.

    Texts are stripped of surrounding whitespace. `user_turn` must not be empty;
    empty `lesson_id`, `pika_turn` and `main_response` become None.
    """

    model_config = ConfigDict(frozen=True, strict=True, extra="ignore")

    id: str
    """Stable, unique id, e.g. ``bridge:6315993_39:1a2b3c4d5e`` or ``uptake:7:69``."""
    source: str
    """Where the triple came from: ``bridge``, ``uptake``, ``export``, or the ``source``
    of a JSONL row."""
    lesson_id: str | None = None
    """The lesson (Bridge ``lesson_topic``, uptake ``obs_id``, export ``lesson_id``);
    None when unknown."""
    pika_turn: str | None = None
    """The tutor's turn the child answered; None when there is none (uptake)."""
    user_turn: str
    """What the child said. Never empty."""
    main_response: str | None = None
    """The tutor's reply after the child's turn; None when unknown."""

    @field_validator("id", "source")
    @classmethod
    def _required_text(cls, value: str) -> str:
        value = value.strip()
        if not value:
            raise PydanticCustomError("empty_field", "must not be empty or whitespace-only")
        return value

    @field_validator("user_turn")
    @classmethod
    def _user_turn_not_blank(cls, value: str) -> str:
        value = value.strip()
        if not value:
            raise PydanticCustomError("empty_user_turn", "must not be empty or whitespace-only")
        return value

    @field_validator("lesson_id", "pika_turn", "main_response")
    @classmethod
    def _empty_to_none(cls, value: str | None) -> str | None:
        if value is None:
            return None
        return value.strip() or None


def _count(skipped: SkipCounts | None, reason: SkipReason) -> None:
    if skipped is not None:
        skipped[reason] += 1


TripleStream = Generator[Triple, None, None]
"""What the readers return: an iterator of triples that can be closed early."""


def _dedup(triples: TripleStream, skipped: SkipCounts | None) -> TripleStream:
    seen: set[str] = set()
    try:
        for triple in triples:
            if triple.id in seen:
                _count(skipped, "duplicate_id")
                continue
            seen.add(triple.id)
            yield triple
    finally:
        triples.close()


# --- Bridge -------------------------------------------------------------------------


def _turn_text(turn: Any) -> tuple[str, str]:
    """(user, stripped text) of one Bridge turn; `_Skip` on a malformed turn."""
    if not isinstance(turn, dict):
        raise _Skip("wrong_type")
    user, text = turn.get("user"), turn.get("text")
    if user is None or text is None:
        raise _Skip("missing_field")
    if not isinstance(user, str) or not isinstance(text, str):
        raise _Skip("wrong_type")
    return user, text.strip()


def _tutor_texts(value: Any) -> str | None:
    """Non-empty tutor texts of a Bridge reply list, joined with a space; None if none."""
    if value is None:
        return None
    if not isinstance(value, list):
        raise _Skip("wrong_type")
    texts = [text for user, text in map(_turn_text, value) if user == "tutor" and text]
    return " ".join(texts) or None


def _bridge_triple(item: Any) -> Triple:
    if not isinstance(item, dict):
        raise _Skip("not_an_object")
    c_id, history = item.get("c_id"), item.get("c_h")
    if c_id is None or history is None:
        raise _Skip("missing_field")
    if not isinstance(c_id, str) or not isinstance(history, list):
        raise _Skip("wrong_type")
    if not c_id.strip():
        raise _Skip("missing_field")
    lesson = item.get("lesson_topic")
    if lesson is not None and not isinstance(lesson, str):
        raise _Skip("wrong_type")
    turns = [_turn_text(turn) for turn in history]

    # The final run of student lines is the child's turn; the tutor line before it is
    # Pika's turn (the last non-empty one: a few Bridge tutor lines are empty).
    end = len(turns)
    start = end
    while start > 0 and turns[start - 1][0] == "student":
        start -= 1
    if start == end:
        raise _Skip("missing_user_turn")
    user_turn = " ".join(text for _, text in turns[start:end] if text)
    if not user_turn:
        raise _Skip("empty_user_turn")
    pika_turn = next(
        (text for user, text in reversed(turns[:start]) if user == "tutor" and text), None
    )
    main_response = _tutor_texts(item.get("c_r_")) or _tutor_texts(item.get("c_r"))

    # `c_id` is not unique in Bridge (the same moment remediated by several experts,
    # also across train and validation), so a hash of the whole item is appended.
    canonical = json.dumps(item, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    digest = hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:10]
    return Triple(
        id=f"bridge:{c_id.strip()}:{digest}",
        source="bridge",
        lesson_id=lesson,
        pika_turn=pika_turn,
        user_turn=user_turn,
        main_response=main_response,
    )


def _read_bridge(path: Path, skipped: SkipCounts | None) -> TripleStream:
    with path.open(encoding="utf-8") as handle:
        try:
            data = json.load(handle)
        except json.JSONDecodeError as exc:
            raise SourceFormatError(f"{path}: not JSON: {exc}") from exc
        except RecursionError as exc:  # absurdly deep nesting: no Bridge file
            raise SourceFormatError(f"{path}: not a Bridge file: JSON nested too deeply") from exc
    if not isinstance(data, list):
        raise SourceFormatError(f"{path}: a Bridge file is a JSON list, got {type(data).__name__}")
    for item in data:
        try:
            yield _bridge_triple(item)
        except _Skip as skip:
            _count(skipped, skip.reason)


def read_bridge(path: Path, skipped: SkipCounts | None = None) -> TripleStream:
    """Triples from a Bridge JSON file (a list of conversations).

    Mapping (shared/data/README.md): ``pika_turn`` is the last non-empty tutor text in
    ``c_h`` before the final student line(s); ``user_turn`` joins those final student
    lines with a space; ``main_response`` joins the tutor texts of ``c_r_`` (the
    expert's reply), or of ``c_r`` (the original reply) when ``c_r_`` has none;
    ``lesson_id`` is ``lesson_topic``. The id is ``bridge:{c_id}:{sha256(item)[:10]}``:
    ``c_id`` alone repeats (several expert remediations of one moment), and the hash
    of the item's canonical JSON makes it unique and stable across reads.

    Args:
        path: The Bridge JSON file, e.g. ``shared/data/bridge/validation.json``.
        skipped: Optional counter that gets one count per skipped row, by reason.

    Yields:
        One `Triple` per usable conversation, in file order.

    Raises:
        FileNotFoundError: `path` does not exist (raised on first iteration).
        SourceFormatError: The file is not JSON or not a list.
    """
    return _dedup(_read_bridge(path, skipped), skipped)


# --- uptake -------------------------------------------------------------------------


def _read_uptake(path: Path, skipped: SkipCounts | None) -> TripleStream:
    with path.open(encoding="utf-8-sig", newline="") as handle:
        reader = csv.DictReader(handle)
        try:
            fieldnames = reader.fieldnames or []
        except csv.Error as exc:
            raise SourceFormatError(f"{path}: not a CSV file: {exc}") from exc
        missing = [column for column in UPTAKE_COLUMNS if column not in fieldnames]
        if missing:
            raise SourceFormatError(f"{path}: missing CSV column(s): {', '.join(missing)}")
        while True:
            # A cell over csv.field_size_limit() (128 KiB) or a NUL in an old Python:
            # the file is refused, naming the line, rather than a traceback.
            try:
                row = next(reader)
            except StopIteration:
                break
            except csv.Error as exc:
                raise SourceFormatError(
                    f"{path}: unreadable CSV after line {reader.line_num}: {exc}"
                ) from exc
            # A short row leaves cells as None (csv.DictReader's restval).
            obs_id, exchange = row.get("obs_id"), row.get("exchange_idx")
            student, teacher = row.get("student_text"), row.get("teacher_text")
            if student is None:
                _count(skipped, "missing_user_turn")
            elif not student.strip():
                _count(skipped, "empty_user_turn")
            elif not obs_id or not exchange or not obs_id.strip() or not exchange.strip():
                _count(skipped, "missing_field")
            else:
                yield Triple(
                    id=f"uptake:{obs_id.strip()}:{exchange.strip()}",
                    source="uptake",
                    lesson_id=obs_id,
                    pika_turn=None,
                    user_turn=student,
                    main_response=teacher,
                )


def read_uptake(path: Path, skipped: SkipCounts | None = None) -> TripleStream:
    """Triples from the uptake CSV (one classroom exchange a row).

    ``user_turn`` is ``student_text``, ``main_response`` is ``teacher_text``,
    ``pika_turn`` is None (there is no earlier tutor turn), ``lesson_id`` is ``obs_id``
    (one observed class), and the id is ``uptake:{obs_id}:{exchange_idx}``, unique in
    the published file.

    Args:
        path: The CSV file, e.g. ``shared/data/uptake/uptake_data.csv``.
        skipped: Optional counter that gets one count per skipped row, by reason.

    Yields:
        One `Triple` per usable row, in file order.

    Raises:
        FileNotFoundError: `path` does not exist (raised on first iteration).
        SourceFormatError: A needed column (see `UPTAKE_COLUMNS`) is missing, or the
            csv module cannot read a line (e.g. a cell over its 128 KiB limit).
    """
    return _dedup(_read_uptake(path, skipped), skipped)


# --- the product's conversation export --------------------------------------------------

_SAFE_CONVERSATION_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")

_Turn = tuple[Literal["pika", "user"], str] | None
"""One export turn as (role, stripped text), or None for a bad turn (already counted)."""


def _export_turn(turn: Any, skipped: SkipCounts | None) -> _Turn:
    """Check one export turn; count a bad one by reason and return None for it."""
    reason: SkipReason | None = None
    if not isinstance(turn, dict):
        reason = "wrong_type"
    else:
        role, text = turn.get("role"), turn.get("text")
        if role is None:
            reason = "missing_field"
        elif not isinstance(role, str):
            reason = "wrong_type"
        elif role not in ("pika", "user"):
            reason = "unknown_role"
        elif text is None:
            reason = "missing_text"
        elif not isinstance(text, str):
            reason = "wrong_type"
        elif not text.strip():
            reason = "empty_turn"
        else:
            return ("pika" if role == "pika" else "user"), text.strip()
    _count(skipped, reason)
    return None


def _export_id_part(conversation_id: str) -> str:
    """The conversation id as it goes into triple ids: itself when it is short and
    wire-safe (``[A-Za-z0-9._-]{1,64}``), else the first 16 hex digits of its sha256."""
    if _SAFE_CONVERSATION_ID.fullmatch(conversation_id):
        return conversation_id
    return hashlib.sha256(conversation_id.encode("utf-8")).hexdigest()[:16]


def _export_triples(obj: dict[str, Any], skipped: SkipCounts | None) -> list[Triple]:
    """The triples of one conversation object; `_Skip` when the whole line is unusable."""
    conversation_id, lesson_id, turns = (
        obj.get("conversation_id"),
        obj.get("lesson_id"),
        obj.get("turns"),
    )
    if conversation_id is None or turns is None:
        raise _Skip("missing_field")
    if not isinstance(conversation_id, str) or not isinstance(turns, list):
        raise _Skip("wrong_type")
    if lesson_id is not None and not isinstance(lesson_id, str):
        raise _Skip("wrong_type")
    if not conversation_id.strip() or not turns:
        raise _Skip("missing_field")
    prefix = f"export:{_export_id_part(conversation_id.strip())}"
    checked = [_export_turn(turn, skipped) for turn in turns]

    triples: list[Triple] = []
    i = 0
    while i < len(checked):
        current = checked[i]
        if current is None or current[0] != "user":
            i += 1
            continue
        # A run of consecutive user turns is one child's turn (joined with a space).
        start = i
        user_texts: list[str] = []
        while i < len(checked) and (turn := checked[i]) is not None and turn[0] == "user":
            user_texts.append(turn[1])
            i += 1
        user_turn = " ".join(user_texts)
        before = checked[start - 1] if start > 0 else None
        after = checked[i] if i < len(checked) else None
        if (start > 0 and before is None) or (i < len(checked) and after is None):
            continue  # next to a bad turn: that turn is counted already
        if before is None or after is None:
            _count(skipped, "wrong_role_order")  # opens or ends the conversation
            continue
        # Pika's turn is the last Pika line before the child; the main response joins
        # every Pika line up to the child's next turn (as Bridge joins `c_r_`).
        pika_texts: list[str] = []
        end = i
        while end < len(checked) and (turn := checked[end]) is not None and turn[0] == "pika":
            pika_texts.append(turn[1])
            end += 1
        main_response = " ".join(pika_texts)
        triples.append(
            Triple(
                id=f"{prefix}:{start}",
                source="export",
                lesson_id=lesson_id,
                pika_turn=before[1],
                user_turn=user_turn,
                main_response=main_response,
            )
        )
    return triples


def _json_objects(path: Path, skipped: SkipCounts | None) -> Iterator[dict[str, Any]]:
    """The JSON objects of a JSON Lines file; blank lines are ignored, other lines that
    are not a JSON object are counted as ``invalid_json`` or ``not_an_object``."""
    with path.open(encoding="utf-8") as handle:
        for line in handle:
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except (json.JSONDecodeError, RecursionError):  # RecursionError: nested too deep
                _count(skipped, "invalid_json")
                continue
            if not isinstance(obj, dict):
                _count(skipped, "not_an_object")
                continue
            yield obj


def _read_export(path: Path, skipped: SkipCounts | None) -> TripleStream:
    for obj in _json_objects(path, skipped):
        try:
            triples = _export_triples(obj, skipped)
        except _Skip as skip:
            _count(skipped, skip.reason)
            continue
        yield from triples


def read_export(path: Path, skipped: SkipCounts | None = None) -> TripleStream:
    """Triples from the product's conversation export (JSON Lines, one conversation a line).

    Format of one line (unknown keys are ignored)::

        {"conversation_id": "c-001", "lesson_id": "colours-1" | null,
         "turns": [{"role": "pika" | "user", "text": "...", "ts": "..."}, ...]}

    ``ts`` is optional and not used: the turns are read in list order. Every child's
    turn with a Pika turn right before it and a Pika turn right after it becomes one
    triple: ``pika_turn`` is the Pika turn before, ``user_turn`` the child's turn,
    ``main_response`` the Pika turn after.

    Consecutive turns of the same role:

    - several ``user`` turns in a row are one child's turn, joined with a space (a
      speech recogniser splits one answer into pieces; Bridge joins student lines
      the same way);
    - several ``pika`` turns in a row: ``pika_turn`` is the last one before the child
      (the line the child answered) and ``main_response`` joins every one after the
      child up to the child's next turn (Pika's reply sent in pieces; Bridge joins the
      lines of ``c_r_`` the same way).

    Bad rows are skipped and counted by reason, never fatal:

    - the whole line: ``invalid_json``, ``not_an_object``, ``missing_field`` (no or
      empty ``conversation_id``, no ``turns`` or an empty list) and ``wrong_type``
      (``conversation_id`` not text, ``turns`` not a list, ``lesson_id`` neither text
      nor null);
    - one turn, counted once each: ``wrong_type`` (a turn that is not an object, or a
      ``role``/``text`` that is not text), ``missing_field`` (no ``role``),
      ``unknown_role``, ``missing_text`` and ``empty_turn``. A bad turn is a wall,
      not a gap: the child's turn next to it makes no triple (it is not counted a
      second time), and the turns on either side of it are never joined or paired;
    - ``wrong_role_order``: a child's turn (one run of user turns) that opens or ends
      the conversation, so there is no Pika turn before or after it;
    - ``duplicate_id``: the same triple id twice (a conversation exported twice).

    Ids are ``export:{conversation_id}:{i}``, ``i`` the 0-based index in ``turns`` of
    the child's (first) turn: the same file always gives the same ids, and a
    conversation that grows keeps the ids of its earlier triples. A
    ``conversation_id`` that is not 1-64 characters of ``[A-Za-z0-9._-]`` is replaced
    by the first 16 hex digits of its sha256, so ids stay safe as request ids.

    Args:
        path: The ``.jsonl`` export, e.g. ``tests/data/conversations.jsonl``.
        skipped: Optional counter that gets one count per skipped line or turn, by reason.

    Yields:
        The triples of each conversation, in file and turn order.

    Raises:
        FileNotFoundError: `path` does not exist (raised on first iteration).
    """
    return _dedup(_read_export(path, skipped), skipped)


# --- JSON Lines of triples ------------------------------------------------------------

_REASON_ORDER: tuple[SkipReason, ...] = (
    "missing_user_turn",
    "empty_user_turn",
    "missing_field",
    "wrong_type",
)


def _classify(exc: ValidationError) -> SkipReason:
    """The skip reason for a Triple validation error, from the errors' types and fields."""
    reasons: set[SkipReason] = set()
    for error in exc.errors():
        field = error["loc"][0] if error["loc"] else None
        if error["type"] == "missing":
            reasons.add("missing_user_turn" if field == "user_turn" else "missing_field")
        elif error["type"] == "empty_user_turn":
            reasons.add("empty_user_turn")
        elif error["type"] == "empty_field":
            reasons.add("missing_field")
        else:
            reasons.add("wrong_type")
    return next(reason for reason in _REASON_ORDER if reason in reasons)


def _read_jsonl(path: Path, skipped: SkipCounts | None) -> TripleStream:
    for obj in _json_objects(path, skipped):
        try:
            yield Triple.model_validate(obj)
        except ValidationError as exc:
            _count(skipped, _classify(exc))


def read_triples_jsonl(path: Path, skipped: SkipCounts | None = None) -> TripleStream:
    """Triples from a JSON Lines file, one triple object a line.

    Blank lines are ignored; unknown keys are ignored. Values are checked strictly
    (no number-to-text coercion).

    Args:
        path: The ``.jsonl`` file.
        skipped: Optional counter that gets one count per skipped line, by reason.

    Yields:
        One `Triple` per usable line, in file order.

    Raises:
        FileNotFoundError: `path` does not exist (raised on first iteration).
    """
    return _dedup(_read_jsonl(path, skipped), skipped)


# --- the gateway's request log ---------------------------------------------------------

REQUEST_LOG_SOURCE = "request-log"
"""The ``source`` of every served line of the request log."""

REQUEST_LOG_GLOB = "requests-*.jsonl"
"""Names of request-log files in a folder (`read_request_log` reads only these)."""


class RequestLogTriple(Triple):
    """A triple from the request log: the served moment plus what was served and rated.

    The six `Triple` fields come first and mean the same, so the extra fields ride along
    wherever a triple goes (`fastresp data triples` writes them; the triple readers ignore
    them). ``source`` is always ``request-log``, so where the answer came from is
    `served_from`. Rows with a `rating` are evaluation data: a child (or a parent) judged
    `fast_response` for this moment.
    """

    fast_response: str | None = None
    """The fast response served (redacted like every text of the log)."""
    served_from: Literal["model", "cache", "fallback"] | None = None
    """The response's own ``source``: generated now, a cached answer, or a fallback phrase.
    Renamed because ``source`` is the triple's origin."""
    personality: str | None = None
    """The personality that answered."""
    adapter_version: str | None = None
    """The LoRA adapter version that answered; None for the base model."""
    latency_ms: float | None = None
    """Time the gateway spent on the request, in milliseconds."""
    rating: int | None = None
    """The 1-5 satisfaction rating (`POST /feedback`); the last one when rated twice;
    None when never rated."""
    rating_comment: str | None = None
    """The rating's comment, redacted; None when there is none."""


def _request_log_files(path: Path) -> list[Path]:
    if path.is_dir():
        files = sorted(path.glob(REQUEST_LOG_GLOB))
        if not files:
            raise SourceFormatError(f"{path}: no request-log files ({REQUEST_LOG_GLOB}) in it")
        return files
    if not path.exists():
        raise FileNotFoundError(f"no such file or folder: {path}")
    return [path]


def _rating_of(obj: dict[str, Any]) -> tuple[str, int, str | None]:
    """(request id, rating, comment) of a rating line; `_Skip` when malformed."""
    request_id, rating, comment = obj.get("request_id"), obj.get("rating"), obj.get("comment")
    if request_id is None or rating is None:
        raise _Skip("missing_field")
    if not isinstance(request_id, str) or not request_id.strip():
        raise _Skip("wrong_type" if not isinstance(request_id, str) else "missing_field")
    if isinstance(rating, bool) or not isinstance(rating, int) or not 1 <= rating <= 5:
        raise _Skip("wrong_type")
    if comment is not None and not isinstance(comment, str):
        raise _Skip("wrong_type")
    return request_id.strip(), rating, (comment.strip() or None) if comment else None


_TRIPLE_FIELDS = frozenset(RequestLogTriple.model_fields) - {"rating", "rating_comment"}


def _ts(obj: dict[str, Any]) -> str:
    """The line's ``ts`` for ordering (ISO 8601 UTC strings sort by time); "" if none."""
    ts = obj.get("ts")
    return ts if isinstance(ts, str) else ""


def _read_request_log(path: Path, skipped: SkipCounts | None) -> TripleStream:
    files = _request_log_files(path)
    # Pass 1: the ratings (a rating may sit in another worker's file, or a later one) and,
    # per request id, which served line wins: the latest by ``ts``, the later read on a tie.
    ratings: dict[str, tuple[str, int, str | None]] = {}
    winners: dict[str, tuple[str, int, int]] = {}
    for file_no, file in enumerate(files):
        for line_no, obj in enumerate(_json_objects(file, None)):  # counted in pass 2
            kind = obj.get("type")
            if kind == "served":
                served_id = obj.get("request_id", obj.get("id"))
                if isinstance(served_id, str):
                    spot = (_ts(obj), file_no, line_no)
                    winners[served_id] = max(winners.get(served_id, spot), spot)
                continue
            if kind != "rating":
                continue
            try:
                request_id, rating, comment = _rating_of(obj)
            except _Skip as skip:
                _count(skipped, skip.reason)
                continue
            ts = _ts(obj)
            if request_id not in ratings or ts >= ratings[request_id][0]:
                ratings[request_id] = (ts, rating, comment)  # the latest rating wins
    # Pass 2: the winning served lines, with their rating joined on the request id.
    served: set[str] = set()
    for file_no, file in enumerate(files):
        for line_no, obj in enumerate(_json_objects(file, skipped)):
            kind = obj.get("type")
            if kind == "rating":
                continue
            if kind != "served":
                _count(skipped, "unknown_type")
                continue
            fields = {key: value for key, value in obj.items() if key in _TRIPLE_FIELDS}
            served_id = obj.get("request_id", obj.get("id"))
            if isinstance(served_id, str):
                if winners[served_id][1:] != (file_no, line_no):
                    _count(skipped, "duplicate_id")  # a reused id: a later line wins
                    continue
                rated = ratings.get(served_id)
                # A rating older than the winning line rated an earlier answer (a line
                # without a ``ts`` is never taken for older).
                if rated is not None and (not rated[0] or rated[0] >= winners[served_id][0]):
                    served.add(served_id)
                    fields["rating"], fields["rating_comment"] = rated[1:]
            try:
                yield RequestLogTriple.model_validate(fields)
            except ValidationError as exc:
                _count(skipped, _classify(exc))
    for _ in ratings.keys() - served:
        _count(skipped, "unmatched_rating")


def read_request_log(path: Path, skipped: SkipCounts | None = None) -> TripleStream:
    """Triples from the gateway's request log (`service/request_log.py`).

    `path` is one log file or a folder; from a folder every ``requests-*.jsonl`` file is
    read (the active file of each worker and its rotated ones), in name order, which is
    time order per worker. Each file holds two kinds of JSON line::

        {"type": "served", "id": request_id, "source": "request-log",
         "lesson_id": hashed session id | null, "pika_turn": ..., "user_turn": ...,
         "main_response": ..., "fast_response": ..., "served_from": "model" | "cache" |
         "fallback", "adapter_version": ..., "latency_ms": ..., "request_id": ...,
         "personality": ..., "ts": ISO 8601 UTC}
        {"type": "rating", "request_id": ..., "rating": 1-5, "comment": ... | null,
         "ts": ...}

    Every served line becomes one `RequestLogTriple`, with the rating of its request
    (the latest rating line for it by ``ts``, in any of the files read) joined in. A
    request id served more than once (a client reusing its ``request_id``) gives one
    triple: the latest served line by ``ts`` (the later one read on a tie) wins, the
    others count as ``duplicate_id``, and only a rating not older than the winning line
    is joined (an older one rated an earlier answer and counts as
    ``unmatched_rating``). Texts are as
    logged, i.e. already redacted. Bad lines are skipped and counted like
    `read_triples_jsonl` does, plus ``unknown_type`` and ``unmatched_rating``; a torn
    last line (a killed worker) counts as ``invalid_json``.

    Args:
        path: A request-log file, or the log folder (`request_log_dir`).
        skipped: Optional counter that gets one count per skipped line, by reason.

    Yields:
        One `RequestLogTriple` per served line, in file order.

    Raises:
        FileNotFoundError: `path` does not exist (raised on first iteration).
        SourceFormatError: `path` is a folder without request-log files.
    """
    return _dedup(_read_request_log(path, skipped), skipped)


def load_triples(
    source: SourceKind,
    path: Path,
    limit: int | None = None,
    skipped: SkipCounts | None = None,
) -> list[Triple]:
    """Read up to `limit` triples of the given source kind.

    Args:
        source: ``bridge``, ``uptake``, ``export``, ``jsonl`` or ``request-log``.
        path: The source file (``request-log``: a file or a folder of them).
        limit: Stop after this many triples; None reads them all. Rows after the
            limit are not read, so they are not counted in `skipped` either.
        skipped: Optional counter that gets one count per skipped row, by reason.

    Returns:
        The triples in file order, at most `limit` of them.

    Raises:
        ValueError: Unknown `source` or a negative `limit`.
        FileNotFoundError: `path` does not exist.
        SourceFormatError: The whole file is unusable.
    """
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")
    if source == "bridge":
        triples = read_bridge(path, skipped)
    elif source == "uptake":
        triples = read_uptake(path, skipped)
    elif source == "export":
        triples = read_export(path, skipped)
    elif source == "jsonl":
        triples = read_triples_jsonl(path, skipped)
    elif source == "request-log":
        triples = read_request_log(path, skipped)
    else:
        raise ValueError(f"unknown source {source!r}; expected one of {', '.join(SOURCE_KINDS)}")
    result: list[Triple] = []
    try:
        if limit == 0:
            return result
        for triple in triples:
            result.append(triple)
            if limit is not None and len(result) >= limit:
                break
    finally:
        triples.close()
    return result
