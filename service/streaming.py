"""Streaming fast responses as Server-Sent Events (`POST /fast-response/stream`).

The stream lets text-to-speech start on the first words instead of the whole answer.
`FastResponseService.respond_stream` produces the events defined here; the route turns
them into SSE with `to_sse`.

Events, in order:

- `token`, zero or more: `{"text": "..."}`, text to append to what came before. Each
  one holds whole words, with their leading space.
- `error`, at most one, and only right before a fallback `done`:
  `{"reason": "deadline" | "engine_error" | "guard", "detail": ..., "message": ...}`.
  `detail` says which guard check failed (`guard` only, else null): `empty`,
  `truncated`, `too_long`, `tone_mismatch` (`service.guard.GuardRejection`), or
  `retracted` (the finished text does not continue what was already sent).
- `done`, exactly one, last: the same JSON object as `POST /fast-response` answers
  (`FastResponseResponse`). With source `model`, its `fast_response` is exactly the
  concatenation of the `token` texts.

Errors before the stream starts (bad input 422, unknown personality 404, body too
large 413) are answered as JSON with that status, like `POST /fast-response`. Once
the stream has started the status is 200 and cannot change: an engine error or the
deadline gives an `error` event and a fallback `done`.

The guard on the stream (`StreamGuard`): text is held back until a word boundary, then
released only as far as `clean_fast_response` (and, when it is on, the tone guard)
accepts the text so far as a complete answer. So:

- no control characters, role prefix ("Pika:") or surrounding quote is ever sent;
- the first sentence is sent word by word; every later sentence only once it is
  finished (the guard drops an unfinished sentence after a finished one);
- never more than the personality's `max_words` words, nothing after the first line.

What was sent cannot be unsent. When the finished generation fails the guard even
though every part sent so far passed it (its first sentence runs over `max_words`,
the token limit cuts it off, or with the tone guard on its tone clashes with the
child's turn), the stream stops sending text and ends with an `error` event (reason
`guard`, `detail` the check) and a `done` with source `fallback` and the fallback
phrase: the client should stop speaking the streamed words and may speak the fallback.
A rejection before any text was sent is sampled again once within the deadline, as
`POST /fast-response` does, and gives no `error` event unless the fallback is used.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from fastapi.sse import ServerSentEvent
from pydantic import BaseModel

from service.child_safety import TurnSafety
from service.engine import GenerationResult
from service.guard import GuardResult, check_tone_fit, clean_fast_response, may_become_role_prefix
from service.schemas import FastResponseResponse
from service.session_state import normalise, repeats
from service.text_checks import opener, word_tokens

#: The `error` event's `detail` when the finished text passes the guard but does not
#: continue the text already sent (for example a role prefix spread over several words).
RETRACTED = "retracted"

#: The `error` event's `detail` when the answer repeats the session's last answers (the
#: same text or the same first two words, `session_state.repeats`); nothing was sent.
REPEATED = "repeat"

_DIGIT = re.compile(r"\d")
_LETTER = re.compile(r"[^\W\d_]")


class StreamToken(BaseModel):
    """Data of a `token` event."""

    text: str
    """Text to append to the text of the earlier `token` events (whole words)."""


class StreamError(BaseModel):
    """Data of an `error` event; a `done` event with source `fallback` follows."""

    reason: str
    """Why the fallback is served: `deadline`, `engine_error`, `guard` or `repeat`."""
    detail: str | None = None
    """For `guard`: the check that failed (`empty`, `truncated`, `too_long`,
    `tone_mismatch`, `retracted`, or a child-safety check: `echoes_unsafe_input`,
    `unsafe_words`, `echoes_personal_detail`, `contact_details`); for `repeat`:
    `repeat`; else null."""
    message: str
    """A sentence for logs and people."""


@dataclass(frozen=True, slots=True)
class TokenEvent:
    """Text to send (whole words)."""

    text: str


@dataclass(frozen=True, slots=True)
class ErrorEvent:
    """The stream failed after it started; a fallback `DoneEvent` follows."""

    reason: str
    detail: str | None
    message: str


@dataclass(frozen=True, slots=True)
class DoneEvent:
    """The answer, as `POST /fast-response` would give it; always the last event."""

    response: FastResponseResponse


StreamEvent = TokenEvent | ErrorEvent | DoneEvent


def to_sse(event: StreamEvent) -> ServerSentEvent:
    """The SSE of `event`: named `token`, `error` or `done`, with JSON data."""
    if isinstance(event, TokenEvent):
        return ServerSentEvent(event="token", data=StreamToken(text=event.text))
    if isinstance(event, ErrorEvent):
        error = StreamError(reason=event.reason, detail=event.detail, message=event.message)
        return ServerSentEvent(event="error", data=error)
    return ServerSentEvent(event="done", data=event.response)


@dataclass(frozen=True, slots=True)
class StreamVerdict:
    """`StreamGuard.finish`'s answer: `rest` is the text still to send (possibly "")
    when the whole answer is accepted, else None with `rejection` (a `GuardRejection`
    value, or RETRACTED)."""

    rest: str | None
    rejection: str | None = None


class StreamGuard:
    """Releases streamed model text only as far as the guard accepts it.

    Feed it the engine's text deltas (`feed`); it returns the text that may be sent
    now. At the end, `finish` gives the verdict on the whole generation, which is the
    same as `POST /fast-response`'s for the same text.

    Args:
        max_words: the personality's word limit.
        user_turn: what the child said, for the tone guard; None when it is off.
        safety: the request's child-safety check (`child_safety.inspect_turn`): text it
            rejects is never released, and words with digits at the end of the text are
            held back until a word without digits follows (or the answer ends), so no
            part of a phone number is sent before the whole is checked. A rejected phrase
            of several words may have had its first words released already (they were
            safe alone); `finish` then rejects the answer and a fallback follows.
        recent: the session's last answers (`session_state`): nothing is released until
            the answer's first two words are known and do not open one of them, and
            `finish` rejects a repeat (`REPEATED`), so it can be sampled again.
    """

    def __init__(
        self,
        max_words: int,
        user_turn: str | None = None,
        safety: TurnSafety | None = None,
        recent: Sequence[str] = (),
    ) -> None:
        self._max_words = max_words
        self._user_turn = user_turn
        self._safety = safety
        self._recent = list(recent)
        self._recent_openers = {opener(normalise(text)) for text in recent}
        self._raw = ""
        self._checked = 0  # length of the raw prefix last checked (at a word boundary)
        self._stuck = False  # the guard's text stopped continuing what was sent
        self.sent = ""
        """The text released so far (the concatenation of `feed`'s answers)."""

    def feed(self, delta: str) -> str:
        """Add the engine's next text; returns the text that may be sent now ("" for none).

        The raw text up to its last whitespace (complete words) is cleaned as if the
        generation had ended there; what the clean text adds to `sent` is released.
        """
        self._raw += delta
        boundary = max(self._raw.rfind(ch) for ch in " \t\n\r")
        if self._stuck or boundary + 1 <= self._checked:
            return ""
        self._checked = boundary + 1
        if not self.sent and may_become_role_prefix(self._raw[: self._checked]):
            return ""  # "Pika's quick" may still become "Pika's quick reaction:"
        candidate = self._check(clean_fast_response(self._raw[: self._checked], self._max_words))
        if candidate is None or len(candidate) <= len(self.sent):
            return ""
        if not candidate.startswith(self.sent):
            self._stuck = True
            return ""
        piece = candidate[len(self.sent) :]
        self.sent = candidate
        return piece

    def finish(self, result: GenerationResult) -> StreamVerdict:
        """The verdict on the whole generation `result`: `clean_fast_response` with
        `truncated` when it hit its token limit, then the tone guard when it is on, as
        `POST /fast-response` checks it; and the accepted text must continue `sent`.
        When accepted, `sent` becomes the whole answer."""
        verdict = clean_fast_response(
            result.text, self._max_words, truncated=result.finish_reason == "length"
        )
        if verdict.text is not None and self._user_turn is not None:
            verdict = check_tone_fit(verdict.text, self._user_turn)
        if verdict.text is None:
            return StreamVerdict(None, str(verdict.rejection))
        unsafe = self._safety.check(verdict.text) if self._safety is not None else None
        if unsafe is not None:
            return StreamVerdict(None, str(unsafe))
        if repeats(verdict.text, self._recent):
            return StreamVerdict(None, REPEATED)
        if not verdict.text.startswith(self.sent):
            return StreamVerdict(None, RETRACTED)
        rest = verdict.text[len(self.sent) :]
        self.sent = verdict.text
        return StreamVerdict(rest, None)

    def _check(self, cleaned: GuardResult) -> str | None:
        """`cleaned.text` if the tone guard (when on) and the safety check accept it,
        else None."""
        text = cleaned.text
        if text is not None and self._user_turn is not None:
            text = check_tone_fit(text, self._user_turn).text
        if text is not None and self._safety is not None:
            if self._safety.check(text):
                return None
            words = text.split(" ")
            while words and (_DIGIT.search(words[-1]) or not _LETTER.search(words[-1])):
                words.pop()  # maybe part of a phone number ("212 -"): wait for what follows
            text = " ".join(words) or None
        if text is not None and self._recent:
            first = opener(normalise(text))
            if len(word_tokens(text)) < 2 or first in self._recent_openers:
                return None  # not known yet not to repeat; `finish` decides
        return text
