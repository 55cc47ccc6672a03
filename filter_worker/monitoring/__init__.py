"""What Prometheus and the orchestrator read from a running service, on one HTTP port.

Every metric a service exports (``metrics.py``), and liveness, readiness and the endpoint that serves
them next to ``/metrics`` (``health.py``). The loops and stages write here and never read back.
Logging is not here: every layer logs, the pipeline included (``logs.py``, at the root), while the
metrics name the pipeline's dead-letter classes and score edges, so they stand above it.
"""
