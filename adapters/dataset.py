"""Data stages around labelling: sources to triples, and labelled rows to a training set.

Two stages of `fastresp data` live here (labelling is `fastresp data label`):

- `collect_triples` + `write_jsonl_atomic`: read several sources (`adapters.sources`)
  into one triples file (``fastresp data triples``).
- `build_dataset`: labelled rows (`adapters.labels`) to train/validation/test files in
  the seed format plus a dataset card (``fastresp data build``).

A **training row** (JSON Lines, one object a line) keeps the seed format's field names::

    {"previous_conversation": [
         {"role": "system", "content": <service.prompts.system_text(personality)>},
         {"role": "assistant", "content": <Pika's turn>},      # omitted when there is none
         {"role": "user", "content": <the child's turn>}],
     "main_response": str | null,          # null when unknown or dropped (below)
     "assistant_fast_response": str,
     "personality": str, "lesson_id": str | null, "source": str,
     "labeler": "teacher" | "tutor-openers", "prompt_version": str,
     "main_response_dropped": bool,        # true when the dropout set it to null
     "id": "<triple id>|<personality>", "triple_id": str,
     "teacher": {...}}                     # only when the labeller recorded one

The system message is `service.prompts.system_text`, the same text the gateway sends
(prompt parity): the SFT formatter turns a row back into a `service.prompts.Turn` and
renders it with the same prompt builder the service uses.

Build rules (`build_dataset`):

- Only ``accepted`` rows of personalities in the manifest are used.
- **Deduplicated**: rows with the same personality, Pika turn, child turn, main
  response and fast response (whitespace collapsed, case folded) are one row; the
  first one read wins.
- **Splits by lesson**: every row of a lesson goes to the same split. The split of a
  lesson is fixed by the sha256 of ``"pika-split-v1:" + lesson_id`` (a number in
  [0, 1): below ``test_fraction`` is test, below ``test_fraction + val_fraction`` is
  validation, the rest train), so it does not depend on the seed, on the order of
  the input or on which other lessons are present: a lesson stays in its split when
  the data grows. Rows without a lesson id are grouped by their triple id instead
  (every personality and labeller of one conversation moment stays together). The
  fractions are met only on average: Bridge has about 100 lessons (its
  ``lesson_topic``), so the real shares are reported in the card.
- **Main-response dropout**: a row that has a main response loses it (set to null,
  ``main_response_dropped: true``) when the sha256 of its seed, id, labeller and fast
  response, as a number in [0, 1), is below the dropout rate: about that share of
  rows, the same rows for the same seed, whatever the order of the input. It applies
  to every split, so evaluation sees both cases (DESIGN.md: the main response is
  often not ready at serving time).

Only the standard library, pydantic and the service's prompt, manifest and atomic-write
modules are imported here: no training stack.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from adapters.labels import LabeledRow, read_rows
from adapters.sources import SkipCounts, SourceKind, Triple, load_triples
from service.atomic_files import write_atomic
from service.personalities import load_personalities
from service.prompts import PROMPT_VERSION, system_text

DEFAULT_PERSONALITIES_FILE = Path(__file__).resolve().parent / "personalities.yaml"

SPLITS: tuple[str, ...] = ("train", "validation", "test")
Split = Literal["train", "validation", "test"]

SPLIT_SALT = "pika-split-v1"
"""Salt of the lesson hash that assigns splits. Changing it reshuffles every lesson."""

OPENER_THRESHOLD = 0.15
"""Share of rows above which one opener is flagged (issue 4: repetitive fillers sound
canned)."""

HISTOGRAM_MAX_WORDS = 12
"""Fast-response lengths are counted per word up to this; longer ones go in one bucket
(12 words is the filters' default length limit)."""

Progress = Callable[[str], None]


class DatasetError(ValueError):
    """The build cannot produce a dataset (no usable rows); nothing is written."""


def _say(progress: Progress | None, message: str) -> None:
    if progress is not None:
        progress(message)


def _unit_interval(text: str) -> float:
    """A number in [0, 1) from the first 64 bits of sha256(`text`)."""
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big") / 2**64


def write_jsonl_atomic(lines: Iterable[str], path: Path) -> int:
    """Write `lines` (each one JSON object, no newline) to `path` atomically.

    The lines go to a temporary file beside `path`, which is fsynced and then renamed
    over `path` (`service.atomic_files.write_atomic`), so a failed or killed run leaves
    `path` as it was. The file gets the mode a plain open() would (0666 less the
    umask), so the training job can read the data.

    Returns:
        The number of lines written.

    Raises:
        OSError: The directory is missing or not writable; `path` is then untouched.
    """
    count = 0

    def numbered() -> Iterator[str]:
        nonlocal count
        for line in lines:
            yield line
            yield "\n"
            count += 1

    write_atomic(path, numbered())
    return count


def write_text_atomic(path: Path, text: str) -> None:
    """Write `text` to `path` atomically, ending with one newline (see `write_jsonl_atomic`).

    Raises:
        OSError: The directory is missing or not writable; `path` is then untouched.
    """
    write_jsonl_atomic([text.rstrip("\n")], path)


# --- sources to triples -----------------------------------------------------------------


@dataclass
class SourceReport:
    """What one ``--source KIND PATH`` gave: triples kept and rows skipped by reason."""

    kind: SourceKind
    path: Path
    triples: int = 0
    skipped: SkipCounts = field(default_factory=Counter)


def collect_triples(
    inputs: Sequence[tuple[SourceKind, Path]], progress: Progress | None = None
) -> tuple[list[Triple], list[SourceReport]]:
    """Read every source in order into one list of triples with unique ids.

    A triple whose id an earlier source (or the same one) already gave is skipped and
    counted as ``duplicate_id`` in its source's report (the same file given twice,
    or overlapping exports).

    Args:
        inputs: (source kind, path) pairs, read in this order.
        progress: Optional callback that gets one line before each source is read.

    Returns:
        The triples in input order, and one report per input.

    Raises:
        FileNotFoundError: A path does not exist.
        adapters.sources.SourceFormatError: A whole file is unusable.
        UnicodeDecodeError: A file is not UTF-8.
    """
    triples: list[Triple] = []
    reports: list[SourceReport] = []
    seen: set[str] = set()
    for kind, path in inputs:
        _say(progress, f"reading {kind} {path}")
        report = SourceReport(kind=kind, path=path)
        for triple in load_triples(kind, path, skipped=report.skipped):
            if triple.id in seen:
                report.skipped["duplicate_id"] += 1
                continue
            seen.add(triple.id)
            triples.append(triple)
            report.triples += 1
        reports.append(report)
    return triples, reports


def write_triples(triples: Iterable[Triple], path: Path) -> int:
    """Write triples as JSON Lines (`Triple` fields), atomically; returns the count."""
    return write_jsonl_atomic((t.model_dump_json() for t in triples), path)


# --- labelled rows to a training set ----------------------------------------------------


class BuildConfig(BaseModel):
    """Settings of `build_dataset` (``fastresp data build``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    labels: list[Path] = Field(min_length=1)
    """Labelled JSON Lines files (`fastresp data label` output), read in order."""
    out: Path
    """Output folder: train.jsonl, validation.jsonl, test.jsonl, README.md, card.json."""
    dropout: float = Field(default=0.2, ge=0.0, le=1.0)
    """Share of rows whose main response is set to null (see the module docstring)."""
    seed: int = 0
    """Seed of the main-response dropout (the splits do not depend on it)."""
    val_fraction: float = Field(default=0.1, ge=0.0, lt=1.0)
    """Expected share of lessons in the validation split."""
    test_fraction: float = Field(default=0.1, ge=0.0, lt=1.0)
    """Expected share of lessons in the test split."""
    personalities_file: Path = DEFAULT_PERSONALITIES_FILE
    """The personality manifest that gives each personality's system text."""
    opener_threshold: float = Field(default=OPENER_THRESHOLD, gt=0.0, le=1.0)
    """Flag an opener that starts more than this share of rows."""
    command: str | None = None
    """The command line that ran the build, recorded in the card."""

    @model_validator(mode="after")
    def _fractions_leave_a_train_split(self) -> BuildConfig:
        if self.val_fraction + self.test_fraction >= 1.0:
            raise ValueError(
                "val_fraction + test_fraction must be below 1 (there must be a train split)"
            )
        return self


class ChatMessage(BaseModel):
    """One message of ``previous_conversation``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    role: Literal["system", "assistant", "user"]
    content: str


class TrainingRow(BaseModel):
    """One training example in the seed format (see the module docstring)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    previous_conversation: list[ChatMessage]
    main_response: str | None
    assistant_fast_response: str
    personality: str
    lesson_id: str | None
    source: str
    labeler: str
    prompt_version: str
    main_response_dropped: bool
    id: str
    triple_id: str
    teacher: dict[str, Any] | None = None

    def to_json(self) -> str:
        """One JSON line; ``teacher`` only when present."""
        data = self.model_dump(mode="json")
        if data["teacher"] is None:
            del data["teacher"]
        return json.dumps(data, ensure_ascii=False)


class Opener(BaseModel):
    """An opener (the first word or two of fast responses) and how many rows start so."""

    text: str
    rows: int
    share: float


class SplitCounts(BaseModel):
    """Counts of one split, or of all of them."""

    rows: int = 0
    lessons: int = 0
    """Distinct lesson groups (lesson id, or triple id when there is none)."""
    main_response_dropped: int = 0
    main_response_absent: int = 0
    """Rows with no main response in the labelled data (not counting the dropout)."""
    personalities: dict[str, int] = Field(default_factory=dict)
    sources: dict[str, int] = Field(default_factory=dict)
    labelers: dict[str, int] = Field(default_factory=dict)


class DatasetCard(BaseModel):
    """What `build_dataset` wrote, as DIR/card.json (and rendered into DIR/README.md)."""

    created: str
    command: str | None
    config: dict[str, Any]
    system_prompt_version: str
    inputs: dict[str, dict[str, int]]
    """Per labels file: lines, rows, accepted, rejected."""
    label_rejections: dict[str, int]
    """Rejected labelled rows by their row-level reason."""
    label_yield: dict[str, dict[str, int]]
    """Per source: labelled rows read and accepted (the labeller's yield)."""
    skipped: dict[str, int]
    """Accepted rows not used: ``duplicate`` and ``unknown_personality``."""
    splits: dict[str, SplitCounts]
    total: SplitCounts
    files: dict[str, dict[str, Any]]
    """Per output file: rows and sha256."""
    fast_response_words: dict[str, int]
    """Length histogram of the fast responses in words: "1".."12" and "13+"."""
    openers: dict[str, list[Opener]]
    """Top 10 openers over all rows: ``first_word`` and ``first_two_words``."""
    openers_by_personality: dict[str, dict[str, list[Opener]]]
    """Top 5 openers of each personality (each gets its own adapter)."""
    repetitive_openers: bool
    """True when one opener starts more than ``opener_threshold`` of the rows, over all
    rows or within one personality."""
    warnings: list[str]


_WORD = re.compile(r"[a-z0-9]+(?:['\u2019][a-z0-9]+)*")


def opener_words(text: str, n: int) -> str:
    """The first `n` words of `text`, lower-cased, without punctuation ("Ooh, nice try!"
    gives "ooh" for 1 and "ooh nice" for 2); fewer when the text is shorter."""
    return " ".join(_WORD.findall(text.lower())[:n])


def _normal(text: str | None) -> str:
    return " ".join(text.split()).casefold() if text else ""


def _dedup_key(row: LabeledRow) -> tuple[str, ...]:
    return (
        row.personality,
        _normal(row.pika_turn),
        _normal(row.user_turn),
        _normal(row.main_response),
        _normal(row.fast_response),
    )


def lesson_group(row: LabeledRow | TrainingRow) -> str:
    """The unit of splitting: the lesson id, or the triple id when there is none."""
    if row.lesson_id is not None:
        return f"lesson:{row.lesson_id}"
    return f"triple:{row.triple_id}"


def assign_split(group: str, val_fraction: float, test_fraction: float) -> Split:
    """The split of a lesson group, from sha256(`SPLIT_SALT`:`group`) (module docstring)."""
    u = _unit_interval(f"{SPLIT_SALT}:{group}")
    if u < test_fraction:
        return "test"
    if u < test_fraction + val_fraction:
        return "validation"
    return "train"


def dropped(row: LabeledRow, seed: int, rate: float) -> bool:
    """Whether the dropout removes `row`'s main response (module docstring)."""
    if row.main_response is None or rate <= 0.0:
        return False
    return _unit_interval(f"dropout:{seed}:{row.id}:{row.labeler}:{row.fast_response}") < rate


def training_row(row: LabeledRow, system: str, drop: bool) -> TrainingRow:
    """The seed-format row of an accepted labelled row.

    Raises:
        ValueError: `row` has no fast response.
    """
    if row.fast_response is None:
        raise ValueError(f"row {row.id!r} has no fast response")
    messages = [ChatMessage(role="system", content=system)]
    if row.pika_turn is not None and row.pika_turn.strip():
        messages.append(ChatMessage(role="assistant", content=row.pika_turn))
    messages.append(ChatMessage(role="user", content=row.user_turn))
    return TrainingRow(
        previous_conversation=messages,
        main_response=None if drop else row.main_response,
        assistant_fast_response=row.fast_response,
        personality=row.personality,
        lesson_id=row.lesson_id,
        source=row.source,
        labeler=row.labeler,
        prompt_version=row.prompt_version,
        main_response_dropped=drop,
        id=row.id,
        triple_id=row.triple_id,
        teacher=row.teacher,
    )


def _counts(rows: Sequence[TrainingRow]) -> SplitCounts:
    return SplitCounts(
        rows=len(rows),
        lessons=len({lesson_group(r) for r in rows}),
        main_response_dropped=sum(r.main_response_dropped for r in rows),
        main_response_absent=sum(
            r.main_response is None and not r.main_response_dropped for r in rows
        ),
        personalities=dict(sorted(Counter(r.personality for r in rows).items())),
        sources=dict(sorted(Counter(r.source for r in rows).items())),
        labelers=dict(sorted(Counter(r.labeler for r in rows).items())),
    )


def _top(texts: Sequence[str], n: int, top: int) -> list[Opener]:
    counts = Counter(opener_words(t, n) for t in texts)
    counts.pop("", None)
    return [
        Opener(text=text, rows=rows, share=round(rows / len(texts), 4))
        for text, rows in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:top]
    ]


