"""`fastresp loadtest`: a headless Locust run with pass/fail thresholds (issue 7)."""

from __future__ import annotations


def loadtest() -> None:
    """Run Locust headless against a running gateway (placeholder until issue 7 lands)."""
    raise NotImplementedError
