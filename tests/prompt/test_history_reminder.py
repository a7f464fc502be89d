"""`after_in_history`: earlier user messages keep the reminder, so prompts grow by appending only."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.prompt import templates
from services.prompt.domain import Assembler, PastTurn, PromptTooLong
from services.prompt.templates import PromptTemplate, TemplateSet
from services.tokenizer.domain import ChatMessage, TextTokenizer

V3 = PromptTemplate(version="v3", before="You are Colloquy. Be helpful.", after="Answer briefly.",
                    after_in_history=True)
V3_SYSTEM = dataclasses.replace(V3, version="v3s", after_placement="system")
V1 = dataclasses.replace(V3, version="v1", after_in_history=False)


def test_every_earlier_user_message_keeps_the_reminder_seeded_ones_too(tok: TextTokenizer) -> None:
    past = [PastTurn(0, "My cat is Pixel.", "Nice!"), PastTurn(1, "My dog is Biscuit.", "Lovely!"),
            PastTurn(2, "He is three.", "Young!")]
    got = Assembler(tok, 8192).assemble(V3, past, "What is my dog's name?")
    assert got.prompt == (
        "<|im_start|>system\nYou are Colloquy. Be helpful.<|im_end|>\n"
        "<|im_start|>user\nMy cat is Pixel.\n\nAnswer briefly.<|im_end|>\n"
        "<|im_start|>assistant\nNice!<|im_end|>\n"
        "<|im_start|>user\nMy dog is Biscuit.\n\nAnswer briefly.<|im_end|>\n"
        "<|im_start|>assistant\nLovely!<|im_end|>\n"
        "<|im_start|>user\nHe is three.\n\nAnswer briefly.<|im_end|>\n"
        "<|im_start|>assistant\nYoung!<|im_end|>\n"
        "<|im_start|>user\nWhat is my dog's name?\n\nAnswer briefly.<|im_end|>\n"
        "<|im_start|>assistant\n")
    assert got.prompt_tokens == tok.count(got.prompt)
    without = Assembler(tok, 8192).assemble(V1, past, "What is my dog's name?")
    assert without.prompt.count("Answer briefly.") == 1


def test_a_system_placed_reminder_follows_every_earlier_user_message(tok: TextTokenizer) -> None:
    got = Assembler(tok, 8192).assemble(V3_SYSTEM, [PastTurn(1, "Hi", "Hello!")], "Bye")
    assert [(m.role, m.content) for m in got.messages] == [
        ("system", V3.before), ("user", "Hi"), ("system", "Answer briefly."), ("assistant", "Hello!"),
        ("user", "Bye"), ("system", "Answer briefly.")]
    assert got.prompt_tokens == tok.count(got.prompt)


@pytest.mark.parametrize("template", [V3, V3_SYSTEM], ids=["append", "system"])
def test_turn_k_plus_1_starts_with_turn_k_prompt_and_answer(tok: TextTokenizer, template: PromptTemplate) -> None:
    """As text and as token ids: the prefix cache can reuse turn k's prompt and answer whole."""
    a = Assembler(tok, 8192)
    messages = ["Hi, I have a dog called Biscuit.", "Give me one tip for sleeping better.",
                "What is the capital of France?", "What is my dog's name?"]
    answers = ["What a lovely name!", "Keep a regular bedtime.", "Paris.", "Biscuit."]
    past: list[PastTurn] = []
    previous = ""
    for i, (message, answer) in enumerate(zip(messages, answers, strict=True), 1):
        prompt = a.assemble(template, past, message).prompt
        if previous:
            assert prompt.startswith(previous)
            assert tok.encode(prompt)[:len(tok.encode(previous))] == tok.encode(previous)
        previous = f"{prompt}{answer}<|im_end|>\n"
        past.append(PastTurn(i, message, answer))


def test_a_history_resent_as_a_seed_each_request_is_prefix_stable_too(tok: TextTokenizer) -> None:
    """The OpenAI-compatible API sends a stateless client's earlier messages as a seed (index 0)."""
    a = Assembler(tok, 8192)
    first = a.assemble(V3, [], "My dog is Biscuit.").prompt
    second = a.assemble(V3, [PastTurn(0, "My dog is Biscuit.", "Lovely!")], "His name?").prompt
    assert second.startswith(f"{first}Lovely!<|im_end|>\n")


