"""The comparison dataset as trainers read it: one rating and one ranking per (user, turn)."""

from __future__ import annotations

from pathlib import Path

from rlhf import data
from services.feedback import dataset


def fb(fid: str, kind: str, created_ms: int, user: str = "u", conv: str = "c", turn: int = 1,
       **fields: object) -> dict:
    base = {"feedback_id": fid, "user_id": user, "conversation_id": conv, "turn_index": turn, "kind": kind,
            "prompt": "<|im_start|>user\nhi", "answers": ["a0", "a1", "a2"], "answer_finish_reasons": [],
            "comment": "", "model_version": "v1", "template_version": "t1", "source": "human",
            "created_unix_ms": created_ms, "rating_answer_index": None, "thumbs_up": None, "ranking": None}
    return {**base, **fields}


def test_resubmitted_rating_and_ranking_replace_the_earlier_ones_of_the_same_user_and_turn(tmp_path: Path) -> None:
    """Before: every submission was a row of its own, so the same ranking sent five times was five
    comparisons in the reward model's data."""
    rows = [
        fb("rank-1", "ranking", 1_000, ranking=[0, 1, 2]),
        fb("rate-1", "rating", 1_001, rating_answer_index=0, thumbs_up=True),
        fb("rank-2", "ranking", 2_000, ranking=[2, 1, 0]),                        # replaces rank-1
        fb("rate-2", "rating", 2_001, rating_answer_index=1, thumbs_up=False),   # replaces rate-1
        fb("rank-other-user", "ranking", 1_500, user="v", ranking=[1, 0, 2]),     # another user: kept
        fb("rank-other-turn", "ranking", 1_600, turn=2, ranking=[1, 2, 0]),       # another turn: kept
        fb("rank-other-conv", "ranking", 1_700, conv="d", ranking=[0, 2, 1]),     # another conversation
    ]
    dataset.write_rows(tmp_path, rows[:2], partition=0, first_offset=0, last_offset=1)
    dataset.write_rows(tmp_path, rows[2:], partition=0, first_offset=2, last_offset=6)
    dataset.write_rows(tmp_path, rows[2:4], partition=0, first_offset=2, last_offset=3)  # a redelivered batch
    got = {r["feedback_id"]: r for r in dataset.read(tmp_path).to_pylist()}
    assert sorted(got) == ["rank-2", "rank-other-conv", "rank-other-turn", "rank-other-user", "rate-2"]
    assert got["rank-2"]["ranking"] == [2, 1, 0] and got["rate-2"]["thumbs_up"] is False
    # What the RLHF job reads: the one ranking of that turn, as last submitted.
    rows_read = data.read_rows(tmp_path, "all", data.FeedbackWindow(0, 10_000))
    assert [r["ranking"] for r in rows_read if r["user_id"] == "u" and r["conversation_id"] == "c"
            and r["turn_index"] == 1 and r["kind"] == "ranking"] == [[2, 1, 0]]


def test_resubmission_after_a_window_still_replaces_the_earlier_one_inside_it(tmp_path: Path) -> None:
    dataset.write_rows(tmp_path, [fb("rank-1", "ranking", 1_000, ranking=[0, 1, 2]),
                                  fb("rank-2", "ranking", 5_000, ranking=[2, 1, 0])], 0, 0, 1)
    assert dataset.read(tmp_path, until_ms=2_000).num_rows == 0
    assert [r["feedback_id"] for r in dataset.read(tmp_path, since_ms=2_000).to_pylist()] == ["rank-2"]


def test_same_millisecond_resubmission_is_ordered_by_the_kafka_log(tmp_path: Path) -> None:
    dataset.write_rows(tmp_path, [fb("first", "ranking", 1_000, ranking=[0, 1, 2])], 0, 9, 9)
    dataset.write_rows(tmp_path, [fb("second", "ranking", 1_000, ranking=[1, 0, 2])], 0, 10, 10)
    assert [r["feedback_id"] for r in dataset.read(tmp_path).to_pylist()] == ["second"]


def test_erase_removes_a_deleted_conversations_rows_from_every_file(tmp_path: Path) -> None:
    """A deleted conversation's feedback leaves the dataset the trainer reads; other rows stay,
    a file left empty is removed, and erasing again changes nothing."""
    from colloquy.v1 import events_pb2

    from services.feedback import dataset as ds

    def r(fid: str, conv: str, day_ms: int) -> dict:
        return {**ds.row(events_pb2.FeedbackEvent(feedback_id=fid, user_id="u", conversation_id=conv, turn_index=1,
                                                  created_unix_ms=day_ms)), "kind": "rating"}

    day = 86_400_000
    ds.write_rows(tmp_path, [r("a1", "gone", 0), r("k1", "kept", 1)], 0, 0, 1)
    ds.write_rows(tmp_path, [r("a2", "gone", day)], 0, 2, 2)
    assert ds.erase(tmp_path, {"gone"}) == 2
    assert [x["feedback_id"] for x in ds.read(tmp_path).to_pylist()] == ["k1"]
    assert len(list(tmp_path.glob("date=*/*.parquet"))) == 1
    assert ds.erase(tmp_path, {"gone"}) == 0 and ds.erase(tmp_path / "missing", {"gone"}) == 0


def test_a_file_written_before_the_ties_column_still_reads(tmp_path: Path) -> None:
    """Files from before `ranking_tied_with_next` lack the column: they read as strict rankings
    (null ties) instead of being skipped as unreadable, which would drop their feedback."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    old_schema = pa.schema([f for f in dataset.SCHEMA if f.name != "ranking_tied_with_next"])
    folder = tmp_path / "date=1970-01-01"
    folder.mkdir()
    pq.write_table(pa.Table.from_pylist([fb("old", "ranking", 1_000, ranking=[1, 0, 2])], schema=old_schema),
                   folder / "part-p0-000000000000-000000000000.parquet")
    dataset.write_rows(tmp_path, [fb("new", "ranking", 2_000, conv="d", ranking=[0, 2, 1],
                                     ranking_tied_with_next=[True, False])], 0, 1, 1)
    got = {r["feedback_id"]: r for r in dataset.read(tmp_path).to_pylist()}
    assert got["old"]["ranking"] == [1, 0, 2] and got["old"]["ranking_tied_with_next"] is None
    assert got["new"]["ranking_tied_with_next"] == [True, False]
    items, _ = data.comparisons(got.values())
    assert sorted(len(c.pairs) for c in items) == [2, 3]
