"""`fastresp eval run`: answer triples with the service, score every answer, report.

One run folder holds everything, so a run can be re-reported, resumed or compared
later without the service or the judge:

==================  ===================================================================
file                what
==================  ===================================================================
responses.jsonl     the service's answers (`service.replay.ReplayRow`, one per
                    (triple, personality) pair; `fastresp eval metrics` reads it too)
judgements.jsonl    the judge's verdicts, appended one line at a time (resumable,
                    `adapters.judge.judge_items`); absent without a judge
rows.jsonl          one `adapters.eval_rows.ScoredRow` per pair: answer, automatic
                    checks and both verdicts
run.json            `adapters.eval_rows.RunInfo`: command, machine, target, judge,
                    calibration
summary.json,       `adapters.eval_report.write_report`: headline figures against the
report.md,          targets, automatic metrics, per-personality table, the 10 worst
report.html, plots/ responses, score, latency and uptake plots
==================  ===================================================================

Steps (`evaluate`):

1. **Answers.** Every triple is sent once per personality: to a live gateway
   (``--url``), to a gateway built in this process from the ``FASTRESP_*`` settings
   (``--in-process``: the same app, the same engine choice, no HTTP server), or read
   from a `fastresp replay --out` file (``--responses``). The answers in a
   ``responses.jsonl`` already in the run folder are reused, so a run killed while
   judging resumes without asking the service again; its failed pairs are asked again.
   A folder holding answers for other pairs, or from another target, is refused.
2. **Automatic checks** of every answer (`adapters.auto_metrics.check_rows`): the text
   rules and the no-judge signals (uptake, tone fit; the uptake model is loaded once
   and scores every answer in one batch).
3. **Judge** (when one is set): both judgements of every answered pair, fallback
   phrases included (they are what the child heard). A verdict is reused only for the
   very text it judged (`adapters.judge` keys verdicts by a hash of the judged input).
   A verdict the judge still fails after its retries is not stored; the row says so and
   a re-run asks again.
4. **Rows and report**, rewritten on every run.
"""

from __future__ import annotations

import asyncio
import os
import platform
import shutil
import socket
import subprocess
from collections.abc import Callable, Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from adapters.auto_metrics import check_rows, served_from_replay
from adapters.eval_rows import (
    JUDGE_ERROR,
    JUDGEMENT_KINDS,
    Calibration,
    JudgementKind,
    RowChecks,
    RunInfo,
    ScoredRow,
    Verdict,
    row_id,
)
from adapters.sources import Triple
from service.replay import ReplayRow

if TYPE_CHECKING:
    from adapters.eval_report import ReportSummary
    from adapters.judge import JudgeConfig, JudgeItem, JudgeRunSummary

RESPONSES_FILE = "responses.jsonl"
JUDGEMENTS_FILE = "judgements.jsonl"
ROWS_FILE = "rows.jsonl"
RUN_FILE = "run.json"

IN_PROCESS_URL = "http://in-process"
"""The base URL requests carry when the gateway runs in this process (never dialled)."""


class EvalRunError(RuntimeError):
    """The run cannot go on: the service or its personalities are unreachable. The
    message names the cause (`fastresp eval run` exits 1)."""


class EvalInputError(ValueError):
    """The run was asked for something it cannot do: an unusable responses file, a
    personality the service does not serve, a run folder holding other answers. The
    message starts with the option at fault (`fastresp eval run` exits 2)."""


@dataclass(frozen=True)
class Target:
    """What answers the triples: exactly one of `url`, `in_process`, `responses`."""

    url: str | None = None
    in_process: bool = False
    responses: Path | None = None

    def describe(self) -> str:
        if self.responses is not None:
            return f"responses file {self.responses}"
        if self.in_process:
            return "in-process gateway (FASTRESP_* settings)"
        return f"service {self.url}"


