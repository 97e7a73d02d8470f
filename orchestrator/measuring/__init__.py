"""Measuring: what planning needs to know and cannot compute, taken from a real Triton and a
real combiner.

Owns the profile runs (``measure``: each member's memory and latency at each batch size, and
the host's costs per request), the load that benchmarks and profiles drive (``bench``), and
tuning a plan against measured throughput (``tune``). It may import planning (the spec and the
plan it measures) and deploying (it starts what it measures).
"""
