"""The moderation numbers: reviewers' verdicts, feedback windows, drift, statistics, decisions observed."""
