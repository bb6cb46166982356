"""Benchmarks and long runs of s3cachefs (see README.md in this folder).

Each script runs as a module from the repository root, e.g. `python -m bench.compare --help`, so that it
imports the package and the test harness (`tests.harness`) of this checkout as ordinary packages.
"""
