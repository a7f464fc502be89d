"""Unit tests of the suite's own logic (no model, no broker): ``pytest bench/test_bench.py``.

The benchmarks themselves are measured, not asserted; what is tested here is the arithmetic and
the report's verdicts, which would silently mislead if wrong.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from bench import common, engine, report, stages, template_answers


def test_percentile_interpolates_and_summary_carries_median_and_p99() -> None:
    xs = list(range(1, 101))
    assert common.percentile(xs, 50) == pytest.approx(50.5)
    assert common.percentile(xs, 99) == pytest.approx(99.01)
    assert common.percentile([7.0], 99) == 7.0
    s = common.summary([3.0, 1.0, 2.0])
    assert (s["median"], s["min"], s["max"], s["n"]) == (2.0, 1.0, 3.0, 3)
    assert common.summary([])["median"] is None


def test_stamps_spread_coalesced_tokens_over_their_interval() -> None:
    # 1 token at t=1, then 4 tokens arriving together at t=2: 4 tokens after the first in 1 s.
    r = engine._stamps_result(10, 0.0, [1.0, 2.0], [1, 4])
    assert r["tokens"] == 5 and r["ttft_s"] == 1.0
    assert r["decode_tok_s"] == pytest.approx(4.0)
    assert r["itl_s"] == pytest.approx([0.25] * 4)


def test_collapsed_stacks_rank_own_and_inclusive_time() -> None:
    text = "main (a.py:1);handle (w.py:2);encode (t.py:3) 30\nmain (a.py:1);poll (k.py:9) 70\n"
    top = stages.collapsed_top(text, 5)
    assert top["samples"] == 100
    assert top["top_self"][0] == {"function": "poll (k.py:9)", "pct": 70.0}
    assert {"function": "main (a.py:1)", "pct": 100.0} in top["top_inclusive"]


def test_redirected_handler_sends_every_output_to_the_bench_topic() -> None:
    @dataclasses.dataclass
    class Out:
        topic: str
        partition: int | None = None

    handle = stages.redirected(lambda ev: [Out("chat.moderated"), Out("chat.replies.x", 0)], "bench.out")
    assert [(o.topic, o.partition) for o in handle(None)] == [("bench.out", None), ("bench.out", None)]


def _doc(name: str, results: dict, params: dict | None = None, load: float = 1.0) -> dict:
    return {"benchmark": name, "machine": {"cpus": 2, "processor": "cpu", "platform": "linux",
                                           "loadavg_before": [load, 0, 0], "loadavg_after": [load, 0, 0]},
            "params": params or {}, "results": results, "skipped": {}, "seconds": 1.0,
            "noisy": load / 2 > common.NOISY_LOAD_PER_CPU}


PIPELINE_KEYS = ("gateway_ttft_ms", "direct_ttft_ms", "ttft_overhead_beyond_moderation_hold_ms", "first_delta_chars",
                 "direct_itl_ms", "gateway_delta_gap_ms")


def test_report_judges_each_goal(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(common, "RESULTS", tmp_path)
    single = lambda tps: {"decode_tok_s": {"median": tps}, "itl_ms": {"median": 1, "p99": 2},  # noqa: E731
                          "ttft_ms": {"median": 5}}
    docs = {
        "engine": _doc("engine", {
            "ort-genai": {"single": single(100.0), "streams": {"1": {"median": 100.0}, "16": {"median": 400.0}}},
            "colloquy": {"single": single(95.0), "streams": {"1": {"median": 90.0}, "16": {"median": 180.0}}},
        }, {"streams": [1, 16], "max_tokens": 8, "model_version": "v"}, load=8.0),
        "pipeline": _doc("pipeline", {"1": {**{k: {"median": 1.0, "p99": 2.0} for k in PIPELINE_KEYS},
                                            "ttft_overhead_ms": {"median": 40.0, "p99": 50.0},
                                            "gateway_itl_ms": {"median": 12.5, "p99": 20.0},
                                            "ort_direct_itl_ms": {"median": 10.0, "p99": 12.0},
                                            "delivered_decode_tok_s": {"median": 80.0, "p99": 90.0}}}),
        "conversation": _doc("conversation", {"gateway": {"1": {"ttft_ms": {"median": 100.0}},
                                                          "20": {"ttft_ms": {"median": 140.0}}},
                                              "kv_reuse": {"turns": {}}}, {"turns": 20}),
    }
    for name, doc in docs.items():
        (tmp_path / f"{name}.json").write_text(json.dumps(doc))
    rows = {r[0]: r for r in report.goals({n: json.loads((tmp_path / f"{n}.json").read_text()) for n in docs})}
    assert rows["single-stream decode through the pipeline"][3] == "**not met**"  # 80 vs 100 tok/s = 80% < 90%
    del docs["pipeline"]["results"]["1"]["ort_direct_itl_ms"]  # ORT from another run is no baseline
    rows = {r[0]: r for r in report.goals(docs)}
    assert rows["single-stream decode through the pipeline"][3] == "unknown"
    assert rows["16-stream aggregate (Colloquy deployment)"][3] == "**not met**"  # 2x
    assert rows["gateway TTFT overhead p50 (1 chat)"][3] == "**not met**"  # 40 ms
    assert rows["turn-20 TTFT (gateway)"][3] == "met"  # 1.4x
    engine.ratios(docs["engine"]["results"])
    text = report.write(tmp_path / "REPORT.md").read_text()
    assert "**noisy**" in text and "not run" in text  # stages.json is missing


def test_stack_cpu_counts_a_process_and_its_children(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import os
    import subprocess
    import sys
    import types

    child = subprocess.Popen([sys.executable, "-c", "sum(range(3_000_000)); import time; time.sleep(5)"])
    try:
        fake = types.SimpleNamespace(procs={"me": types.SimpleNamespace(popen=types.SimpleNamespace(pid=os.getpid()))})
        import time

        time.sleep(1.0)
        cpu = common.stack_cpu(fake)
        assert cpu["me"] > 0
    finally:
        child.kill()
        child.wait()
    monkeypatch.setattr(common, "RESULTS", tmp_path)
    assert json.loads(common.write_json("x", {"a": 1}).read_text()) == {"a": 1}


def test_engine_goals_judge_each_ratio_and_call_missing_figures_unknown() -> None:
    agg = lambda one, sixteen: {"1": {"median": one}, "16": {"median": sixteen}}  # noqa: E731
    single = lambda tps: {"decode_tok_s": {"median": tps}}  # noqa: E731
    doc = {"results": {
        "ort-genai": {"single": single(100.0), "streams": agg(50.0, 200.0)},
        engine.LLAMA: {"single": single(80.0), "streams": agg(60.0, 150.0)},
        "colloquy": {"single": single(96.0), "streams": agg(50.0, 170.0),
                     "streams_itl_ms": {"16": {"median": 40.0, "p99": 130.0}}},
    }}
    rows = {(r[0], r[1]): r for r in engine.goals(doc)}
    dep = engine.SUBJECTS["colloquy"]
    assert rows[(dep, "aggregate@16 vs llama.cpp server (16 slots) @16")][4] == "not met"  # 1.13x < 1.2x
    assert rows[(dep, "aggregate@16 vs its own single stream")][4] == "met"  # 3.4x
    assert rows[(dep, "aggregate@16 vs ORT GenAI static batch of 16")][4] == "not met"  # 0.85x
    assert rows[(dep, "single-stream decode vs ORT GenAI Generator b1")][4] == "met"  # 0.96x
    assert rows[(dep, "ITL p99 / p50 @16 streams")][4] == "not met"  # 3.25x > 3x
    eng = engine.SUBJECTS["colloquy-engine"]
    assert {r[4] for k, r in rows.items() if k[0] == eng} == {"unknown"}


def test_produced_spreads_each_streams_coalesced_tokens() -> None:
    out = engine.produced([{"stamps": [1.0, 2.0], "counts": [1, 2]}, {"stamps": [0.5], "counts": [3]}])
    assert out["tokens"] == 6 and out["itl_s"] == pytest.approx([0.5, 0.5])


# -- bench/reliability.py's new phases: the arithmetic behind their figures ----------------------
def test_max_overlap_counts_chats_held_at_once_and_a_slot_handed_over_is_not_two() -> None:
    from bench import reliability

    assert reliability.max_overlap([]) == 0
    assert reliability.max_overlap([(0, 2), (1, 3), (1.5, 4)]) == 3
    # One chat ends at the instant the next starts: the slot was handed over, never held twice.
    assert reliability.max_overlap([(0, 1), (1, 2), (2, 3)]) == 1
    assert reliability.max_overlap((a, a + 1.5) for a in range(5)) == 2  # a generator, as the phase passes


def test_drain_time_is_the_first_sample_of_the_final_run_of_zero_lag() -> None:
    from bench import reliability

    samples = [(0.0, {"a": 0, "b": 0}), (2.0, {"a": 5, "b": 0}), (4.0, {"a": 0, "b": 0}),
               (6.0, {"a": 0, "b": 3}), (8.0, {"a": 0, "b": 0}), (10.0, {"a": 0, "b": 0})]
    assert reliability.drain_time(samples) == 8.0  # the zero at 4.0 was between two bursts
    assert reliability.drain_time(samples[:4]) is None  # still lagging at the end: not drained
    assert reliability.peak_lag(samples) == {"a": 5, "b": 3}


def test_repeats_counts_extra_copies_of_a_request_id() -> None:
    from bench import reliability

    assert reliability.repeats([]) == 0
    assert reliability.repeats(["r1", "r2", "r1", "r1", "r3"]) == 2


def test_metric_sum_adds_the_samples_whose_labels_match() -> None:
    from bench import reliability

    page = ("# HELP colloquy_events_consumed_total Kafka records consumed\n"
            "# TYPE colloquy_events_consumed_total counter\n"
            'colloquy_events_consumed_total{stage="prompt",topic="chat.moderated"} 7.0\n'
            'colloquy_events_consumed_total{stage="prompt",topic="chat.unanswered"} 2.0\n'
            'colloquy_events_consumed_total{stage="tokenizer",topic="chat.requests"} 5.0\n')
    assert reliability.metric_sum(page, "colloquy_events_consumed_total", stage="prompt") == 9.0
    assert reliability.metric_sum(page, "colloquy_events_consumed_total", stage="prompt",
                                  topic="chat.moderated") == 7.0
    assert reliability.metric_sum(page, "colloquy_batches_cut_total", stage="prompt") == 0.0
    assert reliability.metric_sum("", "colloquy_events_consumed_total") == 0.0


def test_backlog_messages_fit_the_gateway_limit_and_repeat_no_sentence() -> None:
    from bench import reliability

    for text in (reliability.random_word_sentences(8192, 1), reliability.plain_sentences(6144, 1)):
        assert len(text.encode()) <= 8192
        sentences = [s for s in text.split(". ") if s]
        assert len(sentences) > 100
    plain = reliability.plain_sentences(6144, 1).split(". ")[:-1]
    assert len(set(plain)) == len(plain)  # numbered: no two alike
    assert reliability.random_word_sentences(8192, 1) != reliability.random_word_sentences(8192, 2)


def test_keyed_request_id_is_the_gateways_for_the_keys_user() -> None:
    from bench import reliability
    from services.gateway import idempotency

    conv = idempotency.conversation_id("alice", "k1")
    assert reliability.keyed_request_id(1, "k1") == idempotency.request_id("alice", conv, "k1")
    assert reliability.keyed_request_id(2, "k1") != reliability.keyed_request_id(1, "k1")  # bob's own


def test_report_rows_of_the_new_phases() -> None:
    from bench import reliability

    case = {"tries": 3, "same_turn": 3, "recorded_once": 3, "extra_turns": 0, "retry_p50_s": 0.2, "retry_max_s": 0.4}
    result = {
        "idempotent": {"cases": {"replay": case, "join": case, "sigkill": case},
                       "tries": {"sigkill": [{"gateway_restart_s": 9.0}] * 3}, "load_chats": 40,
                       "load_history": {"turns_checked": 38, "lost": 0, "duplicated": 0}},
        "usercap": {"cap": 2, "flood_threads": 8, "seconds": 30.0, "rows": [
            {"who": "another user", "chats": 5, "completed": 5, "refused_per_key_cap": 0, "refusal_p50_s": None,
             "most_held_at_once": 1, "ttft_p50_s": 1.0, "ttft_p99_s": 2.0, "refused_other": []}]},
        "backlog": {"chats": 2, "drained": True, "drain_s": 40.0, "all_backlog_ended_s": 38.0,
                    "by_kind": [{"kind": "k", "chats": 2, "completed": 2, "codes": {"OK": 2}, "latency_p50_s": 3.0,
                                 "latency_max_s": 5.0}],
                    "stages": [{"stage": "prompt", "topic": "chat.moderated", "peak_lag": 9, "records_in": 2,
                                "processed": 2, "processed_again": 0, "batches_cut": 1, "outputs": 2,
                                "outputs_repeated": 0}],
                    "normal_before": {"latency_s": 1.0},
                    "normal_during": [{"sent_at_s": 3.0, "done": True, "latency_s": 4.0, "ttft_s": 3.5}],
                    "history": {"turns_checked": 2, "lost": 0, "duplicated": 0}},
    }
    text = reliability.render(result)
    assert "after a gateway SIGKILL mid-stream (gateway restarted) (under load) | 3/3 the same turn" in text
    assert "another user | 5/5 completed, 0 refused by the per-key cap" in text
    assert "**40.0 s** to drain" in text and "0 records processed twice, 0 outputs written twice" in text
    assert "batches committed in parts: prompt 1" in text
    assert "| prompt | chat.moderated | 9 | 2 | 2 | 0 | 1 | 2 | 0 |" in text


def test_history_store_plan_has_exactly_the_turns_asked_and_its_heavy_user() -> None:
    from bench import history_store as hs

    plan = hs.make_plan(1_000, 10_000, heavy=120, per_user=10)
    assert plan.turns == 10_000 and len(set(plan.ids)) == 1_000
    assert all(1 <= n <= hs.LONG for n in plan.counts) and plan.counts.count(hs.LONG) > 200
    assert plan.users.count(hs.HEAVY_USER) == 120
    assert hs.turn_counts(3, 3, __import__("random").Random(0)) == [1, 1, 1]
    with pytest.raises(ValueError):
        hs.turn_counts(2, 41, __import__("random").Random(0))


def test_history_store_loads_sqlite_reads_every_call_and_judges_the_p99(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """The bulk load writes what the store's readers find (a 20-turn conversation pages 10 + 10,
    the heavy user's list walks every page), on a tiny plan in a SQLite file."""
    from bench import history_store as hs
    from services.conversation.db import ConversationDB

    plan = hs.make_plan(300, 3_000, heavy=120, per_user=10)
    path = tmp_path / "c.db"
    target = hs.Target("sqlite", f"sqlite:///{path}", path=path)
    loaded = hs.load(target, plan, chunk=100)
    assert (loaded["conversations"], loaded["turns"]) == (300, 3_000) and loaded["size_mb"] > 0
    db = ConversationDB(target.url)
    c = plan.counts.index(hs.LONG)
    page = db.get_conversation(plan.ids[c], plan.users[c])
    assert page is not None and [t.index for t in page.turns] == list(range(1, 21))
    assert db.list_conversations(plan.users[c]).conversations[0].title
    db.close()
    reads = hs.reads(target.url, plan, samples=20)
    assert reads["heavy_user_pages"] == 3 and all(reads[k]["n"] == 20 for k, _ in hs.READS)
    results = {"sqlite": {"reads_ms": reads, "load": loaded}}
    hs.judge(results)
    assert results["sqlite"]["reads_met"] == all(reads[k]["p99"] <= hs.GOAL_P99_MS for k, _ in hs.READS)
    results["sqlite"]["reads_ms"]["list_typical_first_page"]["p99"] = 11.0
    hs.judge(results)
    assert results["sqlite"]["reads_met"] is False
    doc = _doc(hs.NAME, results, {"conversations": 300, "turns": 3_000, "long_conversations": 1,
                                  "heavy_user_conversations": 120, "samples": 20, "materializer_turns": 0,
                                  "prompt_turns_quoted": 2})
    rows = {r[0]: r for r in hs.rows(doc)}
    assert rows["ListConversations, a user with ~10"][-1] == "**not met**"
    start = lambda s, rss: {"serving_s": s, "rss_serving_mb": rss, "rss_after_calls_mb": rss + 1,  # noqa: E731
                            "call_ms": {"median": 1.0, "p99": 2.0}}
    results["sqlite"]["processes"] = {"gateway": {"empty": {**start(2.0, 100.0), "starts": [start(2.0, 100.0)]},
                                                  "loaded": {**start(6.0, 120.0), "starts": [start(6.0, 120.0)]}}}
    rows = {r[0]: r for r in hs.rows(doc)}
    assert rows["gateway: start to SERVING, s (loaded; empty store), worst start"][2:] == [6.0, 2.0, None, None,
                                                                                         "**not met**"]
    assert rows["gateway: RSS at SERVING, MB (loaded; empty store)"][-1] == "met"  # 20 MB more
    monkeypatch.setattr(hs.common, "RESULTS", tmp_path)
    hs.write_md({**doc, "started": "2026-12-02T12:00:00Z"})
    assert "bypasses Kafka" in (tmp_path / f"{hs.NAME}.md").read_text()


