"""The comparison dataset: rows from FeedbackEvents, Parquet files partitioned by date.

Append-only, like the Kafka log it is written from. A file is named after the Kafka partition
and offsets it holds, so a batch written again after a crash overwrites itself. A file is
fsynced, renamed into place and its directory fsynced before the sink commits its offsets, so
a committed offset never points past rows a power cut could lose.

`read` gives the dataset a trainer uses: one rating and one ranking per (user, conversation,
turn), the one submitted last. A re-submission replaces the earlier one there; both stay in
the files and on `chat.feedback`.

Deleting a conversation (`ConversationErased` on `chat.feedback`) removes its rows from the
files (`erase`): a deleted conversation's feedback never reaches training again.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from colloquy.v1 import events_pb2

log = logging.getLogger(__name__)

SCHEMA = pa.schema([
    ("feedback_id", pa.string()),
    ("user_id", pa.string()),
    ("conversation_id", pa.string()),
    ("turn_index", pa.int32()),
    ("kind", pa.string()),                      # "rating" | "ranking"
    ("prompt", pa.string()),                    # exactly as the model saw it
    ("answers", pa.list_(pa.string())),         # candidate texts, by index
    ("answer_finish_reasons", pa.list_(pa.string())),
    ("rating_answer_index", pa.int32()),        # rating only
    ("thumbs_up", pa.bool_()),                  # rating only
    ("comment", pa.string()),
    ("ranking", pa.list_(pa.int32())),          # ranking only: candidate indexes, best first
    ("model_version", pa.string()),
    ("template_version", pa.string()),
    ("source", pa.string()),                    # "human" | "simulated"
    ("created_unix_ms", pa.int64()),
    # ranking only: ranking[i] and ranking[i + 1] are as good as each other; empty for a strict
    # ranking. Files written before it read it as null (`read_file`).
    ("ranking_tied_with_next", pa.list_(pa.bool_())),
])


def row(ev: events_pb2.FeedbackEvent) -> dict:
    kind = ev.WhichOneof("feedback") or ""
    return {
        "feedback_id": ev.feedback_id, "user_id": ev.user_id, "conversation_id": ev.conversation_id,
        "turn_index": ev.turn_index, "kind": kind, "prompt": ev.prompt,
        "answers": [a.text for a in sorted(ev.answers, key=lambda a: a.index)],
        "answer_finish_reasons": [a.finish_reason for a in sorted(ev.answers, key=lambda a: a.index)],
        "rating_answer_index": ev.rating.answer_index if kind == "rating" else None,
        "thumbs_up": ev.rating.thumbs_up if kind == "rating" else None,
        "comment": ev.rating.comment if kind == "rating" else "",
        "ranking": list(ev.ranking.order) if kind == "ranking" else None,
        "model_version": ev.model_version, "template_version": ev.template_version,
        "source": ev.source or "human", "created_unix_ms": ev.created_unix_ms,
        "ranking_tied_with_next": list(ev.ranking.tied_with_next) if kind == "ranking" else None,
    }


def read_file(path: Path) -> pa.Table:
    """One file as a table of `SCHEMA`; a column the file was written without (older files have
    no `ranking_tied_with_next`) reads as nulls instead of making the whole file unreadable."""
    present = set(pq.read_schema(path).names)
    table = pq.read_table(path, columns=[n for n in SCHEMA.names if n in present])
    for field in SCHEMA:
        if field.name not in present:
            table = table.append_column(field, pa.nulls(table.num_rows, field.type))
    return table.select(SCHEMA.names).cast(SCHEMA)


def date_of(ms: int) -> str:
    return dt.datetime.fromtimestamp(ms / 1000, tz=dt.UTC).strftime("%Y-%m-%d")


def write_rows(root: Path, rows: list[dict], partition: int, first_offset: int, last_offset: int) -> list[Path]:
    """Write rows grouped by date; each file atomic (temp + rename) and durable (fsynced, and so
    is its directory) when this returns."""
    by_date: dict[str, list[dict]] = {}
    for r in rows:
        by_date.setdefault(date_of(r["created_unix_ms"]), []).append(r)
    written = []
    for day, day_rows in sorted(by_date.items()):
        folder = root / f"date={day}"
        if not folder.exists():
            new_root = not root.exists()
            folder.mkdir(parents=True, exist_ok=True)
            if new_root:
                _fsync_dir(root.parent)
            _fsync_dir(root)  # the new folder's entry, or a power cut can lose the folder
        path = folder / f"part-p{partition}-{first_offset:012d}-{last_offset:012d}.parquet"
        tmp = path.with_suffix(".parquet.tmp")
        pq.write_table(pa.Table.from_pylist(day_rows, schema=SCHEMA), tmp)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)  # the bytes, before the rename makes them the file readers see
        finally:
            os.close(fd)
        os.replace(tmp, path)
        _fsync_dir(folder)  # the rename itself
        written.append(path)
    return written


def erase(root: Path, conversation_ids: set[str]) -> int:
    """Remove every row of these conversations (deleted by their owner or by retention) from the
    dataset's files; returns the rows removed. Each changed file is replaced atomically and
    durably like `write_rows` does (a file left with no rows is removed), so a crash leaves
    either the old or the new file and erasing again finishes the job."""
    if not conversation_ids or not root.exists():
        return 0
    import pyarrow.compute as pc

    wanted = pa.array(sorted(conversation_ids), pa.string())
    removed = 0
    for path in sorted(root.glob("date=*/*.parquet")):
        try:
            table = read_file(path)
        except (pa.ArrowInvalid, OSError) as exc:
            log.warning("skipping an unreadable dataset file", extra={"path": str(path), "error": repr(exc)})
            continue
        hit = pc.is_in(table["conversation_id"], value_set=wanted)
        gone = pc.sum(hit).as_py() or 0
        if not gone:
            continue
        keep = table.filter(pc.invert(hit))
        if keep.num_rows:
            tmp = path.with_suffix(".parquet.tmp")
            pq.write_table(keep, tmp)
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, path)
        else:
            path.unlink()
        _fsync_dir(path.parent)
        removed += gone
    return removed


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def feedback_key(r: dict) -> tuple[str, str, int, str]:
    """What a submission replaces: the same user's earlier rating (or ranking) of the same turn."""
    return (r["user_id"], r["conversation_id"], r["turn_index"], r["kind"])


