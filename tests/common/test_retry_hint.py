from services.common import retry_hint


def test_the_written_trailer_reads_back() -> None:
    assert retry_hint.read(retry_hint.trailer(1.2)) == 2
    assert retry_hint.trailer(0.001) == (("retry-after", "1"),)


def test_bytes_values_other_keys_and_malformed_hints() -> None:
    assert retry_hint.read([("x-other", "9"), ("retry-after", b"7")]) == 7
    assert retry_hint.read([("retry-after", "soon")]) is None
    assert retry_hint.read([("retry-after", "0")]) == 1  # never "retry now"
    assert retry_hint.read(None) is None and retry_hint.read(()) is None
