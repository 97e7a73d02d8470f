"""Planning: from an ensemble, a hardware description and a profile, the plan (which member
runs where, how many instances, which batch size) and its predicted throughput.

Owns the ensemble file (``spec``), the devices (``hardware``), the profile file (``profile``),
the worst-fit placement and greedy search (``allocate``), the plan file (``plan``) and its
picture (``picture``). Pure and fast: it may import only itself, ``orchestrator.errors`` and
the combiner's public surface (to check a rule's name); never measuring or deploying
(an import contract, checked by ``lint-imports``).
"""
