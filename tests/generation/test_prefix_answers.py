"""Cache fills: a finished answer's KV goes into the prefix cache for the conversation's next turn.

Driven pass by pass on the tiny model (CPU): the next turn finds the answer's blocks, its greedy
answer equals a cache-less scheduler's, and a fill never takes a pass while a request waits.
"""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
from prometheus_client import REGISTRY

from services.generation.config import EngineSettings
from services.generation.runner import LoadedModel
from services.generation.scheduler import Job, Scheduler, next_pass
from services.generation.schema import FinishReason, Request, Sampling

FIRST = ("<|im_start|>system\nYou are Colloquy, a helpful assistant.<|im_end|>\n"
         "<|im_start|>user\nTell me a story about the sea.<|im_end|>\n<|im_start|>assistant\n")
NEXT = "<|im_end|>\n<|im_start|>user\nTell me more.<|im_end|>\n<|im_start|>assistant\n"
ANSWER = 30  # tokens: FIRST (33 tokens) + the answer end 1 short of a block, which its end token fills
GREEDY = Sampling(temperature=0, repetition_penalty=1.0, max_tokens=ANSWER)
BLOCK = 16


@pytest.fixture(scope="module")
def model(tiny_model_dir: Path) -> LoadedModel:
    return LoadedModel(tiny_model_dir, "tiny-fill", "cpu")


def scheduler(model: LoadedModel, **kw: int) -> Scheduler:
    return Scheduler(model, EngineSettings(**{"max_running": 2, "prefill_chunk": 8, **kw}), threading.Lock())


def submit(sched: Scheduler, model: LoadedModel, name: str, ids: list[int]) -> Job:
    job = Job(Request(name, "", GREEDY), model, ids)
    sched.waiting.append(job)
    sched.queued_tokens += len(ids)
    return job


def fill_tokens() -> float:
    return REGISTRY.get_sample_value("colloquy_generation_prefix_cache_fill_tokens_total") or 0.0


def test_next_turn_reuses_the_answer_and_answers_as_without_cache(model: LoadedModel) -> None:
    """Turn 2 (= turn 1's ids + its answer + more) hits the answer's blocks; greedy output == cache off."""
    sched = scheduler(model)
    first = submit(sched, model, "t1", model.encode(FIRST))
    while sched.has_work():  # the answer, then its cache fill
        sched.step()
    answer = first.cands[0].generated
    assert first.cands[0].finish is FinishReason.LENGTH and len(answer) == ANSWER
    assert (len(first.ids) + ANSWER) % BLOCK == BLOCK - 1
    ids = first.ids + answer + model.encode(NEXT)
    second = submit(sched, model, "t2", ids)
    while sched.has_work():
        sched.step()
    prompt_blocks = len(first.ids) // BLOCK * BLOCK
    assert model.eos == {2}  # <|im_end|>: a cut answer's fill ends with it, as the next prompt has it
    assert second.reused == (len(first.ids) + len(answer) + 1) // BLOCK * BLOCK > prompt_blocks

    off = scheduler(model, prefix_cache_conversations=0, prefill_chunk=64)  # other chunk bounds too
    alone = submit(off, model, "t2-off", list(ids))
    while off.has_work():
        off.step()
    assert alone.reused == 0 and second.cands[0].generated == alone.cands[0].generated


def test_without_fills_the_next_turn_finds_only_the_prompt(model: LoadedModel) -> None:
    """GENERATION_PREFIX_CACHE_ANSWERS=0: no fill is queued; turn 2 reuses turn 1's prompt blocks only."""
    sched = scheduler(model, prefix_cache_answers=0)
    first = submit(sched, model, "t1", model.encode(FIRST))
    while sched.has_work():
        sched.step()
    assert not sched.fills
    second = submit(sched, model, "t2", first.ids + first.cands[0].generated + model.encode(NEXT))
    while sched.has_work():
        sched.step()
    assert second.reused == len(first.ids) // BLOCK * BLOCK


@pytest.mark.parametrize("prefilling,waiting,running,last", [
    (True, False, False, "decode"), (True, True, True, "decode"), (False, True, False, "decode"),
    (False, True, True, "decode"), (False, True, True, "fill"), (True, False, True, "fill"),
])
def test_a_fill_never_runs_while_a_request_waits_or_prefills(prefilling: bool, waiting: bool, running: bool,
                                                             last: str) -> None:
    assert next_pass(prefilling=prefilling, waiting=waiting, running=running, fill=True, last=last) != "fill"


