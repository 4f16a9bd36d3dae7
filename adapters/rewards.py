"""GRPO rewards: the serving rules and the no-judge signals as reward functions, plus an
optional LLM judge.

Each rule reward scores one completion against one rule of `service.text_checks` (the
one module of text rules, which the guard and the data filters use too), so the model
is trained against the same rule that the data was filtered with and serving enforces.
No rule is written a second time here: every rule reward reads the verdict of one
filter of `service.text_checks.failed_filters`. The two signal rewards read the
signals the data pipeline filters with (`adapters.labels.SignalFilters`): uptake
(`adapters.signals.uptake`) and tone fit (`adapters.signals.tone`); the third signal,
contradiction, is the rule reward ``reward_no_praise_before_correction``.

Signature (TRL's reward-function contract, `trl.GRPOTrainer`): ``fn(prompts,
completions, **kwargs) -> list[float]``, one value per completion, where the dataset's
columns arrive as keyword lists aligned with `completions`. The columns used here are
``user_turn`` (str), ``main_response`` (str or None: not known yet) and, for the judge,
``pika_turn`` (str or None) and ``personality`` (str). TRL's extra keywords
(``completion_ids``, ``trainer_state``, ``log_metric``, ...) are accepted and ignored,
except ``log_metric``, which the judge uses to log its failures.

What is scored: the completion as generated (TRL decodes it with special tokens
skipped, so the end-of-turn marker is gone), stripped of surrounding whitespace, not the
text after the guard (`service.guard.clean_fast_response`). The guard would cut a
rambling completion down to its first sentences; scoring the raw text teaches the model
to stop by itself instead of relying on the cut.

==================================  =================================================
reward (the logged metric name)     1.0 when ... (else 0.0)
==================================  =================================================
reward_length                       filter ``length`` passes: 1 to ``max_words`` words
                                    and at most ``max_chars`` characters
reward_kid_safe                     filter ``kid_safe`` passes: no unsafe word, and no
                                    unsafe word of the child echoed
reward_no_leak                      filter ``no_leak`` passes: no number, 3-word run or
                                    2 content words of the main response the child did
                                    not say; 1.0 when the main response is None
reward_no_praise_before_correction  filter ``no_contradiction`` passes: no praise of
                                    the answer ("Great job!") when the main response
                                    corrects the child; effort praise ("Good try!")
                                    passes; 1.0 when the main response is None
reward_no_question_when_main_asks   filter ``no_question`` passes: no "?" when the
                                    main response has one; 1.0 when it is None
reward_diverse_opener               the completion's `opener` differs from the opener
                                    of every earlier completion of its group
reward_uptake                       (graded, not 0/1) the uptake score in [0, 1]:
                                    how much the completion builds on the child's
                                    turn (all-MiniLM-L6-v2 embeddings plus lexical
                                    features fitted to human uptake ratings;
                                    `adapters.signals.uptake.UptakeScorer`); the data
                                    filter ``low_uptake`` rejects below ``LOW_UPTAKE``
reward_tone_fit                     `adapters.signals.tone.tone_mismatch` finds no
                                    mismatch (data filter ``tone_mismatch``): no
                                    exuberant reply to a sad, scared or hurt child,
                                    no gloomy one to a happy child
reward_judge (optional)             (score - 1) / 4 for the judge's 1-5 score; 0.0
                                    when the judge call failed (counted)
==================================  =================================================

The diversity rule. TRL lays a batch out as groups of ``num_generations`` consecutive
completions of one prompt (on one process, as here: with several, a process's slice
could split a group, and `reward_diverse_opener` refuses a batch that does not split
into whole groups). Within a group, in order, a completion gets 0.0 when its
opener equals the opener of an earlier completion of the same group, else 1.0; so the
first completion of a group always gets 1.0, and a group of 4 with two equal openers
scores [1, 1, 0, 1] when the repeat is third. The opener is
`service.text_checks.opener`: the first two words, lower-cased, punctuation dropped
("Ooh, nice!" and "ooh nice... a dog" both open with "ooh nice"), the same definition
the evaluation's opener statistics use. A completion with no words has the empty
opener, which repeats like any other.

The judge (`JudgeReward`) asks an OpenAI-compatible chat endpoint (a vLLM server or a
hosted API, through the ``openai`` SDK as `adapters.teacher` does) for a 1-5 score of
how well the fast response reacts to the child's turn and leads into the main response,
with the versioned prompt `adapters/prompts/grpo-judge-v1.yaml`. A call that still
fails after its retries, or a reply without a usable score, scores 0.0 and is counted
(`JudgeReward.failures`); the judge never raises into the training loop.

At module level: the standard library, PyYAML, `service.text_checks`,
`adapters.llm_calls` and `adapters.labels` (pydantic); the judge imports ``openai`` and
``tenacity`` on its first call, the signal rewards `adapters.signals` on theirs.
`build_reward_funcs` loads the uptake model once (about 3 s; sentence-transformers, the
``signals`` extra, which ``train`` includes) and binds it into ``reward_uptake``; the
model runs on the CPU or the GPU as sentence-transformers picks. No training stack
(torch, trl) is imported here.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import re
import threading
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from adapters.labels import load_uptake_scorer
from adapters.llm_calls import (
    NO_PIKA_TURN,
    NOT_KNOWN,
    PromptFile,
    backoff_wait,
    is_retryable,
    read_prompt_file,
)
from service.text_checks import DEFAULT_LIMITS, FilterLimits, failed_filters, opener

if TYPE_CHECKING:
    from adapters.signals.uptake import UptakeScorer

log = logging.getLogger(__name__)

RewardFn = Callable[..., list[float]]
"""TRL's reward-function shape: ``fn(prompts, completions, **columns) -> list[float]``."""

