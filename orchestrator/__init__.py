"""Chorus's control plane: read the ensemble, see the hardware, plan, render Triton's model
repository, launch Triton and the combiner. It never sits on the request path.

Sub-packages, one per stage of the method: ``planning`` (the ensemble file, the devices, the
profile, the placement and search, the plan: pure and fast), ``measuring`` (profiles and load
on a real Triton) and ``deploying`` (the model repository, the processes, ``chorus up``,
reloads, Kubernetes). ``cli`` is the ``chorus`` command over all three; ``examples`` holds the
ensembles ``chorus example`` writes.
"""