def opener_stats(texts: Sequence[str], top: int) -> dict[str, list[Opener]]:
    """The `top` most frequent first words and first two words of `texts`."""
    if not texts:
        return {"first_word": [], "first_two_words": []}
    return {"first_word": _top(texts, 1, top), "first_two_words": _top(texts, 2, top)}


def _opener_warnings(scope: str, stats: dict[str, list[Opener]], threshold: float) -> list[str]:
    warnings = []
    for kind, openers in stats.items():
        for opener in openers:
            if opener.share > threshold:
                warnings.append(
                    f"{scope}: {kind.replace('_', ' ')} {opener.text!r} starts "
                    f"{opener.share:.1%} of rows (over {threshold:.0%}): "
                    "repetitive fillers sound canned"
                )
    return warnings


def length_histogram(texts: Iterable[str]) -> dict[str, int]:
    """Fast-response lengths in words (whitespace-separated): "1".."12" and "13+"."""
    buckets = {str(n): 0 for n in range(1, HISTOGRAM_MAX_WORDS + 1)}
    buckets[f"{HISTOGRAM_MAX_WORDS + 1}+"] = 0
    for text in texts:
        words = len(text.split())
        key = str(words) if words <= HISTOGRAM_MAX_WORDS else f"{HISTOGRAM_MAX_WORDS + 1}+"
        buckets[key] = buckets.get(key, 0) + 1
    return buckets


