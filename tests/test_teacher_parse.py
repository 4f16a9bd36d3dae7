"""Teacher replies to candidates: repairs, rejections, rows; and the prompt file.

Every expected value below is written by hand from the reply text, not produced by
the parser.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import pytest

from adapters.sources import Triple
from adapters.teacher import (
    DEFAULT_PROMPT_FILE,
    NOT_KNOWN,
    PromptFileError,
    TeacherConfig,
    TeacherReply,
    build_row,
    candidates_schema,
    load_prompt,
    parse_reply,
)
from service.personalities import Personality
from service.text_checks import FILTERS, FilterLimits, failed_filters

PINNED_PROMPTS = {
    "teacher-v1": "0f2b8d9970b277acd3d9a85ff6e360bab0c039cb7111124ee0783b2792683202",
}
"""prompt version -> SHA-256 of its file. A changed prompt file needs a new version
(a new file, e.g. teacher-v2.yaml): rows must never mix two texts under one version."""

# (reply, expected candidates, expected repairs)
REPAIRED: list[tuple[str, list[str], list[str]]] = [
    ('{"candidates": ["Ooh, a cow!", "Mm, I hear you."]}', ["Ooh, a cow!", "Mm, I hear you."], []),
    ('```json\n{"candidates": ["Wow!", "Yay!"]}\n```', ["Wow!", "Yay!"], ["code_fence"]),
    ('```\n{"candidates": ["Wow!"]}\n```', ["Wow!"], ["code_fence"]),
    (
        'Here you go:\n```json\n{"candidates": ["Wow!"]}\n```\nHope this helps!',
        ["Wow!"],
        ["code_fence", "surrounding_prose"],
    ),
    (
        'Sure! {"candidates": ["Oh, a red bus!"]} Let me know if you need more.',
        ["Oh, a red bus!"],
        ["surrounding_prose"],
    ),
    (
        'Example: {"a": 1}. Answer: {"candidates": ["Yay, a kite!"]}',
        ["Yay, a kite!"],
        ["surrounding_prose"],
    ),
    ('["Ooh!", "Aw, thank you."]', ["Ooh!", "Aw, thank you."], ["bare_list"]),
    ('{"candidates": "Ooh, a cow!"}', ["Ooh, a cow!"], ["string_not_list"]),
    ('"Ooh, a cow!"', ["Ooh, a cow!"], ["string_not_list"]),
    (
        '{"candidates": ["Ooh!", 3, null, "", ["x"], "  Wow,   a cow! "]}',
        ["Ooh!", "Wow, a cow!"],
        ["dropped_items"],
    ),
    (
        '{"candidates": [{"text": "Ooh!"}, {"fast_response": "Yay!"}, {"score": 1}]}',
        ["Ooh!", "Yay!"],
        ["object_items", "dropped_items"],
    ),
    ('{"responses": ["Ooh!", "Yay!"], "note": "two"}', ["Ooh!", "Yay!"], ["renamed_field"]),
    ('{"fast_response": "Ooh, a cow!"}', ["Ooh, a cow!"], ["renamed_field"]),
    ('{"candidates": ["Ooh!", "ooh!", "Yay!"]}', ["Ooh!", "Yay!"], ["duplicates"]),
    (
        '{"candidates": ["Ooh, a cow!", "Mm, I hear y',
        ["Ooh, a cow!"],
        ["truncated_json"],
    ),
    (
        '```json\n{"candidates": ["A \\"big\\" cow!", "Mm',
        ['A "big" cow!'],
        ["code_fence", "truncated_json"],
    ),
    ('{"candidates": ["Caf\\u00e9 time!"]}', ["Café time!"], []),
]

# (reply, expected error)
REJECTED: list[tuple[str | None, str]] = [
    (None, "empty reply"),
    ("", "empty reply"),
    ("   \n", "empty reply"),
    ("Ooh, a cow!", "no JSON object or list in the reply"),
    ('{"candidates": ["Ooh', "no JSON object or list in the reply"),
    ("42", "reply is a JSON int, not an object"),
    ('{"answer": 42}', "no 'candidates' field (keys: answer)"),
    ('{"a": ["x"], "b": ["y"]}', "no 'candidates' field (keys: a, b)"),
    ('{"candidates": 7}', "'candidates' is a int, not a list"),
    ('{"candidates": {"first": "Ooh!"}}', "'candidates' is a dict, not a list"),
    ('{"candidates": []}', "no usable candidate (empty list)"),
    ('{"candidates": ["", "  ", 5]}', "no usable candidate (empty list)"),
    ("```json\n```", "no JSON object or list in the reply"),
]


@pytest.mark.parametrize(("reply", "candidates", "repairs"), REPAIRED)
def test_repaired_replies(reply: str, candidates: list[str], repairs: list[str]) -> None:
    parsed = parse_reply(reply)
    assert parsed.error is None
    assert parsed.candidates == candidates
    assert parsed.repairs == repairs


@pytest.mark.parametrize(("reply", "error"), REJECTED)
def test_rejected_replies(reply: str | None, error: str) -> None:
    parsed = parse_reply(reply)
    assert parsed.error == error
    assert parsed.candidates == []


def test_more_candidates_than_asked_keeps_the_first_k() -> None:
    parsed = parse_reply('{"candidates": ["One!", "Two!", "Three!"]}', k=2)
    assert parsed.candidates == ["One!", "Two!"]
    assert parsed.repairs == ["extra_candidates"]


def test_parser_never_raises_on_odd_input() -> None:
    for reply in ["{", "[", "}{", '{"candidates": [', "```", "\x00", '{"candidates": [1, {}]}']:
        parsed = parse_reply(reply)
        assert parsed.error is not None, reply


# --- rows ---------------------------------------------------------------------------

TRIPLE = Triple(
    id="t1",
    source="test",
    lesson_id="L1",
    pika_turn="What is three plus two?",
    user_turn="Six.",
    main_response="Not quite. Three plus two is five. Let's count on our fingers.",
)
CONFIG = TeacherConfig(base_url="http://127.0.0.1:1/v1", model="teacher-model", k=3)


def _reply(content: str | None) -> TeacherReply:
    return TeacherReply(
        content=content,
        prompt_tokens=100,
        completion_tokens=20,
        structured_output=True,
        finish_reason="stop",
    )


def test_unparsable_reply_is_a_rejected_row_with_the_detail() -> None:
    prompt = load_prompt()
    row = build_row(
        TRIPLE,
        "calm",
        _reply("I cannot help with that."),
        prompt=prompt,
        config=CONFIG,
        base_url="http://127.0.0.1:1/v1",
        limits=FilterLimits(),
    )
    assert row.status == "rejected"
    assert row.reason == "unparsable_reply"
    assert row.fast_response is None
    assert row.labeler == "teacher"
    assert row.prompt_version == "teacher-v1"
    assert row.id == "t1|calm"
    assert row.teacher is not None
    assert row.teacher["error"] == "no JSON object or list in the reply"
    assert row.teacher["reply"] == "I cannot help with that."
    assert row.teacher["model"] == "teacher-model"
    assert row.teacher["prompt_tokens"] == 100
    assert row.teacher["completion_tokens"] == 20
    assert row.teacher["structured_output"] is True


def test_row_selects_among_repaired_candidates() -> None:
    long_one = "Hmm, " + "let us think about this one very slowly together now, " * 2
    reply = (
        f'```json\n{{"candidates": ["{long_one}", "Hmm, thank you for giving it a go.", 5]}}\n```'
    )
    row = build_row(
        TRIPLE,
        "calm",
        _reply(reply),
        prompt=load_prompt(),
        config=CONFIG,
        base_url="http://x/v1",
        limits=FilterLimits(),
    )
    assert row.status == "accepted"
    assert row.fast_response == "Hmm, thank you for giving it a go."
    assert row.alternatives == []
    assert [candidate.text for candidate in row.rejected] == [long_one.strip()]
    assert row.rejected[0].reasons  # failed at least the length filter
    assert set(row.rejected[0].reasons) <= set(FILTERS)
    assert row.teacher is not None
    assert row.teacher["repairs"] == ["code_fence", "dropped_items"]


def test_row_with_no_passing_candidate() -> None:
    row = build_row(
        TRIPLE,
        "calm",
        _reply('{"candidates": ["Great job, that is correct!"]}'),
        prompt=load_prompt(),
        config=CONFIG,
        base_url="http://x/v1",
        limits=FilterLimits(),
    )
    assert row.status == "rejected"
    assert row.reason == "no_candidate_passed"
    assert row.fast_response is None
    assert [candidate.text for candidate in row.rejected] == ["Great job, that is correct!"]


# --- the prompt file ----------------------------------------------------------------


def test_prompt_file_is_pinned_to_its_version() -> None:
    prompt = load_prompt()
    assert prompt.version in PINNED_PROMPTS, f"pin {prompt.version} in PINNED_PROMPTS"
    digest = hashlib.sha256(DEFAULT_PROMPT_FILE.read_bytes()).hexdigest()
    assert prompt.sha256 == digest
    assert digest == PINNED_PROMPTS[prompt.version], (
        f"{DEFAULT_PROMPT_FILE.name} changed but its version is still {prompt.version}: "
        "copy it to a new file with a new version instead"
    )


PERSONALITY = Personality(
    name="calm",
    description="Gentle and patient.",
    style="Calm, warm and simple.",
    fallback_phrases=("Mm.",),
)


def test_prompt_messages_carry_every_input() -> None:
    prompt = load_prompt()
    messages = prompt.messages(TRIPLE, PERSONALITY, 5)
    assert [m["role"] for m in messages] == ["system", "user"]
    user = messages[1]["content"]
    assert "Personality: calm\n" in user
    assert "Description: Gentle and patient.\n" in user
    assert "Style: Calm, warm and simple.\n" in user
    assert "Pika's previous turn: What is three plus two?\n" in user
    assert "The child said: Six.\n" in user
    assert f"Main answer: {TRIPLE.main_response}\n" in user
    assert "exactly 5 different candidate" in user
    assert "{{" not in user and "{{" not in messages[0]["content"]
    # the system message is the same for every request (a shared, cacheable prefix)
    other = Triple(id="t2", source="test", user_turn="Hi!")
    assert prompt.messages(other, PERSONALITY, 2)[0] == messages[0]


def test_prompt_without_main_response_or_pika_turn() -> None:
    triple = Triple(id="t3", source="test", user_turn="{{main_response}} Cow.")
    user = load_prompt().messages(triple, PERSONALITY, 4)[1]["content"]
    assert f"Main answer: {NOT_KNOWN}\n" in user
    assert "Pika's previous turn: none (the conversation starts here)\n" in user
    # a placeholder inside the child's text is not expanded again
    assert "The child said: {{main_response}} Cow.\n" in user


def _examples(system: str) -> list[tuple[str, str | None, list[str]]]:
    """(child's turn, main answer or None, candidates) of every few-shot example."""
    pattern = re.compile(
        r"The child said: (.*)\nMain answer: (.*)\n(\{.*\})",
    )
    found = []
    for user_turn, main, reply in pattern.findall(system):
        parsed = parse_reply(reply)
        assert parsed.error is None and parsed.repairs == [], reply
        found.append((user_turn, None if main == NOT_KNOWN else main, parsed.candidates))
    return found


def test_few_shot_examples_cover_the_cases_and_pass_every_filter() -> None:
    system = load_prompt().system
    for case in (
        "a correct answer",
        "a wrong answer",
        '"I don\'t know"',
        "off-topic chatter",
        "a sad or worried child",
        "a one-word answer",
    ):
        assert f": {case}" in system, case
    examples = _examples(system)
    assert len(examples) == 6
    for user_turn, main, candidates in examples:
        assert len(candidates) == 3
        for candidate in candidates:
            failed = failed_filters(candidate, user_turn=user_turn, main_response=main)
            assert failed == [], (candidate, failed)


def test_schema_asks_for_exactly_k_strings() -> None:
    schema = candidates_schema(4)
    assert schema["type"] == "json_schema"
    body = schema["json_schema"]["schema"]
    assert body["required"] == ["candidates"]
    assert body["properties"]["candidates"]["minItems"] == 4
    assert body["properties"]["candidates"]["maxItems"] == 4
    assert body["properties"]["candidates"]["items"] == {"type": "string"}


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("version: v\nsystem: s {{k}}\nuser: u\n", "'system' must have no placeholders"),
        ("version: v\nsystem: s\nuser: '{{k}} {{oops}}'\n", "unknown oops"),
        ("version: v\nsystem: s\n", "'user' must be a non-empty string"),
        ("- a list\n", "expected a mapping"),
        ("version: [\n", "cannot read prompt file"),
    ],
)
def test_bad_prompt_files_are_refused(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "prompt.yaml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(PromptFileError, match=re.escape(message)):
        load_prompt(path)


def test_api_key_resolution_order() -> None:
    config = TeacherConfig(base_url="http://x/v1", model="m")
    both = {"FASTRESP_TEACHER_API_KEY": "fastresp-key", "OPENAI_API_KEY": "openai-key"}
    assert config.resolved_api_key(both) == "fastresp-key"
    assert config.resolved_api_key({"OPENAI_API_KEY": "openai-key"}) == "openai-key"
    assert config.resolved_api_key({}) == "EMPTY"
    explicit = TeacherConfig(base_url="http://x/v1", model="m", api_key="flag-key")  # type: ignore[arg-type]
    assert explicit.resolved_api_key(both) == "flag-key"
    assert "flag-key" not in repr(explicit)