PROMPTS_DIR = Path(__file__).resolve().parent / "prompts"
DEFAULT_JUDGE_PROMPT = PROMPTS_DIR / "grpo-judge-v1.yaml"
"""The standard judge prompt (see the file's header for its versioning rule)."""

JUDGE_NAME = "reward_judge"
"""The judge's metric name (`JudgeReward.__name__`)."""


# --- the rule rewards ---------------------------------------------------------------


@functools.lru_cache(maxsize=8192)
def _failed(
    completion: str, user_turn: str, main_response: str | None, limits: FilterLimits
) -> frozenset[str]:
    """`failed_filters` of one completion, cached: the five rule rewards of one batch
    score the same completions, so each (completion, turn) is checked once."""
    return frozenset(
        failed_filters(completion, user_turn=user_turn, main_response=main_response, limits=limits)
    )


def _column(kwargs: Mapping[str, Any], name: str, size: int) -> list[Any]:
    """The dataset column `name` from TRL's keyword arguments, checked against `size`.

    Raises:
        ValueError: the column is missing or has another length than the completions.
    """
    values = kwargs.get(name)
    if values is None:
        raise ValueError(f"reward needs the dataset column {name!r}; the dataset lacks it")
    values = list(values)
    if len(values) != size:
        raise ValueError(f"column {name!r} has {len(values)} values for {size} completions")
    return values


def _completion_text(completion: Any) -> str:
    """A completion as text: TRL passes a str for text prompts; a conversational
    completion (a list of messages) is read from its last message's content."""
    if isinstance(completion, str):
        return completion.strip()
    if isinstance(completion, list) and completion and isinstance(completion[-1], dict):
        return str(completion[-1].get("content", "")).strip()
    raise TypeError(f"unexpected completion type {type(completion).__name__}")


def _filter_reward(
    filter_name: str,
    completions: Sequence[Any],
    kwargs: Mapping[str, Any],
    limits: FilterLimits,
) -> list[float]:
    """1.0 for each completion that passes the text filter `filter_name`, else 0.0."""
    size = len(completions)
    user_turns = _column(kwargs, "user_turn", size)
    mains = _column(kwargs, "main_response", size) if "main_response" in kwargs else [None] * size
    return [
        0.0 if filter_name in _failed(_completion_text(c), str(u), m, limits) else 1.0
        for c, u, m in zip(completions, user_turns, mains, strict=True)
    ]


def reward_length(
    prompts: Sequence[Any],
    completions: Sequence[Any],
    *,
    limits: FilterLimits = DEFAULT_LIMITS,
    **kwargs: Any,
) -> list[float]:
    """1.0 when the completion is within the length limits (filter ``length``).

    Args:
        prompts: The prompts (unused; TRL passes them).
        completions: One text per completion.
        limits: ``min_words``, ``max_words`` (the personality's limit when built by
            `build_reward_funcs`) and ``max_chars``.
        **kwargs: Dataset columns; needs ``user_turn``, reads ``main_response``.

    Returns:
        One value per completion: 1.0 pass, 0.0 fail.
    """
    return _filter_reward("length", completions, kwargs, limits)


