"""The prompt builder: the single place that turns a turn into model input.

Serving (`service.fast_response`) and SFT formatting (`adapters`) both call it, so
training and serving cannot drift apart. Two modes:

- **few-shot completion**, for a base model with no adapter: the personality's
  header and worked examples, then the request, ending at "Pika's quick reaction:";
- **chat template**, for instruct and fine-tuned models: a system message (the
  personality's header) and a user message (the request), rendered with the
  tokenizer's own chat template.

Everything shared by one personality comes first and never varies, so vLLM's
prefix caching reuses it; the per-request part comes last.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from service.personalities import FewShotExample, Personality

PromptMode = Literal["few_shot", "chat"]

#: Bumped whenever the wording below changes: adapters record the prompt version
#: they were trained with.
PROMPT_VERSION = "2026-11-29.1"

REACTION_LABEL = "Pika's quick reaction:"


class ChatTokenizer(Protocol):
    """The part of a Hugging Face tokenizer the chat mode needs."""

    def apply_chat_template(self, conversation: Any, /, **kwargs: Any) -> Any: ...


@dataclass(frozen=True, slots=True)
class Turn:
    """One request: what Pika said, what the child said, and (if known) Pika's main answer."""

    pika_turn: str | None
    user_turn: str
    main_response: str | None = None


def _one_line(text: str) -> str:
    """Collapse all whitespace (newlines included) to single spaces."""
    return " ".join(text.split())


def system_text(personality: Personality) -> str:
    """The personality's fixed instructions; the stable prefix of both modes."""
    return (
        "You are Pika, a friendly English tutor for young children. "
        f"Personality: {_one_line(personality.description)} "
        f"Style: {_one_line(personality.style)}\n"
        "After the child speaks, Pika says one short, warm reaction "
        f"(at most {personality.max_words} words) to what the child actually said. "
        "It leads into Pika's next line without answering it, repeating it or "
        "contradicting it."
    )


def format_turn(turn: Turn | FewShotExample) -> str:
    """The per-request block: Pika's question, the child's answer, Pika's next line."""
    lines = []
    if turn.pika_turn and turn.pika_turn.strip():
        lines.append(f"Pika asked: {_one_line(turn.pika_turn)}")
    lines.append(f"Child said: {_one_line(turn.user_turn)}")
    if turn.main_response and turn.main_response.strip():
        lines.append(f"Pika will say next: {_one_line(turn.main_response)}")
    return "\n".join(lines)


def few_shot_prompt(personality: Personality, turn: Turn) -> str:
    """A completion prompt for a base model; generation continues after the label.

    Stop on "\\n" so the model writes one line.
    """
    blocks = [system_text(personality)]
    for example in personality.few_shot:
        reaction = _one_line(example.fast_response)
        blocks.append(f"{format_turn(example)}\n{REACTION_LABEL} {reaction}")
    blocks.append(f"{format_turn(turn)}\n{REACTION_LABEL}")
    return "\n\n".join(blocks)


def chat_messages(
    personality: Personality, turn: Turn, fast_response: str | None = None
) -> list[dict[str, str]]:
    """Chat messages for `turn`; with `fast_response`, the assistant answer is appended
    (the SFT training example)."""
    messages = [
        {"role": "system", "content": system_text(personality)},
        {"role": "user", "content": format_turn(turn)},
    ]
    if fast_response is not None:
        messages.append({"role": "assistant", "content": fast_response})
    return messages


def chat_prompt(tokenizer: ChatTokenizer, personality: Personality, turn: Turn) -> str:
    """The chat-template prompt, ending where the assistant's answer starts.

    `enable_thinking=False` turns off Qwen3's reasoning block; other templates ignore it.
    """
    rendered = tokenizer.apply_chat_template(
        chat_messages(personality, turn),
        tokenize=False,
        add_generation_prompt=True,
        enable_thinking=False,
    )
    if not isinstance(rendered, str):
        raise TypeError("apply_chat_template(tokenize=False) did not return a string")
    return rendered


def build_prompt(
    personality: Personality,
    turn: Turn,
    mode: PromptMode,
    tokenizer: ChatTokenizer | None = None,
) -> str:
    """Model input for `turn` in `mode`.

    The turn's texts are data: chat-template control tokens written in them
    (``<|im_start|>``, ``<start_of_turn>``, ``</s>``, and every special token of
    `tokenizer` when one is given) are replaced by a space first
    (`child_safety.strip_control_tokens`), since the tokenizer, vLLM's too, would parse
    them as the real tokens and a child's text could open a system message.

    Raises:
        ValueError: chat mode without a tokenizer.
    """
    turn = _without_control_tokens(turn, tokenizer)
    if mode == "few_shot":
        return few_shot_prompt(personality, turn)
    if tokenizer is None:
        raise ValueError("chat mode needs the model's tokenizer")
    return chat_prompt(tokenizer, personality, turn)


@functools.lru_cache(maxsize=4)
def _special_tokens(tokenizer: Any) -> frozenset[str]:
    from service.child_safety import special_tokens

    return special_tokens(tokenizer)


def _without_control_tokens(turn: Turn, tokenizer: Any | None) -> Turn:
    """`turn` with control tokens taken out of its texts (see `build_prompt`)."""
    from service.child_safety import strip_control_tokens

    tokens = _special_tokens(tokenizer) if tokenizer is not None else frozenset()

    def strip(text: str | None) -> str | None:
        return None if text is None else strip_control_tokens(text, tokens)

    user_turn = strip_control_tokens(turn.user_turn, tokens)
    return Turn(strip(turn.pika_turn), user_turn, strip(turn.main_response))
