"""`make audit` (security/audit.py, issue 8 part 6): findings are listed and never fail the
build; an audit that cannot reach a vulnerability service says so loudly and passes
(exit 2 only with --strict). The offline case runs the real pip-audit with its HTTP(S)
traffic sent to a closed local port; nothing leaves the machine."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

from tests.conftest import REPO_ROOT, free_port

AUDIT = REPO_ROOT / "security" / "audit.py"


def _audit_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("security_audit", AUDIT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_finding_is_listed_with_its_fix() -> None:
    # The shape of `pip-audit --format json` (pip-audit 2.x): audited packages carry
    # `version` and `vulns`; skipped ones only `skip_reason`.
    report = {
        "dependencies": [
            {
                "name": "pip",
                "version": "23.2.1",
                "vulns": [
                    {
                        "id": "PYSEC-2023-228",
                        "fix_versions": ["23.3"],
                        "aliases": ["CVE-2023-5752", "GHSA-mq26-g339-26xf"],
                        "description": "...",
                    }
                ],
            },
            {"name": "requests", "version": "2.34.2", "vulns": []},
            {"name": "jinja2", "version": "3.1.6", "vulns": [{"id": "GHSA-x", "fix_versions": []}]},
            {"name": "torch", "skip_reason": "Dependency not found on PyPI: torch (2.13.0+cpu)"},
            {"name": "pika-fast-response", "skip_reason": "distribution marked as editable"},
        ],
        "fixes": [],
    }
    text, ran = _audit_module().summarize(report, "pypi", [], "2026-12-07 00:00 UTC")
    assert ran
    assert "packages: 5 installed, 3 audited, 1 not audited, 1 editable" in text
    assert "RESULT: 2 known vulnerabilities in 2 packages" in text
    assert "jinja2 | 3.1.6 | GHSA-x | no fix yet" in text
    assert "pip | 23.2.1 | PYSEC-2023-228 (CVE-2023-5752, GHSA-mq26-g339-26xf) | 23.3" in text
    assert "torch: Dependency not found on PyPI" in text
    assert "DID NOT RUN" not in text


def _offline_run(out: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    closed = f"http://127.0.0.1:{free_port()}"
    proxies = ("https_proxy", "http_proxy", "all_proxy", "no_proxy")
    env = {k: v for k, v in os.environ.items() if k.lower() not in proxies}
    env |= {"HTTPS_PROXY": closed, "HTTP_PROXY": closed}
    return subprocess.run(
        [sys.executable, str(AUDIT), "--out-dir", str(out), "--timeout", "120", *extra],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )


def test_an_audit_without_network_says_so_and_passes(tmp_path: Path) -> None:
    done = _offline_run(tmp_path)
    assert done.returncode == 0, done.stderr
    assert "pip-audit DID NOT RUN" in done.stderr
    text = (tmp_path / "pip-audit.txt").read_text()
    assert "RESULT: THE AUDIT DID NOT RUN; nothing was checked." in text
    assert "pip-audit (pypi) failed" in text and "pip-audit (osv) failed" in text
    assert json.loads((tmp_path / "pip-audit.json").read_text())["audit_did_not_run"]

    strict = _offline_run(tmp_path / "strict", "--strict")
    assert strict.returncode == 2, strict.stderr