def reward_kid_safe(
    prompts: Sequence[Any],
    completions: Sequence[Any],
    *,
    limits: FilterLimits = DEFAULT_LIMITS,
    **kwargs: Any,
) -> list[float]:
    """1.0 when the completion is kid-safe (filter ``kid_safe``): no unsafe word of
    the profanity list or of ``limits.extra_unsafe_words``, and no unsafe word of the
    child's turn repeated. Needs the column ``user_turn``."""
    return _filter_reward("kid_safe", completions, kwargs, limits)


def reward_no_leak(
    prompts: Sequence[Any],
    completions: Sequence[Any],
    *,
    limits: FilterLimits = DEFAULT_LIMITS,
    **kwargs: Any,
) -> list[float]:
    """1.0 when the completion gives away nothing of the main response (filter
    ``no_leak``); 1.0 when ``main_response`` is None. Needs ``user_turn``, reads
    ``main_response``."""
    return _filter_reward("no_leak", completions, kwargs, limits)


def reward_no_praise_before_correction(
    prompts: Sequence[Any],
    completions: Sequence[Any],
    *,
    limits: FilterLimits = DEFAULT_LIMITS,
    **kwargs: Any,
) -> list[float]:
    """1.0 unless the completion praises the answer while the main response corrects
    the child (filter ``no_contradiction``: "Great job!" before "Not quite..." is 0.0,
    "Good try!" is 1.0); 1.0 when ``main_response`` is None."""
    return _filter_reward("no_contradiction", completions, kwargs, limits)


def reward_no_question_when_main_asks(
    prompts: Sequence[Any],
    completions: Sequence[Any],
    *,
    limits: FilterLimits = DEFAULT_LIMITS,
    **kwargs: Any,
) -> list[float]:
    """1.0 unless the completion asks a question ("?") while the main response asks
    one (filter ``no_question``); 1.0 when ``main_response`` is None."""
    return _filter_reward("no_question", completions, kwargs, limits)


