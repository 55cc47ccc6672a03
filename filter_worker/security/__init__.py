"""Secrets and TLS files, handled where the settings are read, with the standard library alone.

The known secrets masked out of everything the process writes (``redaction.py``), and start-up
checks of the TLS files a Kafka client will load (``tls.py``). ``config.py`` registers the secrets
and checks the TLS files as it loads the settings, so both stand below it and import nothing of the
project.
"""
