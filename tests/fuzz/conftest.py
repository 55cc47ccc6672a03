"""Hypothesis profiles: a bounded, repeatable run in the suite, and a long search on request.

The suite runs ``ci``: a fixed number of examples per test, derandomized (the seed is derived from
each test, so every run tries the same inputs and a failure is reproducible from the test name
alone), nothing written to an example database. ``long`` is the fuzz run documented in
docs/security.md: many more examples, a fresh seed each time, failures kept in ``.hypothesis/``
so the next run tries them first::

    FILTER_FUZZ_PROFILE=long .venv/bin/python -m pytest tests/fuzz -q
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

# Large inputs are the point of several tests: generating them is slow by design, not a mistake.
_SLOW_BY_DESIGN = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example]

settings.register_profile(
    "ci", max_examples=150, derandomize=True, database=None, deadline=None, suppress_health_check=_SLOW_BY_DESIGN
)
settings.register_profile("long", max_examples=20_000, deadline=None, suppress_health_check=_SLOW_BY_DESIGN)
settings.load_profile(os.environ.get("FILTER_FUZZ_PROFILE", "ci"))
