"""Feedback sink: turns `chat.feedback` events into the comparison dataset (Parquet by date)."""