def test_a_fill_alternates_with_decode_like_a_prefill() -> None:
    assert next_pass(prefilling=False, waiting=False, running=False, fill=True, last="fill") == "fill"
    assert next_pass(prefilling=False, waiting=False, running=True, fill=True, last="decode") == "fill"
    assert next_pass(prefilling=False, waiting=False, running=True, fill=True, last="fill") == "decode"
    assert next_pass(prefilling=False, waiting=False, running=False, fill=False, last="decode") == ""


def test_a_fill_waits_while_the_running_batch_is_crowded() -> None:
    assert next_pass(prefilling=False, waiting=False, running=True, fill=True, last="decode",
                     crowded=True) == "decode"
    assert next_pass(prefilling=False, waiting=False, running=True, fill=True, last="decode",
                     crowded=False) == "fill"


def test_a_request_arriving_mid_fill_prefills_first(model: LoadedModel) -> None:
    """A waiting request takes the next pass; the interrupted fill resumes after it from the cache."""
    sched = scheduler(model)
    first = submit(sched, model, "t1", model.encode(FIRST))
    while first.cands[0].finish is None:
        sched.step()
    assert len(sched.fills) == 1
    sched.step()  # one fill chunk
    done = fill_tokens()
    assert sched.fills and done > 0
    other = submit(sched, model, "other", model.encode(FIRST.replace("sea", "mountains")))
    while other.prefilled < len(other.ids):
        before = fill_tokens()
        sched.step()
        assert fill_tokens() == before  # no fill pass while the request waits or prefills
    while sched.has_work():
        sched.step()
    assert not sched.fills and sched.cache is not None
    full = len(first.ids) + ANSWER + 1  # the answer and its end token
    assert len(sched.cache.cached(first.ids + first.cands[0].generated + [2])) == full // BLOCK


def test_the_bound_is_checked_with_a_readable_message() -> None:
    from services.common.config import ConfigError, load

    with pytest.raises(ConfigError, match="GENERATION_PREFIX_CACHE_ANSWERS"):
        load(EngineSettings, {"GENERATION_PREFIX_CACHE_ANSWERS": "-1"})
    assert load(EngineSettings, {"GENERATION_PREFIX_CACHE_ANSWERS": "0"}).prefix_cache_answers == 0


def test_short_prompts_share_a_decode_gap_within_the_prefill_budget(model: LoadedModel) -> None:
    """Several short prompts are prefilled between two decode passes while their tokens fit the
    budget (prefill_chunk); a running stream never waits for more prompt tokens than that."""
    assert next_pass(prefilling=True, waiting=True, running=True, fill=False, last="prefill", room=True) == "prefill"
    assert next_pass(prefilling=True, waiting=True, running=True, fill=False, last="prefill", room=False) == "decode"
    budget = 24
    sched = scheduler(model, max_running=8, prefill_chunk=budget, prefix_cache_conversations=0)
    submit(sched, model, "long", model.encode(FIRST))  # running first: its decodes bound the gaps
    while not sched.running:
        sched.step()
    short = [model.encode(f"<|im_start|>user\n{q}<|im_end|>\n") for q in ("Hi", "Why?", "Ok", "Yes", "No", "Go")]
    assert all(len(ids) < budget // 2 for ids in short)
    jobs = [submit(sched, model, f"s{i}", ids) for i, ids in enumerate(short)]
    gaps: list[list[int]] = [[]]  # prompt tokens of each prefill pass, per decode gap
    counter = "colloquy_generation_prompt_tokens_total"
    while any(not j.cands[0].generated for j in jobs):
        before = REGISTRY.get_sample_value(counter) or 0.0
        sched.step()
        if sched._last == "decode":
            gaps.append([])
        elif sched._last == "prefill":
            gaps[-1].append(int((REGISTRY.get_sample_value(counter) or 0.0) - before))
    assert max(len(g) for g in gaps) >= 2  # short prompts shared a gap
    assert all(sum(g) <= budget for g in gaps), gaps  # and no gap went over the budget
    assert sum(len(g) for g in gaps) == len(short)
