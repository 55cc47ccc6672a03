"""filter-worker: a streaming spam/abuse filter for Kafka, classifying with a transformers model."""

__version__ = "0.1.0"
