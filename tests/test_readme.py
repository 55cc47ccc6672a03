"""The README and docs/: the configuration table lists every setting, the quick start is what CI runs, links resolve."""

from __future__ import annotations

import re
from pathlib import Path

from pydantic import BaseModel

from filter_worker.config import ENV_PREFIX, Settings

README = Path(__file__).resolve().parent.parent / "README.md"
CONFIGURATION = README.parent / "docs" / "configuration.md"


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
    documented = set(re.findall(r"^\| `(FILTER_[A-Z_]+)` \|", CONFIGURATION.read_text(encoding="utf-8"), re.MULTILINE))
    assert documented == env_names(Settings)


def _shell_blocks(text: str) -> list[str]:
    return re.findall(r"^```sh\n(.*?)^```", text, re.MULTILINE | re.DOTALL)


def test_quick_start_installs_torch_first_the_demo_light_and_the_tests_as_ci_does():
    text = README.read_text(encoding="utf-8")
    quick_start = text[text.index("## Quick start") : text.index("## Run it locally")]
    torch, demo, tests = _shell_blocks(quick_start)[:3]
    # The CUDA warning and the CPU wheel come before anything installs torch.
    assert quick_start.index("CUDA builds") < quick_start.index("```sh")
    assert "--index-url https://download.pytorch.org/whl/cpu torch==2.13.0" in torch
    # The demo needs no test tool: the `demo` extra only.
    assert demo.strip() == ".venv/bin/pip install -e '.[demo]' && .venv/bin/filter-worker demo"
    ci = (README.parent / ".ci" / "run").read_text(encoding="utf-8")
    assert "pip install torch==2.13.0 -e '.[dev]'" in tests and "torch==2.13.0 -e '.[dev]'" in ci
    assert tests.strip().endswith(".venv/bin/python -m pytest") and "\n.venv/bin/python -m pytest\n" in ci
    assert '.venv/bin/python -m pytest -m "not integration"' in quick_start, "the fast command next to the full one"


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _prose(path: Path) -> str:
    """The file without its fenced code blocks (where brackets are code, not links)."""
    return re.sub(r"^```.*?^```", "", path.read_text(encoding="utf-8"), flags=re.MULTILINE | re.DOTALL)


def test_links_between_the_readme_and_docs_resolve():
    pages = [README, *sorted((README.parent / "docs").glob("*.md"))]
    assert len(pages) >= 4, "the README links to its docs pages"
    anchors = {
        page.resolve(): {_slug(h) for h in re.findall(r"^#+ (.+)$", _prose(page), re.MULTILINE)} for page in pages
    }
    checked = 0
    for page in pages:
        for target in re.findall(r"\]\(([^)\s]+)\)", _prose(page)):
            if target.startswith(("http://", "https://")):
                continue
            file, _, anchor = target.partition("#")
            resolved = (page.parent / file).resolve() if file else page.resolve()
            assert resolved.exists(), f"{page.name}: {target} points at nothing"
            if anchor:
                where = file or page.name
                assert anchor in anchors.get(resolved, set()), f"{page.name}: no heading for #{anchor} in {where}"
            checked += 1
    assert checked >= 10
