"""librdkafka's transactional calls on a helper thread, one at a time, waited on with the loop's own deadline.

librdkafka does not keep the timeout these calls are given: with the broker's connections dropped,
``send_offsets_to_transaction(timeout=10)`` was measured to block for 60 s (librdkafka 2.16), while
the loop it blocked could serve no SIGTERM, no liveness and no consumer poll. So each call runs on a
daemon thread of its own and the loop waits for it at most a turn's worth; a call still running is
waited on again the next turn (never called a second time, and never another call beside it:
librdkafka allows one transactional call at a time). A call that never returns does not keep the
process from exiting.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable


class _Call:
    """One call on its thread: its name, when it began, and (once done) what it raised."""

    def __init__(self, name: str, fn: Callable[[], None], started: float) -> None:
        self.name = name
        self.started = started
        self.done = threading.Event()
        self.error: BaseException | None = None
        self.warned = False  # the log said once that it outlived its bound
        threading.Thread(target=self._run, args=(fn,), name=f"txn-{name}", daemon=True).start()

    def _run(self, fn: Callable[[], None]) -> None:
        try:
            fn()
        except BaseException as exc:  # noqa: BLE001 - handed to the loop, which raises it on its thread
            self.error = exc
        finally:
            self.done.set()


class TransactionalCalls:
    """Runs one transactional call at a time off the loop's thread; see the module docstring."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._call: _Call | None = None

    def run(self, name: str, fn: Callable[[], None], wait_s: float) -> bool:
        """Start ``fn`` as the call ``name`` (or keep waiting on ``name``, begun on an earlier turn) for ``wait_s``.

        ``True``: it returned; it raises what the call raised; ``False``: it still runs (call ``run``
        with the same name again: ``fn`` is then not called).
        """
        call = self._call
        if call is None:
            call = self._call = _Call(name, fn, self._clock())
        elif call.name != name:
            raise RuntimeError(f"librdkafka allows one transactional call at a time: {name} while {call.name} runs")
        if not call.done.wait(max(0.0, wait_s)):
            return False
        self._call = None
        if call.error is not None:
            raise call.error
        return True

    def wait_idle(self, wait_s: float) -> bool:
        """Wait up to ``wait_s`` for a running call to end, dropping its outcome; ``True`` once none runs."""
        call = self._call
        if call is None:
            return True
        if not call.done.wait(max(0.0, wait_s)):
            return False
        self._call = None
        return True

    @property
    def running(self) -> str | None:
        """The name of the call still running, if any."""
        return self._call.name if self._call is not None else None

    def overdue(self, bound_s: float) -> float | None:
        """Seconds the running call has taken, once that is more than ``bound_s``, the first time it is asked
        (for one log line per call); ``None`` otherwise."""
        call = self._call
        if call is None or call.warned:
            return None
        waited = self._clock() - call.started
        if waited <= bound_s:
            return None
        call.warned = True
        return waited

    def running_for(self) -> float:
        """Seconds the running call has taken so far; 0 when none runs."""
        call = self._call
        return self._clock() - call.started if call is not None else 0.0
