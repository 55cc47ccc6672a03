"""Labelled data for ``eval``, ``calibrate`` and ``drift snapshot``, searched: an example, or exit 2 naming the file.

Whatever a data file holds, loading it returns examples or raises ``ConfigError`` whose message names
the file (and, for a row, its line and field); no other exception reaches the user as a traceback.
"""

from __future__ import annotations

import csv
import io
import tempfile
from pathlib import Path

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from filter_worker.config import ConfigError, Scope, ScopeMatch
from filter_worker.pipeline.routing import ScopeMatcher
from filter_worker.tools.evaluation import load_examples, load_texts, parse_label_map
from tests.fuzz.strategies import json_values, texts
from tests.test_cli import cli

SCOPES = ScopeMatcher(
    [
        Scope(name="kids", match=ScopeMatch(header="tenant", values=["kids"]), rules=[]),
        Scope(name="german", match=ScopeMatch(field="meta.lang", values=["de"]), rules=[]),
    ]
)
cells = st.one_of(texts, st.sampled_from(["", "a,b", '"', '"quoted, with comma"', "x\ny", "\x00", "Negative"]))


@st.composite
def csv_files(draw: st.DrawFn) -> bytes:
    """A header line and rows, some with more or fewer fields than the header, some with bare quotes."""
    header = draw(st.lists(st.sampled_from(["text", "label", "lang", "tenant", "meta.lang", "meta", ""]), max_size=5))
    rows = draw(st.lists(st.lists(cells, max_size=7), max_size=6))
    if draw(st.booleans()):  # written by a program: quoted where needed
        out = io.StringIO()
        csv.writer(out).writerows([header, *rows])
        text = out.getvalue()
    else:  # written by hand: commas and quotes as they are
        text = "\n".join(",".join(row) for row in [header, *rows])
    raw = text.encode("utf-8", "surrogatepass")
    return draw(st.sampled_from([raw, b"\xef\xbb\xbf" + raw, raw + b"\xff", raw.replace(b"\n", b"\r\n")]))


jsonl_lines = st.one_of(
    st.builds(lambda v: orjson.dumps(v), json_values),
    st.builds(lambda text, label: orjson.dumps({"text": text, "label": label}), texts, json_values),
    st.sampled_from(
        [b"", b"not json", b'{"text": "\\ud800", "label": "x"}', b"[" * 5000, b'{"a":' * 3000, b"\xff", b"null"]
    ),
)
jsonl_files = st.lists(jsonl_lines, max_size=6).map(lambda lines: b"\n".join(lines))


def _load(content: bytes, suffix: str) -> None:
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / f"data{suffix}"
        path.write_bytes(content)
        for load in (
            lambda: load_examples(path, lang_field="lang", label_map={"spam": "Negative"}, scopes=SCOPES),
            lambda: load_texts(path, "text", SCOPES),
        ):
            try:
                examples = load()
            except ConfigError as exc:
                assert str(exc).startswith(str(path)), f"the message names the file: {exc}"
            else:
                assert examples, "a file without examples is an error, never an empty list"
                for item in examples:
                    text = item.text if hasattr(item, "text") else item[0]
                    assert isinstance(text, str) and text.strip()
                    text.encode("utf-8")  # no lone surrogate reaches the tokenizer


@given(content=csv_files())
def test_any_csv_file_loads_or_is_refused_naming_the_file(content: bytes) -> None:
    _load(content, ".csv")


@given(content=jsonl_files)
def test_any_jsonl_file_loads_or_is_refused_naming_the_file(content: bytes) -> None:
    _load(content, ".jsonl")


@given(text=st.one_of(st.text(), st.builds(lambda v: orjson.dumps(v).decode(), json_values)))
def test_any_label_map_parses_or_is_refused_naming_the_option(text: str) -> None:
    try:
        mapping = parse_label_map(text)
    except ConfigError as exc:
        assert str(exc).startswith("--label-map")
    else:
        assert all(isinstance(k, str) and isinstance(v, str) for k, v in mapping.items())


def test_a_label_map_nested_deeper_than_the_parser_goes_is_refused():
    with pytest.raises(ConfigError, match="--label-map"):
        parse_label_map("[" * 100_000)


def test_an_unquoted_comma_names_the_file_line_and_field(tmp_path):
    data = tmp_path / "data.csv"
    data.write_text("text,label\nfine text,Neutral\nhello, world,Neutral\n", encoding="utf-8")
    with pytest.raises(ConfigError) as err:
        load_examples(data)
    assert str(err.value).startswith(f"{data} line 3: 3 fields, but the header names 2 (text, label)")
    assert "quote" in str(err.value)


def test_eval_exits_2_on_an_unquoted_comma_instead_of_a_traceback(tmp_path, keyword_model):
    data = tmp_path / "data.csv"
    data.write_text("text,label\nhello, world,Neutral\n", encoding="utf-8")
    result = cli("eval", str(data), "--model", str(keyword_model))
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert f"{data} line 2" in result.stderr


def test_jsonl_nested_100000_deep_names_the_line(tmp_path):
    data = tmp_path / "data.jsonl"
    data.write_bytes(b'{"text": "ok", "label": "Neutral"}\n' + b"[" * 100_000 + b"]" * 100_000 + b"\n")
    with pytest.raises(ConfigError, match=rf"{data} line 2: not valid JSON"):
        load_examples(data)


def test_a_csv_field_larger_than_the_csv_modules_default_limit_loads(tmp_path):
    data = tmp_path / "data.csv"
    data.write_text(f"text,label\n{'word ' * 100_000},Neutral\n", encoding="utf-8")
    (example,) = load_examples(data)
    assert len(example.text) == 500_000
