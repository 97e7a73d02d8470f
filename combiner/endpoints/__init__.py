"""The combiner's endpoints: what clients talk to.

Owns the KServe v2 gRPC servicer and ``serve`` (``server``), HTTP/REST (``http``, with bodies
bounded before they are inflated: ``body``), the token and TLS (``auth``), the client shared
memory a co-located client registers (``client_shm``) and the bounds on what clients may hold
open (``connections``). It turns requests into calls on the stages and answers into protocol
messages; it may import the stages, the Triton side and the combiner's top-level modules.
"""
