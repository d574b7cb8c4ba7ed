"""Benchmarks behind `pdcluster bench ...`; each prints a table and writes JSON."""