def test_rebalance_counts_lost_duplicated_and_misnumbered_turns_per_action() -> None:
    from bench.rebalance import Action, Chat, check_history, max_gap, tally

    chats = [Chat(0, 1, 1.0, "c1", "r1", done=True, ended=2.0),
             Chat(0, 2, 2.5, "c1", "r2", done=True, ended=3.0),  # done, never recorded: lost
             Chat(1, 1, 4.0, "c2", "r3", code="UNAVAILABLE", detail="retry shortly", ended=5.0),
             Chat(1, 1, 6.0, "c2", "r4", done=True, ended=7.0),  # recorded twice: duplicated
             Chat(2, 1, 6.5, "c3", "r5", done=True, ended=7.5),
             Chat(2, 2, 7.6, "c3", "r6", ended=7.9)]  # ended without done or error: unclear
    recorded = {"c1": [(1, "r1", True)], "c2": [(1, "r4", True), (1, "r4", True)],
                "c3": [(2, "r5", False)]}  # index 2 with no 1, and no answer text
    history = check_history(chats, recorded)
    assert history["r2"]["lost"] == 1 and history["r1"]["lost"] == 0
    assert history["r4"]["duplicated"] == 1 and history["r3"] == dict.fromkeys(history["r3"], 0)
    assert history["r5"]["bad_index"] == 1 and history["r5"]["no_answer"] == 1
    rows = tally(chats, [Action("tokenizer", "add", "tokenizer-2", 3.5, 8.0)], history, (0.0, 3.5))
    steady, add = rows
    assert (steady["chats"], steady["answered"], steady["lost"], steady["stall_s"]) == (2, 2, 1, 2.0)
    assert (add["chats"], add["answered"], add["errors"], add["unclear"]) == (4, 2, 1, 1)
    assert (add["duplicated"], add["bad_index"], add["no_answer"], add["process"]) == (1, 1, 1, "tokenizer-2")
    assert add["stall_s"] == 3.5  # from the action at 3.5 to the first completion at 7.0
    assert max_gap([], 1.0, 4.0) == 3.0 and max_gap([9.0], 1.0, 4.0) == 3.0