def reward_diverse_opener(
    prompts: Sequence[Any],
    completions: Sequence[Any],
    *,
    num_generations: int | None = None,
    **kwargs: Any,
) -> list[float]:
    """0.0 for a completion whose opener (`service.text_checks.opener`) repeats an
    earlier one of its group, else 1.0.

    Args:
        prompts: The prompts, one per completion.
        completions: TRL's layout: groups of `num_generations` consecutive completions
            of one prompt.
        num_generations: The group size (`build_reward_funcs` binds it). None: a group
            is a run of consecutive completions with the same prompt.
        **kwargs: Ignored.

    Returns:
        One value per completion, 1.0 or 0.0 (the first of a group is always 1.0).

    Raises:
        ValueError: the completions do not split into groups of `num_generations`.
    """
    size = len(completions)
    if num_generations is not None:
        if num_generations < 1 or size % num_generations:
            raise ValueError(
                f"{size} completions do not split into groups of num_generations={num_generations}"
            )
        group_ids = [i // num_generations for i in range(size)]
    else:
        if len(prompts) != size:
            raise ValueError(f"{len(prompts)} prompts for {size} completions")
        group_ids, group = [], -1
        for i, prompt in enumerate(prompts):
            if i == 0 or prompt != prompts[i - 1]:
                group += 1
            group_ids.append(group)
    seen: set[tuple[int, str]] = set()
    rewards = []
    for group, completion in zip(group_ids, completions, strict=True):
        key = (group, opener(_completion_text(completion)))
        rewards.append(0.0 if key in seen else 1.0)
        seen.add(key)
    return rewards


def reward_uptake(
    prompts: Sequence[Any],
    completions: Sequence[Any],
    *,
    scorer: UptakeScorer | None = None,
    **kwargs: Any,
) -> list[float]:
    """The uptake score of each completion: how much it builds on the child's turn.

    Args:
        prompts: The prompts (unused; TRL passes them).
        completions: One text per completion.
        scorer: The uptake model (`build_reward_funcs` binds the one it loaded); None:
            the process's `adapters.signals.uptake.default_scorer`.
        **kwargs: Dataset columns; needs ``user_turn``.

    Returns:
        One value in [0, 1] per completion ("Okay." after "I saw a big red fire truck!"
        scores low, "A big red fire truck, wow!" high), scored as one batch.

    Raises:
        ValueError: the ``user_turn`` column is missing or of another length.
        adapters.labels.SignalsUnavailable: no scorer given and the ``signals`` extra is
            not installed.
    """
    size = len(completions)
    user_turns = _column(kwargs, "user_turn", size)
    model = scorer if scorer is not None else load_uptake_scorer()
    scores = model.score_many(
        [(str(u), _completion_text(c)) for u, c in zip(user_turns, completions, strict=True)]
    )
    return [min(1.0, max(0.0, float(value))) for value in scores]


def reward_tone_fit(
    prompts: Sequence[Any],
    completions: Sequence[Any],
    **kwargs: Any,
) -> list[float]:
    """1.0 when the completion's tone fits the child's turn, 0.0 on a tone mismatch
    (`adapters.signals.tone.tone_mismatch`: "Yay, how fun!" after "I fell and my knee
    hurts" is 0.0). Needs the column ``user_turn``."""
    from adapters.signals.tone import tone_mismatch

    size = len(completions)
    user_turns = _column(kwargs, "user_turn", size)
    return [
        0.0 if tone_mismatch(str(u), _completion_text(c)) is not None else 1.0
        for u, c in zip(user_turns, completions, strict=True)
    ]


RULE_REWARDS: tuple[RewardFn, ...] = (
    reward_length,
    reward_kid_safe,
    reward_no_leak,
    reward_no_praise_before_correction,
    reward_no_question_when_main_asks,
)
"""The rewards that read one text filter (`build_reward_funcs` binds the limits)."""

REWARDS: Mapping[str, RewardFn] = MappingProxyType(
    {
        fn.__name__: fn
        for fn in (*RULE_REWARDS, reward_diverse_opener, reward_uptake, reward_tone_fit)
    }
)
"""Every automatic reward by its name (the metric TRL logs as ``rewards/<name>/mean``):
the rule rewards, the opener diversity and the two signal rewards."""


def build_reward_funcs(
    weights: Mapping[str, float] | None = None,
    *,
    limits: FilterLimits = DEFAULT_LIMITS,
    num_generations: int,
    judge: JudgeReward | None = None,
    judge_weight: float = 1.0,
    uptake_scorer: UptakeScorer | None = None,
) -> tuple[list[RewardFn], list[float]]:
    """The reward functions and weights for TRL (``reward_funcs``, ``reward_weights``).

    Every reward of `REWARDS` is included, in registry order, so every one is logged
    each step; a weight of 0 keeps a reward in the logs without letting it steer
    training. The judge comes last when given.

    Args:
        weights: reward name -> weight; names not given weigh 1.0.
        limits: Text-filter limits for the rule rewards (e.g. the personality's
            ``max_words``).
        num_generations: TRL's group size, bound into `reward_diverse_opener`.
        judge: The optional LLM judge.
        judge_weight: Its weight.
        uptake_scorer: The uptake model bound into ``reward_uptake``; None loads the
            process's default one now (`adapters.labels.load_uptake_scorer`), so a
            missing ``signals`` extra fails here, before training starts.

    Returns:
        (functions, weights), aligned. The functions are `functools.partial` objects
        of the named functions; TRL takes the wrapped function's ``__name__``.

    Raises:
        ValueError: an unknown reward name (listing the known ones) or a negative or
            non-finite weight, naming it.
        adapters.labels.SignalsUnavailable: the uptake model cannot be loaded.
    """
    given = dict(weights or {})
    known = [*REWARDS, JUDGE_NAME]
    for name, weight in given.items():
        if name not in known:
            raise ValueError(f"unknown reward {name!r}; known: {', '.join(known)}")
        if not (weight >= 0.0 and math.isfinite(weight)):
            raise ValueError(f"reward weight {name}: must be a finite number >= 0, got {weight}")
    if not (judge_weight >= 0.0 and math.isfinite(judge_weight)):
        raise ValueError(f"judge weight must be a finite number >= 0, got {judge_weight}")
    if JUDGE_NAME in given and judge is None:
        raise ValueError(f"a weight for {JUDGE_NAME} needs a judge endpoint")
    scorer = uptake_scorer if uptake_scorer is not None else load_uptake_scorer()
    funcs: list[RewardFn] = []
    out_weights: list[float] = []
    for name, fn in REWARDS.items():
        if fn is reward_diverse_opener:
            bound = functools.partial(fn, num_generations=num_generations)
        elif fn is reward_uptake:
            bound = functools.partial(fn, scorer=scorer)
        elif fn is reward_tone_fit:
            bound = functools.partial(fn)
        else:
            bound = functools.partial(fn, limits=limits)
        funcs.append(bound)
        out_weights.append(float(given.get(name, 1.0)))
    if judge is not None:
        funcs.append(judge)
        out_weights.append(float(given.get(JUDGE_NAME, judge_weight)))
    return funcs, out_weights


# --- the LLM judge ------------------------------------------------------------------


class JudgePromptError(ValueError):
    """The judge prompt file is missing, not YAML, or lacks a field or placeholder."""


JUDGE_PLACEHOLDERS: frozenset[str] = frozenset(
    {"personality", "pika_turn", "user_turn", "main_response", "fast_response"}
)


@dataclass(frozen=True)
class JudgePrompt(PromptFile):
    """The judge's prompt: a fixed system message and a user-message template."""

    def messages(
        self,
        *,
        personality: str,
        pika_turn: str | None,
        user_turn: str,
        main_response: str | None,
        fast_response: str,
    ) -> list[dict[str, str]]:
        """The chat messages asking for a score of `fast_response`."""
        return self.render(
            {
                "personality": personality,
                "pika_turn": pika_turn or NO_PIKA_TURN,
                "user_turn": user_turn,
                "main_response": main_response or NOT_KNOWN,
                "fast_response": fast_response,
            }
        )


def load_judge_prompt(path: Path = DEFAULT_JUDGE_PROMPT) -> JudgePrompt:
    """Read and check a judge prompt file (``version``, ``system``, ``user``;
    `adapters.llm_calls.read_prompt_file`).

    Raises:
        JudgePromptError: unreadable, not a mapping, a missing or empty field, a
            placeholder in ``system``, or ``user`` placeholders other than exactly
            `JUDGE_PLACEHOLDERS`.
    """
    return read_prompt_file(
        path, JudgePrompt, JUDGE_PLACEHOLDERS, JudgePromptError, "judge prompt file"
    )


_FENCE = re.compile(r"^```[A-Za-z0-9_-]*\s*\n?(.*?)\n?\s*```$", re.DOTALL)


def parse_judge_score(text: str | None) -> int | None:
    """The 1-5 score of a judge reply, or None when it has none.

    Accepted: a JSON object ``{"score": n}`` (n an integer 1-5, or a string or float
    holding one, e.g. "4" or 4.0), optionally inside a code fence or after other
    keys such as ``"reason"``. Anything else (no JSON, no score, out of range, 3.5)
    is None.
    """
    if text is None:
        return None
    body = text.strip()
    fence = _FENCE.match(body)
    if fence is not None:
        body = fence.group(1).strip()
    start, end = body.find("{"), body.rfind("}")
    if start < 0 or end < start:
        return None
    try:
        value = json.loads(body[start : end + 1])
    except json.JSONDecodeError:
        return None
    if not isinstance(value, dict) or "score" not in value:
        return None
    score = value["score"]
    if isinstance(score, bool):
        return None
    if isinstance(score, str):
        try:
            score = float(score.strip())
        except ValueError:
            return None
    if isinstance(score, float):
        if not score.is_integer():
            return None
        score = int(score)
    if isinstance(score, int) and 1 <= score <= 5:
        return score
    return None


def judge_schema() -> dict[str, Any]:
    """The ``response_format`` asking for ``{"score": 1-5}`` (OpenAI strict structured
    outputs and vLLM guided decoding both accept it)."""
    return {
        "type": "json_schema",
        "json_schema": {
            "name": "fast_response_score",
            "strict": True,
            "schema": {
                "type": "object",
                "properties": {"score": {"type": "integer", "enum": [1, 2, 3, 4, 5]}},
                "required": ["score"],
                "additionalProperties": False,
            },
        },
    }


class JudgeReplyError(RuntimeError):
    """A judge reply without a usable 1-5 score."""


class JudgeReward:
    """The LLM-judge reward: ``(score - 1) / 4`` of a 1-5 judge score per completion.

    A sync TRL reward function (an instance with ``__name__ == "reward_judge"``). One
    `openai.OpenAI` client is made on the first call and reused; the completions of a
    batch are scored `concurrency` at a time on a thread pool. Each request is retried
    with exponential backoff and jitter (tenacity) on 429, 408, 5xx, timeouts and
    connection errors (`adapters.llm_calls`, shared with `adapters.teacher`); the SDK's own
    retries are off.

    Failures never raise: a completion whose request still fails after its retries,
    or whose reply has no usable score (`parse_judge_score`), scores 0.0 and adds 1 to
    `failures`. Each call logs the batch's failure count through TRL's ``log_metric``
    as ``judge/failures`` (a mean per logging step). After `max_consecutive_failures`
    failures in a row the judge is taken as down: it stops sending requests and every
    later completion scores 0.0 and counts as a failure, so a dead endpoint costs a
    few backoff cycles, not one per completion for the rest of the run.

    Attributes:
        calls: Completions scored (including failures).
        failures: Completions scored 0.0 because the judge failed.
        disabled: True once the judge was taken as down.
    """

    def __init__(
        self,
        *,
        base_url: str,
        model: str,
        api_key: str | None = None,
        prompt_file: Path = DEFAULT_JUDGE_PROMPT,
        temperature: float = 0.0,
        max_tokens: int = 32,
        timeout_s: float = 30.0,
        max_retries: int = 3,
        backoff_initial_s: float = 1.0,
        backoff_max_s: float = 20.0,
        concurrency: int = 4,
        structured_output: bool = False,
        max_consecutive_failures: int = 16,
    ) -> None:
        """Check the settings and read the prompt; nothing is sent yet.

        Args:
            base_url: OpenAI-compatible API root, e.g. ``http://127.0.0.1:8100/v1``.
            model: Model name as the server knows it.
            api_key: Key to send; None sends "EMPTY" (a local vLLM needs none).
            prompt_file: The judge prompt (`load_judge_prompt`).
            temperature, max_tokens: Sampling of the judge's reply.
            timeout_s: Limit for one HTTP request, seconds.
            max_retries: Retries after the first attempt, on transient errors.
            backoff_initial_s, backoff_max_s: Backoff: doubles per retry from the
                initial wait, plus up to 1 s of jitter, capped (also a Retry-After).
            concurrency: Requests in flight at once.
            structured_output: Send ``response_format`` with `judge_schema`.
            max_consecutive_failures: Failures in a row after which the judge stops
                sending requests for the rest of the run.

        Raises:
            ValueError: a setting out of range (named).
            JudgePromptError: the prompt file is unusable.
        """
        if not base_url.startswith(("http://", "https://")):
            raise ValueError(f"judge base_url must be an http(s) URL, got {base_url!r}")
        for name, value in (
            ("timeout_s", timeout_s),
            ("backoff_initial_s", backoff_initial_s),
            ("backoff_max_s", backoff_max_s),
        ):
            if not value > 0:
                raise ValueError(f"judge {name} must be > 0, got {value}")
        if max_retries < 0:
            raise ValueError(f"judge max_retries must be >= 0, got {max_retries}")
        if concurrency < 1 or max_consecutive_failures < 1 or max_tokens < 1:
            raise ValueError("judge concurrency, max_tokens, max_consecutive_failures must be >= 1")
        self.__name__ = JUDGE_NAME
        self.base_url = base_url
        self.model = model
        self.prompt = load_judge_prompt(prompt_file)
        self.temperature = temperature
        self.max_tokens = max_tokens
        self.timeout_s = timeout_s
        self.max_retries = max_retries
        self.backoff_initial_s = backoff_initial_s
        self.backoff_max_s = backoff_max_s
        self.concurrency = concurrency
        self.structured_output = structured_output
        self.max_consecutive_failures = max_consecutive_failures
        self._api_key = api_key or "EMPTY"
        self._client: Any = None
        self._pool: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()
        self._in_a_row = 0
        self.calls = 0
        self.failures = 0
        self.disabled = False

    def __repr__(self) -> str:
        return f"JudgeReward(base_url={self.base_url!r}, model={self.model!r})"

    def _ensure_client(self) -> Any:
        if self._client is None:
            from openai import OpenAI

            self._client = OpenAI(
                base_url=self.base_url,
                api_key=self._api_key,
                timeout=self.timeout_s,
                max_retries=0,  # tenacity is the one retry loop
            )
            self._pool = ThreadPoolExecutor(
                max_workers=self.concurrency, thread_name_prefix="grpo-judge"
            )
        return self._client

    def close(self) -> None:
        """Close the HTTP client and the thread pool (a later call opens new ones)."""
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        if self._client is not None:
            self._client.close()
            self._client = None

    def __enter__(self) -> JudgeReward:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _wait(self, retry_state: Any) -> float:
        """Exponential backoff with jitter, or the server's Retry-After, both capped."""
        return backoff_wait(retry_state, self.backoff_initial_s, self.backoff_max_s)

    def score_one(self, messages: list[dict[str, str]]) -> int:
        """The judge's 1-5 score for one prompt, with retries.

        Raises:
            openai.APIError: the request failed after its retries (or at once for a
                status that is not retried).
            JudgeReplyError: the reply has no usable score.
        """
        from tenacity import Retrying, retry_if_exception, stop_after_attempt

        client = self._ensure_client()
        extra: dict[str, Any] = {}
        if self.structured_output:
            extra["response_format"] = judge_schema()
        for attempt in Retrying(
            stop=stop_after_attempt(self.max_retries + 1),
            wait=self._wait,
            retry=retry_if_exception(is_retryable),
            reraise=True,
        ):
            with attempt:
                response = client.chat.completions.create(
                    model=self.model,
                    messages=messages,
                    temperature=self.temperature,
                    max_tokens=self.max_tokens,
                    **extra,
                )
        try:
            content = response.choices[0].message.content
        except (AttributeError, TypeError, IndexError) as exc:
            raise JudgeReplyError(f"not a chat completion: {str(response)[:200]!r}") from exc
        score = parse_judge_score(content if isinstance(content, str) else None)
        if score is None:
            raise JudgeReplyError(f"no 1-5 score in the reply {str(content)[:200]!r}")
        return score

    def _reward(self, messages: list[dict[str, str]]) -> float:
        """One completion's reward; 0.0 (counted) on any judge failure."""
        with self._lock:
            if self.disabled:
                self.calls += 1
                self.failures += 1
                return 0.0
        try:
            score = self.score_one(messages)
        except Exception as exc:  # any judge failure: score 0.0, count it, keep training
            with self._lock:
                self.calls += 1
                self.failures += 1
                self._in_a_row += 1
                if self._in_a_row >= self.max_consecutive_failures and not self.disabled:
                    self.disabled = True
                    log.warning(
                        "judge %s failed %d times in a row (last: %s: %s); it is taken as "
                        "down and scores 0.0 for the rest of the run",
                        self.base_url,
                        self._in_a_row,
                        type(exc).__name__,
                        exc,
                    )
                else:
                    log.warning("judge call failed: %s: %s", type(exc).__name__, exc)
            return 0.0
        with self._lock:
            self.calls += 1
            self._in_a_row = 0
        return (score - 1) / 4

    def __call__(
        self,
        prompts: Sequence[Any],
        completions: Sequence[Any],
        **kwargs: Any,
    ) -> list[float]:
        """Score each completion, `concurrency` requests at a time.

        Args:
            prompts: The prompts (unused: the judge sees the turn, not the model input).
            completions: One text per completion.
            **kwargs: Dataset columns ``user_turn`` (required), ``main_response``,
                ``pika_turn``, ``personality`` (optional), and TRL's ``log_metric``.

        Returns:
            One value per completion in [0, 1]: ``(score - 1) / 4``, or 0.0 on failure.
        """
        size = len(completions)
        user_turns = _column(kwargs, "user_turn", size)
        mains = _column(kwargs, "main_response", size) if "main_response" in kwargs else None
        pikas = _column(kwargs, "pika_turn", size) if "pika_turn" in kwargs else None
        people = _column(kwargs, "personality", size) if "personality" in kwargs else None
        requests = [
            self.prompt.messages(
                personality=str(people[i]) if people else "pika",
                pika_turn=pikas[i] if pikas else None,
                user_turn=str(user_turns[i]),
                main_response=mains[i] if mains else None,
                fast_response=_completion_text(completions[i]),
            )
            for i in range(size)
        ]
        before = self.failures
        self._ensure_client()
        assert self._pool is not None
        rewards = list(self._pool.map(self._reward, requests))
        log_metric = kwargs.get("log_metric")
        if callable(log_metric):
            log_metric("judge/failures", float(self.failures - before))
        return rewards


def judge_api_key(env_var: str | None, environ: Mapping[str, str] | None = None) -> str | None:
    """The judge's API key from `env_var` (None or unset: no key)."""
    if not env_var:
        return None
    env = os.environ if environ is None else environ
    return env.get(env_var) or None