def _count_lines(path: Path) -> int:
    with path.open(encoding="utf-8", errors="replace") as handle:
        return sum(1 for line in handle if line.strip())


def build_dataset(config: BuildConfig, progress: Progress | None = None) -> DatasetCard:
    """Labelled rows to train/validation/test JSON Lines files and a dataset card.

    Writes ``train.jsonl``, ``validation.jsonl``, ``test.jsonl``, ``card.json`` and
    ``README.md`` into `config.out` (created when missing), each file atomically; the
    rules are in the module docstring.

    Args:
        config: The build settings.
        progress: Optional callback that gets one line per step.

    Returns:
        The dataset card (also written as card.json).

    Raises:
        FileNotFoundError: A labels file does not exist.
        service.personalities.ManifestError: The personality manifest is unusable.
        DatasetError: No accepted row is left to write (nothing is written then).
        OSError: The output folder cannot be created or written.
    """
    personalities = load_personalities(config.personalities_file)
    systems = {name: system_text(p) for name, p in personalities.items()}

    inputs: dict[str, dict[str, int]] = {}
    rejections: Counter[str] = Counter()
    yields: dict[str, Counter[str]] = {}
    skipped: Counter[str] = Counter()
    unknown: Counter[str] = Counter()
    seen: set[tuple[str, ...]] = set()
    kept: list[LabeledRow] = []
    for path in config.labels:
        if not path.is_file():
            raise FileNotFoundError(f"labels file not found: {path}")
        stats = {"lines": _count_lines(path), "rows": 0, "accepted": 0, "rejected": 0}
        for row in read_rows(path):
            stats["rows"] += 1
            per_source = yields.setdefault(row.source, Counter(rows=0, accepted=0))
            per_source["rows"] += 1
            if row.status != "accepted" or row.fast_response is None:
                stats["rejected"] += 1
                rejections[row.reason or "rejected"] += 1
                continue
            stats["accepted"] += 1
            per_source["accepted"] += 1
            if row.personality not in systems:
                skipped["unknown_personality"] += 1
                unknown[row.personality] += 1
                continue
            key = _dedup_key(row)
            if key in seen:
                skipped["duplicate"] += 1
                continue
            seen.add(key)
            kept.append(row)
        inputs[str(path)] = stats
        _say(
            progress,
            f"read {path}: {stats['rows']} row(s), {stats['accepted']} accepted, "
            f"{stats['rejected']} rejected"
            + (
                f", {stats['lines'] - stats['rows']} unreadable line(s)"
                if stats["lines"] > stats["rows"]
                else ""
            ),
        )
    _say(
        progress,
        f"{len(kept)} row(s) kept; {skipped['duplicate']} duplicate(s), "
        f"{skipped['unknown_personality']} of unknown personalities",
    )
    if not kept:
        where = ", ".join(str(p) for p in config.labels)
        if unknown:
            raise DatasetError(
                f"no accepted rows to build from in {where}: the accepted rows are of "
                f"personalities not in {config.personalities_file}: " + ", ".join(sorted(unknown))
            )
        raise DatasetError(f"no accepted rows to build from in {where}")

    by_split: dict[str, list[TrainingRow]] = {name: [] for name in SPLITS}
    for row in kept:
        split = assign_split(lesson_group(row), config.val_fraction, config.test_fraction)
        drop = dropped(row, config.seed, config.dropout)
        by_split[split].append(training_row(row, systems[row.personality], drop))

    config.out.mkdir(parents=True, exist_ok=True)
    files: dict[str, dict[str, Any]] = {}
    for name in SPLITS:
        path = config.out / f"{name}.jsonl"
        count = write_jsonl_atomic((r.to_json() for r in by_split[name]), path)
        files[path.name] = {
            "rows": count,
            "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
        }
        _say(progress, f"wrote {path}: {count} row(s)")

    every = [r for name in SPLITS for r in by_split[name]]
    texts = [r.assistant_fast_response for r in every]
    openers = opener_stats(texts, top=10)
    warnings = _opener_warnings("all rows", openers, config.opener_threshold)
    by_personality: dict[str, dict[str, list[Opener]]] = {}
    names = sorted({r.personality for r in every})
    for name in names:
        mine = [r.assistant_fast_response for r in every if r.personality == name]
        by_personality[name] = opener_stats(mine, top=5)
        if len(names) > 1:  # with one personality these are the warnings above
            warnings += _opener_warnings(
                f"personality {name}", by_personality[name], config.opener_threshold
            )
    repetitive = bool(warnings)
    for name in SPLITS:
        if not by_split[name]:
            warnings.append(f"the {name} split is empty")
    if unknown:
        left_out = ", ".join(sorted(unknown))
        warnings.append(f"rows of personalities not in the manifest were left out: {left_out}")

    card = DatasetCard(
        created=datetime.now(UTC).isoformat(timespec="seconds"),
        command=config.command,
        config=config.model_dump(mode="json", exclude={"command"}),
        system_prompt_version=PROMPT_VERSION,
        inputs=inputs,
        label_rejections=dict(sorted(rejections.items())),
        label_yield={source: dict(c) for source, c in sorted(yields.items())},
        skipped=dict(sorted(skipped.items())),
        splits={name: _counts(by_split[name]) for name in SPLITS},
        total=_counts(every),
        files=files,
        fast_response_words=length_histogram(texts),
        openers=openers,
        openers_by_personality=by_personality,
        repetitive_openers=repetitive,
        warnings=warnings,
    )
    write_jsonl_atomic([card.model_dump_json(indent=2)], config.out / "card.json")
    write_jsonl_atomic([render_card(card)], config.out / "README.md")
    _say(progress, f"wrote {config.out / 'card.json'} and {config.out / 'README.md'}")
    return card


