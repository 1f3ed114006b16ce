"""What the client raises."""

from __future__ import annotations

import grpc


class DistilleryError(Exception):
    """Base class of the client's errors."""


class RpcError(DistilleryError):
    """The coordinator refused or failed a call; ``code`` is the gRPC status code (e.g.
    ``grpc.StatusCode.UNAUTHENTICATED`` for a missing or unknown token, ``INVALID_ARGUMENT`` for
    a spec the coordinator's validation refused, ``NOT_FOUND`` for an unknown campaign)."""

    def __init__(self, what: str, code: grpc.StatusCode, details: str) -> None:
        self.what = what
        self.code = code
        self.details = details
        super().__init__(f"{what}: {code.name}: {details}")

    @classmethod
    def wrap(cls, what: str, e: grpc.RpcError) -> RpcError:
        code = e.code() if isinstance(e, grpc.Call) else grpc.StatusCode.UNKNOWN
        details = (e.details() if isinstance(e, grpc.Call) else None) or str(e)
        return cls(what, code, details)


class ArtifactError(DistilleryError):
    """A download failed its checks: bad digest, digest mismatch, or an unsafe manifest path."""
