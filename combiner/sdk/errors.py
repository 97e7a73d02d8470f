"""The SDK's errors: one small tree, translated from gRPC's status codes at the client's edge.

::

    EnsembleError
    ├── InvalidRequest      the request was refused (INVALID_ARGUMENT); the message says why
    ├── ModelNotFound       no such ensemble on this endpoint (NOT_FOUND)
    ├── DeadlineExceeded    no answer in time (DEADLINE_EXCEEDED)
    ├── Unavailable         the endpoint or a member cannot be reached (UNAVAILABLE)
    ├── Unauthenticated     no token, or not the endpoint's (UNAUTHENTICATED)
    └── ServerError         anything else the server reported (INTERNAL, ...)
"""

from __future__ import annotations

from tritonclient.utils import InferenceServerException

__all__ = [
    "DeadlineExceeded",
    "EnsembleError",
    "InvalidRequest",
    "ModelNotFound",
    "ServerError",
    "Unauthenticated",
    "Unavailable",
    "translate",
]


class EnsembleError(Exception):
    """Base of every error the client raises; ``code`` is the gRPC status code's name."""

    code = ""

    def __init__(self, message: str, code: str = "") -> None:
        super().__init__(message)
        self.code = code or type(self).code


class InvalidRequest(EnsembleError):
    code = "INVALID_ARGUMENT"


class ModelNotFound(EnsembleError):
    code = "NOT_FOUND"


class DeadlineExceeded(EnsembleError):
    code = "DEADLINE_EXCEEDED"


class Unavailable(EnsembleError):
    code = "UNAVAILABLE"


class Unauthenticated(EnsembleError):
    code = "UNAUTHENTICATED"


class ServerError(EnsembleError):
    code = "INTERNAL"


_BY_CODE: dict[str, type[EnsembleError]] = {
    cls.code: cls
    for cls in (InvalidRequest, ModelNotFound, DeadlineExceeded, Unavailable, Unauthenticated)
}


def translate(e: InferenceServerException) -> EnsembleError:
    """The most specific error of the tree for tritonclient's ``e`` (raise it ``from e``)."""
    status = (e.status() or "").removeprefix("StatusCode.")
    cls = _BY_CODE.get(status, ServerError)
    return cls(e.message() or str(e), status)
