"""Load-test harness and micro/macro benchmarks."""