def read(root: Path, source: str | None = None, since_ms: int = 0, until_ms: int | None = None) -> pa.Table:
    """The dataset: per `feedback_key` the latest submission, then optionally one source and a
    time window (`created_unix_ms` in [since_ms, until_ms)), oldest first.

    Latest is by `created_unix_ms` (the gateway's accept time), ties in Kafka log order: one
    conversation's feedback is keyed to one partition, and files are read in (date, partition,
    offset) order. The latest is chosen before the window, so a re-submission after a window
    also replaces the earlier one within it. A redelivered copy (same `feedback_id`) is the same
    submission and changes nothing.
    """
    files = sorted(root.glob("date=*/*.parquet")) if root.exists() else []
    rows: list[dict] = []
    for path in files:
        try:
            rows.extend(read_file(path).to_pylist())
        except (pa.ArrowInvalid, OSError) as exc:  # e.g. a file from before writes were fsynced
            log.warning("skipping an unreadable dataset file", extra={"path": str(path), "error": repr(exc)})
    latest: dict[tuple[str, str, int, str], dict] = {}
    for r in sorted(rows, key=lambda r: r["created_unix_ms"]):  # stable: ties keep log order
        latest[feedback_key(r)] = r
    keep = [r for r in sorted(latest.values(), key=lambda r: r["created_unix_ms"])
            if (not source or r["source"] == source) and r["created_unix_ms"] >= since_ms
            and (until_ms is None or r["created_unix_ms"] < until_ms)]
    return pa.Table.from_pylist(keep, schema=SCHEMA)
