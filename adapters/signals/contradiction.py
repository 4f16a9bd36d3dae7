"""Contradiction with the main response: praise of an answer that the main response corrects.

A fast response contradicts the main response when it praises the child's answer
("Great job!", "Correct!", "You got it!") and the main answer then corrects the child
("Not quite...", "There are 60 minutes in an hour." after "44"). Effort praise ("Good
try!") and neutral openers ("Hmm, let's see.") never contradict.

The cues live in `service.text_checks` (`corrects_child`, `praises_answer`), where the
data filter ``no_contradiction``, the GRPO reward ``reward_no_praise_before_correction``
and the evaluation metrics share them (the service guard does not check them); this
module only measures them.

Labelled set: `CONTRADICTION_LABELS`, 59 items of the Bridge data (Wang et al., 2024,
"Bridging the Novice-Expert Gap via Models of Decision-Making: A Case Study on
Remediating Math Mistakes", NAACL; ``shared/data/bridge``), with the texts copied
verbatim: the tutor's turn, the child's turn and the main response (the expert's
rewrite, else the original reply, as `adapters.sources.read_bridge` maps them). Each item
has the label ``corrects`` (does the main response tell the child the answer is wrong or
not finished?) and two or three sample fast responses with the expected flag
``praise_before_correction`` (``corrects`` and the response praises the answer). An agent
wrote these labels by reading each main response, not human raters; the cues were tuned
while looking at the same items, so the figures are optimistic for unseen data.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from adapters.signals.scoring import PrecisionRecall
from service.text_checks import corrects_child, praises_answer

CONTRADICTION_LABELS: Path = (
    Path(__file__).parents[2] / "tests" / "data" / "contradiction_labels.jsonl"
)
"""The hand-labelled Bridge items (JSON Lines, one item a line; see the module doc)."""


def praise_before_correction(response: str, *, user_turn: str, main_response: str) -> bool:
    """True when `response` praises the answer and `main_response` corrects the child.

    The same rule as the filter ``no_contradiction`` of `service.text_checks.failed_filters`
    (which fails exactly when this is True).

    Args:
        response: a fast response ("Great job!").
        user_turn: what the child said ("44"); its numbers feed the number cue.
        main_response: Pika's main answer ("There are 60 minutes in an hour.").

    Returns:
        ``praises_answer(response) and corrects_child(main_response, user_turn)``.
    """
    return praises_answer(response) and corrects_child(main_response, user_turn)


def _load(path: Path) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = []
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            item = json.loads(line)
            if not isinstance(item, dict):
                raise ValueError(f"{path}:{number}: not a JSON object")
            items.append(item)
    return items


def evaluate_contradiction(labels: Path | None = None) -> dict[str, PrecisionRecall]:
    """Precision and recall of the contradiction cues against the labelled items.

    Args:
        labels: a JSON Lines file of labelled items (default `CONTRADICTION_LABELS`).
            Each line has ``user_turn``, ``main_response``, ``corrects`` (bool) and
            ``responses``: a list of ``{"text", "praise_before_correction"}``.

    Returns:
        ``{"corrects": ...}``: `corrects_child(main_response, user_turn)` against
        ``corrects``, one pair per item; ``{"praise_before_correction": ...}``:
        `praise_before_correction` against the label, one pair per sample response.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: a line is not JSON or not an object (json.JSONDecodeError is one).
        KeyError: an item lacks a field.
    """
    items = _load(CONTRADICTION_LABELS if labels is None else labels)
    corrects = PrecisionRecall.of(
        (corrects_child(item["main_response"], item["user_turn"]), bool(item["corrects"]))
        for item in items
    )
    flag = PrecisionRecall.of(
        (
            praise_before_correction(
                response["text"],
                user_turn=item["user_turn"],
                main_response=item["main_response"],
            ),
            bool(response["praise_before_correction"]),
        )
        for item in items
        for response in item["responses"]
    )
    return {"corrects": corrects, "praise_before_correction": flag}
