"""Default sampling of a model version, recorded in its registry manifest under ``"sampling"``.

A request's explicit values always win; these fill what it leaves unset (generation reads them
from the manifest of the version that answers, so a rollout can change them with the model).
SmolLM2-135M-Instruct's authors suggest a low temperature (about 0.2) with top_p 0.9: at the old
0.7 both the float32 and the 4-bit builds answered mostly nonsense. The repetition penalty is
the guard against degenerate loops ("Bonjour, bonjour! ..." repeated to max_tokens): applied by
the engine to the distinct tokens among the answer's last ``repetition_window`` tokens.
"""

from __future__ import annotations

from typing import Any

SMOLLM2_135M_INSTRUCT: dict[str, Any] = {
    "temperature": 0.2,
    "top_p": 0.9,
    "top_k": 50,
    "repetition_penalty": 1.1,
    "repetition_window": 64,
}

MANIFEST_KEY = "sampling"


def defaults_for(manifest: dict[str, Any] | None) -> dict[str, Any]:
    """A version's defaults: its manifest's, else (older versions) the base model's."""
    recorded = (manifest or {}).get(MANIFEST_KEY)
    return {**SMOLLM2_135M_INSTRUCT, **(recorded if isinstance(recorded, dict) else {})}
