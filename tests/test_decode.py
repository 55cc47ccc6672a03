from __future__ import annotations

import pytest

from filter_worker.pipeline.decode import ERROR_CLASSES, Decoded, DecodeFailure, decode

MALFORMED: list[tuple[bytes | None, str]] = [
    (None, "empty_value"),
    (b"", "empty_value"),
    (b"\xff\xfe\x00", "invalid_utf8"),
    (b"hello", "invalid_json"),
    (b'{"text": "cut', "invalid_json"),
    (b"[1, 2]", "not_object"),
    (b"42", "not_object"),
    (b'"text"', "not_object"),
    (b'{"body": "x"}', "missing_text"),
    (b'{"text": null}', "missing_text"),
    (b'{"text": 3}', "text_not_string"),
    (b'{"text": ["a"]}', "text_not_string"),
    (b'{"text": ""}', "empty_text"),
    (b'{"text": " \\n\\t"}', "empty_text"),
]


@pytest.mark.parametrize(("value", "error"), MALFORMED)
def test_malformed_json_records_get_a_class_and_a_reason(value, error):
    result = decode(value, "json", "text")
    assert isinstance(result, DecodeFailure)
    assert result.error == error
    assert result.reason and result.reason[0].islower()


def test_error_classes_lists_every_class_decode_returns():
    # Metrics initialise a dead-letter series per listed class: a new class must be listed too.
    # invalid_header comes from intake (tests/fuzz/test_attacks.py): the client could not read a header name.
    assert set(ERROR_CLASSES) == {error for _, error in MALFORMED} | {"invalid_header"}
    assert len(ERROR_CLASSES) == len(set(ERROR_CLASSES))


def test_dotted_path_reaches_nested_text():
    result = decode(b'{"payload": {"body": "hi there"}, "id": 1}', "json", "payload.body")
    assert result == Decoded("hi there", {"payload": {"body": "hi there"}, "id": 1})
    missing = decode(b'{"payload": "flat"}', "json", "payload.body")
    assert isinstance(missing, DecodeFailure) and missing.error == "missing_text"
    assert "payload.body" in missing.reason


def test_text_format_takes_the_whole_value():
    assert decode("grüße".encode(), "text", "ignored") == Decoded("grüße", None)
    assert decode(b"  ", "text", "x") == DecodeFailure("empty_text", "the value is only whitespace")
    bad = decode(b"ok \xc3\x28", "text", "x")
    assert isinstance(bad, DecodeFailure) and bad.error == "invalid_utf8" and "byte 3" in bad.reason
