"""The combiner's side facing Triton: the gRPC channels and calls to each node (``upstream``),
which node runs which member (``nodes``), each node's health (``watch``) and the shared-memory
pool a request's input is written to once (``shm``). It imports nothing of the endpoints or the
stages.
"""
