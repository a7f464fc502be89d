"""The comparison dataset: rows from FeedbackEvents, Parquet files partitioned by date.

Append-only. A file is named after the Kafka partition and offsets it holds, so a batch
written again after a crash overwrites itself; readers still dedupe on `feedback_id`.
"""

from __future__ import annotations

import datetime as dt
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
from colloquy.v1 import events_pb2

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
    }


def date_of(ms: int) -> str:
    return dt.datetime.fromtimestamp(ms / 1000, tz=dt.UTC).strftime("%Y-%m-%d")


def write_rows(root: Path, rows: list[dict], partition: int, first_offset: int, last_offset: int) -> list[Path]:
    """Write rows grouped by date; atomic per file (temp + rename)."""
    by_date: dict[str, list[dict]] = {}
    for r in rows:
        by_date.setdefault(date_of(r["created_unix_ms"]), []).append(r)
    written = []
    for day, day_rows in sorted(by_date.items()):
        folder = root / f"date={day}"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"part-p{partition}-{first_offset:012d}-{last_offset:012d}.parquet"
        tmp = path.with_suffix(".parquet.tmp")
        pq.write_table(pa.Table.from_pylist(day_rows, schema=SCHEMA), tmp)
        os.replace(tmp, path)
        written.append(path)
    return written


def read(root: Path, source: str | None = None, since_ms: int = 0, until_ms: int | None = None) -> pa.Table:
    """The dataset (deduplicated by feedback_id), optionally one source and a time window."""
    if not root.exists() or not any(root.glob("date=*/*.parquet")):
        return SCHEMA.empty_table()
    table = pads.dataset(str(root), format="parquet", partitioning="hive",
                         exclude_invalid_files=True).to_table(columns=SCHEMA.names)
    rows = table.to_pylist()
    seen: set[str] = set()
    keep = []
    for r in sorted(rows, key=lambda r: r["created_unix_ms"]):
        if r["feedback_id"] in seen:
            continue
        if source and r["source"] != source:
            continue
        if r["created_unix_ms"] < since_ms or (until_ms is not None and r["created_unix_ms"] >= until_ms):
            continue
        seen.add(r["feedback_id"])
        keep.append(r)
    return pa.Table.from_pylist(keep, schema=SCHEMA)