# --- the card as Markdown -----------------------------------------------------------------


def _table(header: Sequence[str], rows: Iterable[Sequence[object]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return lines


def _pct(part: int, whole: int) -> str:
    return f"{part / whole:.1%}" if whole else "-"


def render_card(card: DatasetCard) -> str:
    """The dataset card as Markdown (DIR/README.md)."""
    total = card.total.rows
    out = ["# Fast-response training data", ""]
    out.append(f"Built {card.created} with system prompt version {card.system_prompt_version}.")
    if card.command:
        out += ["", "```", card.command, "```"]
    cfg = card.config
    out += [
        "",
        f"Dropout {cfg['dropout']} (seed {cfg['seed']}), validation fraction "
        f"{cfg['val_fraction']}, test fraction {cfg['test_fraction']} (by lesson), "
        f"opener threshold {cfg['opener_threshold']:.0%}.",
        "",
        "## Inputs",
        "",
    ]
    out += _table(
        ["labels file", "rows", "accepted", "rejected"],
        [(p, s["rows"], s["accepted"], s["rejected"]) for p, s in card.inputs.items()],
    )
    out += ["", "Labelling yield (accepted / labelled rows) by source:", ""]
    out += _table(
        ["source", "labelled rows", "accepted", "yield"],
        [
            (source, c["rows"], c["accepted"], _pct(c["accepted"], c["rows"]))
            for source, c in card.label_yield.items()
        ],
    )
    if card.label_rejections:
        out += ["", "Rejected labelled rows by reason: " + _inline(card.label_rejections) + "."]
    if card.skipped:
        out += ["", "Accepted rows left out: " + _inline(card.skipped) + "."]
    out += ["", "## Splits", ""]
    out += _table(
        ["split", "rows", "share", "lessons", "main response dropped", "no main response"],
        [
            (
                name,
                c.rows,
                _pct(c.rows, total),
                c.lessons,
                f"{c.main_response_dropped} ({_pct(c.main_response_dropped, c.rows)})",
                c.main_response_absent,
            )
            for name, c in [*card.splits.items(), ("all", card.total)]
        ],
    )
    for title, attr in (
        ("Personalities", "personalities"),
        ("Sources", "sources"),
        ("Labellers", "labelers"),
    ):
        keys = list(getattr(card.total, attr))
        out += ["", f"## {title}", ""]
        out += _table(
            [title.lower()[:-1] if title != "Personalities" else "personality", *SPLITS, "all"],
            [
                (
                    key,
                    *(getattr(card.splits[s], attr).get(key, 0) for s in SPLITS),
                    getattr(card.total, attr)[key],
                )
                for key in keys
            ],
        )
    out += ["", "## Fast-response length (words)", ""]
    biggest = max(card.fast_response_words.values(), default=0)
    out += _table(
        ["words", "rows", "share", ""],
        [
            (words, n, _pct(n, total), "#" * round(40 * n / biggest) if biggest else "")
            for words, n in card.fast_response_words.items()
        ],
    )
    out += ["", "## Top openers", ""]
    for kind in ("first_word", "first_two_words"):
        out += [f"{kind.replace('_', ' ').capitalize()}, all rows:", ""]
        out += _table(
            ["opener", "rows", "share"],
            [(f"`{o.text}`", o.rows, f"{o.share:.1%}") for o in card.openers[kind]],
        )
        out.append("")
    for name, stats in card.openers_by_personality.items():
        tops = ", ".join(f"`{o.text}` {o.share:.1%}" for o in stats["first_two_words"])
        out.append(f"- {name}: {tops}")
    out += ["", "## Warnings", ""]
    if card.repetitive_openers:
        out += ["**Repetitive openers**: repetitive fillers sound canned.", ""]
    out += [f"- {w}" for w in card.warnings] or ["None."]
    out += ["", "## Files", ""]
    out += _table(
        ["file", "rows", "sha256"],
        [(name, f["rows"], f"`{f['sha256']}`") for name, f in card.files.items()],
    )
    return "\n".join(out) + "\n"


def _inline(counts: dict[str, int]) -> str:
    return ", ".join(f"{key} {value}" for key, value in counts.items())
