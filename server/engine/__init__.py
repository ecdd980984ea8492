"""Continuous-batching engine: scheduler, KV slots, sampling, incremental detokenization."""
