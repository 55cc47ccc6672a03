"""One bound on everything between consume and the acknowledgement of its output, in records and bytes.

Records wait in many places: the batch buffer, the model, librdkafka's producer queue while the broker
does not acknowledge (an outage, with ``message.timeout.ms=0`` records wait for it as long as it lasts),
the dead-letter gate, a transaction that is not committed yet. Bounding each place alone leaves the
sum unbounded, so the offset tracker counts every record consumed and not yet acknowledged, whatever
stage holds it, and the loop stops fetching (pauses its partitions) once either bound is reached. It
resumes below half of both, so a full budget does not pause and resume on every record: each pause
drops librdkafka's prefetched records, which are fetched again on resume.

A record acknowledged behind a gap (a lower offset of its partition still in the model) is not
committable yet, but it holds no memory: it does not count. Counting it paused a fast worker for half
a second at a time while its model sat idle (measured with a near-free model: two such pauses in a
5 s run, the loop waiting for records 31 % of the time).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class InFlightBudget:
    max_records: int
    max_bytes: int

    def spent(self, records: int, size: int) -> bool:
        return records >= self.max_records or size >= self.max_bytes

    def refilled(self, records: int, size: int) -> bool:
        return records < self.max_records // 2 and size < self.max_bytes // 2
