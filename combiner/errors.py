"""The one error the combiner's endpoints answer with: a refusal or failure and its status."""

from __future__ import annotations

import grpc

__all__ = ["RequestError"]


class RequestError(Exception):
    """A request the endpoint refuses or could not serve; carries the gRPC status to answer
    with (the HTTP endpoint maps it to an HTTP status)."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        self.code = code
        super().__init__(message)
