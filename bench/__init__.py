"""Benchmarks: ratios against a baseline interleaved in the same run; `make bench` prints them."""
