"""Benchmarks of the server against its ceilings (``python -m bench``)."""
