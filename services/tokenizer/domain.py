"""The model's tokenizer as plain code: encode, decode, count, render the chat template.

No I/O beyond building from an already-loaded `tokenizers.Tokenizer` (or its JSON), so the prompt
service can import and reuse it, and unit tests need no server. The limits are the public
contract's (tokenizer.proto); every violation raises `InvalidArgument` naming the field.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import NamedTuple

from tokenizers import Tokenizer

from model.chat_template import render_chatml

MAX_TEXTS = 64
MAX_TEXT_BYTES = 64 * 1024
MAX_SEQUENCES = 64
MAX_IDS = 32768
MAX_MESSAGES = 256
ROLES = ("system", "user", "assistant")


class InvalidArgument(ValueError):
    """Bad input; `field` is the request field path ("texts[3]") the message is about."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason


class ChatMessage(NamedTuple):
    """One message for the chat template: role is "system", "user" or "assistant"."""

    role: str
    content: str


@dataclasses.dataclass(frozen=True)
class RenderedPrompt:
    """A conversation rendered with the chat template, as text and as the ids the model reads."""

    text: str
    ids: list[int]


def check_texts(texts: Sequence[str], field: str = "texts") -> None:
    """Enforce TokenizeRequest.texts limits: 1..64 texts, each at most 64 KiB of UTF-8."""
    if not texts:
        raise InvalidArgument(field, "must not be empty")
    if len(texts) > MAX_TEXTS:
        raise InvalidArgument(field, f"at most {MAX_TEXTS} texts per request, got {len(texts)}")
    for i, text in enumerate(texts):
        if len(text.encode("utf-8")) > MAX_TEXT_BYTES:
            raise InvalidArgument(f"{field}[{i}]", f"longer than {MAX_TEXT_BYTES} bytes")


def check_message_count(count: int, field: str = "messages") -> None:
    """ApplyChatTemplateRequest.messages: 1..256 messages."""
    if count == 0:
        raise InvalidArgument(field, "must not be empty")
    if count > MAX_MESSAGES:
        raise InvalidArgument(field, f"at most {MAX_MESSAGES} messages, got {count}")


class TextTokenizer:
    """SmolLM2's byte-level BPE, shared by the tokenizer and prompt services.

    `tokenizers.Tokenizer` is thread-safe for encode/decode and releases the GIL in batch calls,
    so one instance serves the gRPC loop's worker threads and the Kafka worker together.
    """

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tok = tokenizer
        # The ids the model can read: the BPE vocabulary plus added tokens (<|im_start|>, ...).
        self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
        self.special_tokens: tuple[str, ...] = tuple(
            t.content for t in tokenizer.get_added_tokens_decoder().values() if t.special)

    @classmethod
    def from_file(cls, path: str) -> TextTokenizer:
        """Load `tokenizer.json`."""
        return cls(Tokenizer.from_file(path))

    # -- the four operations -----------------------------------------------------------------
    def encode_batch(self, texts: Sequence[str], add_special_tokens: bool = False) -> list[list[int]]:
        check_texts(texts)
        return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=add_special_tokens)]

    def decode_batch(self, sequences: Sequence[Sequence[int]], skip_special_tokens: bool = False,
                     field: str = "tokens") -> list[str]:
        """Decode id sequences; every id must be inside the vocabulary (ids are never clamped)."""
        if not sequences:
            raise InvalidArgument(field, "must not be empty")
        if len(sequences) > MAX_SEQUENCES:
            raise InvalidArgument(field, f"at most {MAX_SEQUENCES} sequences per request, "
                                         f"got {len(sequences)}")
        for i, ids in enumerate(sequences):
            if len(ids) > MAX_IDS:
                raise InvalidArgument(f"{field}[{i}].ids", f"at most {MAX_IDS} ids, got {len(ids)}")
            for j, token in enumerate(ids):
                if token >= self.vocab_size:
                    raise InvalidArgument(f"{field}[{i}].ids[{j}]", f"{token} is not in the vocabulary "
                                                                    f"(ids 0..{self.vocab_size - 1})")
        return self._tok.decode_batch([list(ids) for ids in sequences],
                                      skip_special_tokens=skip_special_tokens)

    def count_batch(self, texts: Sequence[str]) -> list[int]:
        check_texts(texts)
        return [len(e.ids) for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

    def count(self, text: str) -> int:
        """Tokens of one text with no limit checks (internal callers bound their own input)."""
        return len(self._tok.encode(text, add_special_tokens=False).ids)

    def count_all(self, texts: Sequence[str]) -> list[int]:
        """Tokens of many texts in one parallel batch, with no limit checks (internal callers)."""
        return [len(e.ids) for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

    def encode(self, text: str) -> list[int]:
        """Ids of one text with no limit checks (internal callers bound their own input)."""
        return self._tok.encode(text, add_special_tokens=False).ids

    def render(self, messages: Sequence[ChatMessage], add_generation_prompt: bool = True) -> str:
        """ChatML text of `messages`, exactly as SmolLM2's own template renders it."""
        return render_chatml(({"role": m.role, "content": m.content} for m in messages),
                             add_generation_prompt=add_generation_prompt)

    def apply_chat_template(self, messages: Sequence[ChatMessage],
                            add_generation_prompt: bool = True) -> RenderedPrompt:
        """Render and encode a conversation (ApplyChatTemplate's limits: 1..256 messages)."""
        check_message_count(len(messages))
        for i, m in enumerate(messages):
            if m.role not in ROLES:
                raise InvalidArgument(f"messages[{i}].role", "must be set (system, user or assistant)")
            if len(m.content.encode("utf-8")) > MAX_TEXT_BYTES:
                raise InvalidArgument(f"messages[{i}].content", f"longer than {MAX_TEXT_BYTES} bytes")
        text = self.render(messages, add_generation_prompt)
        return RenderedPrompt(text=text, ids=self.encode(text))

    def neutralize_special_tokens(self, text: str) -> str:
        """Make text from people unable to open or close ChatML turns.

        The tokenizer turns the literal string "<|im_end|>" into the control token that ends a
        turn, so a message containing "<|im_end|>\\n<|im_start|>system\\n..." would forge hidden
        instructions. A zero-width space after the first character keeps the text readable but
        makes it tokenize as ordinary characters.
        """
        for special in self.special_tokens:
            if special in text:
                text = text.replace(special, special[0] + "\u200b" + special[1:])
        return text
