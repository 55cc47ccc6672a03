"""Everything a worker image does not need: benchmark, demo, embedded broker, samples, evaluation."""
