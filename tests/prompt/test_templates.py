"""Prompt template versions: the shipped file and the parser's errors."""

from __future__ import annotations

import pytest

from services.prompt import templates


def test_shipped_templates(shipped: templates.TemplateSet) -> None:
    assert shipped.current == "v5"
    assert {"v1", "v2", "v3", "v4", "v5"} <= set(shipped.versions)
    for version, t in shipped.versions.items():
        assert t.version == version
        assert t.before and t.after and t.refusal
        assert t.after_placement in templates.PLACEMENTS
    assert shipped.get() is shipped.get("v5")
    assert shipped.get("v2").before != shipped.get("v1").before


def test_unknown_version_lists_the_known_ones(shipped: templates.TemplateSet) -> None:
    with pytest.raises(templates.UnknownTemplate) as exc:
        shipped.get("v9")
    assert str(exc.value) == "unknown version 'v9' (known: v1, v2, v3, v4, v5)"


def test_minimal_version_gets_defaults() -> None:
    ts = templates.parse({"current": "a", "versions": {"a": {"before": "  Be kind.\n"}}})
    assert ts.get() == templates.PromptTemplate(version="a", before="Be kind.")
    assert ts.get().answer_stops == ()  # no reminder: nothing to stop before


def test_an_answer_stops_before_the_reminders_opening_words(shipped: templates.TemplateSet) -> None:
    assert shipped.get("v5").after == "(Answer this message directly and briefly.)"
    assert shipped.get("v5").answer_stops == ("\n\n(Answer this", "\n(Answer this", "(Answer this")
    short = templates.parse({"current": "a", "versions": {"a": {"before": "Be kind.", "after": "(Briefly.)"}}})
    assert short.get().answer_stops == ("\n\n(Briefly.)", "\n(Briefly.)", "(Briefly.)")


@pytest.mark.parametrize(("doc", "error"), [
    ([], "expected a mapping"),
    ({"current": "a"}, "'versions' must be a non-empty mapping"),
    ({"current": "b", "versions": {"a": {"before": "x"}}}, "'current' must name one of the versions (a)"),
    ({"current": "a", "versions": {"a": {"after": "x"}}}, "versions.a.before: must be a non-empty string"),
    ({"current": "a", "versions": {"a": {"before": "x", "befor": "y"}}}, "unknown keys ['befor']"),
    ({"current": "a", "versions": {"a": {"before": "x", "after_placement": "middle"}}},
     "after_placement: must be one of append, system"),
    ({"current": "a", "versions": {"a": {"before": 3}}}, "versions.a.before: must be a string"),
    ({"current": "a", "versions": {"a": {"before": "x", "refusal": " "}}}, "refusal: must not be empty"),
])
def test_invalid_documents_say_where(doc: object, error: str) -> None:
    with pytest.raises(templates.TemplateError) as exc:
        templates.parse(doc, "t.yaml")
    assert error in str(exc.value)
    assert str(exc.value).startswith("t.yaml")


def test_load_file_reports_yaml_errors(tmp_path) -> None:
    bad = tmp_path / "t.yaml"
    bad.write_text("current: [unclosed\n")
    with pytest.raises(templates.TemplateError) as exc:
        templates.load_file(bad)
    assert str(bad) in str(exc.value)
