"""What the teacher (`adapters.teacher`) and the GRPO judge (`adapters.rewards`) share.

Both ask an OpenAI-compatible chat endpoint with a versioned prompt file and retry
transient failures with tenacity; the rules for that live here once:

- **Prompt files** (`read_prompt_file`): YAML with non-empty strings ``version``,
  ``system`` and ``user``; ``system`` has no ``{{placeholder}}`` (it is the shared
  prefix a server can cache) and ``user`` uses exactly the caller's placeholders.
  The file's sha256 identifies the exact text. Each caller keeps its own files,
  placeholders, error type and message wording.
- **Retries** (`is_retryable`, `backoff_wait`): 429, 408, 5xx, timeouts and
  connection errors are retried, never another 4xx; the wait doubles per retry from
  an initial value, plus up to 1 s of jitter, is capped, and honours a server's
  ``Retry-After`` up to the cap.

`openai` is imported inside the functions that need it: importing this module stays
cheap.
"""

from __future__ import annotations

import hashlib
import random
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import yaml

NOT_KNOWN = "not known yet"
"""The main response as a prompt shows it when there is none."""
NO_PIKA_TURN = "none (the conversation starts here)"
"""Pika's previous turn as a prompt shows it when there is none."""

PLACEHOLDER = re.compile(r"\{\{([a-z_]+)\}\}")
"""A ``{{name}}`` placeholder of a prompt file's ``user`` template."""


@dataclass(frozen=True)
class PromptFile:
    """A checked prompt file: a fixed system message and a user-message template."""

    version: str
    sha256: str
    """SHA-256 (hex) of the prompt file's bytes."""
    system: str
    user_template: str

    def render(self, values: Mapping[str, str]) -> list[dict[str, str]]:
        """The chat messages: the system message, and the user template with each
        ``{{name}}`` replaced by ``values[name]``."""
        user = PLACEHOLDER.sub(lambda match: values[match.group(1)], self.user_template)
        return [{"role": "system", "content": self.system}, {"role": "user", "content": user}]


P = TypeVar("P", bound=PromptFile)


def read_prompt_file(
    path: Path,
    kind: type[P],
    placeholders: frozenset[str],
    error: type[Exception],
    what: str,
) -> P:
    """Read and check a prompt file (``version``, ``system``, ``user``).

    Args:
        path: The YAML file.
        kind: The `PromptFile` class to return.
        placeholders: The exact set of placeholders ``user`` must use.
        error: The exception raised for every problem.
        what: How the read-error message names the file (``prompt file``).

    Raises:
        error: unreadable (``cannot read <what> <path>: ...``), not a mapping, a missing
            or empty field, a placeholder in ``system``, or ``user`` placeholders other
            than exactly `placeholders` (each message starts with the path).
    """
    try:
        data = path.read_bytes()
        raw = yaml.safe_load(data.decode("utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise error(f"cannot read {what} {path}: {exc}") from exc
    if not isinstance(raw, dict):
        raise error(f"{path}: expected a mapping with version, system and user")
    fields: dict[str, str] = {}
    for name in ("version", "system", "user"):
        value = raw.get(name)
        if not isinstance(value, str) or not value.strip():
            raise error(f"{path}: '{name}' must be a non-empty string")
        fields[name] = value
    if PLACEHOLDER.search(fields["system"]):
        raise error(f"{path}: 'system' must have no placeholders (shared prefix)")
    used = set(PLACEHOLDER.findall(fields["user"]))
    if used != placeholders:
        unknown = ", ".join(sorted(used - placeholders)) or "none"
        missing = ", ".join(sorted(placeholders - used)) or "none"
        raise error(f"{path}: 'user' placeholders: unknown {unknown}; missing {missing}")
    return kind(
        version=fields["version"].strip(),
        sha256=hashlib.sha256(data).hexdigest(),
        system=fields["system"],
        user_template=fields["user"],
    )


def is_retryable(exc: BaseException) -> bool:
    """429, 408, 5xx, timeouts and connection errors; never other 4xx."""
    import openai

    if isinstance(exc, openai.APIConnectionError):  # includes APITimeoutError
        return True
    if isinstance(exc, openai.APIStatusError):
        return exc.status_code in (408, 429) or exc.status_code >= 500
    return False


def backoff_wait(retry_state: Any, initial_s: float, max_s: float) -> float:
    """Seconds to wait before the next attempt (a tenacity ``wait`` body).

    Exponential backoff from `initial_s` (doubling per attempt) plus up to 1 s of
    jitter, or the server's ``Retry-After`` when longer; both capped at `max_s`.
    """
    import openai

    attempt = max(1, retry_state.attempt_number)
    delay: float = min(max_s, initial_s * 2 ** (attempt - 1))
    delay = min(max_s, delay + random.uniform(0, min(1.0, delay)))
    outcome = retry_state.outcome
    exc = outcome.exception() if outcome is not None else None
    if isinstance(exc, openai.APIStatusError):
        header = exc.response.headers.get("retry-after")
        try:
            after = float(header) if header is not None else None
        except ValueError:
            after = None
        if after is not None and after >= 0:
            delay = min(max_s, max(delay, after))
    return delay
