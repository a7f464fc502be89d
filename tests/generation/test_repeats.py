"""The copy guard (services.generation.repeats): which earlier answers it finds in a ChatML
prompt's ids and what it takes from the token that would continue copying one."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from bench.answer_copies import Chats, echoes, longest_shared_run, shows_reminder
from services.generation.repeats import CopyGuard, earlier_answers, last_user_turn

HEADER = [1, 9, 10]  # "<|im_start|>assistant\n"
END = 2  # "<|im_end|>"
USER = [1, 5, 6]  # "<|im_start|>user\n"


def prompt(*turns: tuple[list[int], list[int]], new: list[int]) -> list[int]:
    ids: list[int] = []
    for user, answer in turns:
        ids += [*USER, *user, END, 7, *HEADER, *answer, END, 7]
    return [*ids, *USER, *new, END, 7, *HEADER]


def test_earlier_answers_are_the_closed_assistant_turns_not_the_open_one_nor_the_users() -> None:
    ids = prompt(([40, 41], [20, 21, 22]), ([42], [30, 31]), new=[43])
    assert earlier_answers(ids, HEADER, END) == [[20, 21, 22], [30, 31]]
    assert earlier_answers(prompt(new=[43]), HEADER, END) == []  # a first turn: nothing to copy
    assert earlier_answers([*HEADER, 20, 21], HEADER, END) == []  # an answer that never ended is the open one
    assert earlier_answers(ids, [], END) == []


def guard(answers: list[list[int]], multiplier: float = 1.0, base: float = 2.0, allowed: int = 2,
          ends: tuple[int, ...] = (), echo: tuple[int, ...] = (), breaks: tuple[int, ...] = ()) -> CopyGuard:
    return CopyGuard(answers, multiplier, base, allowed, ends, echo, breaks)


def fed(g: CopyGuard, tokens: list[int], text: str = "x") -> CopyGuard:
    for t in tokens:
        g.feed(t, text)
    return g


def penalties(g: CopyGuard) -> dict[int, float]:
    tokens, amounts = g.penalties()
    return {int(t): float(a) for t, a in zip(tokens, amounts, strict=True)}


def test_a_copy_costs_nothing_up_to_allowed_then_multiplier_times_base_per_further_token() -> None:
    g = guard([[20, 21, 22, 23, 24, 25]])
    assert penalties(fed(g, [20])) == {}  # one token copied: allowed is 2
    assert penalties(fed(g, [21])) == {22: 1.0}  # two copied: continuing costs 1.0 x 2^0
    assert penalties(fed(g, [22])) == {23: 2.0}
    assert penalties(fed(g, [23])) == {24: 4.0}
    assert penalties(fed(g, [99])) == {}  # the answer left the copy: nothing is owed


def test_the_longest_of_several_copies_sets_a_tokens_penalty_and_no_copy_spans_two_answers() -> None:
    g = fed(guard([[20, 21, 22, 50], [21, 22, 60], [22, 70]]), [20, 21, 22])
    assert penalties(g) == {50: 2.0, 60: 1.0}  # 3 tokens copied from the first, 2 from the second
    end_to_start = fed(guard([[20, 21], [22, 23]]), [20, 21, 22])
    assert penalties(end_to_start) == {}  # "21, 22" runs across the boundary of two answers


def test_ending_a_whole_copy_of_an_earlier_answer_costs_every_end_token_like_a_further_token() -> None:
    stub = [20, 21, 22, 23]  # "The answer to this question is:" then the end token
    g = fed(guard([[30, 31], stub], ends=(END, 0)), stub)
    assert penalties(g) == {0: 4.0, END: 4.0}  # 4 copied: ending continues the copy, 1.0 x 2^(4 - 2)
    assert penalties(fed(guard([stub]), stub)) == {}  # no end tokens given: ending is free, as before
    short = fed(guard([[20, 21]], ends=(END,)), [20, 21])
    assert penalties(short) == {END: 1.0}  # a whole answer of `allowed` tokens: the first further token's price


def test_an_answer_ending_on_an_earlier_answers_last_tokens_ends_freely() -> None:
    g = fed(guard([[20, 21, 22, 23]], ends=(END,)), [40, 22, 23])  # "... could help!" like an earlier answer
    assert penalties(g) == {}
    middle = fed(guard([[20, 21, 22, 23]], ends=(END,)), [20, 21, 22])
    assert penalties(middle) == {23: 2.0}  # not at the end yet: the next copied token pays, ending is free


def test_the_last_user_turn_is_the_message_being_answered() -> None:
    ids = prompt(([40, 41], [20, 21, 22]), new=[43, 44])
    assert last_user_turn(ids, USER, END) == [43, 44]
    assert last_user_turn(prompt(new=[43]), USER, END) == [43]
    assert last_user_turn([*HEADER, 20], USER, END) == []  # no user turn
    assert last_user_turn([*USER, 43, 44], USER, END) == []  # never closed
    assert last_user_turn(ids, [], END) == []


def test_echoing_the_users_turn_costs_like_a_copy_and_so_does_ending_on_a_whole_line_of_it() -> None:
    turn = (43, 44, 45, 7, 7, 46, 47)  # a message, a blank line (7 = "\n"), the hidden reminder
    g = guard([], echo=turn, ends=(END,), breaks=(7,))  # a first turn: no earlier answer, only the echo
    assert penalties(g) == {}  # the first `allowed` tokens are free ("I'm" opens many an answer)
    assert penalties(fed(g, [43, 44])) == {45: 1.0}  # then 1.0 x 2^(2 - 2)
    assert penalties(fed(g, [45])) == {7: 2.0, END: 2.0}  # the whole message repeated: ending continues it
    assert penalties(fed(g, [7, 7, 46, 47])) == {END: 32.0}  # the whole turn: only ending is left to pay
    left = fed(guard([], echo=turn, breaks=(7,)), [43, 44, 99])
    assert penalties(left) == {}  # it said something else: sharing the message's words later is free
    assert penalties(fed(left, [43, 44, 45])) == {}  # the echo is watched from the answer's first token only
    later = fed(guard([[20, 21, 22]], echo=(20, 30, 31)), [20, 30])
    assert penalties(later) == {31: 1.0}  # beside the earlier answers' copies (one token of one: free)


def test_apply_lowers_only_the_continuing_tokens_and_leaves_the_bound_buffer_alone() -> None:
    g = fed(guard([[20, 21, 22]]), [20, 21])
    logits = np.zeros(30, np.float32)
    out = g.apply(logits)
    assert out[22] == -1.0 and np.count_nonzero(out) == 1
    assert not logits.any()  # the engine's bound logits are reused by the next pass
    assert guard([[20, 21, 22]]).apply(logits) is logits  # nothing owed: no copy made


def test_inside_a_code_block_copying_is_free() -> None:
    g = guard([[20, 21, 22, 23]])
    g.feed(20, "Here:\n```py\n")
    g.feed(21, "x = 1")
    assert penalties(g) == {}  # an edit repeats the earlier code
    g.feed(22, "\n```\n")
    assert penalties(g) == {23: 2.0}  # closed again: prose is guarded


def test_a_long_copy_is_penalized_finitely() -> None:
    long = list(range(100, 200))
    g = fed(guard([long], base=1.75), long[:90])
    (amount,) = penalties(g).values()
    assert np.isfinite(amount) and amount > 1e6


@pytest.fixture(scope="module")
def served_chats(real_model_dir: Path) -> Chats:
    """Turns assembled with the served template, answered by the engine's scheduler on the real model."""
    from services.generation.runner import LoadedModel
    from services.prompt.config import DEFAULT_TEMPLATES
    from services.prompt.templates import load_file
    from services.tokenizer.domain import TextTokenizer

    model = LoadedModel(real_model_dir, "real", "cpu")
    return Chats(model, TextTokenizer.from_file(str(real_model_dir / "tokenizer.json")),
                 load_file(DEFAULT_TEMPLATES).get())


