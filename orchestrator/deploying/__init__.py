"""Deploying: a plan made real.

Owns the model repository Triton reads (``render``), the processes and their supervision
(``launch``: Triton, the combiner, ports, keys), ``chorus up`` (``up``), changing a running
deployment and serving one node (``deploy``), and the Kubernetes manifests (``kubernetes``).
It may import planning (the plan is its input); never measuring.
"""