def test_template_answers_counts_stubs_non_answers_and_gate_answers() -> None:
    quality = template_answers.GATE
    gate = [q.accept[0] for q in quality]
    gate[0] = ""  # an empty answer: a stub, a non-answer and wrong
    questions = ["Why do we need sleep?", "What is the capital of France?"]
    stub = template_answers.summarize(questions, ["The answer to this question is:", "Paris is the capital."], gate)
    answered = template_answers.summarize(
        questions, ["Sleep lets the body and the brain rest and repair.", "Paris is the capital."], gate)
    assert (stub["stubs"], answered["stubs"]) == (2, 1)
    assert stub["non_answers"] == answered["non_answers"] + 1
    assert stub["quality_correct"] == answered["quality_correct"] == len(quality) - 1
    assert stub["rule_mean_rlhf"] < answered["rule_mean_rlhf"]
    assert {"question": "Why do we need sleep?", "answer": "The answer to this question is:",
            "why": "stub, off_topic"} in template_answers.failures(questions, ["The answer to this question is:",
                                                                          "Paris is the capital.", *gate])
    assert template_answers.is_stub("Here are the steps: ") and not template_answers.is_stub("Ratio 1:2 holds.")


def test_an_echo_is_an_answer_opening_with_the_users_message_and_the_reminder_is_seen_reworded() -> None:
    from bench.answer_copies import echoes, shows_reminder

    reminder = "(Answer this message directly and briefly.)"
    assert echoes("Hello!", "Hello!\n\n" + reminder, reminder) and echoes("Thanks, bye!", "Thanks, bye!", reminder)
    assert not echoes("Hello!", "Hello! How can I help you today?", reminder)  # a short message: all of it, only it
    assert echoes("How are you doing today?", "How are you doing? I am fine.", reminder)  # a longer one: four words
    assert not echoes("What is the capital of France?", "The capital of France is Paris.", reminder)
    assert shows_reminder("Thanks, bye!\n\n(Answer this question.)", reminder)  # reworded by the model
    assert not shows_reminder("I'm glad I could help.", reminder) and not shows_reminder("anything", "")


def test_moderation_finetune_folds_partition_the_train_rows_with_their_harmful_share() -> None:
    from bench import moderation_finetune

    texts, labels, lookalike = moderation_finetune.train_rows()
    assert len(texts) == len(labels) == len(lookalike) and lookalike.any()
    harm = labels.any(axis=1)
    tests = [moderation_finetune.fold(labels, k)[1] for k in range(moderation_finetune.FOLDS)]
    assert sorted(i for t in tests for i in t) == list(range(len(texts)))  # each row left out exactly once
    train, test = moderation_finetune.fold(labels, 0)
    assert not set(train) & set(test)
    assert abs(harm[test].mean() - harm.mean()) < 0.01  # stratified
