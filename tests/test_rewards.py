"""Golden examples for the GRPO rewards (adapters/rewards.py).

Every expected value below was decided by reading the example against the rule it
tests (the filter table in service/text_checks.py and the diversity rule in
adapters/rewards.py), not by running the code. The judge runs its real `openai`
client against a scripted local HTTP server (tests/fake_judge.py): the judge's quality
is not under test here, its plumbing is (retries, parsing, failures counted, never
raising).
"""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path
from typing import Any

import pytest

from adapters.rewards import (
    DEFAULT_JUDGE_PROMPT,
    JUDGE_NAME,
    REWARDS,
    JudgePromptError,
    JudgeReward,
    build_reward_funcs,
    load_judge_prompt,
    parse_judge_score,
    reward_diverse_opener,
    reward_kid_safe,
    reward_length,
    reward_no_leak,
    reward_no_praise_before_correction,
    reward_no_question_when_main_asks,
)
from service.text_checks import FilterLimits, opener
from tests.conftest import free_port
from tests.fake_judge import fake_judge

PINNED_JUDGE_PROMPTS = {
    "grpo-judge-v1": "84affe5eebca6a7537e75529b4d1da395678dbc914613f2563ddca0357312d84",
}
"""judge prompt version -> SHA-256 of its file. A changed prompt needs a new version
(a new file): two adapters naming one judge version were scored by the same text."""

RewardCall = Any


def score(
    fn: RewardCall,
    completions: list[str],
    *,
    user_turn: str,
    main_response: str | None,
    **extra: Any,
) -> list[float]:
    """Call a reward as TRL does: prompts, completions, every column as a list, and
    TRL's own extra keywords."""
    n = len(completions)
    kwargs: dict[str, Any] = {
        "completion_ids": [[1, 2, 3]] * n,
        "user_turn": [user_turn] * n,
        "main_response": [main_response] * n,
        "pika_turn": ["What is seven plus six?"] * n,
        "personality": ["calm"] * n,
        "trainer_state": None,
        "log_extra": lambda *a, **k: None,
        "log_metric": lambda *a, **k: None,
    }
    kwargs.update(extra)
    return list(fn(prompts=["<prompt>"] * n, completions=completions, **kwargs))


# --- the registry -------------------------------------------------------------------


def test_registry_names_are_the_logged_metric_names() -> None:
    assert list(REWARDS) == [
        "reward_length",
        "reward_kid_safe",
        "reward_no_leak",
        "reward_no_praise_before_correction",
        "reward_no_question_when_main_asks",
        "reward_diverse_opener",
        "reward_uptake",
        "reward_tone_fit",
    ]
    for name, fn in REWARDS.items():
        assert fn.__name__ == name


def test_build_reward_funcs_weights_names_and_bound_arguments() -> None:
    judge = JudgeReward(base_url="http://127.0.0.1:9/v1", model="judge")
    funcs, weights = build_reward_funcs(
        {"reward_length": 2.0, "reward_diverse_opener": 0.0, JUDGE_NAME: 0.5},
        limits=FilterLimits(max_words=3),
        num_generations=2,
        judge=judge,
    )
    # TRL names a reward by the __name__ of the function a partial wraps, or of the
    # object (trl.trainer.utils.get_callable_name; not imported here: trl takes seconds
    # to import, and tests/test_grpo_tiny.py checks the logged names end to end).
    names = [(f.func if isinstance(f, functools.partial) else f).__name__ for f in funcs]
    assert names == [*REWARDS, JUDGE_NAME]
    assert weights == [2.0, 1.0, 1.0, 1.0, 1.0, 0.0, 1.0, 1.0, 0.5]
    # The personality's word limit and the group size are bound in.
    assert score(funcs[0], ["Ooh, a red truck!"], user_turn="red", main_response=None) == [0.0]
    diverse = funcs[5]
    assert isinstance(diverse, functools.partial)
    assert diverse.keywords == {"num_generations": 2}
    # Without a judge, its weight is refused; unknown names and negative weights too.
    with pytest.raises(ValueError, match=JUDGE_NAME):
        build_reward_funcs({JUDGE_NAME: 1.0}, num_generations=2)
    with pytest.raises(ValueError, match="reward_lenght"):
        build_reward_funcs({"reward_lenght": 1.0}, num_generations=2)
    with pytest.raises(ValueError, match="reward_kid_safe"):
        build_reward_funcs({"reward_kid_safe": -1.0}, num_generations=2)


