"""The README's configuration table must list every setting, so docs and code cannot drift."""

from __future__ import annotations

import re
from pathlib import Path

from pydantic import BaseModel

from filter_worker.config import ENV_PREFIX, Settings

README = Path(__file__).resolve().parent.parent / "README.md"


def env_names(model: type[BaseModel], prefix: str = ENV_PREFIX) -> set[str]:
    names = set()
    for name, field in model.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel) and prefix == ENV_PREFIX:
            names |= env_names(annotation, f"{prefix}{name.upper()}__")
        else:
            names.add(f"{prefix}{name.upper()}")
    return names


def test_every_setting_is_documented_and_every_documented_setting_exists():
    documented = set(re.findall(r"^\| `(FILTER_[A-Z_]+)` \|", README.read_text(encoding="utf-8"), re.MULTILINE))
    assert documented == env_names(Settings)


def test_quick_start_is_the_two_commands_ci_runs():
    text = README.read_text(encoding="utf-8")
    ci = (README.parent / ".ci" / "run").read_text(encoding="utf-8")
    assert "pip install torch==2.13.0 -e '.[dev]' && .venv/bin/filter-worker demo" in text
    assert ".venv/bin/python -m pytest\n" in text
    assert "torch==2.13.0 -e '.[dev]'" in ci and "\n.venv/bin/python -m pytest\n" in ci
