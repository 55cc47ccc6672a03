"""``filter-worker bench``: how close the worker gets to the model's own speed, on one set of texts.

The forward pass is the ceiling; everything else (Kafka I/O, decoding, tokenization, routing,
publishing, commits) has to hide behind it. One run measures, on the same texts:

1. **model only** (the ceiling): pre-tokenized texts sorted by length, cut into batches of the
   configured size, straight through the forward pass at the configured precision. Also the same
   passes in arrival order on a subset, to show what batching without length awareness costs.
2. **end to end**: the real worker against a real broker (embedded Tansu, or ``--bootstrap-servers``)
   with every record already in the input topic; timed from the first record consumed to every
   output acknowledged and every offset committed (the consumer-group join is not counted). Run in
   ``--rounds`` rounds, each between two ceiling measurements, and the median round is reported:
   shared machines drift by tens of percent within minutes, and one burst should not decide it.
3. **latency**: a fresh worker fed at a steady ``--rate`` (default half the end-to-end throughput);
   record timestamp to publish acknowledgement, p50/p95/p99.
4. **naive baseline**: what a user's first loop does (consume one record, run a transformers
   ``pipeline`` on its text, produce, wait for the acknowledgement, commit), float32, on a subset.
5. **variants**: each other backend and precision against eager PyTorch float32 on the same texts:
   how often the routed action (and the top label) changes, the largest probability difference, and
   model-only speed, measured in interleaved rounds and reported as the median ratio.

When the worker misses its end-to-end target, the bench checks whether the model could have set the
pace at all: it runs the worker without a forward pass on the same broker, and if that is below the
target fraction of this model's ceiling, the broker and the per-record costs set the pace and the
target is reported as not judged instead of missed.

``--plumbing`` measures only that: the worker with a micro model, and without a forward pass,
against a minimal correct at-least-once loop written directly on confluent-kafka (with and without
the model's tokenizer over each fetched batch), on the same broker and records, as ratios.

The texts are ``samples.message_mix`` (deterministic for ``--seed``) or one per line of ``--file``.
Every option is checked before the first phase: a run that cannot work stops at once (exit 2).
"""

from __future__ import annotations

from filter_worker.tools.bench.options import BenchOptions
from filter_worker.tools.bench.run import run_bench

__all__ = ["BenchOptions", "run_bench"]
