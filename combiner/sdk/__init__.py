"""Python SDK for a Chorus ensemble endpoint (any KServe v2 gRPC client works too).

    import numpy as np
    from combiner.sdk import EnsembleClient

    images = np.zeros((16, 1, 8, 8), np.float32)  # (batch, *input shape), the input's dtype
    with EnsembleClient("127.0.0.1:8100") as client:
        probabilities = client.predict(images)  # (batch, *output shape): here (16, 10) float32
        answer = client.infer(images, deadline_ms=50)  # an Answer: outputs, contributors, missing

``AsyncEnsembleClient`` is the asyncio twin. Needs only numpy and ``tritonclient[grpc]``.

On the combiner's host, ``shared_memory=True`` puts each call's input and output in a system
shared-memory region of the client's (one per call in flight, reused, unlinked on ``close``)
instead of in the request and response (the endpoint must allow it: ``chorus up
--allow-client-shm``). Its registrations belong to a session of this client's (a random secret
sent as the ``chorus-shm-session`` header); when the endpoint no longer knows a region (a
restarted or reloaded worker, another worker after a reconnect) the client registers it again
and repeats the call (three tries in all). A region whose call did not end in an answer (a
timeout, a cancellation) is never reused: the server may still write into it, so it is
unregistered and unlinked. Regions have random names and are never opened if they exist (a pid
is no identity across PID namespaces sharing /dev/shm). ``token=`` sends the endpoint's bearer
token; ``tls=True`` speaks TLS, trusting the system's authorities or ``root_certificates`` (a
PEM file).

Errors are one small tree, translated from gRPC's at this edge::

    EnsembleError
    ├── InvalidRequest      the request was refused (INVALID_ARGUMENT); the message says why
    ├── ModelNotFound       no such ensemble on this endpoint (NOT_FOUND)
    ├── DeadlineExceeded    no answer in time (DEADLINE_EXCEEDED)
    ├── Unavailable         the endpoint or a member cannot be reached (UNAVAILABLE)
    ├── Unauthenticated     no token, or not the endpoint's (UNAUTHENTICATED)
    └── ServerError         anything else the server reported (INTERNAL, ...)

Inside: ``core`` (the client without I/O: requests, answers, regions, retries, as steps),
``sync`` and ``aio`` (the two shells making its calls), ``tensors``, ``regions``, ``answer``,
``errors``, and ``protocol`` (the names the endpoint spells alike).
"""

from combiner.sdk.aio import AsyncEnsembleClient
from combiner.sdk.answer import Answer, Inputs, Outputs
from combiner.sdk.errors import (
    DeadlineExceeded,
    EnsembleError,
    InvalidRequest,
    ModelNotFound,
    ServerError,
    Unauthenticated,
    Unavailable,
)
from combiner.sdk.sync import EnsembleClient

__all__ = [
    "Answer",
    "AsyncEnsembleClient",
    "DeadlineExceeded",
    "EnsembleClient",
    "EnsembleError",
    "Inputs",
    "InvalidRequest",
    "ModelNotFound",
    "Outputs",
    "ServerError",
    "Unauthenticated",
    "Unavailable",
]
