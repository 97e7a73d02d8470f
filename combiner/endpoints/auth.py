"""Who may use the endpoint: an optional bearer token, and TLS, shared by gRPC and HTTP.

With a token (``--token-file``), every call but the health checks (live, ready: what load
balancers and Kubernetes probes ask, and what they may ask without a secret) must carry
``authorization: Bearer <token>``; others get UNAUTHENTICATED (HTTP 401). With a certificate
and key (``--tls-cert``, ``--tls-key``), both endpoints speak TLS.
"""

from __future__ import annotations

import hmac
import ssl
from dataclasses import dataclass
from pathlib import Path

import grpc

__all__ = ["HEALTH_METHODS", "Credentials"]

# gRPC methods and HTTP paths that need no token
HEALTH_METHODS = frozenset({"ServerLive", "ServerReady", "ModelReady"})


@dataclass(frozen=True)
class Credentials:
    token: str | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None

    @classmethod
    def load(
        cls,
        token_file: Path | None = None,
        tls_cert: Path | None = None,
        tls_key: Path | None = None,
    ) -> Credentials:
        """Check the files; a token file holds the token on its first line."""
        if (tls_cert is None) != (tls_key is None):
            raise ValueError("TLS needs both a certificate (--tls-cert) and a key (--tls-key)")
        for path in (tls_cert, tls_key):
            if path is not None and not path.is_file():
                raise ValueError(f"no such file: {path}")
        token = None
        if token_file is not None:
            lines = token_file.read_text().splitlines()
            token = lines[0].strip() if lines else ""
            if not token:
                raise ValueError(f"token file {token_file} is empty")
        return cls(token, tls_cert, tls_key)

    def allows(self, authorization: str | None) -> bool:
        """Whether an ``authorization`` header value opens the endpoint."""
        if self.token is None:
            return True
        scheme, _, given = (authorization or "").partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(
            given.strip().encode(), self.token.encode()
        )

    @property
    def tls(self) -> bool:
        return self.tls_cert is not None

    def grpc_credentials(self) -> grpc.ServerCredentials | None:
        if self.tls_cert is None or self.tls_key is None:
            return None
        return grpc.ssl_server_credentials(
            [(self.tls_key.read_bytes(), self.tls_cert.read_bytes())]
        )

    def ssl_context(self) -> ssl.SSLContext | None:
        if self.tls_cert is None or self.tls_key is None:
            return None
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(self.tls_cert, self.tls_key)
        return context
