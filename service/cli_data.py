"""`fastresp data ...`: sources to triples, labelling, training-set build (issue 4).

Heavy or optional imports (openai, the profanity list) happen inside the commands.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(
    rich_markup_mode=None,
    help="Training data: real conversations to triples, fast-response labels and "
    "per-personality train/validation/test splits.",
    no_args_is_help=True,
)


# --- fastresp data label (teacher and tutor-openers labellers) ----------------------


def _looks_like_labelled_rows(path: Path) -> bool:
    """True when the first JSON line of `path` is a labelled row, not a triple: the
    triple reader ignores unknown keys, so labels would otherwise be labelled again."""
    import json

    try:
        with path.open(encoding="utf-8") as lines:
            for line in lines:
                if line.strip():
                    first = json.loads(line)
                    return isinstance(first, dict) and {"labeler", "triple_id"} <= first.keys()
    except (OSError, UnicodeDecodeError, ValueError, RecursionError):
        return False  # the reader reports what is wrong with the file
    return False


def _label_fail(message: str) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code=2)


@app.command()
def label(
    labeler: Annotated[
        str,
        typer.Option(
            help="Who proposes the fast responses: 'teacher' (an LLM behind any "
            "OpenAI-compatible API) or 'tutor-openers' (the short acknowledgement real "
            "tutors open their reply with; no LLM)."
        ),
    ],
    triples: Annotated[
        Path, typer.Option(help="Triples JSON Lines file (from `fastresp data triples`).")
    ],
    out: Annotated[
        Path,
        typer.Option(
            help="Labelled rows, JSON Lines. Appended to: rows already there are skipped, "
            "so re-running the same command resumes an interrupted run."
        ),
    ],
    personality: Annotated[
        list[str] | None,
        typer.Option(
            help="Personality to label for; repeat for several. Default: every personality "
            "in the manifest for teacher, 'calm' for tutor-openers (one only)."
        ),
    ] = None,
    personalities_file: Annotated[
        Path | None,
        typer.Option(help="Personality manifest. Default: adapters/personalities.yaml."),
    ] = None,
    limit: Annotated[int, typer.Option(min=0, help="Label only the first N triples; 0: all.")] = 0,
    base_url: Annotated[
        str | None,
        typer.Option(
            envvar="FASTRESP_TEACHER_BASE_URL",
            help="teacher: OpenAI-compatible API root, e.g. http://127.0.0.1:8100/v1 "
            "(vLLM) or https://api.openai.com/v1.",
        ),
    ] = None,
    model: Annotated[
        str | None,
        typer.Option(
            envvar="FASTRESP_TEACHER_MODEL",
            help="teacher: model name as the server knows it (vLLM: --served-model-name).",
        ),
    ] = None,
    api_key: Annotated[
        str | None,
        typer.Option(
            help="teacher: API key. Default: $FASTRESP_TEACHER_API_KEY, then "
            "$OPENAI_API_KEY, then none (a local vLLM server needs none).",
            show_default=False,
        ),
    ] = None,
    k: Annotated[
        int, typer.Option(min=1, max=16, help="teacher: candidates asked for per row.")
    ] = 4,
    concurrency: Annotated[
        int, typer.Option(min=1, max=256, help="teacher: requests in flight at once.")
    ] = 4,
    temperature: Annotated[
        float, typer.Option(min=0.0, max=2.0, help="teacher: sampling temperature.")
    ] = 0.9,
    max_tokens: Annotated[
        int, typer.Option(min=1, max=8192, help="teacher: longest reply, in tokens.")
    ] = 256,
    timeout: Annotated[
        float, typer.Option(min=0.001, help="teacher: limit per HTTP request, in seconds.")
    ] = 60.0,
    max_retries: Annotated[
        int,
        typer.Option(
            min=0,
            max=50,
            help="teacher: retries on 429, 5xx, timeouts and connection errors "
            "(exponential backoff with jitter).",
        ),
    ] = 5,
    structured_output: Annotated[
        str,
        typer.Option(
            help="teacher: response_format with a JSON schema: 'auto' (try it, drop it "
            "for the run if the server refuses it with 400), 'on' or 'off'."
        ),
    ] = "auto",
    prompt_file: Annotated[
        Path | None,
        typer.Option(
            help="teacher: prompt file. Default: adapters/prompts/teacher-v1.yaml, the "
            "standard prompt; its version goes into every row."
        ),
    ] = None,
    max_words: Annotated[
        int | None, typer.Option(min=1, help="Filter: most words in a fast response (12).")
    ] = None,
    max_chars: Annotated[
        int | None,
        typer.Option(min=1, help="Filter: most characters in a fast response (70)."),
    ] = None,
    no_signal_filters: Annotated[
        bool,
        typer.Option(
            "--no-signal-filters",
            help="Turn the signal filters off: low_uptake (the uptake model's score is "
            "below LOW_UPTAKE: the reply does not build on what the child said; teacher "
            "only) and tone_mismatch (an exuberant reply to a sad child, a gloomy one to "
            "a happy child). They are on by default and run after the text filters; for "
            "teacher the uptake model (the 'signals' extra) also ranks the passing "
            "candidates. tutor-openers gets tone_mismatch only: its labels are short "
            "acknowledgements ('Close!', 'Good try!') that take up nothing by design. "
            "Off, the text filters alone decide and no model is loaded.",
        ),
    ] = False,
) -> None:
    """Label triples with fast responses: one row per (triple, personality).

    Each row holds the best candidate that passed every filter, the other passing ones,
    and the rejected ones with the filters they failed (see adapters/labels.py). The
    text filters run first (no_contradiction is the praise-before-correction filter:
    "Great job!" before a correction), then the signal filters low_uptake (teacher) and
    tone_mismatch (off with --no-signal-filters); the teacher's best candidate is the
    passing one with the highest uptake score.
    The output is append-only JSON Lines, flushed per row: re-running the same command
    skips the rows already there, so a killed run resumes where it stopped.

    teacher: pairs the teacher failed on after retries are not written (a re-run
    retries them) and are counted as teacher_error.

    Exit code: 0 done; 1 some pairs failed at the teacher, or the teacher refused the
    key or model; 2 bad arguments (nothing is written then).
    """
    import asyncio
    import dataclasses
    from collections import Counter

    from pydantic import ValidationError
    from rich.console import Console
    from rich.table import Table

    from adapters.labels import LABELERS, LabelSummary, SignalFilters, SignalsUnavailable
    from adapters.sources import Triple, read_triples_jsonl
    from adapters.teacher import (
        DEFAULT_PROMPT_FILE,
        PromptFileError,
        TeacherConfig,
        TeacherUnavailable,
        label_with_teacher,
        load_prompt,
    )
    from service.cli_common import progress_bar
    from service.personalities import ManifestError, load_personalities
    from service.settings import default_personalities_file
    from service.text_checks import FilterLimits

    if labeler not in LABELERS:
        _label_fail(f"--labeler: unknown labeler {labeler!r}; choose one of {', '.join(LABELERS)}")
    if structured_output not in ("auto", "on", "off"):
        _label_fail(f"--structured-output: {structured_output!r}; choose auto, on or off")
    if not triples.is_file():
        _label_fail(f"--triples: no such file: {triples}")
    if out.exists() and not out.is_file():
        _label_fail(f"--out: not a file: {out}")
    if not out.resolve().parent.is_dir():
        _label_fail(f"--out: no such directory: {out.resolve().parent}")

    manifest_path = personalities_file or default_personalities_file()
    try:
        manifest = load_personalities(manifest_path)
    except ManifestError as exc:
        _label_fail(f"--personalities-file: {exc}")
    default_names = list(manifest) if labeler == "teacher" else ["calm"]
    names = list(dict.fromkeys(personality or default_names))
    unknown = [name for name in names if name not in manifest]
    if unknown:
        _label_fail(
            f"--personality: unknown personality {', '.join(map(repr, unknown))} in "
            f"{manifest_path}; known: {', '.join(manifest)}"
        )
    if labeler == "tutor-openers" and len(names) != 1:
        _label_fail("--personality: tutor-openers labels for one personality at a time")

    limits = FilterLimits()
    if max_words is not None:
        limits = dataclasses.replace(limits, max_words=max_words)
    if max_chars is not None:
        limits = dataclasses.replace(limits, max_chars=max_chars)

    teacher_config: TeacherConfig | None = None
    prompt_version: str | None = None
    if labeler == "teacher":
        if not base_url:
            _label_fail(
                "--base-url is required with --labeler teacher (or FASTRESP_TEACHER_BASE_URL)"
            )
        if not model:
            _label_fail("--model is required with --labeler teacher (or FASTRESP_TEACHER_MODEL)")
        try:
            prompt_version = load_prompt(prompt_file or DEFAULT_PROMPT_FILE).version
        except PromptFileError as exc:
            _label_fail(f"--prompt-file: {exc}")
        try:
            teacher_config = TeacherConfig(
                base_url=base_url,
                model=model,
                api_key=api_key,
                k=k,
                concurrency=concurrency,
                temperature=temperature,
                max_tokens=max_tokens,
                timeout_s=timeout,
                max_retries=max_retries,
                structured_output=structured_output,
                prompt_file=prompt_file or DEFAULT_PROMPT_FILE,
            )
        except ValidationError as exc:
            options = {"timeout_s": "timeout"}
            problems = "; ".join(
                "--"
                + "-".join(options.get(str(p), str(p)).replace("_", "-") for p in err["loc"])
                + f": {err['msg']}"
                for err in exc.errors()
            )
            _label_fail(problems)

    # An --out with rows of another labeller or prompt version would be "resumed" with
    # the wrong rows (ids are per triple and personality), so it is refused; so is a
    # file that is not labelled rows at all (a triples file, say), which would get rows
    # appended to it. Only a torn last line (no newline: a killed run) may be invalid.
    problem = _out_file_problem(out, labeler, prompt_version)
    if problem is not None:
        _label_fail(f"--out: {problem}")
    existed = out.exists()
    try:
        out.open("a", encoding="utf-8").close()
    except OSError as exc:
        _label_fail(f"--out: cannot write {out}: {exc.strerror or exc}")
    if not existed:
        out.unlink()  # the probe wrote nothing; leave no empty file behind on an error

    if _looks_like_labelled_rows(triples):
        _label_fail(
            f"--triples: {triples} holds labelled rows (from `fastresp data label`), not "
            "triples; give the output of `fastresp data triples`"
        )
    skipped: Counter[str] = Counter()
    try:
        stream = read_triples_jsonl(triples, skipped)
        rows_in: list[Triple] = []
        for triple in stream:
            rows_in.append(triple)
            if limit and len(rows_in) >= limit:
                break
        stream.close()
    except (OSError, UnicodeDecodeError) as exc:
        _label_fail(f"--triples: cannot read {triples}: {exc}")
    skips = ", ".join(f"{reason} {n}" for reason, n in sorted(skipped.items())) or "none"
    console = Console()
    console.print(f"{len(rows_in)} triple(s) from {triples}; skipped lines: {skips}")
    if not rows_in:
        _label_fail(f"--triples: no usable triples in {triples}")

    signals: SignalFilters | None = None
    if no_signal_filters:
        console.print("signal filters: off (--no-signal-filters)")
    else:
        try:
            # tutor-openers: acknowledgements take up nothing by design ("Close!" scores
            # about 0.33), so low_uptake would reject nearly all of them (adapters/labels.py)
            signals = SignalFilters.load(uptake=labeler == "teacher")
        except SignalsUnavailable as exc:
            _label_fail(str(exc))
            raise  # unreachable; keeps type checkers happy
        console.print(
            f"signal filters: low_uptake (uptake < {signals.low_uptake:g}), tone_mismatch"
            if signals.scorer is not None
            else "signal filters: tone_mismatch (low_uptake is for the teacher labeller)"
        )

    failure: str | None = None
    with progress_bar(f"label ({labeler})") as update:
        total = len(rows_in) * len(names)
        done = 0

        def tick() -> None:
            nonlocal done
            done += 1
            update(f"label ({labeler})", done, total)

        summary: LabelSummary
        if teacher_config is not None:
            try:
                summary = asyncio.run(
                    label_with_teacher(
                        rows_in,
                        [manifest[name] for name in names],
                        out,
                        teacher_config,
                        limits=limits,
                        signals=signals,
                        progress=tick,
                    )
                )
            except TeacherUnavailable as exc:
                failure = str(exc)
        else:
            from adapters.tutor_openers import label_with_tutor_openers

            summary = label_with_tutor_openers(
                rows_in, out, personality=names[0], limits=limits, signals=signals, progress=tick
            )
    if failure is not None:
        typer.secho(
            f"error: {failure}\nrows written so far stay in {out}; fix the option and re-run "
            "to resume",
            fg=typer.colors.RED,
            err=True,
        )
        raise typer.Exit(code=1)
    totals = Table(title=f"labelled rows -> {out}", show_header=False)
    totals.add_column("what")
    totals.add_column("value", justify="right")
    for what, value in (
        ("rows written", summary.rows),
        ("accepted", summary.accepted),
        ("rejected", summary.rejected),
        ("acceptance rate", f"{summary.acceptance_rate:.1%}"),
        ("skipped (already done)", summary.skipped_done),
        ("candidates", summary.candidates),
        ("candidates passed", summary.candidates_passed),
        ("prompt tokens", summary.prompt_tokens),
        ("completion tokens", summary.completion_tokens),
    ):
        totals.add_row(what, str(value))
    console.print(totals)
    if summary.rejections:
        reasons = Table(title="rejections by reason (row reasons and candidate filters)")
        reasons.add_column("reason")
        reasons.add_column("count", justify="right")
        for reason, count in sorted(summary.rejections.items(), key=lambda kv: (-kv[1], kv[0])):
            reasons.add_row(reason, str(count))
        console.print(reasons)
    failed = summary.rejections.get("teacher_error", 0)
    if failed:
        console.print(
            f"{failed} pair(s) failed at the teacher after retries and were not written; "
            "re-run the same command to retry them."
        )
    if summary.rejections.get("teacher_error"):
        raise typer.Exit(code=1)


def _out_file_problem(out: Path, labeler: str, prompt_version: str | None) -> str | None:
    """Why `out` cannot be resumed by this labeller, or None when it can (or is new)."""
    from pydantic import ValidationError

    from adapters.labels import LabeledRow

    if not out.exists():
        return None
    try:
        with out.open(encoding="utf-8") as lines:
            for number, line in enumerate(lines, start=1):
                if not line.strip():
                    continue
                try:
                    row = LabeledRow.model_validate_json(line)
                except ValidationError:
                    if not line.endswith("\n"):
                        continue  # a torn last line of a killed run: cut on resume
                    return (
                        f"{out} is not a file of labelled rows (line {number} is not one); "
                        "write the labels to another file"
                    )
                if row.labeler != labeler or (
                    prompt_version is not None and row.prompt_version != prompt_version
                ):
                    return (
                        f"{out} already holds rows labelled by {row.labeler} "
                        f"({row.prompt_version}); write {labeler} rows to another file"
                    )
    except UnicodeDecodeError as exc:
        return f"{out} is not UTF-8 text ({exc.reason} at byte {exc.start})"
    except OSError as exc:
        return f"cannot read {out}: {exc.strerror or exc}"
    return None


def _data_fail(message: str, code: int = 2) -> None:
    """Print ``error: message`` to stderr and exit (2: bad arguments, 1: no result)."""
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code=code)


def _progress(message: str) -> None:
    typer.echo(message, err=True)


@app.command()
def triples(
    source: Annotated[
        list[str],
        typer.Option(
            metavar="KIND",
            help="Source kind: bridge, uptake, export (the product's conversation export), "
            "jsonl (triples) or request-log (the gateway's redacted request log, "
            "FASTRESP_REQUEST_LOG_DIR: a log file or the whole folder; ratings are joined "
            "in, so each triple also carries fast_response, served_from, personality, "
            "adapter_version, latency_ms, rating and rating_comment). Repeat it, each "
            "followed by its PATH: --source bridge train.json --source request-log logs/.",
        ),
    ],
    paths: Annotated[
        list[Path],
        typer.Argument(
            metavar="PATH...",
            help="One source file per --source, in order (request-log: a file or a folder).",
        ),
    ],
    out: Annotated[Path, typer.Option(help="Triples JSON Lines file to write (atomically).")],
) -> None:
    """Read conversation sources into one triples file.

    Triples are `{id, source, lesson_id, pika_turn, user_turn, main_response}`; ids are
    stable and unique across the run (a repeated id is skipped as duplicate_id). Bad
    source rows are skipped and counted by reason. Exit code: 0 when triples were
    written, 1 when no source gave any (nothing written), 2 for bad arguments.

    Rated request-log rows are evaluation data: filter the output on `rating` (e.g.
    `jq -c 'select(.rating != null)'`); the other readers ignore the extra fields.
    """
    from collections import Counter
    from typing import cast

    from adapters.dataset import collect_triples, write_triples
    from adapters.sources import SOURCE_KINDS, SourceFormatError, SourceKind

    if len(source) != len(paths):
        _data_fail(
            f"--source: {len(source)} source kind(s) but {len(paths)} PATH(s); "
            "give each --source KIND its PATH: --source bridge train.json"
        )
    for kind in source:
        if kind not in SOURCE_KINDS:
            _data_fail(
                f"--source: unknown source {kind!r}; choose one of {', '.join(SOURCE_KINDS)}"
            )
    for kind, path in zip(source, paths, strict=True):
        if kind == "request-log" and path.is_dir():
            continue  # a log folder: every requests-*.jsonl in it
        if not path.is_file():
            _data_fail(f"--source {kind}: no such file: {path}")
    if out.is_dir():
        _data_fail(f"--out: is a directory: {out}")
    if not out.resolve().parent.is_dir():
        _data_fail(f"--out: no such directory: {out.resolve().parent}")

    inputs = [(cast("SourceKind", kind), path) for kind, path in zip(source, paths, strict=True)]
    try:
        collected, reports = collect_triples(inputs, progress=_progress)
    except (SourceFormatError, UnicodeDecodeError) as exc:
        _data_fail(f"--source: not a usable source file: {exc}")
    total_skipped: Counter[str] = Counter()
    for report in reports:
        total_skipped.update(report.skipped)
        skips = ", ".join(f"{r} {n}" for r, n in sorted(report.skipped.items())) or "none"
        typer.echo(f"{report.kind:<11} {report.path}: {report.triples} triple(s); skipped: {skips}")
    if not collected:
        _data_fail("--source: no usable triples in any source; nothing written", code=1)
    try:
        written = write_triples(collected, out)
    except OSError as exc:
        _data_fail(f"--out: cannot write {out}: {exc.strerror or exc}")
        raise  # unreachable; keeps type checkers happy
    skips = ", ".join(f"{r} {n}" for r, n in sorted(total_skipped.items())) or "none"
    typer.echo(f"total: {written} triple(s) written to {out}; skipped: {skips}")


@app.command()
def build(
    labels: Annotated[
        list[Path],
        typer.Option(help="Labelled JSON Lines file (fastresp data label); repeatable."),
    ],
    out: Annotated[
        Path,
        typer.Option(help="Output folder: train/validation/test.jsonl, README.md and card.json."),
    ],
    dropout: Annotated[
        float, typer.Option(help="Share of rows whose main response is set to null (0-1).")
    ] = 0.2,
    seed: Annotated[int, typer.Option(help="Seed of the main-response dropout.")] = 0,
    val_fraction: Annotated[
        float, typer.Option(help="Expected share of lessons in the validation split.")
    ] = 0.1,
    test_fraction: Annotated[
        float, typer.Option(help="Expected share of lessons in the test split.")
    ] = 0.1,
    personalities_file: Annotated[
        Path | None,
        typer.Option(help="Personality manifest (default: adapters/personalities.yaml)."),
    ] = None,
    opener_threshold: Annotated[
        float, typer.Option(help="Flag an opener that starts more than this share of rows.")
    ] = 0.15,
) -> None:
    """Build the training set: seed-format rows split by lesson, with a dataset card.

    Only accepted rows are used, deduplicated; the split of each lesson is fixed by a
    hash of its id, so no lesson is in two splits; the main response is dropped from
    about --dropout of the rows (reproducible with --seed). Exit code: 0 on success,
    1 when no accepted row is left (nothing written), 2 for bad arguments.
    """
    import shlex
    import sys

    from pydantic import ValidationError

    from adapters.dataset import BuildConfig, DatasetError, build_dataset
    from service.personalities import ManifestError

    for path in labels:
        if not path.is_file():
            _data_fail(f"--labels: no such file: {path}")
    if out.exists() and not out.is_dir():
        _data_fail(f"--out: not a directory: {out}")
    values: dict[str, object] = {
        "labels": labels,
        "out": out,
        "dropout": dropout,
        "seed": seed,
        "val_fraction": val_fraction,
        "test_fraction": test_fraction,
        "opener_threshold": opener_threshold,
        "command": shlex.join(["fastresp", *sys.argv[1:]]),
    }
    if personalities_file is not None:
        if not personalities_file.is_file():
            _data_fail(f"--personalities-file: no such file: {personalities_file}")
        values["personalities_file"] = personalities_file
    try:
        config = BuildConfig.model_validate(values)
    except ValidationError as exc:
        problems = "; ".join(
            f"--{str(err['loc'][0]).replace('_', '-')}: {err['msg']}"
            if err["loc"]
            else f"--val-fraction/--test-fraction: {err['msg']}"
            for err in exc.errors()
        )
        _data_fail(problems)
        raise  # unreachable; keeps type checkers happy
    try:
        card = build_dataset(config, progress=_progress)
    except ManifestError as exc:
        _data_fail(f"--personalities-file: {exc}")
        raise
    except DatasetError as exc:
        _data_fail(f"--labels: {exc}", code=1)
        raise
    except UnicodeDecodeError as exc:
        _data_fail(f"--labels: a labels file is not UTF-8 text: {exc}")
        raise
    except OSError as exc:
        _data_fail(f"--out: cannot write the dataset to {out}: {exc.strerror or exc}")
        raise
    splits = ", ".join(f"{name} {counts.rows}" for name, counts in card.splits.items())
    typer.echo(f"rows: {card.total.rows} ({splits}); dataset card: {out / 'README.md'}")
    for warning in card.warnings:
        typer.secho(f"warning: {warning}", fg=typer.colors.YELLOW)
