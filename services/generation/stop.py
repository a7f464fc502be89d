"""Stop strings: text is matched, not token ids, so a stop string may span tokens."""

from __future__ import annotations

from collections.abc import Sequence


class StopMatcher:
    """Incremental stop-string search that never releases text a stop string might start with."""

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = tuple(s for s in stops if s)
        self.held = ""

    def feed(self, piece: str) -> tuple[str, bool]:
        """(text safe to emit, whether a stop string matched). Text from the match on is dropped."""
        if not self.stops:
            return piece, False
        buf = self.held + piece
        cut = min((i for i in (buf.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            self.held = ""
            return buf[:cut], True
        keep = 0
        for s in self.stops:  # longest suffix of buf that is a proper prefix of a stop string
            for k in range(min(len(s) - 1, len(buf)), keep, -1):
                if buf.endswith(s[:k]):
                    keep = k
                    break
        self.held = buf[len(buf) - keep:] if keep else ""
        return buf[:len(buf) - keep], False

    def flush(self) -> str:
        """What was held back: at the end it was no stop string after all."""
        out, self.held = self.held, ""
        return out
