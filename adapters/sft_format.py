"""A training row to model input: the prompt the gateway sends, and the answer to learn.

Shared by SFT (`adapters.sft`), GRPO and the prompt-parity test, so every trainer sees
exactly what serving sends:

- `row_turn` turns a training row (`adapters.dataset` docstring: the seed format)
  back into the `service.prompts.Turn` it was built from;
- `training_prompt` renders it with `service.prompts.build_prompt(..., "chat",
  tokenizer)`, the very call `FastResponseService.prompt_for` makes for a personality
  served by an adapter. The row's own system message is not used: the prompt comes
  from the personality manifest, as at serving time;
- `training_completion` is the rest of the chat-template rendering with the answer
  appended: the fast response plus the end-of-turn marker (`<|im_end|>` for ChatML,
  `<end_of_turn>` for gemma), which is what stops generation when served;
- `tokenize_example` tokenises both as the engine does: the prompt alone, with the
  tokenizer's special tokens (vLLM adds gemma's `<bos>` to a text prompt), then the
  completion without them. Tokenising the two apart matters: the engine never sees
  the answer when it tokenises the prompt, so a BPE merge across the boundary would
  teach the model tokens it is never asked to continue from.

Only the service's prompt module and the standard library are imported here.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

from service.personalities import Personality
from service.prompts import ChatTokenizer, Turn, build_prompt, chat_messages


class TrainingDataError(ValueError):
    """A training file or row is malformed; the message names the row and field."""


class TrainingTokenizer(ChatTokenizer, Protocol):
    """The part of a Hugging Face tokenizer training needs: chat template and `__call__`."""

    def __call__(self, text: str, /, **kwargs: Any) -> Any: ...


def read_training_rows(path: Path) -> list[dict[str, Any]]:
    """The JSON objects of a training-rows file (`fastresp data build` output).

    Blank lines are skipped. Rows are not validated here: `row_turn` and
    `row_fast_response` check the fields they use.

    Raises:
        TrainingDataError: a line is not UTF-8 or not a JSON object (its line number is
            named).
        OSError: the file cannot be read.
    """
    rows: list[dict[str, Any]] = []
    with path.open("rb") as lines:
        for number, raw in enumerate(lines, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise TrainingDataError(f"{path}:{number}: not UTF-8: {exc}") from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as exc:
                raise TrainingDataError(f"{path}:{number}: not JSON: {exc}") from None
            if not isinstance(row, dict):
                raise TrainingDataError(f"{path}:{number}: not a JSON object")
            rows.append(row)
    return rows


def _row_id(row: Mapping[str, Any]) -> str:
    value = row.get("id")
    return repr(value) if isinstance(value, str) else "(no id)"


def _optional_text(row: Mapping[str, Any], field: str, value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise TrainingDataError(f"row {_row_id(row)}: {field}: must be a string or null")
    return value if value.strip() else None


def row_turn(row: Mapping[str, Any]) -> Turn:
    """The turn of a training row: Pika's turn (the assistant message of
    `previous_conversation`, if any), the child's turn (its last user message) and
    `main_response` (null when unknown or dropped).

    Raises:
        TrainingDataError: a malformed row; the message names the row id and field.
    """
    messages = row.get("previous_conversation")
    if not isinstance(messages, Sequence) or isinstance(messages, str) or not messages:
        raise TrainingDataError(
            f"row {_row_id(row)}: previous_conversation: must be a non-empty list of messages"
        )
    pika_turn: str | None = None
    user_turn: str | None = None
    for index, message in enumerate(messages):
        field = f"previous_conversation[{index}]"
        if not isinstance(message, Mapping):
            raise TrainingDataError(f"row {_row_id(row)}: {field}: must be an object")
        role, content = message.get("role"), message.get("content")
        if role not in ("system", "assistant", "user"):
            raise TrainingDataError(
                f"row {_row_id(row)}: {field}.role: must be system, assistant or user"
            )
        if not isinstance(content, str):
            raise TrainingDataError(f"row {_row_id(row)}: {field}.content: must be a string")
        if role == "assistant":
            pika_turn = content
        elif role == "user":
            user_turn = content
    if user_turn is None or not user_turn.strip():
        raise TrainingDataError(
            f"row {_row_id(row)}: previous_conversation: no non-empty user message"
        )
    main_response = _optional_text(row, "main_response", row.get("main_response"))
    return Turn(_optional_text(row, "pika_turn", pika_turn), user_turn, main_response)


def row_fast_response(row: Mapping[str, Any]) -> str:
    """The fast response a row teaches (`assistant_fast_response`).

    Raises:
        TrainingDataError: missing, not a string, or blank.
    """
    value = row.get("assistant_fast_response")
    if not isinstance(value, str) or not value.strip():
        raise TrainingDataError(
            f"row {_row_id(row)}: assistant_fast_response: must be a non-empty string"
        )
    return value


def training_prompt(personality: Personality, turn: Turn, tokenizer: ChatTokenizer) -> str:
    """The prompt the gateway sends for `turn` when `personality` has an adapter:
    exactly `build_prompt(personality, turn, "chat", tokenizer)`."""
    return build_prompt(personality, turn, "chat", tokenizer)


def training_completion(
    personality: Personality, turn: Turn, fast_response: str, tokenizer: ChatTokenizer
) -> str:
    """The text the model must generate after `training_prompt`: the answer and the
    end-of-turn marker, e.g. ``"beta beta<|im_end|>"`` (ChatML) or
    ``"Ooh!<end_of_turn>"`` (gemma). Trailing whitespace after the marker is dropped:
    generation stops at the marker.

    Raises:
        TrainingDataError: the chat template renders the conversation with the answer
            so that it does not start with the prompt (a template that changes earlier
            turns when an answer follows cannot be trained this way).
    """
    prompt = training_prompt(personality, turn, tokenizer)
    full = tokenizer.apply_chat_template(
        chat_messages(personality, turn, fast_response),
        tokenize=False,
        add_generation_prompt=False,
        enable_thinking=False,
    )
    if not isinstance(full, str):
        raise TypeError("apply_chat_template(tokenize=False) did not return a string")
    if not full.startswith(prompt):
        raise TrainingDataError(
            "the chat template renders the conversation with the answer differently from "
            "the prompt (add_generation_prompt=True) before the answer starts, so the "
            "training prompt would not be the served one"
        )
    completion = full[len(prompt) :].rstrip()
    if not completion.strip():
        raise TrainingDataError("the chat template rendered an empty answer")
    return completion


def tokenize_example(
    prompt: str, completion: str, tokenizer: TrainingTokenizer
) -> dict[str, list[int]]:
    """Token ids of prompt + completion, tokenised as the engine does.

    The prompt is tokenised with the tokenizer's special tokens (as vLLM tokenises a
    text prompt: gemma's `<bos>` comes first), the completion without them, and the two
    are concatenated.

    Returns:
        ``{"input_ids": prompt ids + completion ids, "completion_mask": [0] * len(prompt
        ids) + [1] * len(completion ids)}``: TRL's pre-tokenized columns.
    """
    prompt_ids = [int(i) for i in tokenizer(prompt).input_ids]
    completion_ids = [int(i) for i in tokenizer(completion, add_special_tokens=False).input_ids]
    return {
        "input_ids": prompt_ids + completion_ids,
        "completion_mask": [0] * len(prompt_ids) + [1] * len(completion_ids),
    }
