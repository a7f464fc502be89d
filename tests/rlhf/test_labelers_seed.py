"""The labellers' default seed differs per round of the job (no stack needed)."""

from __future__ import annotations

import pytest

from rlhf.labelers import default_seed


def test_each_round_gets_its_own_seed() -> None:
    assert default_seed({}) == 0
    assert default_seed({"RLHF_ROUND": "1"}) == 1000
    assert default_seed({"RLHF_ROUND": "2"}) == 2000


@pytest.mark.parametrize("raw", ["0", "-1", "two"])
def test_a_bad_round_is_refused_with_its_value(raw: str) -> None:
    with pytest.raises(ValueError, match=f"RLHF_ROUND must be a round number >= 1, got '{raw}'"):
        default_seed({"RLHF_ROUND": raw})
