"""Benchmarks: the paper's tables, runtime latency, training speed and preset tuning; results under runs/bench/."""