# --- reward_length ------------------------------------------------------------------


def test_length() -> None:
    twelve = "Wow, you and your dad ate a big warm bowl of pho!"  # 12 words, 51 chars
    thirteen = "Wow, you and your dad ate a big warm bowl of pho today!"
    long_words = (
        "Extraordinary, spectacular, magnificent, phenomenal, astonishing, unbelievable answers!"
    )
    assert len(long_words.split()) == 7 and len(long_words) > 70  # precondition
    completions = ["Ooh, a red fire truck!", twelve, thirteen, long_words, "", "   ", "  Ooh!\n"]
    assert score(reward_length, completions, user_turn="I ate pho", main_response=None) == [
        1.0,
        1.0,
        0.0,
        0.0,
        0.0,
        0.0,
        1.0,
    ]


def test_length_uses_the_personality_word_limit() -> None:
    three = FilterLimits(max_words=3)
    assert score(
        functools.partial(reward_length, limits=three),
        ["Ooh, a red truck!", "Ooh, red truck!"],
        user_turn="red",
        main_response=None,
    ) == [0.0, 1.0]


# --- reward_kid_safe ----------------------------------------------------------------


def test_kid_safe() -> None:
    completions = [
        "You are so stupid!",  # extra unsafe word
        "What the hell!",  # extra unsafe word
        "This is shit.",  # the profanity list
        "Ooh, a big black dog!",  # an ignored innocent list entry
        "Ooh, a dog in the park!",
    ]
    assert score(
        reward_kid_safe, completions, user_turn="I saw a big black dog", main_response=None
    ) == [0.0, 0.0, 0.0, 1.0, 1.0]


# --- reward_no_leak -----------------------------------------------------------------

WRONG = "I think it is twelve."
CORRECTION = "Not quite. Seven plus six is thirteen. Let's count together."


def test_no_leak_numbers() -> None:
    completions = [
        "Hmm, is it 13?",  # the answer's number, as digits
        "Hmm, thirteen!",  # ... as a word
        "Hmm, twelve, let me see.",  # the child's own number: not a leak
        "Ooh, let's see!",
    ]
    assert score(reward_no_leak, completions, user_turn=WRONG, main_response=CORRECTION) == [
        0.0,
        0.0,
        1.0,
        1.0,
    ]


def test_no_leak_content_words() -> None:
    main = "That's okay! A baby cat is called a kitten. Can you say kitten?"
    # "baby" and "kitten": two content words of the answer the child did not say.
    assert score(
        reward_no_leak,
        ["A baby kitten!", "Ooh, a kitten!"],
        user_turn="I don't know.",
        main_response=main,
    ) == [0.0, 1.0]


def test_no_leak_without_main_response_passes() -> None:
    assert score(reward_no_leak, ["Hmm, is it 13?"], user_turn=WRONG, main_response=None) == [1.0]


# --- reward_no_praise_before_correction ---------------------------------------------


def test_no_praise_before_a_correction() -> None:
    completions = ["Great job!", "You got it!", "Good try!", "Hmm, let me see."]
    assert score(
        reward_no_praise_before_correction,
        completions,
        user_turn=WRONG,
        main_response=CORRECTION,
    ) == [0.0, 0.0, 1.0, 1.0]


def test_praise_is_fine_when_the_main_response_praises_or_is_unknown() -> None:
    praising = "Yes! Seven plus six is thirteen."
    for main in (praising, None):
        assert score(
            reward_no_praise_before_correction,
            ["Great job!"],
            user_turn="Thirteen!",
            main_response=main,
        ) == [1.0]


# --- reward_no_question_when_main_asks ----------------------------------------------


def test_no_question_when_the_main_response_asks_one() -> None:
    child = "I ate pho with my dad"
    asks = "Pho is a noodle soup. Can you say noodle soup?"
    tells = "Pho is a noodle soup from Vietnam."
    fn = reward_no_question_when_main_asks
    completions = ["Ooh, do you like pho?", "Ooh, pho with your dad!"]
    assert score(fn, completions, user_turn=child, main_response=asks) == [0.0, 1.0]
    assert score(fn, completions, user_turn=child, main_response=tells) == [1.0, 1.0]
    assert score(fn, completions, user_turn=child, main_response=None) == [1.0, 1.0]


