"""The pieces of benchmarks/bench_methods.py, one module per job."""
