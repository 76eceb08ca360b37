"""Foundations: run configuration and its hash, cache entries on disk, progress bars, threads, the
pinned numerics of the machine, memory sampling and the console. Imports nothing else of the project."""
