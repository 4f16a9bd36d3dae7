"""Wire schemas of the HTTP API (pydantic). Limits are documented in the README.

Length limits, in characters:
- `pika_turn` 1,000: the longest Bridge tutor turn is 162;
- `user_turn` 500: a child's spoken turn; the longest Bridge student turn is 268;
- `main_response` 2,000: a tutor's full answer;
- feedback `comment` 1,000: a parent's or teacher's remark on one answer.
"""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StringConstraints

MAX_PIKA_TURN_CHARS = 1000
MAX_USER_TURN_CHARS = 500
MAX_MAIN_RESPONSE_CHARS = 2000
MAX_FEEDBACK_COMMENT_CHARS = 1000

Source = Literal["model", "cache", "fallback"]


#: C0 control characters but tab, newline and carriage return; DEL; C1 controls.
_CONTROL_CHARS = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")
#: Unicode bidirectional embeddings, overrides and isolates (U+202A-U+202E,
#: U+2066-U+2069): they reorder how text is displayed ("Trojan Source", CVE-2021-42574).
_BIDI_CONTROLS = re.compile(r"[\u202a-\u202e\u2066-\u2069]")
#: Unicode tag characters (U+E0000-U+E007F): invisible, and a known way to hide
#: instructions for a language model inside text that looks harmless.
_TAG_CHARS = re.compile(r"[\U000e0000-\U000e007f]")


#: A `<word>` token such as `<unused0>` or `<start_of_image>`.
_ANGLE_TOKEN = re.compile(r"<[^<>\s]{1,64}>")


def _turn_text(value: str) -> str:
    """Refuse text an ASR transcript or a tutor turn never holds: control characters
    (NUL included), bidirectional overrides, invisible tag characters, and text without
    a letter or digit (empty, whitespace-, punctuation- or emoji-only: nothing to react
    to). The message names the problem and the character's code point, never the text."""
    if (found := _CONTROL_CHARS.search(value)) is not None:
        raise ValueError(f"must not contain control characters (found U+{ord(found[0]):04X})")
    if (found := _BIDI_CONTROLS.search(value)) is not None:
        raise ValueError(
            f"must not contain bidirectional override characters (found U+{ord(found[0]):04X})"
        )
    if (found := _TAG_CHARS.search(value)) is not None:
        raise ValueError(f"must not contain invisible tag characters (found U+{ord(found[0]):04X})")
    if not any(ch.isalnum() for ch in value):
        raise ValueError(
            "must contain a letter or digit (empty, whitespace-, punctuation- or emoji-only "
            "text has nothing to react to)"
        )
    # Imported here: child_safety loads the profanity and phone-number libraries.
    from service.child_safety import strip_control_tokens

    # Also without `<word>` tokens: the served tokenizer's own (gemma's `<unused0>`) are
    # taken out too, and which those are is only known with the model.
    if not any(ch.isalnum() for ch in _ANGLE_TOKEN.sub(" ", strip_control_tokens(value))):
        raise ValueError(
            "must contain a letter or digit besides chat-template control tokens such as "
            "<|im_start|> (they are taken out of every turn)"
        )
    return value


PikaTurn = Annotated[str, Field(max_length=MAX_PIKA_TURN_CHARS), AfterValidator(_turn_text)]
UserTurn = Annotated[str, Field(max_length=MAX_USER_TURN_CHARS), AfterValidator(_turn_text)]
MainResponse = Annotated[str, Field(max_length=MAX_MAIN_RESPONSE_CHARS), AfterValidator(_turn_text)]
Identifier = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9._:-]{1,128}$")]


class FastResponseRequest(BaseModel):
    """`POST /fast-response` body. Unknown fields are refused (422)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    personality: Annotated[str, StringConstraints(min_length=1, max_length=64)]
    """A personality from the manifest; an unknown one gets 404."""
    pika_turn: PikaTurn | None = None
    """Pika's previous turn. Omit or null at the start of a conversation; if given,
    it must not be blank."""
    user_turn: UserTurn
    """What the child said (the ASR transcript)."""
    main_response: MainResponse | None = None
    """Pika's main answer, when it is already known."""
    session_id: Identifier | None = None
    """The child's lesson session, for per-session state."""
    request_id: Identifier | None = None
    """Caller's id for tracing; one is generated when absent."""


class FastResponseResponse(BaseModel):
    """`POST /fast-response` answer."""

    fast_response: str
    source: Source
    """`model`: generated now; `cache`: a stored model answer; `fallback`: a fixed
    phrase after a deadline, engine error or guard rejection."""
    personality: str
    adapter_version: str | None
    """Version of the LoRA adapter that answered; None for the base model."""
    latency_ms: float
    """Time spent in the gateway for this request, in milliseconds."""
    request_id: str


class FeedbackRequest(BaseModel):
    """`POST /feedback` body: a satisfaction rating of one served fast response.
    Unknown fields are refused (422)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    request_id: Identifier
    """The `request_id` of the `/fast-response` answer being rated. An id never served,
    or served longer ago than the feedback TTL (`FASTRESP_FEEDBACK_TTL_S`), gets 404."""
    rating: Annotated[int, Field(ge=1, le=5)]
    """Satisfaction from 1 (poor) to 5 (great); an integer (not `4.5`, `"4"` or `true`)."""
    comment: Annotated[str, Field(max_length=MAX_FEEDBACK_COMMENT_CHARS)] | None = None
    """Optional free text, at most 1,000 characters; blank text is stored as no comment.
    It is stored with the rating, never put in a metric label or a log line."""


class FeedbackResponse(BaseModel):
    """`POST /feedback` answer: the stored rating and the answer it refers to."""

    request_id: str
    rating: int
    personality: str
    adapter_version: str | None
    """Version of the LoRA adapter that gave the rated answer; None for the base model."""
    source: Source
    replaced: bool
    """True when this rating replaced an earlier rating of the same request (a request
    is counted once, with its latest rating)."""


class ErrorDetail(BaseModel):
    """One problem with a request; `loc` names the field, e.g. ["body", "user_turn"]."""

    loc: list[str | int]
    msg: str
    type: str


class ErrorResponse(BaseModel):
    """Every 4xx/5xx body."""

    detail: list[ErrorDetail]


class Health(BaseModel):
    """`/healthz` and `/readyz` body."""

    status: Literal["ok", "unavailable"]
    checks: dict[str, str] = {}
