from __future__ import annotations

import pytest

from filter_worker.exit_codes import ExitCode, FailureSlot, FatalError


def test_the_first_fatal_error_stays_whatever_comes_after():
    """The first delivery core cleared a stored fatal error when it aborted a transaction; nothing can now."""
    slot = FailureSlot()
    slot.raise_if_set()
    first = FatalError("fenced", ExitCode.FAILED)
    slot.set(first)
    slot.set(FatalError("a later, unrelated failure", ExitCode.DEAD_LETTER_LIMIT))
    with pytest.raises(FatalError) as raised:
        slot.raise_if_set()
    assert raised.value is first
