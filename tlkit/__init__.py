"""tlkit: run, track and compare transfer-learning experiments as an MLflow Project."""

from tlkit import allocator

__version__ = "0.1.0"

# Before anything allocates a batch: peak memory then stays flat as the data grows (allocator.py).
allocator.fix_mmap_threshold()
