"""Benchmark suite of the service: HTTP, freshness, worker throughput and memory.

Run it with `bench/run`; docs/benchmarks.md explains the parts and how to read the table.
"""
