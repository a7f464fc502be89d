"""The moderation categories (OpenAI moderation names), their parents and families.

A subcategory implies its parent (a threat of hate is hate), so training labels and scores are
made consistent with `with_parents` / a max over children.
"""

from __future__ import annotations

CATEGORIES: tuple[str, ...] = (
    "harassment", "harassment/threatening",
    "hate", "hate/threatening",
    "self-harm", "self-harm/intent", "self-harm/instructions",
    "sexual", "sexual/minors",
    "violence", "violence/graphic",
    "illicit", "illicit/violent",
)

# Not a classifier category: output moderation's check for the hidden instructions (leak.py),
# decided by policy.yaml's `system_prompt_leak` entry; only output verdicts carry it.
SYSTEM_PROMPT_LEAK = "system_prompt_leak"

PARENT: dict[str, str] = {c: c.split("/")[0] for c in CATEGORIES if "/" in c}

FAMILIES: tuple[str, ...] = ("harassment", "hate", "self-harm", "sexual", "violence", "illicit")


def family(category: str) -> str:
    """'self-harm/intent' -> 'self-harm'."""
    return category.split("/")[0]


def with_parents(labels: list[str] | set[str]) -> set[str]:
    """Labels plus the parents they imply; unknown names raise (typos in data must not pass)."""
    out = set()
    for label in labels:
        if label not in CATEGORIES:
            raise ValueError(f"unknown moderation category {label!r}")
        out.add(label)
        if label in PARENT:
            out.add(PARENT[label])
    return out


def consistent(scores: dict[str, float]) -> dict[str, float]:
    """A parent scores at least as high as any of its children."""
    out = dict(scores)
    for child, parent in PARENT.items():
        out[parent] = max(out[parent], out[child])
    return out