# --- reward_diverse_opener ----------------------------------------------------------


def test_opener_is_two_words_lower_cased_without_punctuation() -> None:
    # The diversity reward's opener is service.text_checks.opener (the evaluation uses
    # it too); these are the cases the reward relies on.
    assert opener("Ooh, nice!") == "ooh nice"
    assert opener("ooh NICE... a dog") == "ooh nice"
    assert opener("Oh... wow") == "oh wow"
    assert opener("It\u2019s fun!") == "it's fun"
    assert opener("\u2014 Wow!") == "wow"
    assert opener("") == ""


def test_diverse_opener_group_of_four_with_two_equal_openers() -> None:
    group = ["Ooh, nice!", "Wow, cool.", "ooh nice... a dog", "Hmm, okay."]
    assert reward_diverse_opener(["p"] * 4, group, num_generations=4) == [1.0, 1.0, 0.0, 1.0]


def test_diverse_opener_compares_within_a_group_only() -> None:
    # Two groups of 2: "Ooh, nice" opens both groups (no penalty across groups), and
    # repeats inside the second group.
    completions = ["Ooh nice", "Wow", "Ooh, nice!", "OOH NICE."]
    prompts = ["p1", "p1", "p2", "p2"]
    assert reward_diverse_opener(prompts, completions, num_generations=2) == [1.0, 1.0, 1.0, 0.0]
    # Without num_generations, a group is a run of equal consecutive prompts.
    assert reward_diverse_opener(prompts, completions) == [1.0, 1.0, 1.0, 0.0]
    with pytest.raises(ValueError, match="num_generations=3"):
        reward_diverse_opener(prompts, completions, num_generations=3)


def test_rule_rewards_need_the_user_turn_column() -> None:
    with pytest.raises(ValueError, match="user_turn"):
        reward_length(prompts=["p"], completions=["Ooh!"], main_response=[None])


# --- the judge: reply parsing and prompt file ---------------------------------------


@pytest.mark.parametrize(
    ("reply", "expected"),
    [
        ('{"score": 4}', 4),
        ('```json\n{"score": 5}\n```', 5),
        ('{"reason": "warm and specific", "score": "3"}', 3),
        ('{"score": 1.0}', 1),
        ('Sure! {"score": 2}', 2),
        ('{"score": 3.5}', None),
        ('{"score": 6}', None),
        ('{"score": 0}', None),
        ('{"score": true}', None),
        ('{"rating": 4}', None),
        ("Score: 4", None),
        ("", None),
        (None, None),
    ],
)
def test_parse_judge_score(reply: str | None, expected: int | None) -> None:
    assert parse_judge_score(reply) == expected


def test_judge_prompt_file_is_pinned_to_its_version() -> None:
    prompt = load_judge_prompt()
    assert prompt.version in PINNED_JUDGE_PROMPTS, f"pin {prompt.version}"
    digest = hashlib.sha256(DEFAULT_JUDGE_PROMPT.read_bytes()).hexdigest()
    assert prompt.sha256 == digest
    assert digest == PINNED_JUDGE_PROMPTS[prompt.version], (
        f"{DEFAULT_JUDGE_PROMPT.name} changed but its version is still {prompt.version}: "
        "copy it to a new file with a new version instead"
    )


def test_judge_prompt_file_errors_name_the_problem(tmp_path: Path) -> None:
    bad = tmp_path / "judge.yaml"
    bad.write_text("version: x\nsystem: s\nuser: '{{user_turn}} {{fast_response}}'\n")
    with pytest.raises(JudgePromptError, match="missing main_response, personality, pika_turn"):
        load_judge_prompt(bad)
    bad.write_text("version: x\nsystem: s\n")
    with pytest.raises(JudgePromptError, match="'user'"):
        load_judge_prompt(bad)


# --- the judge against a scripted server --------------------------------------------


