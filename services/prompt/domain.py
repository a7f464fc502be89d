"""Prompt assembly: hidden instructions + past conversation + new message, cut to the token budget.

Plain code over the shared tokenizer (no I/O), so the Kafka stage and the gRPC API build the same
prompt and unit tests check truncation exactly.

The prompt is [system `before`] + every earlier, non-blocked turn (user message + answer of
candidate 0) + the new user message (+ the `after` reminder), rendered with ChatML and the
assistant header. When it does not fit in context - answer budget, the oldest turns go first;
the instructions and the new message are never cut.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence

from colloquy.v1 import chat_pb2

from services.prompt.templates import PromptTemplate
from services.tokenizer.domain import ChatMessage, InvalidArgument, TextTokenizer

DEFAULT_ANSWER_BUDGET = 256


class PromptTooLong(InvalidArgument):
    """Even the instructions and the new message alone exceed the budget."""

    def __init__(self, tokens: int, limit: int) -> None:
        super().__init__("message", f"too long for the model's context ({tokens} tokens, at most {limit})")
        self.tokens = tokens
        self.limit = limit


@dataclasses.dataclass(frozen=True)
class PastTurn:
    """One earlier exchange as the model is shown it."""

    index: int
    user: str
    assistant: str


@dataclasses.dataclass(frozen=True)
class AssembledPrompt:
    messages: list[ChatMessage]
    prompt: str
    prompt_tokens: int
    dropped_turns: int
    template_version: str


def check_message(message: str, max_bytes: int, field: str = "message") -> None:
    """A new message must have visible text and fit the configured size."""
    if not message.strip():
        raise InvalidArgument(field, "must not be empty")
    size = len(message.encode("utf-8"))
    if size > max_bytes:
        raise InvalidArgument(field, f"longer than {max_bytes} bytes")


def chosen_answer(turn: chat_pb2.Turn) -> str:
    """The answer the conversation continues from: candidate 0 (answers may arrive unordered)."""
    for answer in turn.answers:
        if answer.index == 0:
            return answer.text
    return turn.answers[0].text if turn.answers else ""


def past_turns(turns: Iterable[chat_pb2.Turn]) -> list[PastTurn]:
    """Earlier turns in index order, without blocked ones (their text never reaches the model)."""
    return [PastTurn(t.index, t.user_message, chosen_answer(t))
            for t in sorted(turns, key=lambda t: t.index) if not t.blocked]


class Assembler:
    """Builds prompts for one model: its tokenizer and its context length."""

    def __init__(self, tokenizer: TextTokenizer, context_tokens: int) -> None:
        if context_tokens <= 0:
            raise ValueError("context_tokens must be > 0")
        self.tok = tokenizer
        self.context_tokens = context_tokens
        # A system message is always the first one when we count a segment (see _segment_counts),
        # so the template adds no default system prompt to it.
        self._probe = ChatMessage("system", "")
        self._probe_tokens = self.tok.count(self.tok.render([self._probe], add_generation_prompt=False))

    def _segment_counts(self, messages: Sequence[ChatMessage]) -> list[int]:
        """Tokens each message adds to a rendered prompt.

        ChatML wraps every message in <|im_start|>/<|im_end|>, special tokens that BPE never merges
        across, so a prompt's length is the sum of its messages' lengths; measuring through the
        renderer keeps this exact without restating the template here.
        """
        if not messages:
            return []
        texts = [self.tok.render([self._probe, m], add_generation_prompt=False) for m in messages]
        return [n - self._probe_tokens for n in self.tok.count_all(texts)]

    def assemble(self, template: PromptTemplate, history: Sequence[PastTurn], message: str,
                 answer_budget: int = DEFAULT_ANSWER_BUDGET,
                 budget_field: str = "answer_budget") -> AssembledPrompt:
        """The prompt for `message` after `history`, within context - `answer_budget` tokens."""
        if answer_budget < 1:
            raise InvalidArgument(budget_field, "must be at least 1")
        if answer_budget >= self.context_tokens:
            raise InvalidArgument(budget_field, f"must be less than the model's context "
                                                f"({self.context_tokens} tokens)")
        budget = self.context_tokens - answer_budget
        clean = self.tok.neutralize_special_tokens
        head = [ChatMessage("system", template.before)]
        new_message = clean(message)
        if template.after and template.after_placement == "append":
            tail = [ChatMessage("user", f"{new_message}\n\n{template.after}")]
        elif template.after:
            tail = [ChatMessage("user", new_message), ChatMessage("system", template.after)]
        else:
            tail = [ChatMessage("user", new_message)]

        fixed = self.tok.count(self.tok.render(head + tail))
        if fixed > budget:
            own = self.tok.count(new_message)
            raise PromptTooLong(own, max(0, budget - (fixed - own)))

        pairs = [[ChatMessage("user", clean(t.user)), ChatMessage("assistant", clean(t.assistant))]
                 for t in history]
        counts = self._segment_counts([m for pair in pairs for m in pair])
        # Keep the longest run of newest turns that fits; everything older is dropped.
        used, keep = fixed, 0
        for i in range(len(pairs) - 1, -1, -1):
            cost = counts[2 * i] + counts[2 * i + 1]
            if used + cost > budget:
                break
            used += cost
            keep += 1
        while True:
            kept = pairs[len(pairs) - keep:] if keep else []
            messages = head + [m for pair in kept for m in pair] + tail
            prompt = self.tok.render(messages)
            tokens = self.tok.count(prompt)
            if tokens <= budget or keep == 0:  # the exact count confirms the sum (keep==0 fits: fixed)
                break
            keep -= 1
        return AssembledPrompt(messages=messages, prompt=prompt, prompt_tokens=tokens,
                               dropped_turns=len(pairs) - keep, template_version=template.version)
