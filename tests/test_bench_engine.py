"""`fastresp bench` (service.bench_engine, service.cli_bench).

The unit tests check the matrix, the option parsing and the ratio arithmetic on
hand-made latencies. The engine test runs the real command in a subprocess on the tiny
model with a short matrix (two engine starts, about a minute on two cores) and checks the
table it prints and the JSON it writes: one row per configuration, the columns in order,
TTFT only for streamed rows, vLLM's prefix-cache counters moving only with prefix caching,
and ratio 1.00 for exactly the fastest row.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from service.bench_engine import TABLE_COLUMNS, BenchConfig, BenchReport, ConfigResult, matrix
from service.cli_bench import parse_counts, parse_switches
from tests.conftest import REPO_ROOT, TEST_DATA


def test_matrix_is_every_combination_with_prefix_caching_outermost() -> None:
    configs = matrix(
        prefix_caching=[True, False], streaming=[True, False], concurrency=[1, 8], lora=[False]
    )
    assert len(configs) == 8
    assert len(set(configs)) == 8
    assert [c.prefix_caching for c in configs] == [True] * 4 + [False] * 4
    assert configs[0] == BenchConfig(True, True, 1, False)


@pytest.mark.parametrize(
    ("axis", "values"), [("concurrency", []), ("concurrency", [0]), ("lora", [])]
)
def test_matrix_refuses_bad_axes_naming_them(axis: str, values: list[object]) -> None:
    axes: dict[str, list[object]] = {
        "prefix_caching": [True],
        "streaming": [True],
        "concurrency": [1],
        "lora": [False],
    }
    axes[axis] = values
    with pytest.raises(ValueError, match=axis):
        matrix(**axes)  # type: ignore[arg-type]


def test_option_parsing() -> None:
    assert parse_switches("--lora", "on,off") == [True, False]
    assert parse_switches("--lora", " OFF ") == [False]
    assert parse_counts("--concurrency", "1, 8,32,8") == [1, 8, 32]
    for bad in ("", "yes", "on,maybe"):
        with pytest.raises(ValueError, match="--lora"):
            parse_switches("--lora", bad)
    for bad in ("", "0", "1,x", "-1"):
        with pytest.raises(ValueError, match="--concurrency"):
            parse_counts("--concurrency", bad)


def test_fastresp_bench_is_registered_and_refuses_bad_options() -> None:
    from typer.testing import CliRunner

    from service.cli import app

    runner = CliRunner()
    shown = runner.invoke(app, ["bench", "--help"])
    assert shown.exit_code == 0, shown.output
    assert "--concurrency" in shown.output and "--prefix-caching" in shown.output
    for option, value in (("--concurrency", "0,8"), ("--streaming", "maybe")):
        refused = runner.invoke(app, ["bench", option, value])
        assert refused.exit_code == 2
        assert f"error: {option}" in refused.output


def test_ratio_is_end_to_end_p95_over_the_fastest() -> None:
    """Hand-made latencies: P95 (inclusive method) of [0.1, 0.2] is 0.195 s, of [0.3, 0.4]
    0.395 s, so the ratios are 1 and 0.395 / 0.195."""
    fast = ConfigResult(BenchConfig(True, True, 1, False), [0.05, 0.05], [0.1, 0.2], 4, 0.3)
    slow = ConfigResult(BenchConfig(False, False, 1, False), [], [0.3, 0.4], 4, 0.7)
    report = BenchReport("cmd", "m", "cpu", "p", 2, [slow, fast])
    rows = report.rows()
    assert rows[1]["ratio_to_fastest"] == 1.0
    assert rows[0]["ratio_to_fastest"] == pytest.approx(0.395 / 0.195)
    assert rows[0]["ttft"] == {"p50_ms": None, "p95_ms": None, "p99_ms": None}
    assert rows[1]["output_tokens_per_s"] == pytest.approx(4 / 0.3)
    table = report.markdown_table().splitlines()
    assert table[0] == "| " + " | ".join(TABLE_COLUMNS) + " |"
    assert table[3].endswith("| 1.00 (fastest) |")
    assert table[2].endswith(f"| {0.395 / 0.195:.2f} |")


def _parse_table(text: str) -> list[dict[str, str]]:
    lines = [line for line in text.splitlines() if line.startswith("|")]
    header = [cell.strip() for cell in lines[0].strip("|").split("|")]
    assert header == list(TABLE_COLUMNS)
    assert set(lines[1].replace("|", "")) == {"-"}
    rows = []
    for line in lines[2:]:
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        assert len(cells) == len(header), line
        rows.append(dict(zip(header, cells, strict=True)))
    return rows


@pytest.mark.engine
def test_bench_runs_on_the_tiny_model(tiny_model_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "FASTRESP_PERSONALITIES_FILE": str(TEST_DATA / "personalities.yaml"),
        "FASTRESP_CPU_KV_CACHE_GIB": "0.25",
        "FASTRESP_ENFORCE_EAGER": "true",
        "FASTRESP_ADAPTER_STORE": str(TEST_DATA / "no-published-adapters"),
    }
    max_tokens, requests = 3, 2
    args = ["--model", str(tiny_model_dir), "--concurrency", "2", "--requests", str(requests)]
    args += ["--max-tokens", str(max_tokens), "--prefix-caching", "on,off"]
    args += ["--streaming", "on,off", "--lora", "off,on", "--lora-rank", "8", "--json", str(out)]
    done = subprocess.run(
        [sys.executable, "-m", "service.cli_bench", *args],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Command: `fastresp bench --model" in done.stdout
    rows = _parse_table(done.stdout)
    combos = {(r["prefix caching"], r["streaming"], r["concurrency"], r["LoRA"]) for r in rows}
    assert len(rows) == 8
    assert combos == {
        (p, s, "2", lo) for p in ("on", "off") for s in ("on", "off") for lo in ("on", "off")
    }
    for row in rows:
        assert row["requests"] == str(requests)
        streamed = row["streaming"] == "on"
        assert (row["TTFT P95 ms"] != "-") == streamed, row
        assert float(row["e2e P50 ms"]) <= float(row["e2e P95 ms"]) <= float(row["e2e P99 ms"])
        assert float(row["output tok/s"]) > 0
        if row["prefix caching"] == "on":  # vLLM's counters moved: the shared prefix hit
            assert float(row["prefix-cache hit %"]) > 0, row
        else:
            assert row["prefix-cache hit %"] == "-", row
        assert float(row["e2e P95 / fastest"].removesuffix(" (fastest)")) >= 1.0
    report = json.loads(out.read_text())
    assert report["date"] and report["machine"] and report["command"].startswith("fastresp bench")
    data = report["rows"]
    assert [r["label"] for r in data] == [
        f"prefix={r['prefix caching']} stream={r['streaming']} c=2 lora={r['LoRA']}" for r in rows
    ]
    for row in data:  # every request decoded exactly max_tokens tokens (EOS ignored)
        assert row["output_tokens"] == requests * max_tokens
    fastest = min(range(len(data)), key=lambda i: data[i]["e2e"]["p95_ms"])
    assert [i for i, r in enumerate(data) if r["ratio_to_fastest"] == 1.0] == [fastest]
    marked = [i for i, r in enumerate(rows) if r["e2e P95 / fastest"] == "1.00 (fastest)"]
    assert marked == [fastest]
