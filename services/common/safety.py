"""Where to get help, said wherever the assistant tells a person their words touch on self-harm:
input moderation's warning notice, output moderation's notices, and the prompt stage's refusal of a
blocked message (a refusal alone would turn away the person most in need of an answer)."""

from __future__ import annotations

from colloquy.v1 import common_pb2

CRISIS_LINE = ("If you are thinking about harming yourself, please reach out: call or text 988 in the US, "
               "or your local emergency number.")
SELF_HARM = ("self-harm", "self-harm/intent", "self-harm/instructions")


def needs_crisis_line(result: common_pb2.ModerationResult) -> bool:
    """Whether a verdict flagged any self-harm category."""
    return any(result.categories.get(c) for c in SELF_HARM)
