"""The guard against copying earlier answers: a penalty on continuing a verbatim copy of an
earlier assistant turn of the same prompt.

Why: a small model re-reads its own earlier answers in the history and copies them: a
conversation's third answer opened with the second's sentence ("I'm glad you're happy with your
furry friend!") word for word. The repetition penalty does not see it (it covers the answer's own
last tokens, against loops), and a penalty on every token of the history would also punish the
words an answer must share with the question.

How: the "DRY" rule of llama.cpp's and text-generation-webui's samplers (multiplier x
base^(length - allowed)), but matched against earlier *assistant* turns only, never the user's
messages or the instructions, and only over the answer's own tokens: after an answer has copied
`length` tokens of an earlier answer, the token that would continue the copy loses
`multiplier x base^(length - allowed)` from its logit (at the defaults two shared tokens cost
nothing, a third 0.8, a sixth 4.3, a tenth 40: a sentence soon cannot be continued). Off inside a Markdown
code block, where copying earlier code is what an edit asks for. Each candidate keeps its own
state, so an answer depends only on its own prompt and tokens (batching changes nothing).

An echo: an answer that opens by repeating the user's last turn word for word pays the same price
(the first `allowed` tokens free: "I'm" opens both "I'm stressed" and "I'm sorry to hear that"),
also to end where a line of the turn ends (the message, before the blank line and the hidden
reminder the prompt service appends). Without this a greeting was answered with itself and the
reminder after it ("Hello!\n\n(Answer this message directly and briefly.)", which output moderation
then cut as a leak), and each later turn of that conversation with the user's message again ("How
are you today?" -> "How are you today?"). Sharing the message's words later on ("The capital of
France is") is not an echo and costs nothing.

An answer that has copied a whole earlier answer (of at least `allowed` tokens) also pays to end there:
in the prompt that answer's end token follows it, so ending is the copy's next token. Without this
a short answer was copied whole and stopped: once a first answer was the stub "The answer to this
question is:", the conversation's next turns were the same stub (23 of 45 answer-quality questions
asked after it, bench/results/answer_copies.md). Only a whole copy: an answer that merely ends on the same two or
three tokens as an earlier one ("... could help!") ends freely.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

END = -1  # after each earlier answer: no token equals it, so no copy spans two answers
MAX_EXPONENT = 30  # base ** 30 is already a ban; keeps the penalty finite
FENCE = "```"
_NONE: tuple[np.ndarray, np.ndarray] = (np.empty(0, np.int64), np.empty(0, np.float32))  # nothing owed


def earlier_answers(ids: Sequence[int], header: Sequence[int], end: int) -> list[list[int]]:
    """The earlier assistant turns in a ChatML prompt's ids: what follows each `header`
    (``<|im_start|>assistant\\n``) up to its `end` (``<|im_end|>``). The last header, the answer
    being generated, has no end and is not one of them."""
    h = len(header)
    if not h:
        return []
    out: list[list[int]] = []
    i, n = 0, len(ids)
    first = header[0]
    while i <= n - h:
        if ids[i] == first and list(ids[i:i + h]) == list(header):
            start = i + h
            j = start
            while j < n and ids[j] != end:
                j += 1
            if j == n:  # the open turn: the answer itself
                break
            if j > start:
                out.append(list(ids[start:j]))
            i = j + 1
        else:
            i += 1
    return out


def last_user_turn(ids: Sequence[int], header: Sequence[int], end: int) -> list[int]:
    """The last user turn in a ChatML prompt's ids: what follows the last `header`
    (``<|im_start|>user\n``) up to its `end`; empty when there is none."""
    h = len(header)
    if not h:
        return []
    for i in range(len(ids) - h, -1, -1):
        if ids[i] == header[0] and list(ids[i:i + h]) == list(header):
            turn: list[int] = []
            for t in ids[i + h:]:
                if t == end:
                    return turn
                turn.append(t)
            return []  # never closed: not a user turn of a well-formed prompt
    return []


class CopyGuard:
    """One candidate's state: how long a copy of each earlier-answer position its answer is
    continuing, and whether the answer is inside a code block."""

    def __init__(self, answers: Sequence[Sequence[int]], multiplier: float, base: float, allowed: int,
                 ends: Sequence[int] = (), echo: Sequence[int] = (), breaks: Sequence[int] = ()) -> None:
        """`ends`: the tokens that end an answer (each continues a copy that reached an earlier
        answer's end); none: a copy owes nothing there. `echo`: the user's last turn, which the
        answer must not open with; `breaks`: line-break tokens, where ending an echo is ending on a
        whole line of the message (the hidden reminder follows the message after a blank line)."""
        flat: list[int] = []
        whole: list[int] = []  # at each answer's last token: its length (a copy that long is the whole answer)
        for a in answers:
            flat.extend(a)
            whole.extend([0] * len(a))
            if a:
                whole[-1] = len(a)
            flat.append(END)
            whole.append(0)
        self.whole = np.asarray(whole, dtype=np.int64)
        self.ends = np.asarray(sorted(set(ends)), dtype=np.int64)
        self.history = np.asarray(flat, dtype=np.int64)
        # match[j]: the answer's last match[j] tokens equal history[j - match[j] + 1 .. j]
        self.match = np.zeros(len(flat), dtype=np.int64)
        self.multiplier, self.base, self.allowed = multiplier, base, allowed
        self.text = ""
        self.echo = list(echo)
        self.echoed = 0 if self.echo else -1  # the answer so far is echo[:echoed]; -1 once it is not
        self.breaks = frozenset(breaks)

    def feed(self, token: int, text: str) -> None:
        """The answer's next token and the text it decoded to."""
        h, m = self.history, self.match
        if h.size:  # none on a first turn: only the echo is watched
            extended = np.zeros_like(m)
            extended[1:] = m[:-1] + 1
            extended[0] = 1
            self.match = np.where(h == token, extended, 0)
        self.text += text
        if self.echoed >= 0:
            echoing = self.echoed < len(self.echo) and token == self.echo[self.echoed]
            self.echoed = self.echoed + 1 if echoing else -1

    def penalties(self) -> tuple[np.ndarray, np.ndarray]:
        """(tokens, amounts): what each token that would continue a copy loses from its logit."""
        if self.text.count(FENCE) % 2:  # inside a code block
            return _NONE
        m = self.match[:-1]
        at = np.nonzero(m >= self.allowed)[0]
        nxt = self.history[at + 1]
        exponent = np.minimum(m[at] - self.allowed, MAX_EXPONENT)
        amount = self.multiplier * np.power(self.base, exponent)
        at_end = nxt == END
        if at_end.any():  # a whole earlier answer copied: every end token continues it; a tail copy ends freely
            keep = ~at_end | (m[at] >= self.whole[at])
            nxt, amount, at_end = nxt[keep], amount[keep], at_end[keep]
            nxt = np.concatenate([nxt[~at_end], np.repeat(self.ends, int(at_end.sum()))])
            amount = np.concatenate([amount[~at_end], np.tile(amount[at_end], self.ends.size)])
        if self.echoed >= self.allowed:  # echoing the user's turn from the answer's first token
            owed = self.multiplier * self.base ** min(self.echoed - self.allowed, MAX_EXPONENT)
            if self.echoed == len(self.echo):  # the whole turn repeated: ending continues it
                echo_next = list(self.ends)
            elif self.echo[self.echoed] in self.breaks:  # a whole line of it: so does ending here
                echo_next = [self.echo[self.echoed], *self.ends]
            else:
                echo_next = [self.echo[self.echoed]]
            nxt = np.concatenate([nxt, np.asarray(echo_next, dtype=np.int64)])
            amount = np.concatenate([amount, np.full(len(echo_next), owed)])
        if nxt.size == 0:
            return _NONE
        tokens = np.unique(nxt)  # a token continuing several copies: the longest counts
        best = np.zeros(tokens.size)
        np.maximum.at(best, np.searchsorted(tokens, nxt), amount)
        return tokens, best.astype(np.float32)

    def apply(self, logits: np.ndarray) -> np.ndarray:
        """`logits` less the penalties (a new array when any applies: the bound logits buffer is
        reused by the next pass), `logits` itself when none does."""
        tokens, amounts = self.penalties()
        if tokens.size == 0:
            return logits
        out = np.array(logits, dtype=np.float32, copy=True)
        out[tokens] -= amounts
        return out
