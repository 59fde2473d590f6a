"""The benchmark suite: `python -m bench.<name>` from the repository root (bench/README.md)."""
