"""``--config`` files, searched: settings, or exit 2 with one sentence; never a traceback, never a secret.

Documents are drawn from the settings' own sections and fields with values of every TOML type (and
some keys that do not exist), plus raw bytes and nesting deeper than Python's parsers go.
"""

from __future__ import annotations

import math
import tempfile
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from filter_worker.config import ConfigError, Settings, load_settings

SECRET = "s3cret-in-a-config-file"
SECTIONS = {name: list(field.annotation.model_fields) for name, field in Settings.model_fields.items()
            if hasattr(field.annotation, "model_fields")}  # fmt: skip
scalars = st.one_of(
    st.booleans(),
    st.integers(-(2**63), 2**63 - 1),
    st.floats(allow_nan=False),
    st.text(st.characters(blacklist_categories=("Cs",)), max_size=20),
    st.sampled_from(["SSL", "SASL_SSL", "PLAIN", "json", "text", "drop", "Negative", "", "-1", "0"]),
)
rule_keys = st.sampled_from(["action", "labels", "min_score", "name", "x"])
toml_values = st.recursive(
    scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(rule_keys, inner, max_size=3), max_leaves=6
)


def _toml(value: Any) -> str:
    """A TOML value: strings and keys as JSON strings (TOML's basic strings accept JSON's escapes)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return "inf" if value == math.inf else "-inf" if value == -math.inf else repr(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return orjson.dumps(value).decode()
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return "{" + ", ".join(f"{orjson.dumps(k).decode()} = {_toml(v)}" for k, v in value.items()) + "}"


@st.composite
def documents(draw: st.DrawFn) -> bytes:
    lines = []
    for section in draw(st.lists(st.sampled_from([*SECTIONS, "unknown"]), max_size=3, unique=True)):
        lines.append(f"[{section}]")
        known = SECTIONS.get(section, [])
        for key in draw(st.lists(st.sampled_from([*known, "no_such_key"]), max_size=4, unique=True)):
            lines.append(f"{key} = {_toml(draw(toml_values))}")
        if section == "kafka" and draw(st.booleans()):
            lines.append(f'sasl_password = "{SECRET}"')
            lines.append(f'properties = {{"sasl.password" = "{SECRET}", "bogus" = {_toml(draw(scalars))}}}')
    text = "\n".join(lines).encode()
    return draw(st.sampled_from([text, text + b"\n[", text + b"\xff", b"\x00" + text]))


def _load(content: bytes) -> None:
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "filter-worker.toml"
        path.write_bytes(content)
        try:
            load_settings(path)
        except ConfigError as exc:
            message = str(exc)
            assert message.startswith(("invalid configuration", "--config")), message
            assert "\n" not in message and SECRET not in message


@given(content=documents())
def test_any_config_file_loads_or_stops_with_one_sentence(content: bytes) -> None:
    _load(content)


@given(content=st.binary(max_size=300))
def test_any_bytes_as_a_config_file_load_or_stop_with_one_sentence(content: bytes) -> None:
    _load(content)


@pytest.mark.parametrize(
    "text",
    ["x = " + "[" * 100_000 + "]" * 100_000, "[kafka]\nproperties = " + "{a = " * 3000 + "1" + "}" * 3000],
    ids=["arrays", "inline-tables"],
)
def test_a_config_file_nested_deeper_than_the_parser_goes_is_refused_naming_it(tmp_path, text):
    path = tmp_path / "deep.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=f"invalid configuration: {path} nests tables or arrays too deeply"):
        load_settings(path)


def test_a_json_variable_nested_too_deeply_is_named(monkeypatch):
    monkeypatch.setenv("FILTER_ROUTING__RULES", "[" * 100_000)
    with pytest.raises(ConfigError, match="FILTER_ROUTING__RULES nests lists or objects too deeply"):
        load_settings()


@pytest.mark.parametrize("value", ["true", "3", "1.5", "[1, 2]", "{a = 1}", '""'])
def test_every_setting_given_each_toml_type_loads_or_stops_with_one_sentence(tmp_path, value):
    # Found by the search above: `[drift] reference = false` crashed with AttributeError ('bool' object has
    # no attribute 'strip'); a value of any TOML type, in any setting, is at worst a configuration error.
    path = tmp_path / "types.toml"
    for section, fields in SECTIONS.items():
        for field in fields:
            path.write_text(f"[{section}]\n{field} = {value}\n")
            _load(path.read_bytes())
