"""The moderation numbers: reviewers' verdicts, feedback windows and service, drift, statistics."""
