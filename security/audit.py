"""`make audit`: pip-audit over the installed dev venv, with its result written down.

Runs `pip-audit --skip-editable -f json` against the environment of the Python that runs
this script (the project itself, installed editable, is skipped), asks the PyPI
vulnerability service first and OSV second when PyPI answered for no package, and writes

- `security/pip-audit.json`: pip-audit's own JSON (dependencies, vulns, skip reasons);
- `security/pip-audit.txt`: the date, the command, how many packages were audited, every
  finding (package, version, advisory id and aliases, fixed versions) and every package
  that could not be audited.

Findings never fail the build (issue 8: the audit "doesn't have to be clean"; each finding
is listed in the README's Security section). When the audit could not run at all (no
network, no vulnerability service reachable, pip-audit missing or crashing) it says so
in a banner on stderr and in the text file, and exits 0, so a flaky network cannot fail
`make test`; `--strict` (`make audit AUDIT_STRICT=1`) makes that case exit 2 instead.

Exit status: 0 audited (with or without findings) or not run without --strict; 2 not
run with --strict.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
SERVICES = ("pypi", "osv")


def run_pip_audit(
    service: str, json_out: Path, timeout_s: float
) -> tuple[dict[str, Any] | None, str]:
    """Run pip-audit with `service`; return (its JSON or None, why it gave none)."""
    command = [
        sys.executable,
        "-m",
        "pip_audit",
        "--skip-editable",
        "--format",
        "json",
        "--vulnerability-service",
        service,
        "--progress-spinner",
        "off",
        "--timeout",
        "20",
        "--output",
        str(json_out),
    ]
    json_out.unlink(missing_ok=True)
    print(f"pip-audit: auditing the installed packages against {service} ...", flush=True)
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return None, f"pip-audit ({service}) ran past {timeout_s:.0f} s"
    # pip-audit exits 1 both for "vulnerabilities found" and for errors: its JSON file
    # tells them apart.
    if not json_out.is_file():
        lines = [line for line in done.stderr.strip().splitlines() if line.strip()]
        last = lines[-1] if lines else f"exit status {done.returncode}, no output"
        return None, f"pip-audit ({service}) failed: {last}"
    return json.loads(json_out.read_text()), ""


def audited(report: dict[str, Any]) -> list[dict[str, Any]]:
    return [d for d in report["dependencies"] if "skip_reason" not in d]


def summarize(
    report: dict[str, Any] | None, service: str, problems: list[str], started: str
) -> tuple[str, bool]:
    """The text report and whether the audit ran (answered for at least one package)."""
    head = [
        "pip-audit of the installed dev venv (`make audit`, security/audit.py)",
        f"date: {started}",
        f"machine: {platform.node()} ({platform.system()} {platform.machine()}), "
        f"Python {platform.python_version()}",
        f"command: {sys.executable} -m pip_audit --skip-editable --format json "
        f"--vulnerability-service {service}",
    ]
    ran = report is not None and bool(audited(report))
    if not ran:
        reasons = problems or ["no vulnerability service answered"]
        body = ["", "RESULT: THE AUDIT DID NOT RUN; nothing was checked.", *reasons]
        return "\n".join(head + body) + "\n", False
    assert report is not None
    deps = report["dependencies"]
    checked = audited(report)
    found = [(d, v) for d in checked for v in d.get("vulns", [])]
    skipped = [d for d in deps if "skip_reason" in d and d["skip_reason"] != EDITABLE]
    lines = [
        "",
        f"packages: {len(deps)} installed, {len(checked)} audited, {len(skipped)} not "
        f"audited, {sum(1 for d in deps if d.get('skip_reason') == EDITABLE)} editable (skipped)",
        f"RESULT: {len(found)} known vulnerabilities in "
        f"{len({d['name'] for d, _ in found})} packages",
    ]
    if problems:
        lines.append("(earlier tries: " + "; ".join(problems) + ")")
    if found:
        lines += ["", "package | version | id (aliases) | fixed in"]
        for dep, vuln in sorted(found, key=lambda f: (f[0]["name"], f[1]["id"])):
            aliases = ", ".join(vuln.get("aliases") or [])
            fixed = ", ".join(vuln.get("fix_versions") or []) or "no fix yet"
            ident = f"{vuln['id']} ({aliases})" if aliases else vuln["id"]
            lines.append(f"{dep['name']} | {dep['version']} | {ident} | {fixed}")
    if skipped:
        lines += ["", "not audited:"]
        lines += [f"  {d['name']}: {d['skip_reason']}" for d in skipped]
    return "\n".join(head + lines) + "\n", True


EDITABLE = "distribution marked as editable"


def main() -> int:
    parser = argparse.ArgumentParser(
        description="Audit the installed packages of this Python environment with pip-audit "
        "(PyPI's vulnerability service, then OSV) and write security/pip-audit.json and "
        "security/pip-audit.txt. Findings never fail; an audit that could not run prints a "
        "banner and exits 0 (2 with --strict)."
    )
    parser.add_argument("--out-dir", type=Path, default=HERE, help="where the two files go")
    parser.add_argument("--strict", action="store_true", help="exit 2 when the audit could not run")
    parser.add_argument(
        "--timeout", type=float, default=120.0, help="seconds per pip-audit run (default 120)"
    )
    args = parser.parse_args()
    args.out_dir.mkdir(parents=True, exist_ok=True)
    json_out = args.out_dir / "pip-audit.json"
    started = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    problems: list[str] = []
    report: dict[str, Any] | None = None
    service = SERVICES[0]
    if shutil.which("pip-audit", path=str(Path(sys.executable).parent)) is None:
        problems.append(f"pip-audit is not installed in {sys.prefix} (make install-dev)")
    else:
        for service in SERVICES:
            tried, problem = run_pip_audit(service, json_out, args.timeout)
            report = tried or report
            if tried is not None and audited(tried):
                break
            if tried is not None:  # every package skipped, e.g. "not found on PyPI"
                example = tried["dependencies"][0].get("skip_reason", "") if tried else ""
                problem = f"{service} answered for none of the packages (e.g. {example!r})"
            problems.append(problem)
    text, ran = summarize(report, service, problems, started)
    # pip-audit's JSON of the last run that gave one, with why the audit did not run
    kept = dict(report or {"dependencies": [], "fixes": []})
    if not ran:
        kept["audit_did_not_run"] = problems
    json_out.write_text(json.dumps(kept, indent=1) + "\n")
    (args.out_dir / "pip-audit.txt").write_text(text)
    print(text, end="")
    if not ran:
        banner = "!" * 78
        print(
            f"{banner}\n!!! pip-audit DID NOT RUN: {'; '.join(problems)}\n"
            f"!!! No package was checked for known vulnerabilities.\n{banner}",
            file=sys.stderr,
        )
        return 2 if args.strict else 0
    print(f"written: {json_out} and {args.out_dir / 'pip-audit.txt'}")
    return 0


def guarded_main() -> int:
    """`main`, except that a bug here prints a banner instead of failing `make test`."""
    try:
        return main()
    except Exception as exc:  # the audit must never fail the build, except with --strict
        print(f"!!! pip-audit DID NOT RUN: security/audit.py failed: {exc!r}", file=sys.stderr)
        return 2 if "--strict" in sys.argv else 0


if __name__ == "__main__":
    raise SystemExit(guarded_main())
