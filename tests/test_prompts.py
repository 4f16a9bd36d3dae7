"""The prompt builder in both modes, with golden text written by hand."""

from __future__ import annotations

from pathlib import Path

import pytest

from service.personalities import FewShotExample, Personality
from service.prompts import Turn, build_prompt, chat_messages

PERSONALITY = Personality(
    name="calm",
    description="Gentle.",
    style="Soft.",
    max_words=10,
    fallback_phrases=("Mm.",),
    few_shot=(FewShotExample(pika_turn="Colour?", user_turn="Red!", fast_response="Red, lovely."),),
)

HEADER = (
    "You are Pika, a friendly English tutor for young children. "
    "Personality: Gentle. Style: Soft.\n"
    "After the child speaks, Pika says one short, warm reaction (at most 10 words) "
    "to what the child actually said. It leads into Pika's next line without answering it, "
    "repeating it or contradicting it."
)


def test_few_shot_prompt_golden() -> None:
    turn = Turn("What did you eat?", "I ate pho\nwith my dad", "Pho is a noodle soup.")
    assert build_prompt(PERSONALITY, turn, "few_shot") == (
        f"{HEADER}\n\n"
        "Pika asked: Colour?\nChild said: Red!\nPika's quick reaction: Red, lovely.\n\n"
        "Pika asked: What did you eat?\nChild said: I ate pho with my dad\n"
        "Pika will say next: Pho is a noodle soup.\nPika's quick reaction:"
    )


def test_missing_pika_turn_and_main_response_leave_their_lines_out() -> None:
    prompt = build_prompt(PERSONALITY, Turn(None, "Hello"), "few_shot")
    assert prompt.endswith(
        "Pika's quick reaction: Red, lovely.\n\nChild said: Hello\nPika's quick reaction:"
    )


def test_requests_of_one_personality_share_the_prefix() -> None:
    a = build_prompt(PERSONALITY, Turn("Q1?", "A1", "M1"), "few_shot")
    b = build_prompt(PERSONALITY, Turn("Q2?", "A2", None), "few_shot")
    shared = len(a) - len(a.split("\n\n")[-1])
    assert a[:shared] == b[:shared]
    assert a[shared:] != b[shared:]


def test_chat_messages_put_the_request_last_and_append_the_answer() -> None:
    messages = chat_messages(PERSONALITY, Turn("Q?", "A"), fast_response="Nice!")
    assert messages == [
        {"role": "system", "content": HEADER},
        {"role": "user", "content": "Pika asked: Q?\nChild said: A"},
        {"role": "assistant", "content": "Nice!"},
    ]


def test_chat_mode_renders_with_the_model_tokenizer(tiny_model_dir: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    prompt = build_prompt(PERSONALITY, Turn("Q?", "A"), "chat", tokenizer)
    assert prompt == (
        f"<|im_start|>system\n{HEADER}<|im_end|>\n"
        "<|im_start|>user\nPika asked: Q?\nChild said: A<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


def test_chat_mode_without_tokenizer_is_refused() -> None:
    with pytest.raises(ValueError, match="tokenizer"):
        build_prompt(PERSONALITY, Turn(None, "A"), "chat")
