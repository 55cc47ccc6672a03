"""The two long-running services and the shell they run in, above everything they wire together.

The worker (``run``: its Kafka loop, ``worker.py``, and the classify stage that loop turns,
``classify.py``) and the feedback service (``feedback``, ``feedback.py``) each run their own loop
inside the service shell (``shell.py``): the HTTP endpoint, waiting for Kafka, client errors, and stop
and reload requests, from signals (``signals.py``) and from the ``--config`` file's watcher
(``config_watcher.py``). This is the process's lifecycle; the layers below never import it. This file
imports nothing, so the entry point takes SIGHUP (``signals.py``) before any slow import.
"""
