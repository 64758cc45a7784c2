#!/usr/bin/env python
"""`quadit bench-cpu-time` as a script: the same parser and code (`engines.cli.bench_cpu_time`)."""
from engines.cli import bench_cpu_time
from engines.cli.common import run

if __name__ == "__main__":
    run(bench_cpu_time.main)
