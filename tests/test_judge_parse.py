"""Judge replies to verdicts: repairs, rejections; the prompt files and the schemas.

Every expected value below is written by hand from the reply text, not produced by
the parser. No server is involved (tests/test_judge_http.py has the requests).
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Any

import pytest

from adapters.eval_rows import JUDGEMENT_KINDS, JudgementKind
from adapters.judge import (
    DEFAULT_PROMPT_FILES,
    JudgeConfig,
    JudgeItem,
    JudgePromptError,
    judge_input_sha256,
    judgement_schema,
    load_judge_prompts,
    parse_judgement,
    record_id,
    verdict_of,
)
from adapters.llm_calls import NO_PIKA_TURN, NOT_KNOWN, ChatEndpoint, ChatEndpointConfig
from adapters.teacher import TeacherConfig, candidates_schema

PINNED_PROMPTS = {
    "judge-intent-v1": "492ead891268ec847122941ff95659d48af4525375ae7cabaf0389eb3f5ce9bc",
    "judge-bridging-v1": "1e08ba2e4c02ae42205c5801d03ab84a814be3e0e0e1cbb28f69bed7dcc4f1fc",
}
"""prompt version -> SHA-256 of its file. A changed prompt file needs a new version
(a new file, e.g. judge-intent-v2.yaml): two runs naming one judge version must have
been judged by the same text."""

FULL_INTENT = (
    '{"intent_score": 4, "reasoning": "Hears the guess.", '
    '"intent_detected": "a guess", "alignment_quality": "good"}'
)
INTENT_DETAILS = {"intent_detected": "a guess", "alignment_quality": "good"}
NO_OTHER_INTENT_FIELDS = ["missing_field:intent_detected", "missing_field:alignment_quality"]

# (reply, expected score, expected reasoning, expected repairs)
INTENT_ACCEPTED: list[tuple[str, int, str, list[str]]] = [
    (FULL_INTENT, 4, "Hears the guess.", []),
    (f"```json\n{FULL_INTENT}\n```", 4, "Hears the guess.", ["code_fence"]),
    (f"```\n{FULL_INTENT}\n```", 4, "Hears the guess.", ["code_fence"]),
    (
        f"Here is my grade:\n```json\n{FULL_INTENT}\n```\nThanks!",
        4,
        "Hears the guess.",
        ["code_fence", "surrounding_prose"],
    ),
    (f"Sure! {FULL_INTENT} Hope that helps.", 4, "Hears the guess.", ["surrounding_prose"]),
    (FULL_INTENT.replace(": 4,", ': "4",'), 4, "Hears the guess.", ["score_string"]),
    (FULL_INTENT.replace(": 4,", ": 4.0,"), 4, "Hears the guess.", ["score_float"]),
    (FULL_INTENT.replace('"intent_score"', '"score"'), 4, "Hears the guess.", ["renamed_field"]),
    (FULL_INTENT.replace(": 4,", ": 1,"), 1, "Hears the guess.", []),
    (FULL_INTENT.replace(": 4,", ": 5,"), 5, "Hears the guess.", []),
]


@pytest.mark.parametrize(("reply", "score", "reasoning", "repairs"), INTENT_ACCEPTED)
def test_intent_replies_are_accepted_or_repaired(
    reply: str, score: int, reasoning: str, repairs: list[str]
) -> None:
    parsed = parse_judgement("intent", reply)
    assert parsed.error is None
    assert parsed.score == score
    assert parsed.reasoning == reasoning
    assert parsed.details == INTENT_DETAILS
    assert parsed.repairs == repairs


def test_truncated_after_the_score_keeps_it_and_the_partial_reasoning() -> None:
    parsed = parse_judgement("intent", '{"intent_score": 4, "reasoning": "The child gu')
    assert parsed.error is None
    assert parsed.score == 4
    assert parsed.reasoning == "The child gu"
    assert parsed.details == {"intent_detected": "", "alignment_quality": ""}
    assert parsed.repairs == ["truncated_json", *NO_OTHER_INTENT_FIELDS]


def test_truncated_right_after_the_score() -> None:
    parsed = parse_judgement("bridging", '{"bridging_score": 2, "reasoning": ')
    assert parsed.score == 2
    assert parsed.reasoning == ""
    assert parsed.details == {"leaks": None, "repeats": None, "contradicts": None}
    assert parsed.repairs == [
        "truncated_json",
        "missing_field:reasoning",
        "missing_field:leaks",
        "missing_field:repeats",
        "missing_field:contradicts",
    ]


def test_truncated_bridging_keeps_the_complete_flags() -> None:
    parsed = parse_judgement(
        "bridging", '{"bridging_score": 1, "reasoning": "Says six.", "leaks": true, "rep'
    )
    assert parsed.score == 1
    assert parsed.reasoning == "Says six."
    assert parsed.details == {"leaks": True, "repeats": None, "contradicts": None}
    assert parsed.repairs == [
        "truncated_json",
        "missing_field:repeats",
        "missing_field:contradicts",
    ]


# (reply, expected error): out of range is never clamped
INTENT_REJECTED: list[tuple[str | None, str]] = [
    (None, "empty reply"),
    ("", "empty reply"),
    ("   \n", "empty reply"),
    ('{"intent_score": 0, "reasoning": "x"}', "intent_score 0 is outside 1-5"),
    ('{"intent_score": 6, "reasoning": "x"}', "intent_score 6 is outside 1-5"),
    ('{"intent_score": -1, "reasoning": "x"}', "intent_score -1 is outside 1-5"),
    ('{"intent_score": "6"}', "intent_score 6 is outside 1-5"),
    ('{"score": 6}', "intent_score 6 is outside 1-5"),
    ('{"intent_score": 3.5}', "intent_score 3.5 is not a whole number"),
    ('{"intent_score": "3.5"}', 'intent_score "3.5" is not a whole number'),
    ('{"intent_score": true}', "intent_score true is not an integer 1-5"),
    ('{"intent_score": false}', "intent_score false is not an integer 1-5"),
    ('{"intent_score": null}', "intent_score null is not an integer 1-5"),
    ('{"intent_score": "four"}', 'intent_score "four" is not a number'),
    ('{"intent_score": [4]}', "intent_score [4] is not an integer 1-5"),
    ('{"reasoning": "The child gu', "reply cut off before intent_score (no complete JSON object)"),
    ('{"intent_sc', "reply cut off before intent_score (no complete JSON object)"),
    ('{"reasoning": "fine"}', "no intent_score field (keys: reasoning)"),
    ('{"bridging_score": 4}', "no intent_score field (keys: bridging_score)"),
    ("The response is great, I give it a 5.", "no JSON object in the reply"),
    ("[4, 5]", "reply is a JSON list, not an object"),
    ("4", "reply is a JSON int, not an object"),
]


@pytest.mark.parametrize(("reply", "error"), INTENT_REJECTED)
def test_intent_replies_are_rejected_naming_the_value(reply: str | None, error: str) -> None:
    parsed = parse_judgement("intent", reply)
    assert parsed.score is None
    assert parsed.reasoning is None
    assert parsed.error == error


def test_a_missing_text_field_is_accepted_as_empty() -> None:
    parsed = parse_judgement("intent", '{"intent_score": 3, "reasoning": "Generic."}')
    assert parsed.score == 3
    assert parsed.details == {"intent_detected": "", "alignment_quality": ""}
    assert parsed.repairs == NO_OTHER_INTENT_FIELDS
    parsed = parse_judgement(
        "intent", '{"intent_score": 2, "intent_detected": 7, "alignment_quality": "poor"}'
    )
    assert parsed.reasoning == ""
    assert parsed.details == {"intent_detected": "", "alignment_quality": "poor"}
    assert parsed.repairs == ["missing_field:reasoning", "missing_field:intent_detected"]


FULL_BRIDGING = (
    '{"bridging_score": 1, "reasoning": "Praises before a correction.", '
    '"leaks": false, "repeats": false, "contradicts": true}'
)


def test_bridging_reply_with_its_flags() -> None:
    parsed = parse_judgement("bridging", FULL_BRIDGING)
    assert parsed.error is None
    assert parsed.score == 1
    assert parsed.reasoning == "Praises before a correction."
    assert parsed.details == {"leaks": False, "repeats": False, "contradicts": True}
    assert parsed.repairs == []


def test_a_bridging_flag_that_is_not_a_boolean_is_none() -> None:
    parsed = parse_judgement(
        "bridging", '{"bridging_score": 5, "reasoning": "ok", "leaks": "no", "repeats": false}'
    )
    assert parsed.score == 5
    assert parsed.details == {"leaks": None, "repeats": False, "contradicts": None}
    assert parsed.repairs == ["missing_field:leaks", "missing_field:contradicts"]


def test_bridging_scores_are_read_from_their_own_field() -> None:
    assert parse_judgement("bridging", '{"bridging_score": 6}').error == (
        "bridging_score 6 is outside 1-5"
    )
    assert parse_judgement("bridging", '{"score": "2"}').repairs[:2] == [
        "renamed_field",
        "score_string",
    ]
    # an intent reply is not a bridging one
    assert parse_judgement("bridging", FULL_INTENT).error == (
        "no bridging_score field (keys: alignment_quality, intent_detected, intent_score, "
        "reasoning)"
    )


def test_the_verdict_of_an_unparsable_reply_says_why() -> None:
    verdict = verdict_of("intent", parse_judgement("intent", '{"intent_score": 0}'))
    assert verdict.kind == "intent"
    assert verdict.score is None
    assert verdict.error == "unparsable reply: intent_score 0 is outside 1-5"
    verdict = verdict_of("bridging", parse_judgement("bridging", FULL_BRIDGING))
    assert verdict.score == 1 and verdict.error is None
    assert verdict.details == {"leaks": False, "repeats": False, "contradicts": True}


# --- the prompt files ---------------------------------------------------------------


@pytest.mark.parametrize("kind", JUDGEMENT_KINDS)
def test_prompt_file_is_pinned_to_its_version(kind: JudgementKind) -> None:
    path = DEFAULT_PROMPT_FILES[kind]
    prompt = load_judge_prompts(JudgeConfig(base_url="http://127.0.0.1:1/v1", model="j"))[kind]
    assert prompt.version == f"judge-{kind}-v1"
    assert path.name == f"{prompt.version}.yaml"
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    assert PINNED_PROMPTS.get(prompt.version) == digest, (
        f"{path} changed without a new version: copy it to a new file with a new "
        "`version` instead of editing this one"
    )
    assert prompt.sha256 == digest


def test_intent_prompt_states_the_rubric_of_the_issue() -> None:
    system = load_judge_prompts(JudgeConfig(base_url="http://h/v1", model="j"))["intent"].system
    # issue 6, word for word
    for line in (
        "5 = perfect understanding, the response directly addresses the intent.",
        "4 = good understanding, minor misalignment.",
        "3 = adequate understanding, somewhat generic.",
        "2 = poor understanding, partly off-topic.",
        "1 = no understanding, completely irrelevant.",
    ):
        assert line in system
    assert '{"intent_score": 4, "reasoning":' in system  # the score first


def test_bridging_prompt_asks_for_its_fields_score_first() -> None:
    system = load_judge_prompts(JudgeConfig(base_url="http://h/v1", model="j"))["bridging"].system
    assert '{"bridging_score": 4, "reasoning":' in system
    for word in ("LEAKS", "REPEATS", "CONTRADICTS", "not known yet"):
        assert word in system


def test_prompt_messages_fill_every_placeholder() -> None:
    prompts = load_judge_prompts(JudgeConfig(base_url="http://h/v1", model="j"))
    item = JudgeItem(
        id="t1|calm",
        personality="calm",
        pika_turn=None,
        user_turn="Seven?",
        main_response=None,
        fast_response="Ooh, a guess!",
    )
    for kind in JUDGEMENT_KINDS:
        system, user = prompts[kind].messages(item)
        assert system == {"role": "system", "content": prompts[kind].system}
        assert user["role"] == "user"
        assert "{{" not in user["content"]
        for text in ("calm", NO_PIKA_TURN, "Seven?", NOT_KNOWN, "Ooh, a guess!"):
            assert text in user["content"]


def test_a_bad_prompt_file_is_refused(tmp_path: Path) -> None:
    bad = tmp_path / "judge.yaml"
    bad.write_text("version: x\nsystem: hello\nuser: '{{personality}} {{user_turn}}'\n")
    config = JudgeConfig(base_url="http://h/v1", model="j", prompt_files={"intent": bad})
    with pytest.raises(JudgePromptError, match=re.escape(f"{bad}: 'user' placeholders")):
        load_judge_prompts(config)
    missing = tmp_path / "nope.yaml"
    config = JudgeConfig(base_url="http://h/v1", model="j", prompt_files={"bridging": missing})
    with pytest.raises(JudgePromptError, match="cannot read bridging judge prompt file"):
        load_judge_prompts(config)
    same = JudgeConfig(
        base_url="http://h/v1",
        model="j",
        prompt_files={"bridging": DEFAULT_PROMPT_FILES["intent"]},
    )
    with pytest.raises(JudgePromptError, match="need different prompt files"):
        load_judge_prompts(same)


def test_config_checks_the_url_and_resolves_the_key() -> None:
    with pytest.raises(ValueError, match="http:// or https://"):
        JudgeConfig(base_url="127.0.0.1:8000", model="j")
    config = JudgeConfig(base_url="http://h/v1", model="j")
    assert config.resolved_api_key({}) == "EMPTY"
    assert config.resolved_api_key({"OPENAI_API_KEY": "b"}) == "b"
    env = {"OPENAI_API_KEY": "b", "FASTRESP_JUDGE_API_KEY": "a"}
    assert config.resolved_api_key(env) == "a"
    assert JudgeConfig(base_url="http://h/v1", model="j", api_key="c").resolved_api_key(env) == "c"


def test_judge_and_teacher_configs_share_one_base_with_their_own_defaults() -> None:
    judge = JudgeConfig(base_url="http://h/v1", model="j", api_key="k", max_tokens=99)
    teacher = TeacherConfig(base_url="http://t/v1", model="t")
    assert isinstance(judge, ChatEndpointConfig) and isinstance(teacher, ChatEndpointConfig)
    assert (judge.temperature, teacher.temperature) == (0.0, 0.9)
    assert JudgeConfig.api_key_env_vars == ("FASTRESP_JUDGE_API_KEY", "OPENAI_API_KEY")
    assert TeacherConfig.api_key_env_vars == ("FASTRESP_TEACHER_API_KEY", "OPENAI_API_KEY")
    # each key variable is its own role's: the judge's is not the teacher's
    assert teacher.resolved_api_key({"FASTRESP_JUDGE_API_KEY": "a"}) == "EMPTY"
    assert "api_key_env_vars" not in JudgeConfig.model_fields  # a ClassVar, not a field
    with pytest.raises(ValueError, match="extra"):
        JudgeConfig(base_url="http://h/v1", model="j", k=3)  # type: ignore[call-arg]
    assert judge.endpoint() == ChatEndpoint(
        base_url="http://h/v1",
        model="j",
        api_key="k",
        temperature=0.0,
        max_tokens=99,
        timeout_s=60.0,
        max_retries=5,
        backoff_initial_s=1.0,
        backoff_max_s=30.0,
        structured_output="auto",
        response_format=None,
        label="judge",
    )
    endpoint = teacher.endpoint(response_format=candidates_schema(4))
    assert (endpoint.label, endpoint.temperature, endpoint.api_key) == ("teacher", 0.9, "EMPTY")
    assert endpoint.response_format == candidates_schema(4)


# --- what a judgement judged ----------------------------------------------------------

ITEM = JudgeItem(
    id="t1|calm",
    personality="calm",
    pika_turn=None,
    user_turn="Seven?",
    main_response=None,
    fast_response="Ooh, a gu\u00e9ss!",
)


def test_the_input_hash_is_of_the_canonical_json_of_kind_and_texts() -> None:
    # written out by hand: sorted keys, no spaces, null for None, the é as UTF-8
    canonical = (
        '{"fast_response":"Ooh, a gu\u00e9ss!","kind":"intent","main_response":null,'
        '"personality":"calm","pika_turn":null,"user_turn":"Seven?"}'
    ).encode()
    assert "\u00e9".encode() in canonical
    expected = hashlib.sha256(canonical).hexdigest()
    assert judge_input_sha256(ITEM, "intent") == expected
    assert record_id(ITEM, "intent") == f"t1|calm|intent|{expected[:16]}"


def test_the_input_hash_changes_with_every_judged_text_and_not_with_the_id() -> None:
    base = judge_input_sha256(ITEM, "intent")
    assert judge_input_sha256(ITEM, "bridging") != base
    for change in (
        {"personality": "playful"},
        {"pika_turn": "What is three plus three?"},
        {"pika_turn": ""},  # "" and None render alike, but are not the same input
        {"user_turn": "Seven!"},
        {"main_response": "Close! It is six."},
        {"fast_response": "Ooh, a guess."},
    ):
        changed = JudgeItem(**(vars(ITEM) | change))
        assert judge_input_sha256(changed, "intent") != base, change
    renamed = JudgeItem(**(vars(ITEM) | {"id": "t2|calm"}))
    assert judge_input_sha256(renamed, "intent") == base
    assert record_id(renamed, "intent") != record_id(ITEM, "intent")


# --- the schemas --------------------------------------------------------------------


def _schema(kind: JudgementKind) -> dict[str, Any]:
    body = judgement_schema(kind)
    assert body["type"] == "json_schema"
    assert body["json_schema"]["strict"] is True
    schema: dict[str, Any] = body["json_schema"]["schema"]
    return schema


def test_intent_schema() -> None:
    schema = _schema("intent")
    assert list(schema["properties"]) == [
        "intent_score",
        "reasoning",
        "intent_detected",
        "alignment_quality",
    ]
    assert schema["properties"]["intent_score"] == {"type": "integer", "enum": [1, 2, 3, 4, 5]}
    assert schema["properties"]["alignment_quality"]["enum"] == [
        "perfect",
        "good",
        "adequate",
        "poor",
        "none",
    ]
    assert schema["required"] == list(schema["properties"])
    assert schema["additionalProperties"] is False


def test_bridging_schema() -> None:
    schema = _schema("bridging")
    assert list(schema["properties"]) == [
        "bridging_score",
        "reasoning",
        "leaks",
        "repeats",
        "contradicts",
    ]
    for flag in ("leaks", "repeats", "contradicts"):
        assert schema["properties"][flag] == {"type": "boolean"}
    assert schema["required"] == list(schema["properties"])
    assert schema["additionalProperties"] is False
