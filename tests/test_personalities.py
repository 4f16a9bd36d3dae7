"""The shipped manifest loads and the loader names bad fields."""

from __future__ import annotations

from pathlib import Path

import pytest

from service.personalities import ManifestError, load_personalities
from service.settings import default_personalities_file


def test_shipped_manifest_has_two_complete_personalities() -> None:
    personalities = load_personalities(default_personalities_file())
    assert {"cheerful", "calm"} <= set(personalities)
    for personality in personalities.values():
        assert personality.fallback_phrases
        assert personality.few_shot, "base-model serving needs few-shot examples"
        assert "\n\n" in personality.sampling.stop, "a base model ends a reaction with a blank line"


def test_relative_adapter_path_is_resolved_against_the_manifest(tmp_path: Path) -> None:
    manifest = tmp_path / "p.yaml"
    manifest.write_text(
        "personalities:\n  one:\n    description: d\n    style: s\n"
        "    adapter: adapters/one\n    fallback_phrases: [Hi.]\n"
    )
    assert load_personalities(manifest)["one"].adapter == tmp_path / "adapters" / "one"


@pytest.mark.parametrize(
    ("body", "named"),
    [
        ("personalities:\n  one:\n    style: s\n    fallback_phrases: [Hi.]\n", "one.description"),
        (
            "personalities:\n  one:\n    description: d\n    style: s\n    fallback_phrases: []\n",
            "one.fallback_phrases",
        ),
        (
            "personalities:\n  one:\n    description: d\n    style: s\n    fallback_phrases: [a]\n"
            "    sampling: {max_tokens: 0}\n",
            "one.sampling.max_tokens",
        ),
        (
            "personalities:\n  Bad Name:\n    description: d\n    style: s\n"
            "    fallback_phrases: [a]\n",
            "Bad Name.name",
        ),
        ("personalities: {}\n", "no personalities"),
        ("[1, 2\n", "cannot read"),
    ],
)
def test_bad_manifest_names_the_field(tmp_path: Path, body: str, named: str) -> None:
    manifest = tmp_path / "p.yaml"
    manifest.write_text(body)
    with pytest.raises(ManifestError, match=named.replace(".", r"\.")):
        load_personalities(manifest)
