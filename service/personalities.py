"""The personality manifest (`adapters/personalities.yaml`) as typed objects."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import yaml
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError

PersonalityName = Annotated[str, StringConstraints(pattern=r"^[a-z][a-z0-9_-]{0,63}$")]


class SamplingConfig(BaseModel):
    """Sampling settings of one personality (vLLM `SamplingParams` fields)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_tokens: int = Field(default=24, ge=1, le=256)
    temperature: float = Field(default=0.7, ge=0.0, le=2.0)
    top_p: float = Field(default=0.9, gt=0.0, le=1.0)
    stop: tuple[str, ...] = ("\n",)


class FewShotExample(BaseModel):
    """One worked example in the few-shot prompt."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    pika_turn: str | None = None
    user_turn: str = Field(min_length=1)
    main_response: str | None = None
    fast_response: str = Field(min_length=1)


class Personality(BaseModel):
    """One Pika personality: prompt text, sampling, optional LoRA adapter, fallbacks."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: PersonalityName
    description: str = Field(min_length=1)
    style: str = Field(min_length=1)
    max_words: int = Field(default=12, ge=1, le=40)
    sampling: SamplingConfig = SamplingConfig()
    adapter: Path | None = None
    fallback_phrases: tuple[str, ...] = Field(min_length=1)
    few_shot: tuple[FewShotExample, ...] = ()


class ManifestError(ValueError):
    """The personality manifest is missing or invalid; the message names the field."""


def load_personalities(path: Path) -> dict[str, Personality]:
    """Read the manifest at `path`.

    Returns:
        personality name -> Personality, in file order. Relative adapter paths are
        resolved against the manifest's folder.

    Raises:
        ManifestError: unreadable YAML, or a field that fails validation (named).
    """
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise ManifestError(f"cannot read personalities file {path}: {exc}") from exc
    if not isinstance(raw, dict) or not isinstance(raw.get("personalities"), dict):
        raise ManifestError(f"{path}: expected a mapping with a 'personalities' mapping")
    result: dict[str, Personality] = {}
    for name, body in raw["personalities"].items():
        if not isinstance(body, dict):
            raise ManifestError(f"{path}: personalities.{name} must be a mapping")
        try:
            personality = Personality.model_validate({"name": name, **body})
        except ValidationError as exc:
            problems = "; ".join(
                f"personalities.{name}.{'.'.join(str(p) for p in err['loc'])}: {err['msg']}"
                for err in exc.errors()
            )
            raise ManifestError(f"{path}: {problems}") from exc
        if personality.adapter is not None and not personality.adapter.is_absolute():
            personality = personality.model_copy(
                update={"adapter": (path.parent / personality.adapter).resolve()}
            )
        result[name] = personality
    if not result:
        raise ManifestError(f"{path}: no personalities defined")
    return result