@pytest.mark.model
def test_the_served_model_stops_copying_its_earlier_answer(served_chats: Chats) -> None:
    """Through the served template and the engine's scheduler: asked for another tip, the served
    model repeats its first answer word for word (all 48 tokens of it when this was written);
    with the guard at the model's default it writes a different sentence."""
    from services.prompt.domain import PastTurn

    chats, model = served_chats, served_chats.model
    first = "Give me a tip for sleeping better."
    (tip,) = chats.answer_all([chats.prompt([], first)], 48, None)
    follow_up = chats.prompt([PastTurn(1, first, tip)], "Another one?")
    (copied,) = chats.answer_all([follow_up], 48, 0.0)
    (guarded,) = chats.answer_all([follow_up], 48, None)
    earlier = earlier_answers(model.encode(follow_up), model.answer_header, model.turn_end)
    assert [model.tokenizer.decode(a) for a in earlier] == [tip]
    assert longest_shared_run(model.encode(copied), earlier) >= 8, copied  # the copying the guard is for
    assert longest_shared_run(model.encode(guarded), earlier) < 8, guarded
    assert guarded.strip()


@pytest.mark.model
def test_the_served_model_answers_a_greeting_instead_of_repeating_it(served_chats: Chats) -> None:
    """Through the served template: greeted with "Hello!", the served model repeats it (and would go on
    with the hidden reminder after it, which the template's answer stops end: "Hello!" alone); with the
    guard it answers."""
    chats, reminder = served_chats, served_chats.template.after
    prompt = chats.prompt([], "Hello!")
    (echoed,) = chats.answer_all([prompt], 48, 0.0)
    (guarded,) = chats.answer_all([prompt], 48, None)
    assert echoes("Hello!", echoed, reminder) and echoed.strip() == "Hello!", echoed
    assert not echoes("Hello!", guarded, reminder) and not shows_reminder(guarded, reminder), guarded
    assert guarded.strip()
