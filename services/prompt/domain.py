"""Prompt assembly: hidden instructions + past conversation + new message, cut to the token budget.

Plain code over the shared tokenizer (no I/O), so the Kafka stage and the gRPC API build the same
prompt and unit tests check truncation exactly.

The prompt is [system `before`, then the client's own system text of a seeded conversation] +
the seed's earlier exchanges + every earlier, non-blocked turn (user message + answer of
candidate 0) + the new user message (+ the `after` reminder; with `after_in_history`, earlier user
messages carry it too), rendered with ChatML and the assistant header. When it does not fit in
context - answer budget, the oldest exchanges go first (the seed's before the recorded turns); the
instructions, the client's system text and the new message are never cut. Only the newest turns
that can fit are tokenized, so a long history costs no more than a short one.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping, Sequence

from colloquy.v1 import chat_pb2

from services.prompt.templates import PromptTemplate
from services.tokenizer.domain import MAX_SEQUENCES, ChatMessage, InvalidArgument, TextTokenizer

DEFAULT_ANSWER_BUDGET = 256
# English text averages about 4 characters per BPE token; only sizes tokenizer batches (a wrong
# guess costs an extra call or some extra tokenizing, never a different prompt).
GUESS_CHARS_PER_TOKEN = 4


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


def max_token_bytes(tok: TextTokenizer) -> int:
    """The most UTF-8 bytes any one token decodes to (81 for SmolLM2: a run of 80 spaces and a
    newline); a token that is part of a character decodes to U+FFFD, which over-counts: safe."""
    longest = 1
    for start in range(0, tok.vocab_size, MAX_SEQUENCES):
        ids = [[i] for i in range(start, min(start + MAX_SEQUENCES, tok.vocab_size))]
        longest = max(longest, *(len(text.encode("utf-8")) for text in tok.decode_batch(ids)))
    return longest


def past_turns(turns: Iterable[chat_pb2.Turn]) -> list[PastTurn]:
    """Earlier turns in index order, without blocked ones (their text never reaches the model)."""
    return [PastTurn(t.index, t.user_message, chosen_answer(t))
            for t in sorted(turns, key=lambda t: t.index) if not t.blocked]


def conversation_seed(recorded: Mapping[int, chat_pb2.Turn],
                      new_seed: chat_pb2.ConversationSeed | None = None) -> tuple[str, list[PastTurn]]:
    """(client system text, seeded exchanges as turns with index 0) of a conversation.

    The seed is stored with turn 1; before turn 1 is recorded, the new turn's own seed is used
    (it can only be turn 1: the gateway accepts a seed only for a new conversation). A turn 1
    refused by input moderation takes its seed with it: moderation judged them together, so
    its text never reaches the model, like a blocked turn's.
    """
    first = recorded.get(1)
    seed = new_seed if first is None else None if first.blocked else first.seed
    if seed is None:
        return "", []
    return seed.system, [PastTurn(0, ex.user, ex.assistant) for ex in seed.exchanges]


def user_turn(template: PromptTemplate, text: str) -> list[ChatMessage]:
    """The messages of a user's (already neutralized) text with the template's `after` reminder
    placed as `after_placement` says: appended after a blank line, or a system message after it."""
    if template.after and template.after_placement == "append":
        return [ChatMessage("user", f"{text}\n\n{template.after}")]
    if template.after:
        return [ChatMessage("user", text), ChatMessage("system", template.after)]
    return [ChatMessage("user", text)]


def reminded(template: PromptTemplate) -> bool:
    """Whether earlier user messages are shown with the reminder (`after_in_history`).

    Seeded exchanges get it too: the OpenAI-compatible API sends a client's whole history as a
    seed each request, and its earlier user messages were the newest of the previous requests."""
    return template.after_in_history and bool(template.after)


def past_messages(template: PromptTemplate, turn: PastTurn, clean: Callable[[str], str]) -> list[ChatMessage]:
    """An earlier turn's messages: its user message (exactly as it was sent when it was the newest,
    if `reminded`) and its answer; `clean` neutralizes special tokens."""
    text = clean(turn.user)
    user = user_turn(template, text) if reminded(template) else [ChatMessage("user", text)]
    return [*user, ChatMessage("assistant", clean(turn.assistant))]


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
        self.max_token_bytes = max_token_bytes(tokenizer)

    def min_tokens(self, text: str) -> int:
        """A lower bound on the tokens of `text`, without tokenizing it: no token covers more
        than `max_token_bytes` bytes, and a character is at least one byte."""
        return -(-len(text) // self.max_token_bytes)

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
                 budget_field: str = "answer_budget", system: str = "") -> AssembledPrompt:
        """The prompt for `message` after `history`, within context - `answer_budget` tokens.

        `system` (the client's own instructions) joins the leading system message after the
        operator's `before`, in the same message: SmolLM2-Instruct was tuned on ChatML with one
        leading system message, and the operator's text stays first and whole."""
        if answer_budget < 1:
            raise InvalidArgument(budget_field, "must be at least 1")
        if answer_budget >= self.context_tokens:
            raise InvalidArgument(budget_field, f"must be less than the model's context "
                                                f"({self.context_tokens} tokens)")
        budget = self.context_tokens - answer_budget
        clean = self.tok.neutralize_special_tokens
        operator = [ChatMessage("system", template.before)]
        head = [ChatMessage("system", f"{template.before}\n\n{clean(system)}")] if system.strip() else operator
        new_message = clean(message)
        tail = user_turn(template, new_message)

        fixed = self.tok.count(self.tok.render(head + tail))
        if fixed > budget:
            without = self.tok.count(self.tok.render(operator + tail)) if head is not operator else fixed
            if without > budget:
                own = self.tok.count(new_message)
                raise PromptTooLong(own, max(0, budget - (without - own)))
            raise InvalidArgument("seed.system", f"too long for the model's context with this message "
                                                 f"({fixed - without} tokens, at most {budget - without})")

        newest_first = self._newest_that_fit(template, history, budget - fixed)
        keep = len(newest_first)
        pairs = newest_first[::-1]
        while True:
            kept = pairs[len(pairs) - keep:] if keep else []
            messages = head + [m for pair in kept for m in pair] + tail
            prompt = self.tok.render(messages)
            tokens = self.tok.count(prompt)
            if tokens <= budget or keep == 0:  # the exact count confirms the sum (keep==0 fits: fixed)
                break
            keep -= 1
        return AssembledPrompt(messages=messages, prompt=prompt, prompt_tokens=tokens,
                               dropped_turns=len(history) - keep, template_version=template.version)

    def _newest_that_fit(self, template: PromptTemplate, history: Sequence[PastTurn],
                         room: int) -> list[list[ChatMessage]]:
        """The longest run of newest turns whose messages fit in `room` tokens, newest first.

        A turn's messages are those `past_messages` renders (with the reminder under
        `after_in_history`), and its cost counts all of them.

        Work is bounded by what fits, not by the history's length: turns are walked newest first
        and the walk stops at the first one that does not fit. Turns are tokenized in batches (one
        tokenizer call each) of about what is left to fill, guessed at GUESS_CHARS_PER_TOKEN; a
        turn joins a batch only while the batch's lower bound (`min_tokens`) still fits, so at
        most `room` x `max_token_bytes` message characters are tokenized per prompt whatever the
        history holds, and a message too long to fit is never tokenized.
        """
        clean = self.tok.neutralize_special_tokens
        kept: list[list[ChatMessage]] = []
        i = len(history)
        while i > 0:
            batch: list[PastTurn] = []
            bound = guess = 0
            while i - len(batch) > 0 and guess < room:
                t = history[i - len(batch) - 1]
                # One bound over user text + reminder: appended, they share a message (and tokens).
                user = f"{t.user}\n\n{template.after}" if reminded(template) else t.user
                bound += self.min_tokens(user) + self.min_tokens(t.assistant)
                if bound > room:
                    break
                guess += (len(user) + len(t.assistant)) // GUESS_CHARS_PER_TOKEN + 1
                batch.append(t)
            if not batch:
                return kept
            pairs = [past_messages(template, t, clean) for t in batch]
            counts = self._segment_counts([m for pair in pairs for m in pair])
            start = 0
            for pair in pairs:
                cost = sum(counts[start:start + len(pair)])
                start += len(pair)
                if cost > room:
                    return kept
                room -= cost
                kept.append(pair)
            i -= len(batch)
        return kept
