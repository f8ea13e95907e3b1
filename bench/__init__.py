"""Benchmarks (not tests): memofill side by side with the raw floor and its peers.

Run ``python -m bench`` from the repository root; see ``bench/README.md``.
"""
