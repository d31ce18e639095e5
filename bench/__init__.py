"""dspark_ops microbenchmarks: `python -m bench --op sample` (see README)."""
