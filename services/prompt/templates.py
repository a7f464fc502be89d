"""Versioned prompt templates (the hidden instructions), parsed from a YAML document.

Parsing is pure (`parse`) so it is unit-tested on dicts; `load_file` only reads the file.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

PLACEMENTS = ("append", "system")
# How many of the reminder's opening words an answer stops before (`PromptTemplate.answer_stops`):
# two, because the model rewords the rest ("(Answer this question in a more formal tone.)",
# bench/results/answer_copies.md), and "(Answer this" does not occur in ordinary prose.
REMINDER_STOP_WORDS = 2


class TemplateError(ValueError):
    """The templates document is invalid; the message says where."""


class UnknownTemplate(LookupError):
    """A request named a template version that is not configured."""

    def __init__(self, version: str, known: list[str]) -> None:
        super().__init__(f"unknown version {version!r} (known: {', '.join(known)})")
        self.version = version


@dataclasses.dataclass(frozen=True)
class PromptTemplate:
    """Hidden instructions of one version: `before` the conversation, `after` the new message.

    `after_in_history` also places `after` after every earlier user message (seeded ones too), as
    it was placed when that message was the newest, so a turn's prompt starts with the previous
    turn's prompt + answer (a prefix the engine's KV cache can reuse).
    """

    version: str
    before: str
    after: str = ""
    after_placement: str = "append"
    after_in_history: bool = False
    refusal: str = "Sorry, I can't help with that request."

    @property
    def answer_stops(self) -> tuple[str, ...]:
        """Texts generation stops before: the reminder's opening words. The served model sometimes
        ends a short answer by repeating the reminder it read after the user's message ("I'm glad I
        could help.\n\n(Answer this message directly and briefly.)", bench/results/answer_copies.md);
        output moderation then rightly cuts the answer as a leak and the user sees "The answer was
        stopped". Stopping there gives "I'm glad I could help." instead. The same words after a line
        break or two come first, so the break (the model copies the prompt's blank line) goes with them."""
        opening = " ".join(self.after.split()[:REMINDER_STOP_WORDS])
        return (f"\n\n{opening}", f"\n{opening}", opening) if opening else ()


@dataclasses.dataclass(frozen=True)
class TemplateSet:
    """Every configured version and the one served by default."""

    current: str
    versions: Mapping[str, PromptTemplate]

    def get(self, version: str = "") -> PromptTemplate:
        """The template `version`, or the current one when empty."""
        name = version or self.current
        try:
            return self.versions[name]
        except KeyError:
            raise UnknownTemplate(name, sorted(self.versions)) from None


def parse(doc: Any, source: str = "templates") -> TemplateSet:
    """Validate and build a TemplateSet from {"current": ..., "versions": {name: {...}}}."""
    if not isinstance(doc, Mapping):
        raise TemplateError(f"{source}: expected a mapping with 'current' and 'versions'")
    versions = doc.get("versions")
    if not isinstance(versions, Mapping) or not versions:
        raise TemplateError(f"{source}: 'versions' must be a non-empty mapping")
    parsed: dict[str, PromptTemplate] = {}
    for name, body in versions.items():
        where = f"{source}: versions.{name}"
        if not isinstance(body, Mapping):
            raise TemplateError(f"{where}: expected a mapping")
        unknown = set(body) - {"before", "after", "after_placement", "after_in_history", "refusal"}
        if unknown:
            raise TemplateError(f"{where}: unknown keys {sorted(unknown)}")
        fields: dict[str, str] = {}
        for key in ("before", "after", "after_placement", "refusal"):
            if key in body:
                if not isinstance(body[key], str):
                    raise TemplateError(f"{where}.{key}: must be a string")
                fields[key] = body[key].strip()
        if not fields.get("before"):
            raise TemplateError(f"{where}.before: must be a non-empty string")
        if fields.get("after_placement", "append") not in PLACEMENTS:
            raise TemplateError(f"{where}.after_placement: must be one of {', '.join(PLACEMENTS)}")
        if "refusal" in fields and not fields["refusal"]:
            raise TemplateError(f"{where}.refusal: must not be empty")
        in_history = body.get("after_in_history", False)
        if not isinstance(in_history, bool):
            raise TemplateError(f"{where}.after_in_history: must be true or false")
        if in_history and not fields.get("after"):
            raise TemplateError(f"{where}.after_in_history: needs a non-empty 'after'")
        parsed[str(name)] = PromptTemplate(version=str(name), after_in_history=in_history, **fields)
    current = doc.get("current")
    if not isinstance(current, str) or current not in parsed:
        raise TemplateError(f"{source}: 'current' must name one of the versions ({', '.join(sorted(parsed))})")
    return TemplateSet(current=current, versions=parsed)


def load_file(path: str | Path) -> TemplateSet:
    """Read and parse a templates YAML file."""
    path = Path(path)
    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise TemplateError(f"{path}: {exc}") from None
    return parse(doc, str(path))