def judge_for(url: str, **settings: Any) -> JudgeReward:
    values: dict[str, Any] = {"backoff_initial_s": 0.01, "backoff_max_s": 0.02, "max_retries": 2}
    values.update(settings)
    return JudgeReward(base_url=url, model="judge-model", **values)


def by_fast_response(scores: dict[str, int]) -> Any:
    def reply(body: dict[str, Any], number: int) -> tuple[int, str]:
        user = body["messages"][1]["content"]
        for text, value in scores.items():
            if f"Fast response to grade: {text}\n" in user:
                return 200, f'{{"score": {value}}}'
        return 200, '{"score": 3}'

    return reply


def test_judge_scores_map_to_zero_one() -> None:
    with fake_judge(by_fast_response({"Ooh, a cow!": 5, "Hm.": 1, "Mm, cows.": 3})) as server:
        metrics: list[tuple[str, float]] = []
        with judge_for(server.url) as judge:
            rewards = score(
                judge,
                ["Ooh, a cow!", "Hm.", "Mm, cows."],
                user_turn="Cow.",
                main_response=None,
                log_metric=lambda name, value: metrics.append((name, value)),
            )
        assert rewards == [1.0, 0.0, 0.5]
        assert (judge.calls, judge.failures) == (3, 0)
        assert metrics == [("judge/failures", 0.0)]
        body = server.requests[0]
        assert body["model"] == "judge-model"
        assert body["temperature"] == 0.0
        user = body["messages"][1]["content"]
        assert "The child said: Cow.\n" in user
        assert "Main answer: not known yet\n" in user
        assert "Pika's previous turn: What is seven plus six?\n" in user
        assert "Personality: calm\n" in user
        assert body["messages"][0]["content"] == load_judge_prompt().system


def test_judge_retries_transient_errors() -> None:
    def reply(body: dict[str, Any], number: int) -> tuple[int, str]:
        return (503, "busy") if number < 2 else (200, '{"score": 5}')

    with fake_judge(reply) as server, judge_for(server.url, max_retries=2) as judge:
        assert score(judge, ["Ooh!"], user_turn="Cow.", main_response="A cow says moo.") == [1.0]
        assert len(server.requests) == 3
        assert judge.failures == 0


def test_judge_failures_score_zero_and_are_counted() -> None:
    def reply(body: dict[str, Any], number: int) -> tuple[int, str]:
        user = body["messages"][1]["content"]
        if "grade: bad request" in user:
            return 400, "refused"
        if "grade: prose" in user:
            return 200, "I would give it a 4."
        return 200, '{"score": 5}'

    metrics: list[tuple[str, float]] = []
    with fake_judge(reply) as server, judge_for(server.url, concurrency=1) as judge:
        rewards = score(
            judge,
            ["bad request", "prose", "fine"],
            user_turn="Cow.",
            main_response=None,
            log_metric=lambda name, value: metrics.append((name, value)),
        )
        assert rewards == [0.0, 0.0, 1.0]
        assert (judge.calls, judge.failures) == (3, 2)
        assert len(server.requests) == 3  # a 400 is not retried
        assert metrics == [("judge/failures", 2.0)]


def test_judge_endpoint_down_scores_zero_without_raising() -> None:
    url = f"http://127.0.0.1:{free_port()}/v1"  # nothing listens there
    metrics: list[tuple[str, float]] = []
    with judge_for(url, max_retries=1) as judge:
        rewards = score(
            judge,
            ["Ooh!", "Mm."],
            user_turn="Cow.",
            main_response=None,
            log_metric=lambda name, value: metrics.append((name, value)),
        )
    assert rewards == [0.0, 0.0]
    assert (judge.calls, judge.failures) == (2, 2)
    assert metrics == [("judge/failures", 2.0)]


def test_judge_stops_calling_after_consecutive_failures() -> None:
    with (
        fake_judge(lambda body, number: (500, "down")) as server,
        judge_for(server.url, max_retries=0, concurrency=1, max_consecutive_failures=2) as judge,
    ):
        rewards = score(judge, ["a", "b", "c", "d", "e"], user_turn="Cow.", main_response=None)
        assert rewards == [0.0] * 5
        assert judge.disabled
        assert (judge.calls, judge.failures) == (5, 5)
        assert len(server.requests) == 2  # then no more requests