def test_without_it_turn_k_plus_1_diverges_at_turn_k_message(tok: TextTokenizer) -> None:
    a = Assembler(tok, 8192)
    first = a.assemble(V1, [], "Hi").prompt
    second = a.assemble(V1, [PastTurn(1, "Hi", "Hello!")], "Bye").prompt
    assert not second.startswith(first)


def test_the_shipped_v3_is_v1_with_the_reminder_in_history(tok: TextTokenizer, shipped: TemplateSet) -> None:
    v1, v3 = shipped.get("v1"), shipped.get("v3")
    assert v3.after_in_history and not v1.after_in_history and not shipped.get("v2").after_in_history
    assert dataclasses.replace(v3, version="v1", after_in_history=False) == v1
    past = [PastTurn(1, "Hi", "Hello!")]
    a = Assembler(tok, 8192)
    assert a.assemble(v3, past, "Bye").prompt.count(v3.after) == 2
    assert a.assemble(v1, past, "Bye").prompt.count(v1.after) == 1
    assert a.assemble(v3, [], "Bye").prompt == a.assemble(v1, [], "Bye").prompt  # a first turn: same


text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=40)


@settings(max_examples=40, deadline=None)
@given(turns=st.lists(st.tuples(text, text), max_size=20), context=st.integers(60, 400),
       system_placed=st.booleans(), seeded=st.integers(0, 2))
def test_budget_counts_the_reminders_exactly(tok: TextTokenizer, turns: list[tuple[str, str]], context: int,
                                             system_placed: bool, seeded: int) -> None:
    """The newest-first walk keeps exactly the turns that tokenizing the whole rendered history
    keeps, reminders included, and the prompt's count is the real one."""
    template = V3_SYSTEM if system_placed else V3
    past = [PastTurn(0 if i < seeded else i + 1, u, x) for i, (u, x) in enumerate(turns)]
    a = Assembler(tok, context)
    try:
        got = a.assemble(template, past, "Next?", 8)
    except PromptTooLong:
        return
    clean = tok.neutralize_special_tokens
    tail = ([ChatMessage("user", "Next?"), ChatMessage("system", template.after)] if system_placed
            else [ChatMessage("user", f"Next?\n\n{template.after}")])
    used = tok.count(tok.render([ChatMessage("system", template.before), *tail]))
    keep = 0
    for t in reversed(past):
        rendered = tok.render([ChatMessage("system", template.before), *tail], add_generation_prompt=False)
        if system_placed:
            user = [ChatMessage("user", clean(t.user)), ChatMessage("system", template.after)]
        else:
            user = [ChatMessage("user", f"{clean(t.user)}\n\n{template.after}")]
        with_turn = tok.render([ChatMessage("system", template.before), *user,
                                ChatMessage("assistant", clean(t.assistant)), *tail], add_generation_prompt=False)
        cost = tok.count(with_turn) - tok.count(rendered)
        if used + cost > context - 8:
            break
        used += cost
        keep += 1
    assert got.dropped_turns == len(past) - keep
    assert got.prompt_tokens == used == tok.count(got.prompt)


@pytest.mark.parametrize(("body", "error"), [
    ({"before": "x", "after": "y", "after_in_history": "yes"}, "after_in_history: must be true or false"),
    ({"before": "x", "after": "y", "after_in_history": 1}, "after_in_history: must be true or false"),
    ({"before": "x", "after_in_history": True}, "after_in_history: needs a non-empty 'after'"),
])
def test_invalid_after_in_history_says_where(body: dict[str, object], error: str) -> None:
    with pytest.raises(templates.TemplateError) as exc:
        templates.parse({"current": "a", "versions": {"a": body}}, "t.yaml")
    assert str(exc.value) == f"t.yaml: versions.a.{error}"


def test_after_in_history_defaults_to_false_and_parses_true() -> None:
    ts = templates.parse({"current": "a", "versions": {"a": {"before": "x", "after": "y"},
                                                       "b": {"before": "x", "after": "y", "after_in_history": True}}})
    assert ts.get("a").after_in_history is False and ts.get("b").after_in_history is True
