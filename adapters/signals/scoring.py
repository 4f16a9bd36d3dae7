"""Precision and recall of a binary signal against hand labels."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True)
class PrecisionRecall:
    """Counts of a flag (predicted) against a label (expected), over `n` items."""

    true_positives: int
    false_positives: int
    false_negatives: int
    true_negatives: int

    @classmethod
    def of(cls, pairs: Iterable[tuple[bool, bool]]) -> PrecisionRecall:
        """Count (predicted, expected) pairs."""
        tp = fp = fn = tn = 0
        for predicted, expected in pairs:
            if predicted and expected:
                tp += 1
            elif predicted:
                fp += 1
            elif expected:
                fn += 1
            else:
                tn += 1
        return cls(tp, fp, fn, tn)

    @property
    def n(self) -> int:
        return (
            self.true_positives + self.false_positives + self.false_negatives + self.true_negatives
        )

    @property
    def precision(self) -> float | None:
        """TP / (TP + FP); None when nothing was flagged."""
        flagged = self.true_positives + self.false_positives
        return self.true_positives / flagged if flagged else None

    @property
    def recall(self) -> float | None:
        """TP / (TP + FN); None when nothing is labelled positive."""
        positives = self.true_positives + self.false_negatives
        return self.true_positives / positives if positives else None

    def describe(self) -> str:
        """ "precision 0.92 (12/13), recall 0.86 (12/14), n 40"."""
        flagged = self.true_positives + self.false_positives
        positives = self.true_positives + self.false_negatives
        p = "n/a" if self.precision is None else f"{self.precision:.2f}"
        r = "n/a" if self.recall is None else f"{self.recall:.2f}"
        return (
            f"precision {p} ({self.true_positives}/{flagged}), "
            f"recall {r} ({self.true_positives}/{positives}), n {self.n}"
        )
