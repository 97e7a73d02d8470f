"""The stages a request goes through: batching, then prediction (the fan-out to every member,
each with its own queue), then combination (the rule, and the uncertainty measures).

``service`` ties them together for the endpoints; ``request`` reads a request's inputs and
writes its answer; ``rules`` are the combination rules, which a user may add to. The stages
may import the Triton side and the combiner's top-level modules, and read client shared
memory through ``combiner.endpoints.client_shm``; nothing else of the endpoints.
"""