def machine_description() -> str:
    """This machine: hostname, CPU model and count, and its GPUs (``nvidia-smi -L``) or
    "no GPU" when there is no NVIDIA driver. Never raises."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpus = "no GPU"
    if shutil.which("nvidia-smi"):
        try:
            listed = subprocess.run(
                ["nvidia-smi", "-L"], capture_output=True, text=True, timeout=10, check=False
            ).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            listed = ""
        if listed:
            gpus = "GPU: " + "; ".join(listed.splitlines())
    return f"{socket.gethostname()}: {os.cpu_count()} x {cpu}, {gpus}"


def pairs(triples: Sequence[Triple], personalities: Sequence[str]) -> list[Triple]:
    """Each triple repeated once per personality, in the order `service.replay.replay`
    assigns personalities round robin, so triple i meets every personality once."""
    return [triple for triple in triples for _ in personalities]


async def answer_with_service(
    triples: Sequence[Triple],
    target: Target,
    personalities: Sequence[str] | None,
    *,
    concurrency: int,
    timeout_s: float,
    previous: Sequence[ReplayRow] = (),
    progress: Callable[[int, int], None] | None = None,
    settings: Any = None,
) -> list[ReplayRow]:
    """Every (triple, personality) answer from a live or in-process gateway.

    Answers in `previous` (an earlier run into the same folder) are kept when they
    succeeded; only the missing and the failed pairs are sent again.

    Args:
        triples: The triples; each is sent once per personality.
        target: `Target.url` or `Target.in_process`.
        personalities: Names to ask for; None: every one the gateway serves.
        concurrency, timeout_s: As `service.replay.replay`.
        previous: Earlier answers of the same folder.
        progress: ``progress(done, total)`` per answer sent.
        settings: `service.settings.Settings` for the in-process gateway (None: from
            the environment).

    Returns:
        One row per (triple, personality), triples in order, each triple's
        personalities in the order given (or served).

    Raises:
        EvalRunError: the personalities cannot be listed, or the gateway serves none.
        EvalInputError: a personality the gateway does not serve, or `previous` holds
            answers for other pairs than the ones asked for.
    """
    import httpx

    from service.replay import fetch_personalities, replay

    async with AsyncExitStack() as stack:
        transport: httpx.AsyncBaseTransport | None = None
        if target.in_process:
            from service.app import create_app
            from service.settings import Settings

            app = create_app(settings if settings is not None else Settings())
            await stack.enter_async_context(app.router.lifespan_context(app))
            transport = httpx.ASGITransport(app=app)
            base_url = IN_PROCESS_URL
            served_names = list(app.state.service.personalities)
        else:
            assert target.url is not None
            base_url = target.url.rstrip("/")
            try:
                served_names = await asyncio.to_thread(fetch_personalities, base_url, timeout_s)
            except (httpx.HTTPError, ValueError) as exc:
                raise EvalRunError(
                    f"cannot list personalities from {base_url}/personalities: "
                    f"{type(exc).__name__}: {exc} (is the service running?)"
                ) from exc
        names = list(dict.fromkeys(personalities)) if personalities else served_names
        if not names:
            raise EvalRunError(f"{target.describe()} serves no personalities")
        unknown = [name for name in names if name not in served_names]
        if unknown:
            raise EvalInputError(
                f"--personality: {', '.join(unknown)} not served by {target.describe()} "
                f"(it serves: {', '.join(served_names) or 'none'})"
            )
        wanted = [(triple, name) for triple in triples for name in names]
        earlier = {row_id(row.triple.id, row.personality): row for row in previous}
        asked = {row_id(triple.id, name) for triple, name in wanted}
        if earlier and set(earlier) != asked:
            raise EvalInputError(
                f"--out: the folder holds answers for {len(earlier)} other (triple, "
                f"personality) pairs than the {len(asked)} asked for now (another triples "
                "file, --limit or --personality); use a new --out folder"
            )
        todo = [
            (triple, name)
            for triple, name in wanted
            if (done := earlier.get(row_id(triple.id, name))) is None or not done.ok
        ]
        answered: dict[str, ReplayRow] = {}
        sent = 0
        for name in names:
            batch = [triple for triple, person in todo if person == name]
            if not batch:
                continue
            offset = sent

            def tick(done: int, total: int, offset: int = offset) -> None:
                if progress is not None:
                    progress(offset + done, len(todo))

            rows = await replay(
                batch,
                base_url,
                [name],
                concurrency=concurrency,
                timeout_s=timeout_s,
                progress=tick,
                transport=transport,
            )
            sent += len(batch)
            answered.update((row_id(row.triple.id, row.personality), row) for row in rows)
        return [
            answered.get(key) or earlier[key]
            for key in (row_id(triple.id, name) for triple, name in wanted)
        ]
    raise AssertionError("unreachable")  # pragma: no cover


def read_responses(path: Path, option: str = "--responses") -> list[ReplayRow]:
    """The rows of a `fastresp replay --out` file (or a run's ``responses.jsonl``).

    Raises:
        EvalInputError: unreadable, not replay rows (``path:line``), empty, or two rows
            for the same (triple, personality); the message starts with `option`.
    """
    from service.replay import ReplayFileError, read_replay_rows

    try:
        rows = read_replay_rows(path)
    except ReplayFileError as exc:
        raise EvalInputError(f"{option}: {exc}") from exc
    if not rows:
        raise EvalInputError(f"{option}: {path} holds no rows")
    seen: set[str] = set()
    for row in rows:
        key = row_id(row.triple.id, row.personality)
        if key in seen:
            raise EvalInputError(f"{option}: {path} answers the pair {key!r} twice")
        seen.add(key)
    return rows


def scored_rows(
    responses: Sequence[ReplayRow],
    verdicts: dict[tuple[str, JudgementKind], Verdict] | None,
) -> list[ScoredRow]:
    """One `ScoredRow` per response: its automatic checks and, when `verdicts` is not
    None (a judge was set), its two verdicts; an answered row the judge has no verdict
    for gets a score-less verdict whose error is `JUDGE_ERROR`.

    Pairs are unique (`read_responses`, `answer_with_service` check it).
    """
    answered = [row for row in responses if row.ok and row.fast_response is not None]
    checks = dict(
        zip(
            (id(row) for row in answered),
            check_rows([served_from_replay(row) for row in answered]),
            strict=True,
        )
    )
    out: list[ScoredRow] = []
    for row in responses:
        key = row_id(row.triple.id, row.personality)
        is_answered = id(row) in checks
        judged: dict[JudgementKind, Verdict | None] = {"intent": None, "bridging": None}
        if verdicts is not None and is_answered:
            for kind in JUDGEMENT_KINDS:
                judged[kind] = verdicts.get((key, kind)) or Verdict(kind=kind, error=JUDGE_ERROR)
        out.append(
            ScoredRow(
                id=key,
                triple=row.triple,
                personality=row.personality,
                session_id=row.session_id,
                fast_response=row.fast_response if is_answered else None,
                source=row.source if is_answered else None,
                adapter_version=row.adapter_version,
                latency_ms=row.latency_ms if is_answered else None,
                error=None if is_answered else (row.error or "no answer"),
                checks=checks.get(id(row), RowChecks()),
                intent=judged["intent"],
                bridging=judged["bridging"],
            )
        )
    return out


def judge_items_of(responses: Sequence[ReplayRow]) -> list[JudgeItem]:
    """What the judge is asked about: every answered response (fallbacks included:
    they are what the child heard), with the row id of its pair."""
    from adapters.judge import JudgeItem

    return [
        JudgeItem(
            id=row_id(row.triple.id, row.personality),
            personality=row.personality,
            pika_turn=row.triple.pika_turn,
            user_turn=row.triple.user_turn,
            main_response=row.triple.main_response,
            fast_response=row.fast_response,
        )
        for row in responses
        if row.ok and row.fast_response is not None
    ]


async def _make_folder(out_dir: Path) -> None:
    """Create the run folder once there is something to write (a run refused earlier
    leaves no empty folder behind).

    Raises:
        EvalInputError: it cannot be created.
    """
    try:
        await asyncio.to_thread(out_dir.mkdir, parents=True, exist_ok=True)
    except OSError as exc:
        raise EvalInputError(f"--out: cannot create {out_dir}: {exc}") from exc


def _check_same_target(out_dir: Path, target: Target) -> None:
    """Refuse a folder whose answers came from another target (its ``run.json``).

    Raises:
        EvalInputError: ``run.json`` names another target.
    """
    run_file = out_dir / RUN_FILE
    if not run_file.exists():
        return  # a run stopped before its end: nothing recorded to compare with
    try:
        earlier = RunInfo.model_validate_json(run_file.read_bytes()).target
    except (OSError, ValueError):
        return
    if earlier != target.describe():
        raise EvalInputError(
            f"--out: {out_dir} holds answers from {earlier}, not from {target.describe()}; "
            "use a new --out folder"
        )


@dataclass
class EvalResult:
    """What `evaluate` did: the rows, the report's figures and the judge's counts."""

    rows: list[ScoredRow]
    summary: ReportSummary
    judge: JudgeRunSummary | None


async def evaluate(
    triples: Sequence[Triple],
    target: Target,
    out_dir: Path,
    *,
    name: str | None = None,
    command: str = "",
    triples_description: str = "",
    personalities: Sequence[str] | None = None,
    concurrency: int = 4,
    timeout_s: float = 30.0,
    judge: JudgeConfig | None = None,
    calibration: Calibration | None = None,
    log: Callable[[str], None] = lambda message: None,
    progress: Callable[[str, int, int], None] | None = None,
    settings: Any = None,
) -> EvalResult:
    """Run the steps of the module docstring into `out_dir` (created if missing).

    Args:
        triples: Sent once per personality (unused with `Target.responses`).
        target: What answers.
        out_dir: The run folder.
        name: The run's label (default: the folder's name).
        command, triples_description: Recorded in ``run.json``.
        personalities: Names to ask for; None: every one the service serves.
        concurrency, timeout_s: Service requests in flight, per-request timeout (s).
        judge: The judge; None: automatic metrics only (the report says so).
        calibration: The judge's `fastresp eval calibrate` result, for the report.
        log: Receives one line per step.
        progress: ``progress(step, done, total)`` for ``answers`` and ``judge``.
        settings: Settings of the in-process gateway (None: from the environment).

    Raises:
        EvalRunError: see `answer_with_service` and `read_responses`.
        adapters.judge.JudgeUnavailable, adapters.judge.JudgePromptError: the judge
            (the answers and verdicts so far stay in `out_dir`).
        adapters.judge.JudgementsFileError: ``judgements.jsonl`` in `out_dir` came from
            another judge model or prompt (resuming would mix two judges).
    """
    from adapters.dataset import write_jsonl_atomic, write_text_atomic
    from adapters.eval_report import write_report
    from adapters.judge import (
        judge_info,
        judge_items,
        load_judge_prompts,
        read_judgements,
        used_structured_output,
    )

    given = read_responses(target.responses) if target.responses is not None else None
    if judge is not None:
        load_judge_prompts(judge)  # a bad prompt file fails before the service is asked
    run_name = name or (await asyncio.to_thread(out_dir.resolve)).name
    responses_path = out_dir / RESPONSES_FILE
    if (out_dir / RUN_FILE).exists() or (out_dir / RESPONSES_FILE).exists():
        _check_same_target(out_dir, target)
    if judge is None and (out_dir / JUDGEMENTS_FILE).exists():
        raise EvalInputError(
            f"--judge-url: {out_dir} was judged ({JUDGEMENTS_FILE}); re-run it with the same "
            "judge, or use a new --out folder for a run without one"
        )
    if given is not None:
        responses = given
        log(f"read {len(responses)} responses from {target.responses}")
        await _make_folder(out_dir)
        write_jsonl_atomic((row.model_dump_json() for row in responses), responses_path)
    else:
        previous: list[ReplayRow] = []
        if responses_path.exists():
            previous = read_responses(responses_path, "--out")
        names = list(dict.fromkeys(personalities or [])) or list(
            dict.fromkeys(row.personality for row in previous)
        )
        asked = {row_id(triple.id, name) for triple in triples for name in names}
        if (
            previous
            and all(row.ok for row in previous)
            and asked == {row_id(row.triple.id, row.personality) for row in previous}
        ):
            responses = previous
            log(
                f"reusing the {len(responses)} answers in {responses_path} "
                "(delete it to ask the service again)"
            )
        else:
            if previous:
                log(f"{responses_path} holds {len(previous)} answers; asking for the rest")
            log(f"asking {target.describe()} for {len(triples)} triple(s) x each personality")
            responses = await answer_with_service(
                triples,
                target,
                personalities,
                concurrency=concurrency,
                timeout_s=timeout_s,
                previous=previous,
                progress=(
                    (lambda done, total: progress("answers", done, total)) if progress else None
                ),
                settings=settings,
            )
            await _make_folder(out_dir)
            write_jsonl_atomic((row.model_dump_json() for row in responses), responses_path)
            log(f"wrote {len(responses)} responses to {responses_path}")

    judge_summary: JudgeRunSummary | None = None
    structured: bool | None = None
    verdicts: dict[tuple[str, JudgementKind], Verdict] | None = None
    if judge is not None:
        judgements_path = out_dir / JUDGEMENTS_FILE
        items = judge_items_of(responses)
        total = len(JUDGEMENT_KINDS) * len(items)
        done = 0

        def tick() -> None:
            nonlocal done
            done += 1
            if progress is not None:
                progress("judge", done, total)

        log(f"judging {len(items)} answers x {len(JUDGEMENT_KINDS)} judgements with {judge.model}")
        judge_summary = await judge_items(
            items, JUDGEMENT_KINDS, judgements_path, judge, progress=tick
        )
        log(
            f"judge: {judge_summary.judged} asked now ({judge_summary.scored} scored, "
            f"{judge_summary.rejected} rejected, {judge_summary.judge_errors} failed), "
            f"{judge_summary.skipped_done} judged before"
        )
        verdicts = dict(read_judgements(judgements_path, items))
        structured = used_structured_output(judgements_path)

    rows = scored_rows(responses, verdicts)
    write_jsonl_atomic((row.model_dump_json() for row in rows), out_dir / ROWS_FILE)
    info = RunInfo(
        name=run_name,
        created=datetime.now(UTC).isoformat(timespec="seconds"),
        command=command,
        machine=machine_description(),
        target=target.describe(),
        triples=triples_description or f"{len(responses)} (triple, personality) pairs",
        judge=judge_info(judge, structured) if judge is not None else None,
        calibration=calibration,
    )
    write_text_atomic(out_dir / RUN_FILE, info.model_dump_json(indent=2) + "\n")
    summary = write_report(rows, info, out_dir)
    return EvalResult(rows=rows, summary=summary, judge=judge_summary)
