"""Error vocabulary shared by the generation side and the model store.

Pure Python on purpose: the HTTP process (``serve/``) maps these to status
codes, and the worker process ships them across the process boundary as plain
``(kind, message, field)`` triples, so nothing here may import torch.
"""

from __future__ import annotations


class SDError(Exception):
    """Base class: every error we raise on purpose, with a user-facing message."""

    kind = "internal"

    def __init__(self, message: str, *, field: str | None = None):
        super().__init__(message)
        self.message = message
        self.field = field

    def to_dict(self) -> dict:
        return {"kind": self.kind, "message": self.message, "field": self.field}


class InvalidParameter(SDError):
    """A request parameter is out of range or not one of the allowed values (HTTP 422)."""

    kind = "invalid"


class ModelNotFound(SDError):
    """A named model does not exist in the store (HTTP 404); the message says where we looked."""

    kind = "not_found"


class ModelRejected(SDError):
    """A model file exists but cannot be used: corrupt, unsafe pickle, unknown architecture (HTTP 422)."""

    kind = "rejected"


class Forbidden(SDError):
    """A model location outside what the settings allow (HTTP 403)."""

    kind = "forbidden"


class InsufficientStorage(SDError):
    """A model does not fit the disk cache even after evicting everything not in use (HTTP 507)."""

    kind = "insufficient_storage"


class SourceUnavailable(SDError):
    """Something the request points at could not be read for a reason not its own: S3 down, throttled (HTTP 502)."""

    kind = "source_unavailable"


class GenerationFailed(SDError):
    """Generation itself failed (HTTP 500): out of memory, NaNs, a cancelled job."""

    kind = "failed"


class Cancelled(GenerationFailed):
    """The job was stopped before it finished (server shutting down)."""

    kind = "cancelled"


KINDS = {cls.kind: cls for cls in (SDError, InvalidParameter, ModelNotFound, ModelRejected, Forbidden, InsufficientStorage,
                                   SourceUnavailable, GenerationFailed, Cancelled)}


def from_dict(data: dict) -> SDError:
    """Rebuild an error shipped across the process boundary by :meth:`SDError.to_dict`."""
    cls = KINDS.get(data.get("kind", "internal"), SDError)
    return cls(data.get("message", "unknown error"), field=data.get("field"))
