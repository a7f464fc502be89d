"""bench/scale.py's own arithmetic (no broker): the stall and commit-pause measures and its tables."""

from __future__ import annotations

from bench import scale


def test_scale_stall_is_the_longest_gap_and_commit_pauses_pair_each_advance() -> None:
    assert scale._max_gap([1.0, 1.1, 3.0, 3.2], 0.9, 4.0) == (1.1, 3.0)
    assert scale._max_gap([], 2.0, 5.0) == (2.0, 5.0)  # nothing handled in the window: all of it
    samples = [(0.0, 0), (0.5, 10), (1.0, 10), (2.5, 10), (3.0, 30), (3.5, 30)]
    pauses = [b[0] - a[0] for a, b in scale._progress_pairs(samples)]
    assert pauses == [0.5, 2.5, 0.5]  # the last: still paused when the window ended
    doc = {"started": "2026-12-02T12:00:00Z", "seconds": 60, "noisy": False, "skipped": {"prompt": "x"},
           "machine": {"cpus": 2, "processor": "cpu", "loadavg_before": [1.0], "loadavg_after": [2.0]},
           "params": {"warmup_events": {"tokenizer": 100}, "method": "m"},
           "results": {"tokenizer": {"1": {"events_per_s": 100.0, "events": 400}, "2": {"events_per_s": 150.0,
                                                                        "handled_per_replica": [50, 50]},
                                     "ratio": 1.5, "rebalance": {"join_to_partitions_s": 1.0, "stall_s": 2.0,
                                                                 "steady_max_gap_s": 0.1, "commit_pause_s": 2.5,
                                                                 "steady_commit_pause_s": 0.3}}}}
    doc["store"] = {"turns": 10, "conversations": 1, "context": {
        "prompt_chars_mean": 4000, "turn_proto_bytes_mean": 600, "sqlite": {"bytes_per_turn": 5900},
        "postgresql": {"bytes_per_turn": 2500}}}
    text = scale.markdown(doc)
    assert "| tokenizer | 100.0 | 150.0 | 1.50 | [50, 50] |" in text and "(skipped prompt: x)" in text
    assert "| every earlier turn that fits the context | 4000 | 600 | 5900 | 2500 |" in text
