"""ragapi's benchmark against the raw limit of its model and store: ``python -m scripts.bench``
(docs/benchmarks.md says what it measures, how, and what it found)."""
