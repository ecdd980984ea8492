"""`loramux bench cluster-sim` loads bench/<name>_bench.py: this is bench/cluster_sim.py under that name."""

from bench.cluster_sim import add_arguments, main

__all__ = ["add_arguments", "main"]
