"""Measuring: what planning needs to know and cannot compute, taken from a real Triton and a
real combiner.

Owns the profile (``measure``: ``chorus profile`` from end to end), each member's memory and
latency at each batch size (``member_curves``), the host's costs per request through the
combiner, with the serving policy set aside (``host_costs``), the CPU and memory of process
trees (``process_usage``), the progress shown meanwhile (``progress``), the load that benchmarks
and profiles drive (``bench``), and tuning a plan against measured throughput (``tune``). It may
import planning (the spec and the plan it measures) and deploying (it starts what it measures).
"""
